"""The compiled libraries load, every schema is registered, and the fallback works without them."""

import os
import subprocess
import sys

import torch

import eagle_fast.ops as ops

OPS = ["fused_preprocess"]


def test_compiled_library_loaded():
    # The test suite runs on a built package: a silent fallback here would hide a broken build.
    assert ops.has_compiled_ops()
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eagle_fast::{name}", "CPU"), name


def test_cuda_kernels_built_with_cuda_torch():
    if not torch.version.cuda:
        return  # CPU-only torch: no _C_cuda by design
    assert ops.has_cuda_kernels(), "CUDA torch and nvcc present, but eagle_fast._C_cuda did not load"
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"eagle_fast::{name}", "CUDA"), name


def test_fallback_without_compiled_library():
    code = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from eagle_fast.ops import fused_preprocess, has_compiled_ops\n"
        "assert not has_compiled_ops()\n"
        "assert sum('compiled kernels' in str(x.message) for x in w) == 1, [str(x.message) for x in w]\n"
        "img = torch.randint(0, 256, (9, 13, 3), dtype=torch.uint8)\n"
        "a = fused_preprocess([img], canvas_size=16, clip_size=8, pix2struct_max_patches=4, pix2struct_patch=4)\n"
        "b = fused_preprocess([img], canvas_size=16, clip_size=8, pix2struct_max_patches=4, pix2struct_patch=4,"
        " backend='reference')\n"
        "assert all(torch.equal(x, y) for x, y in zip(a, b))\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, EAGLE_FAST_DISABLE_COMPILED="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "fallback ok" in res.stdout
