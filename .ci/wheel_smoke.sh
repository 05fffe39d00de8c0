#!/usr/bin/env bash
# Install the built wheel the way a user would, into a fresh venv outside the source tree: the torch
# it pins first, then the wheel with its declared dependencies (train, serve, tiny extras) from the
# package index. Then, from outside the tree and offline of the Hugging Face Hub: the compiled
# kernels against their references, 3 training steps of tiny-x5, one chat turn, one served request,
# and the bundled Triton kernels beside a foreign top-level `triton_kernels` package.
# Usage: wheel_smoke.sh PYTHON DIST   (PYTHON: the interpreter that built the wheel)
set -euo pipefail
PY=$1
WHEEL=$(realpath "$(ls "$2"/eagle_fast-*.whl)")
WORK=$(mktemp -d)
VENV=$WORK/venv
SERVER=
kill_server_and_remove() {
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; fi
  rm -rf "$WORK"  # ~6 GB, mostly torch
}
trap kill_server_and_remove EXIT
START=$(date +%s); T=$START; PHASE=
phase() {  # ends the running phase with its time, starts the next one
  local now; now=$(date +%s)
  if [ -n "$PHASE" ]; then echo "wheel smoke: $PHASE: $((now - T)) s"; fi
  PHASE=$1; T=$now
}

phase "wheel metadata"
# The wheel must pin the torch it was built with (its public version) and ship eagle_fast alone.
PINS=$("$PY" - "$WHEEL" <<'PY'
import importlib.metadata as md, re, sys, zipfile
from packaging.version import Version
with zipfile.ZipFile(sys.argv[1]) as z:
    names = z.namelist()
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
tops = {n.split("/")[0] for n in names}
assert tops == {"eagle_fast", meta.split("/")[0]}, f"unexpected top-level entries: {sorted(tops)}"
torch_pins = [r for r in requires if re.match(r"torch\s*[=<>~!]", r)]
built = Version(md.version("torch")).public
assert torch_pins == [f"torch=={built}"], f"wheel requires {torch_pins}, built with torch {built}"
pins = torch_pins
try:  # the torchvision release paired with that torch, as the build environment has it
    pins.append(f"torchvision=={Version(md.version('torchvision')).public}")
except md.PackageNotFoundError:
    pass
print(" ".join(pins))
PY
)
echo "wheel smoke: $(basename "$WHEEL") requires ${PINS%% *}"

phase "venv + torch"
"$PY" -m venv "$VENV"
VPY=$VENV/bin/python
# shellcheck disable=SC2086  # PINS is a list of requirements
"$VPY" -m pip install -q $PINS

phase "wheel + dependencies"
"$VPY" -m pip install -q "$WHEEL[train,serve,tiny]"
"$VPY" -m pip check

cd "$WORK"
export HF_HUB_OFFLINE=1
phase "kernels"
"$VPY" - <<'PY'
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
from eagle_fast.train.deepspeed_engine import load_config
assert load_config("zero3")["zero_optimization"]["stage"] == 3  # package data travels in the wheel
from importlib.resources import files
assert all((files("eagle_fast.serve") / "static" / f).is_file() for f in ("index.html", "app.js", "style.css"))
print("wheel smoke: kernels ok,", eagle_fast.__file__, "cuda kernels:", ops.has_cuda_kernels())
PY

phase "train tiny-x5, 3 steps"
"$VPY" -m eagle_fast.train --recipe tiny-x5 --max_steps 3 --output_dir "$WORK/run" --save_steps 0 > train.log 2>&1 \
  || { tail -40 train.log; exit 1; }
tail -1 train.log
MODEL=$WORK/run/final
test -f "$MODEL/config.json" && test -f "$WORK/run/loss.png"

phase "chat"
"$VPY" -c "from PIL import Image; Image.new('RGB', (48, 40), (200, 30, 30)).save('red.png')"
"$VPY" -m eagle_fast.chat --model "$MODEL" --image red.png --prompt "What color is the shape?" \
  --max-new-tokens 4 --seed 0 > chat.out 2> chat.err || { tail -20 chat.err; exit 1; }
echo "wheel smoke: chat reply: $(tail -1 chat.out)"

phase "serve"
PORT=$("$VPY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$VPY" -m eagle_fast.serve --model "$MODEL" --port "$PORT" --log-level warning > serve.log 2>&1 &
SERVER=$!
"$VPY" - "$PORT" "$SERVER" <<'PY' || { tail -30 serve.log; exit 1; }
import base64, json, os, sys, time, urllib.request
base, pid = f"http://127.0.0.1:{sys.argv[1]}", int(sys.argv[2])
deadline = time.monotonic() + 180
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5):
            break
    except OSError:
        os.kill(pid, 0)  # raises once the server has exited
        assert time.monotonic() < deadline, "server did not come up in 180 s"
        time.sleep(0.5)
png = base64.b64encode(open("red.png", "rb").read()).decode()
body = {"model": "final", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    {"type": "text", "text": "What color is the shape?"}]}]}
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=120) as r:
    assert r.status == 200, r.status
    reply = json.load(r)
choice = reply["choices"][0]
assert reply["object"] == "chat.completion" and choice["message"]["role"] == "assistant", reply
assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length"), reply
assert 1 <= reply["usage"]["completion_tokens"] <= 4 and reply["usage"]["prompt_tokens"] > 0, reply
print("wheel smoke: served reply:", json.dumps(choice["message"]["content"]), reply["usage"])
PY
kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=

phase "beside a foreign triton_kernels"
# Another distribution may own the top-level name `triton_kernels`; the bundled kernels must not
# take it, nor be shadowed by it.
mkdir -p stub/triton_kernels
echo 'MARKER = "not eagle_fast"' > stub/triton_kernels/__init__.py
PYTHONPATH=$WORK/stub TRITON_INTERPRET=1 "$VPY" - <<'PY'
import os, torch
import eagle_fast, eagle_fast.ops as ops
from eagle_fast.triton_kernels.attention.flash import flash_attention_fwd_triton
import triton_kernels
import eagle_fast.triton_kernels as bundled
assert triton_kernels.MARKER == "not eagle_fast", triton_kernels.__file__
assert triton_kernels.__file__.startswith(os.path.join(os.getcwd(), "stub")), triton_kernels.__file__
assert bundled.__file__.startswith(os.path.dirname(eagle_fast.__file__) + os.sep), bundled.__file__
assert callable(flash_attention_fwd_triton) and ops.has_triton()
q, k, v = (torch.randn(1, 64, n, 64) for n in (2, 1, 1))  # the launcher runs (interpreter on CPU)
err = (ops.attention(q, k, v, causal=True, backend="triton") - ops.attention(q, k, v, causal=True, backend="reference"))
assert err.abs().max() < 1e-4, err.abs().max()
print("wheel smoke: triton_kernels ->", triton_kernels.__file__, "| bundled ->", bundled.__file__)
PY
phase "remove the venv"
cd /
kill_server_and_remove
phase done
echo "wheel smoke test: ok in $(( $(date +%s) - START )) s"
