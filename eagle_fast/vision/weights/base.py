"""What every native-format converter declares: how to recognise its checkpoints and how each native
key is renamed to the expert's; and the per-expert rules on what may stay unloaded."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass


class ExpertWeightsError(RuntimeError):
    """A native checkpoint that cannot be read, or that does not fill an expert as Eagle requires."""


@dataclass(frozen=True)
class Format:
    """One native layout. `detect` sees the checkpoint's key set; `rename` maps one native key to the
    expert key it fills ("vision_tower.<...>"), or None when the key is not used (other towers, heads,
    buffers the expert recomputes)."""

    name: str
    detect: Callable[[Collection[str]], bool]
    rename: Callable[[str], str | None]


@dataclass(frozen=True)
class ExpertRules:
    """formats    the native layouts this expert is loaded from, tried in order;
    never_load    expert key prefixes never filled from a checkpoint, even when names and shapes match
                  (SAM's neck: Eagle replaces the pretrained one by a new, differently-shaped module);
    optional      expert key prefixes of parts Eagle never runs (ConvNeXt's classifier head): they may
                  stay new or have another shape, and native keys under them the expert lacks are unused."""

    formats: tuple[Format, ...]
    never_load: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()


def few(keys: Iterable[str], n: int = 5) -> str:
    """The first n keys and the count, for error messages."""
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown if len(keys) <= n else f"{shown}, ... ({len(keys)} in all)"
