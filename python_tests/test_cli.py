"""The command-line helper every tool is built on: flags from dataclass fields, no abbreviations,
unknown flags refused with suggestions, declared compatibility flags taken with a notice, only the
given flags returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from eagle_fast.cli import ConfigParser, Ignored


@dataclass
class Opts:
    model: str = field(metadata={"help": "a checkpoint"})
    temperature: float = 0.2
    max_new_tokens: int = 16
    greedy: bool = False
    stop_words: tuple[str, ...] = ()
    images: list[str] = field(default_factory=list)
    seed: int | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"


def _parser(**kw) -> ConfigParser:
    p = ConfigParser("prog", **kw)
    p.add_config(Opts)
    return p


def test_fields_become_flags_with_types_and_only_given_ones_are_returned():
    got = _parser().parse_given(
        [
            "--model",
            "m",
            "--max-new-tokens",
            "5",
            "--greedy",
            "--stop_words",
            "a",
            "b",
            "--images",
            "x.png",
            "--images",
            "y.png",
            "--seed",
            "none",
        ]
    )
    assert got == {
        "model": "m",
        "max_new_tokens": 5,
        "greedy": True,
        "stop_words": ("a", "b"),
        "images": ("x.png", "y.png"),
        "seed": None,
    }
    assert Opts(**got).temperature == 0.2  # not given: the dataclass default, never a parser copy of it
    assert _parser().parse_given(["--model", "m", "--greedy", "false"])["greedy"] is False
    assert _parser().parse_given(["--model", "m", "--no-greedy"])["greedy"] is False
    assert _parser().parse_given(["--model", "m", "--dtype", "bfloat16"])["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m", "--temp", "0"], "unknown flag --temp (did you mean --temperature?)"),
        (["--model", "m", "--max_new_token=3"], "did you mean --max_new_tokens"),
        (["--model", "m", "--nothing-like-it", "1"], "unknown flag --nothing-like-it"),
        (["--model", "m", "--dtype", "float64"], "invalid choice"),
        (["--model", "m", "--greedy", "maybe"], "expected true or false"),
        (["--temperature", "0"], "required: --model"),
    ],
)
def test_abbreviations_unknown_flags_and_bad_values_are_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_given(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    if "unknown flag --temp" in message:
        assert "'0'" not in err  # the value of an unknown flag is not reported as a second problem


def test_ignored_flags_are_accepted_with_one_notice_each_and_harmful_values_refused(capsys):
    p = _parser(
        ignored={"report_to": Ignored("metrics go to a file"), "mm_use_im_start_end": Ignored("not used", ("false",))}
    )
    got = p.parse_given(["--model", "m", "--report_to", "wandb", "--mm-use-im-start-end=False", "--seed", "3"])
    assert got == {"model": "m", "seed": 3}
    err = capsys.readouterr().err
    assert err.count("ignoring") == 2 and "--report_to wandb: metrics go to a file" in err
    with pytest.raises(SystemExit):
        p.parse_given(["--model", "m", "--mm_use_im_start_end", "True"])
    assert "not supported here (not used)" in capsys.readouterr().err


def test_convert_reads_one_value_as_its_flag_would():
    p = _parser()
    assert p.convert("greedy", "yes") is True and p.convert("stop_words", "a, b") == ("a", "b")
    assert p.convert("seed", "None") is None and p.convert("temperature", "0.5") == 0.5
    with pytest.raises(ValueError, match="temperature"):
        p.convert("temperature", "hot")
    with pytest.raises(ValueError, match="not an option"):
        p.convert("no_such_field", "1")


def test_subcommands_share_the_rules(capsys):
    p = ConfigParser("prog")
    sub = p.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("one")
    one.add_config(Opts, include=("temperature", "seed"))
    assert p.parse_given(["one", "--temperature", "1"]) == {"cmd": "one", "temperature": 1.0}
    with pytest.raises(SystemExit):
        p.parse_given(["one", "--temperatur", "1"])
    assert "did you mean --temperature" in capsys.readouterr().err


TOOLS = {  # module: (a flag of its own spelled with dashes, a near-miss of that flag)
    "eagle_fast.train.__main__": ("--max-steps", "--max_step"),
    "eagle_fast.eval.__main__": ("--image-folder", "--image_foldr"),
    "eagle_fast.serve.__main__": ("--max-image-pixels", "--max_image_pixel"),
    "eagle_fast.chat.__main__": ("--max-new-tokens", "--temp"),
    "eagle_fast.demo": ("--eval-limit", "--eval_limt"),
    "eagle_fast.bench.__main__": ("train", "--thread"),
    "eagle_fast.model.presets": ("eagle-tiny-x5", "--tiny"),
}


@pytest.mark.parametrize("module", TOOLS)
def test_every_tool_has_help_and_refuses_unknown_flags(module, capsys):
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    known, near_miss = TOOLS[module]
    assert known.replace("-", "_") in capsys.readouterr().out.replace("-", "_")
    argv = (
        ["train", near_miss]
        if module.startswith("eagle_fast.bench")
        else ["--model", "m", "--task", "gqa", near_miss, "1"]
        if module.startswith("eagle_fast.eval")
        else ["--model", "m", near_miss, "1"]
    )
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert f"unknown flag {near_miss}" in capsys.readouterr().err
