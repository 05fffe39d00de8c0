#!/usr/bin/env bash
# Install the built wheel into a fresh venv that reuses the dev venv's torch & deps (a .pth line),
# then check from outside the source tree that the compiled kernels load and match the reference.
set -euo pipefail
PY=$1; DIST=$2
WHEEL=$(ls "$DIST"/eagle_fast-*.whl)
SMOKE=$(mktemp -d)/venv
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -m venv "$SMOKE"
SMOKE_SITE=$("$SMOKE/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SITE" > "$SMOKE_SITE/_dev_deps.pth"
"$SMOKE/bin/python" -m pip install -q --no-deps --no-index "$WHEEL"
cd "$(dirname "$SMOKE")"
"$SMOKE/bin/python" - <<'PY'
import torch, eagle_fast, eagle_fast.ops as ops
from eagle_fast.ops.fused_preprocess import fused_preprocess
assert "site-packages" in eagle_fast.__file__ and "/venv/" in eagle_fast.__file__, eagle_fast.__file__
assert ops.has_compiled_ops(), "wheel lacks eagle_fast._C"
if torch.version.cuda:
    assert ops.has_cuda_kernels(), "CUDA torch but the wheel lacks eagle_fast._C_cuda"
img = torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
a = fused_preprocess([img], canvas_size=64, clip_size=24, pix2struct_max_patches=16, pix2struct_patch=8)
b = fused_preprocess([img], canvas_size=64, clip_size=24, pix2struct_max_patches=16, pix2struct_patch=8, backend="reference")
assert torch.equal(a.pixel_values, b.pixel_values)
assert (a.clip - b.clip).abs().max() < 1e-5 and (a.flattened_patches - b.flattened_patches).abs().max() < 1e-4
from eagle_fast.ops import resize_concat
feats = [torch.randn(2, 3, 6, 6, requires_grad=True), torch.randn(2, 16, 5, requires_grad=True)]
out = resize_concat(feats, 4, [1, 1])
assert (out - resize_concat(feats, 4, [1, 1], backend="reference")).abs().max() < 1e-5
out.sum().backward()
assert all(f.grad is not None for f in feats)
q, k, v = (torch.randn(1, 33, n, 64) for n in (4, 2, 2))
assert (ops.attention(q, k, v, causal=True) - ops.attention(q, k, v, causal=True, backend="reference")).abs().max() < 1e-5
h, w = torch.randn(2, 7, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
y = torch.randint(0, 50, (2, 7)); y[0, :3] = -100
lce = ops.linear_cross_entropy(h, w, y)
assert (lce - ops.linear_cross_entropy(h, w, y, backend="reference")).abs() < 1e-5
lce.backward()
assert h.grad is not None and w.grad is not None
from transformers import AutoModelForCausalLM
from eagle_fast.model import presets
model = AutoModelForCausalLM.from_config(presets.get("eagle-tiny-x5"))
images = eagle_fast.EagleImageProcessor.from_model_config(model.config)([img])
ids = torch.tensor([[1, -200, 5, 6]])
assert model(ids, images=images).logits.shape == (1, 3 + 16, model.config.vocab_size)
from eagle_fast.train.ds import load_config
assert load_config("zero3")["zero_optimization"]["stage"] == 3  # package data travels in the wheel
from importlib.resources import files
assert all((files("eagle_fast.serve") / "static" / f).is_file() for f in ("index.html", "app.js", "style.css"))
print("wheel smoke test: ok,", eagle_fast.__file__, "cuda kernels:", ops.has_cuda_kernels())
PY
