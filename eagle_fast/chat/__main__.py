"""python -m eagle_fast.chat — chat with an Eagle model from the terminal.

    python -m eagle_fast.chat --model runs/t/final --image cat.png --prompt "What is this?"   # one shot
    python -m eagle_fast.chat --model runs/t/final --image cat.png                            # interactive

Interactive commands: /reset (new conversation), /image PATH (attach an image to the next message),
/quit. The answer streams as it is generated.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from eagle_fast.cli import ConfigParser


@dataclass
class ChatCLIConfig:
    model: str = field(metadata={"help": "a model directory, or a preset name (random weights)"})
    image: list[str] = field(default_factory=list, metadata={"help": "image file(s) for the first message"})
    prompt: str | None = field(default=None, metadata={"help": "one-shot: answer this and exit"})
    template: str = field(default="vicuna_v1", metadata={"help": "chat template"})


# the generation settings a user sets from the terminal; their defaults are GenerationConfig's
GENERATION_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def _open_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def main(argv: list[str] | None = None) -> int:
    from eagle_fast.inference.engine import GenerationConfig

    p = ConfigParser("python -m eagle_fast.chat", __doc__)
    p.add_config(ChatCLIConfig)
    p.add_config(GenerationConfig, include=GENERATION_FLAGS, group="generation")
    given = p.parse_given(argv)
    args = ChatCLIConfig(**{k: given.pop(k) for k in list(given) if k not in GENERATION_FLAGS})

    from eagle_fast.inference import ChatSession, load_model

    model, tokenizer, processor = load_model(args.model)
    chat = ChatSession(model, tokenizer, processor, template=args.template, **given)
    pending = [_open_image(f) for f in args.image]

    def answer(text: str) -> None:
        nonlocal pending
        for delta in chat.send(text, images=pending, stream=True):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        pending = []

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if line == "/quit":
            return 0
        if line == "/reset":
            chat.reset()
            print("(new conversation)")
        elif line.startswith("/image "):
            path = line[len("/image ") :].strip()
            try:
                pending.append(_open_image(path))
            except OSError as e:  # a typo in a path must not end the conversation
                print(f"(cannot open {path!r}: {e})")
                continue
            print(f"({len(pending)} image(s) attached to the next message)")
        elif line:
            answer(line)


if __name__ == "__main__":
    sys.exit(main())
