"""python -m eagle_fast.chat — chat with an Eagle model from the terminal.

    python -m eagle_fast.chat --model runs/t/final --image cat.png --prompt "What is this?"   # one shot
    python -m eagle_fast.chat --model runs/t/final --image cat.png                            # interactive

Interactive commands: /reset (new conversation), /image PATH (attach an image to the next message),
/quit. The answer streams as it is generated.
"""

from __future__ import annotations

import argparse
import sys


def _open_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eagle_fast.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory, or a preset name (random weights)")
    p.add_argument("--image", action="append", default=[], help="image file(s) for the first message")
    p.add_argument("--prompt", default=None, help="one-shot: answer this and exit")
    p.add_argument("--template", default="vicuna_v1")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)

    from eagle_fast.inference import ChatSession, load_model

    model, tokenizer, processor = load_model(args.model)
    chat = ChatSession(model, tokenizer, processor, template=args.template, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed)
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
            path = line[len("/image "):].strip()
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
