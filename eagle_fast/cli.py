"""Command lines built from config dataclasses: the one way every `python -m eagle_fast.<tool>` reads
its flags.

    parser = ConfigParser("python -m eagle_fast.eval", __doc__)
    parser.add_config(EvalConfig)
    cfg = EvalConfig(**parser.parse_given(argv))

Each dataclass field is a flag of the same name (`--max_new_tokens`; `--max-new-tokens` is an alias);
its type gives the conversion: bool (`--flag`, `--flag true|false`, `--no_flag`), int, float, str,
`X | None` ("none" gives None), tuples and lists (space-separated values; a repeated flag adds),
`Literal[...]` (choices), dict (JSON). `field(metadata={"help": ..., "parse": fn, "choices": ...})`
adds help, a custom parser for one value, or choices. Flags are never abbreviated (`--temp` is not
`--temperature`); an unknown flag is an error that names close matches. `parse_given` returns only
the flags given, so a caller layering values (a recipe, a config file) never has them reset to the
dataclass defaults. Flags of other tools that mean nothing here (the original LLaVA scripts') can be
declared `Ignored`: accepted, with one notice line each.

This module imports only the standard library: `--help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class Ignored:
    """A flag accepted for compatibility that changes nothing here. `allowed`: the values that mean
    the same as our behaviour (lower-case); any other value is refused, since accepting it would
    silently do something else than asked. None: every value is harmless."""

    reason: str
    allowed: tuple[str, ...] | None = None


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(hint)):
            return args[0], True
    return hint, False


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def _scalar(hint: Any) -> tuple[Callable[[str], Any], tuple | None]:
    """(converter of one token, choices or None) for a scalar type hint."""
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        kind = type(choices[0])
        return (parse_bool if kind is bool else kind), choices
    if hint is bool:
        return parse_bool, None
    if hint in (int, float, str):
        return hint, None
    if hint is dict or typing.get_origin(hint) is dict:
        return json.loads, None
    if hint is Any:
        return str, None
    raise TypeError(f"no command-line conversion for type {hint!r}")


class ConfigParser(argparse.ArgumentParser):
    """An ArgumentParser that never abbreviates, suggests close matches for unknown flags, takes
    declared `Ignored` flags with a notice, and adds dataclass fields as flags (`add_config`)."""

    def __init__(
        self,
        prog: str | None = None,
        description: str | None = None,
        *,
        ignored: dict[str, Ignored] | None = None,
        **kw: Any,
    ):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kw["allow_abbrev"] = False
        super().__init__(prog=prog, description=description, **kw)
        self.ignored = dict(ignored or {})
        self._sequence_dests: set[str] = set()

    # ------------------------------------------------------------------ building

    def add_config(
        self,
        cls: type,
        *,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        choices: dict[str, Sequence[Any]] | None = None,
        group: str | None = None,
    ) -> None:
        """Every field of dataclass `cls` (or only `include`, minus `exclude`) as a flag; `choices`
        restricts fields by name (e.g. names only known at run time)."""
        hints = typing.get_type_hints(cls)
        wanted = None if include is None else set(include)
        target = self.add_argument_group(group) if group else self
        for f in dataclasses.fields(cls):
            if (wanted is not None and f.name not in wanted) or f.name in exclude or not f.init:
                continue
            self._add_field(target, f, hints[f.name], (choices or {}).get(f.name))

    def _add_field(self, target, f: dataclasses.Field, hint: Any, choices: Sequence[Any] | None) -> None:
        hint, optional = _unwrap_optional(hint)
        names = ["--" + f.name] + (["--" + f.name.replace("_", "-")] if "_" in f.name else [])
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS)
        origin = typing.get_origin(hint)
        if origin in (tuple, list):
            elem = [a for a in typing.get_args(hint) if a is not Ellipsis][0] if typing.get_args(hint) else str
            convert, found = _scalar(elem) if "parse" not in f.metadata else (f.metadata["parse"], None)
            kw.update(nargs="+", action="extend", type=convert)
            self._sequence_dests.add(f.name)
        elif hint is bool:
            convert, found = parse_bool, None
            kw.update(nargs="?", const=True, type=parse_bool, metavar="true|false")
        else:
            convert, found = _scalar(hint) if "parse" not in f.metadata else (f.metadata["parse"], None)
            kw["type"] = _none_or(convert) if optional else convert
        found = choices if choices is not None else f.metadata.get("choices", found)
        if found is not None:
            kw["choices"] = list(found) + ([None] if optional else [])
            if "metavar" not in kw:
                kw["metavar"] = "{" + ",".join(str(c) for c in found) + "}"
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        )
        help_text = f.metadata.get("help", "")
        if default is dataclasses.MISSING:
            kw["required"] = True
        elif "default" not in help_text:
            shown = " ".join(map(str, default)) if isinstance(default, (tuple, list)) else default
            help_text += f" (default: {shown})" if help_text else f"default: {shown}"
        kw["help"] = help_text.replace("%", "%%")
        target.add_argument(*names, **kw)
        if hint is bool:
            negs = ["--no_" + f.name, "--no-" + f.name.replace("_", "-")]
            target.add_argument(
                *negs, dest=f.name, action="store_const", const=False, default=argparse.SUPPRESS, help=argparse.SUPPRESS
            )

    # ------------------------------------------------------------------ parsing

    def parse_given(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """The flags given on the command line only, as {field: value} (tuples for sequences)."""
        ns = self.parse_args(argv)
        return {
            k: (tuple(v) if k in self._all_sequence_dests() and isinstance(v, list) else v) for k, v in vars(ns).items()
        }

    def convert(self, dest: str, text: str) -> Any:
        """One field's value from text, as its flag would read it (for `--set KEY=VALUE` and the
        like); sequences split on commas. ValueError names the problem."""
        for p in self._parsers():
            for a in p._actions:
                if a.dest != dest or not a.option_strings or a.help is argparse.SUPPRESS:
                    continue
                convert = a.type or str
                try:
                    if dest in p._sequence_dests:
                        value: Any = tuple(convert(x.strip()) for x in text.split(",") if x.strip())
                    else:
                        value = convert(text)
                except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                    raise ValueError(f"{dest}={text!r}: {e}") from None
                if a.choices is not None and not all(
                    v in a.choices for v in (value if isinstance(value, tuple) else (value,))
                ):
                    raise ValueError(f"{dest}={text!r}: one of {[c for c in a.choices if c is not None]}")
                return value
        raise ValueError(f"{dest!r} is not an option of {self.prog}")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:
        ns, rest = self.parse_known_args(args, namespace)
        rest = self._drop_ignored(rest)
        if rest:
            self.error(self._unknown_message(rest))
        return ns

    def _drop_ignored(self, rest: list[str]) -> list[str]:
        """Removes declared Ignored flags (and their value) from the unparsed tokens, one notice
        line each; a value that would mean something else here is an error."""
        ignored = {**self._sub_ignored(), **self.ignored}
        kept, i = [], 0
        while i < len(rest):
            tok = rest[i]
            name, eq, value = tok[2:].partition("=") if tok.startswith("--") else ("", "", "")
            rule = ignored.get(name.replace("-", "_"))
            if rule is None:
                kept.append(tok)
                i += 1
                continue
            if not eq and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                value, i = rest[i + 1], i + 1
            i += 1
            if rule.allowed is not None and value.lower() not in rule.allowed:
                self.error(f"--{name} {value}: not supported here ({rule.reason}); accepted: {', '.join(rule.allowed)}")
            print(f"{self.prog}: ignoring --{name}{' ' + value if value else ''}: {rule.reason}", file=sys.stderr)
        return kept

    def _parsers(self) -> list[argparse.ArgumentParser]:
        out: list[argparse.ArgumentParser] = [self]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in dict.fromkeys(action.choices.values()):
                    out += sub._parsers() if isinstance(sub, ConfigParser) else [sub]
        return out

    def _sub_ignored(self) -> dict[str, Ignored]:
        return {k: v for p in self._parsers()[1:] for k, v in getattr(p, "ignored", {}).items()}

    def _all_sequence_dests(self) -> set[str]:
        return set().union(*(getattr(p, "_sequence_dests", set()) for p in self._parsers()))

    def _unknown_message(self, rest: list[str]) -> str:
        primary = {
            s: a.option_strings[-1] if a.option_strings[0] in ("-h",) else a.option_strings[0]
            for p in self._parsers()
            for a in p._actions
            for s in a.option_strings
            if a.help is not argparse.SUPPRESS
        }  # every spelling -> the one shown
        options = sorted(primary)
        parts, after_flag = [], False
        for tok in rest:
            if not tok.startswith("--"):
                if not after_flag:  # a value following an unknown flag is that flag's, not news
                    parts.append(f"unexpected argument {tok!r}")
                after_flag = False
                continue
            after_flag = "=" not in tok
            flag = tok.partition("=")[0]
            # a flag cut short (what abbreviation would have guessed) first, then near-misspellings
            close = list(
                dict.fromkeys(
                    primary[o]
                    for o in [o for o in options if o.startswith(flag)]
                    + difflib.get_close_matches(flag, options, n=3, cutoff=0.75)
                )
            )[:3]
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            parts.append(f"unknown flag {flag}{hint}")
        return "; ".join(parts)
