"""build_info() of the compiled libraries, and `python -m eagle_fast.info`."""

import importlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

import eagle_fast.ops as ops

OPS = ["fused_preprocess", "resize_concat", "attention", "paged_attention", "linear_cross_entropy"]
COMPILED_CPU = ["fused_preprocess", "resize_concat", "paged_attention", "linear_cross_entropy"]
COMPILED_CUDA = ["fused_preprocess", "resize_concat", "linear_cross_entropy"]

# x86-64 micro-architecture levels (the psABI's list), as /proc/cpuinfo names the features
# (sse3 is "pni", lzcnt is "abm", bmi1 is "bmi1").
X86_64_V2 = {"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"}
X86_64_V3 = X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
X86_64_V4 = X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _run_info(*args: str, **env: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "eagle_fast.info", *args],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return res


def test_build_info_of_cpu_library():
    info = importlib.import_module("eagle_fast._C").build_info()
    assert info["module"] == "eagle_fast._C"
    assert info["torch_version"] == torch.__version__  # built against the installed torch
    assert info["torch_cuda_version"] == torch.version.cuda
    assert info["cxx_standard"] == "C++20"  # CMAKE_CXX_STANDARD 20
    assert re.fullmatch(r"(GCC|Clang) \d+\.\d+.*", info["compiler"]), info["compiler"]
    assert isinstance(info["build_type"], str)
    assert info["openmp"] is None or isinstance(info["openmp"], int)
    isa = info["cpu_isa"]
    assert isinstance(isa["dispatch"], str)
    if not (platform.machine() == "x86_64" and info["compiler"].startswith("GCC")):
        assert isa["ops"] == {} and isa["dispatch"].startswith("none")
        return
    assert {op: c["targets"] for op, c in isa["ops"].items()} == {
        "fused_preprocess": ["arch=x86-64-v4", "avx2", "default"],
        "linear_cross_entropy": ["arch=x86-64-v3", "default"],
        "paged_attention": ["arch=x86-64-v3", "default"],
    }
    # The resolver takes the first listed target the CPU supports.
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to check the selected clones against")
    v3 = "arch=x86-64-v3" if X86_64_V3 <= flags else "default"
    v4 = "arch=x86-64-v4" if X86_64_V4 <= flags else "avx2" if "avx2" in flags else "default"
    assert isa["ops"]["linear_cross_entropy"]["selected"] == v3
    assert isa["ops"]["paged_attention"]["selected"] == v3
    assert isa["ops"]["fused_preprocess"]["selected"] == v4


def test_build_info_of_cuda_library():
    if not torch.version.cuda or importlib.util.find_spec("eagle_fast._C_cuda") is None:
        pytest.skip("no eagle_fast._C_cuda in this build (CPU-only torch or no nvcc)")
    info = importlib.import_module("eagle_fast._C_cuda").build_info()
    assert info["module"] == "eagle_fast._C_cuda"
    assert info["torch_version"] == torch.__version__
    assert info["cuda_archs"] == ["sm_80", "sm_90"]  # CMAKE_CUDA_ARCHITECTURES 80 90
    assert re.fullmatch(r"\d+\.\d+", info["cuda_runtime_version"]), info["cuda_runtime_version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["nvcc_version"]), info["nvcc_version"]
    assert info["cxx_standard"] == info["cuda_cxx_standard"] == "C++20"
    assert isinstance(info["cuda_host_compiler"], str) and "cpu_isa" not in info


def test_info_command_names_every_op():
    out = _run_info().stdout
    assert "eagle_fast._C: loaded" in out
    for op in OPS:
        assert re.search(rf"^  {op} +cpu ", out, re.M) and re.search(rf"^  {op} +cuda ", out, re.M), op


def test_info_json_says_what_each_op_runs():
    from eagle_fast.info import build_info, op_states

    assert build_info()["_C"]["loaded"] and build_info()["warnings"] == []
    states = {(s.op, s.device): s for s in op_states()}
    assert sorted(states) == sorted((op, d) for op in OPS for d in ("cpu", "cuda"))
    for op in COMPILED_CPU:
        assert states[op, "cpu"].impl == "cpu-kernel"
        assert states[op, "cpu"].registered_at.startswith("csrc/") and ".cpp:" in states[op, "cpu"].registered_at
    assert states["attention", "cpu"].impl == "torch"  # aten's CPU flash kernel: no C++ kernel of ours
    if not torch.version.cuda:
        return
    for op in COMPILED_CUDA:
        if ops.has_cuda_kernels():
            assert states[op, "cuda"].impl == "cuda-kernel" and ".cu:" in states[op, "cuda"].registered_at
        else:
            assert states[op, "cuda"].impl == ("triton" if ops.has_triton() else "none")
    # No CUDA C++ kernel for these two: Triton when installed.
    assert states["paged_attention", "cuda"].impl == ("triton" if ops.has_triton() else "reference")
    assert states["attention", "cuda"].impl == ("triton" if ops.has_triton() else "torch")


def test_info_reports_the_reference_fallback_when_compiled_is_disabled():
    report = json.loads(_run_info("--json", EAGLE_FAST_DISABLE_COMPILED="1").stdout)
    assert report["build"]["_C"]["loaded"] is False and "build" not in report["build"]["_C"]
    assert "EAGLE_FAST_DISABLE_COMPILED=1" in report["build"]["_C"]["status"]
    states = {(s["op"], s["device"]): s for s in report["ops"]}
    for op in COMPILED_CPU:
        assert states[op, "cpu"]["impl"] == "reference", states[op, "cpu"]
        assert "EAGLE_FAST_DISABLE_COMPILED=1" in states[op, "cpu"]["why"]
        assert states[op, "cpu"]["registered_at"] == "Python"  # not a csrc/ kernel
    assert states["attention", "cpu"]["impl"] == "torch"  # never compiled: unaffected
    if torch.version.cuda:
        for op in COMPILED_CUDA:
            assert states[op, "cuda"]["impl"] == ("triton" if ops.has_triton() else "reference")
