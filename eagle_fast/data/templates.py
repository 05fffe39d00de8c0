"""Conversation templates as data: rendering a conversation into text segments, each marked as
learned (assistant replies and their end-of-turn marker) or not.

Built-in templates render exactly as the original's `Conversation.get_prompt` (NVlabs/EAGLE
`eagle/conversation.py`, a copy of LLaVA's):
  plain      stage-1 captioning: "<image>" + caption + "\\n" (LLaVA's preprocess_plain)
  vicuna_v1  "{system} USER: {q} ASSISTANT: {a}</s>USER: ..." (SeparatorStyle.TWO)
  llama3     header-style turns ending in <|eot_id|> (SeparatorStyle.MPT; the system text carries
             <|begin_of_text|>, so no second BOS is added: the original's double BOS is not reproduced)
  chatml     Yi-34B's "chatml direct": <|im_start|>role\\n ... <|im_end|>, no newline between turns
             (SeparatorStyle.MPT)
  hf         the tokenizer's own chat_template (apply_chat_template), learned spans found by
             rendering growing prefixes of the conversation

An empty message renders as the original renders it, on purpose: SeparatorStyle.TWO writes
"ROLE:" with neither the space nor the separator ("... ASSISTANT:USER: ..."), SeparatorStyle.MPT
writes the role header alone ("<|im_start|>assistant\\n<|im_start|>user\\n..."), and plain writes
"<image>" + "\\n". The label masks of the built-in templates are not read from the segments: they
follow the original's token-count rule (data/tokenize.py); the segments' `learn` flags give the
same answer on ordinary conversations and drive the masks of "hf" only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Segment:
    text: str
    learn: bool


@dataclass(frozen=True)
class Template:
    name: str
    style: str  # "plain" | "two" | "mpt" | "hf"
    system: str = ""
    user: str = ""
    assistant: str = ""
    sep: str = ""
    sep2: str = ""
    stop: str = ""  # what ends a generated reply
    adds_bos: bool = True  # whether the tokenizer's own BOS is added (False when the text holds it)

    def render(
        self, turns: list[tuple[str, str]], tokenizer: Any = None, add_generation_prompt: bool = False
    ) -> list[Segment]:
        """turns: [(role, text)] with role "user" / "assistant", alternating, user first.
        Returns the text as segments; concatenated they are the prompt the model sees."""
        if self.style == "plain":
            segs = []
            for role, text in turns:
                segs.append(Segment(text, learn=False) if role == "user" else Segment(text + self.sep, learn=True))
            return segs
        if self.style == "two":  # SeparatorStyle.TWO
            segs = [Segment(self.system + self.sep, learn=False)]
            for role, text in turns:
                name = self.user if role == "user" else self.assistant
                if not text:  # the original writes "ROLE:" alone: no space, no separator
                    segs.append(Segment(f"{name}:", learn=False))
                elif role == "user":
                    segs.append(Segment(f"{name}: {text}{self.sep}", learn=False))
                else:  # the space after "ASSISTANT:" is learned: generation starts right after the colon
                    segs += [Segment(f"{name}:", learn=False), Segment(f" {text}{self.sep2}", learn=True)]
            if add_generation_prompt:
                segs.append(Segment(f"{self.assistant}:", learn=False))
            return segs
        if self.style == "mpt":  # SeparatorStyle.MPT
            segs = [Segment(self.system + self.sep, learn=False)]
            for role, text in turns:
                header = self.user if role == "user" else self.assistant
                if not text:  # the original writes the role header alone, without the separator
                    segs.append(Segment(header, learn=False))
                elif role == "user":
                    segs.append(Segment(header + text + self.sep, learn=False))
                else:
                    segs += [Segment(header, learn=False), Segment(text + self.sep, learn=True)]
            if add_generation_prompt:
                segs.append(Segment(self.assistant, learn=False))
            return segs
        if self.style == "hf":
            return _render_hf(turns, tokenizer, add_generation_prompt)
        raise ValueError(f"template {self.name!r}: unknown style {self.style!r}")


def _render_hf(turns, tokenizer, add_generation_prompt) -> list[Segment]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'hf' needs a tokenizer with a chat_template")

    def text(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    msgs = [{"role": r, "content": t} for r, t in turns]
    segs, done = [], ""
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        prompt = text(msgs[:i], True)  # everything up to the opening of this reply
        full = text(msgs[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(
                "template 'hf': the tokenizer's chat_template does not render conversations "
                "prefix-consistently; learned spans cannot be located"
            )
        segs += [Segment(prompt[len(done) :], learn=False), Segment(full[len(prompt) :], learn=True)]
        done = full
    rest = text(msgs, add_generation_prompt)
    if not rest.startswith(done):
        raise ValueError("template 'hf': inconsistent rendering of the whole conversation")
    if len(rest) > len(done):
        segs.append(Segment(rest[len(done) :], learn=False))
    return segs


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", "plain", sep="\n", stop="\n"),
    "vicuna_v1": Template(
        "vicuna_v1", "two", system=VICUNA_SYSTEM, user="USER", assistant="ASSISTANT", sep=" ", sep2="</s>", stop="</s>"
    ),
    "llama3": Template(
        "llama3",
        "mpt",
        system="<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + VICUNA_SYSTEM,
        user="<|start_header_id|>user<|end_header_id|>\n\n",
        assistant="<|start_header_id|>assistant<|end_header_id|>\n\n",
        sep="<|eot_id|>",
        stop="<|eot_id|>",
        adds_bos=False,
    ),
    "chatml": Template(
        "chatml",
        "mpt",
        system="<|im_start|>system\nAnswer the questions.",
        user="<|im_start|>user\n",
        assistant="<|im_start|>assistant\n",
        sep="<|im_end|>",
        stop="<|im_end|>",
    ),
    "hf": Template("hf", "hf", adds_bos=False),
}
ALIASES = {"v1": "vicuna_v1", "llava_v1": "vicuna_v1", "yi_34b_chatml_direct": "chatml", "chatml_direct": "chatml"}


def get_template(name: str | Template) -> Template:
    if isinstance(name, Template):
        return name
    key = ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; known: {sorted(TEMPLATES)} (aliases {sorted(ALIASES)})")
    return TEMPLATES[key]
