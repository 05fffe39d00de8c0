"""Native state dict -> the expert's state dict, with Eagle's loading rules enforced."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from eagle_fast.vision.weights import clip, convnext, eva, pix2struct, sam
from eagle_fast.vision.weights.base import ExpertRules, ExpertWeightsError, few

RULES: dict[str, ExpertRules] = {
    "clip-448": clip.RULES,
    "convnext-1024": convnext.RULES,
    "sam-1024": sam.RULES,
    "det-1024": eva.RULES,
    "pix2struct-1024": pix2struct.RULES,
}


def rules_for(name: str) -> ExpertRules:
    if name not in RULES:
        raise ExpertWeightsError(f"no native weight format known for vision expert {name!r}; known: {sorted(RULES)}")
    return RULES[name]


@dataclass
class Conversion:
    """Expert keys fall in exactly one of loaded / new / mismatched; native keys either fill a loaded
    key, are the source of a mismatched one, or are unused."""

    state: dict[str, torch.Tensor]  # loaded keys -> native tensors (not copied, not cast)
    loaded: list[str]  # expert keys filled from the native weights
    new: list[str]  # expert keys left to initialise
    mismatched: list[str]  # expert keys whose native tensor had another shape (heads only)
    unused: list[str]  # native keys not used
    name: str = ""  # the expert
    format: str = ""  # the native layout recognised (e.g. "hf-clip")
    # mismatched key -> (native shape, expert shape)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.loaded)} loaded, {len(self.new)} new, {len(self.mismatched)} mismatched, "
            f"{len(self.unused)} unused"
        )


def _detect(name: str, rules: ExpertRules, keys: set[str]):
    for fmt in rules.formats:
        if fmt.detect(keys):
            return fmt
    raise ExpertWeightsError(
        f"{name}: checkpoint layout not recognised (known: {', '.join(f.name for f in rules.formats)}); "
        f"its keys begin: {few(sorted(keys))}"
    )


def convert(name: str, native: dict[str, torch.Tensor], expert: torch.nn.Module) -> Conversion:
    """Maps the native keys of expert `name` to `expert`'s state-dict keys, using only the expert's
    names and shapes (it may be on the meta device), and enforces: every expert tensor is loaded with
    its own shape, except the never-loaded (SAM's neck: always new) and optional (ConvNeXt's head: new
    or mismatched allowed) parts; native tensors that the format places in the expert's network but
    the expert lacks (a deeper or differently built checkpoint) are an error too."""
    rules = rules_for(name)
    fmt = _detect(name, rules, set(native))
    expected = {k: tuple(v.shape) for k, v in expert.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    unused: list[str] = []
    stray: list[str] = []
    source: dict[str, str] = {}  # expert key -> native key
    for key, tensor in native.items():
        target = fmt.rename(key)
        if target is None or target.startswith(rules.never_load):
            unused.append(key)
            continue
        if target in source:
            raise ExpertWeightsError(f"{name}: native keys {source[target]} and {key} both map to {target}")
        source[target] = key
        if target not in expected:
            (unused if target.startswith(rules.optional) else stray).append(key)
        elif tuple(tensor.shape) != expected[target]:
            shapes[target] = (tuple(tensor.shape), expected[target])
        else:
            state[target] = tensor
    loaded = [k for k in expected if k in state]
    mismatched = [k for k in expected if k in shapes]
    new = [k for k in expected if k not in state and k not in shapes]

    problems = []
    bad_shape = [k for k in mismatched if not k.startswith(rules.optional)]
    if bad_shape:
        problems.append(
            f"{len(bad_shape)} tensor(s) of another shape: "
            + few(f"{k} (checkpoint {list(shapes[k][0])}, expert {list(shapes[k][1])})" for k in bad_shape)
        )
    missing = [k for k in new if not k.startswith(rules.never_load + rules.optional)]
    if missing:
        problems.append(f"{len(missing)} expert tensor(s) missing from the checkpoint: {few(missing)}")
    if stray:
        problems.append(
            f"{len(stray)} checkpoint tensor(s) with no place in the expert (does the expert "
            f"config match the checkpoint?): {few(stray)}"
        )
    if problems:
        raise ExpertWeightsError(f"{name} ({fmt.name} checkpoint): " + "; ".join(problems))
    return Conversion(
        state=state,
        loaded=loaded,
        new=new,
        mismatched=mismatched,
        unused=unused,
        name=name,
        format=fmt.name,
        shapes={k: shapes[k] for k in mismatched},
    )
