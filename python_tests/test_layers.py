"""The layers import one way: each imported alone, in a fresh interpreter, loads nothing above it
(ops: no model, data, vision, inference or train; data: no model, vision, inference or train;
vision: no data, model, inference or train; inference: no train). `import eagle_fast` registers
"eagle_llama" with transformers' Auto classes without importing the model."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = ("eagle_fast.model.eagle", "eagle_fast.model.splice", "eagle_fast.model.projector")
HIGHER = {
    "eagle_fast.ops": (
        "eagle_fast.data",
        "eagle_fast.vision",
        "eagle_fast.inference",
        "eagle_fast.train",
        "eagle_fast.serve",
        "eagle_fast.eval",
        *MODEL,
    ),
    "eagle_fast.data": (
        "eagle_fast.vision",
        "eagle_fast.inference",
        "eagle_fast.train",
        "eagle_fast.serve",
        "eagle_fast.eval",
        *MODEL,
    ),
    "eagle_fast.vision.processor": (
        "eagle_fast.data",
        "eagle_fast.inference",
        "eagle_fast.train",
        "eagle_fast.serve",
        "eagle_fast.eval",
        *MODEL,
    ),
    "eagle_fast.vision.mixture": (
        "eagle_fast.data",
        "eagle_fast.inference",
        "eagle_fast.train",
        "eagle_fast.serve",
        "eagle_fast.eval",
        *MODEL,
    ),
    "eagle_fast.inference": ("eagle_fast.train", "eagle_fast.serve", "eagle_fast.eval"),
}


def _loaded(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layer", sorted(HIGHER))
def test_a_layer_imported_alone_loads_nothing_above_it(layer):
    loaded = _loaded(f"import {layer}")
    above = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HIGHER[layer])]
    assert layer in loaded and not above, above


def test_importing_eagle_fast_registers_the_model_without_importing_it(tmp_path):
    loaded = _loaded(
        "import eagle_fast\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        "assert AutoConfig.for_model('eagle_llama').model_type == 'eagle_llama'"
    )
    assert "eagle_fast.model.eagle" not in loaded and "eagle_fast.inference" not in loaded
    # and the Auto classes build the real model from an Eagle config or checkpoint
    code = (
        "import eagle_fast, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from eagle_fast.model.config import EagleLlamaConfig\n"
        "from eagle_fast.model.presets import get\n"
        "m = AutoModelForCausalLM.from_config(get('eagle-tiny-x5'))\n"
        f"m.save_pretrained({str(tmp_path)!r})\n"
        f"n = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "print(type(m).__name__, type(n).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["EagleLlamaForCausalLM", "EagleLlamaForCausalLM"]


def test_the_top_level_names_still_resolve():
    import eagle_fast

    assert eagle_fast.load_model.__module__ == "eagle_fast.inference.loading"
    assert eagle_fast.ChatSession.__name__ == "ChatSession" and eagle_fast.EagleImageProcessor.__name__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        eagle_fast.nope  # noqa: B018
