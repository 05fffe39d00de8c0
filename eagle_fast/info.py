"""`python -m eagle_fast.info`: how eagle_fast was built, and which implementation each op runs.

Like `torch.__config__.show()`. The build part comes from the compiled libraries themselves
(`eagle_fast._C.build_info()`, `eagle_fast._C_cuda.build_info()`: torch and CUDA versions built
against, compiler, C++ standard, the CPU instruction-set clone each kernel's ifunc resolver took,
the CUDA architectures compiled). The op part names, per op and device, what a call with
backend="auto" runs (compiled C++ / CUDA kernel, Triton, PyTorch's own kernel, or the pure-torch
reference) and why, following the rules of each op's registration in eagle_fast/ops/, and shows
where the dispatcher's kernel for that device was registered (a csrc/ file for compiled kernels).
`--json` prints the same as one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import warnings
from typing import Any

import torch

OPS = ("fused_preprocess", "resize_concat", "attention", "paged_attention", "linear_cross_entropy")
# Ops with a C++ CPU kernel in _C; of these, all but paged_attention have a CUDA kernel in _C_cuda.
_COMPILED_CPU = ("fused_preprocess", "resize_concat", "paged_attention", "linear_cross_entropy")
_COMPILED_CUDA = ("fused_preprocess", "resize_concat", "linear_cross_entropy")

IMPL_LABELS = {
    "cpu-kernel": "compiled C++ CPU kernel (eagle_fast._C)",
    "cuda-kernel": "compiled CUDA kernel (eagle_fast._C_cuda)",
    "triton": "Triton kernel",
    "torch": "PyTorch's own kernel",
    "reference": "pure-torch reference fallback",
    "none": "no kernel",
}


@dataclasses.dataclass
class OpState:
    op: str
    device: str  # "cpu" or "cuda"
    impl: str  # a key of IMPL_LABELS
    why: str
    registered_at: str | None = None  # the dispatcher's kernel for this device: a csrc/ file, or "Python"


def _library():
    # Importing the ops registers every op (and loads the compiled libraries unless disabled); the
    # fallback warning is not repeated here: the report says it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        importlib.import_module("eagle_fast.ops")
        return importlib.import_module("eagle_fast.ops._library")


def _compiled_status() -> tuple[bool, str]:
    lib = _library()
    if os.environ.get("EAGLE_FAST_DISABLE_COMPILED") == "1":
        return False, "EAGLE_FAST_DISABLE_COMPILED=1 is set"
    if lib.load_compiled():
        return True, "eagle_fast._C loaded"
    if importlib.util.find_spec("eagle_fast._C") is None:
        return False, "eagle_fast._C is missing (package not built: pip install -e .)"
    try:  # present but not importable: the same error load_compiled() met
        importlib.import_module("eagle_fast._C")
    except ImportError as exc:
        return False, f"eagle_fast._C does not load ({exc})"
    return False, "eagle_fast._C not loaded"


def _cuda_status() -> tuple[bool, str]:
    if not torch.version.cuda:
        return False, "CPU-only torch build"
    compiled, why = _compiled_status()
    if not compiled:
        return False, why
    if _library().has_cuda_kernels():
        return True, "eagle_fast._C_cuda loaded"
    if importlib.util.find_spec("eagle_fast._C_cuda") is None:
        return False, "eagle_fast._C_cuda not built (no nvcc when the package was built)"
    try:
        importlib.import_module("eagle_fast._C_cuda")
    except ImportError as exc:
        return False, f"eagle_fast._C_cuda does not load ({exc})"
    return False, "eagle_fast._C_cuda not loaded"


def _module_info(name: str, loaded: bool, why: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "loaded": loaded,
        "status": why,
        "present": importlib.util.find_spec(f"eagle_fast.{name}") is not None,
    }
    if loaded:
        info["build"] = importlib.import_module(f"eagle_fast.{name}").build_info()
    return info


def build_info() -> dict[str, Any]:
    """Versions of the running stack, and each compiled library's own build_info() when loaded."""
    import eagle_fast

    lib = _library()
    triton_version = None
    if lib.has_triton():
        import triton

        triton_version = triton.__version__
    cuda_ok = torch.cuda.is_available()
    out: dict[str, Any] = {
        "eagle_fast": eagle_fast.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if cuda_ok else None,
        "EAGLE_FAST_DISABLE_COMPILED": os.environ.get("EAGLE_FAST_DISABLE_COMPILED"),
        "_C": _module_info("_C", *_compiled_status()),
    }
    if torch.version.cuda:
        out["_C_cuda"] = _module_info("_C_cuda", *_cuda_status())
    warn = []
    for name in ("_C", "_C_cuda"):
        built = out.get(name, {}).get("build", {}).get("torch_version")
        if built and built != torch.__version__:
            warn.append(f"eagle_fast.{name} was built against torch {built}, running {torch.__version__}: rebuild it")
    out["warnings"] = warn
    return out


def _registered_at(op: str, key: str) -> str | None:
    """Where the dispatcher's kernel of eagle_fast::<op> for `key` (CPU, CUDA) was registered."""
    try:
        dump = torch._C._dispatch_dump(f"eagle_fast::{op}")
    except Exception:  # a private API: its absence only loses this column
        return None
    lines = dump.splitlines()
    for k in (key, "CompositeExplicitAutograd[alias]", "CompositeImplicitAutograd[alias]"):
        for line in lines:
            if line.startswith(f"{k}: registered at "):
                where = line.split(" registered at ", 1)[1].split(" :: ", 1)[0]
                return where[where.index("csrc/") :] if "csrc/" in where else "Python"
    return None


def _cpu_state(op: str, compiled: bool, why: str) -> tuple[str, str]:
    if op == "attention":
        return "torch", (
            "aten's CPU flash kernel (no compiled kernel for this op); sdpa for fp64, head dim > 256 or an attn_mask"
        )
    if compiled:
        return "cpu-kernel", why
    return "reference", why + (" (the op's chunk loop in torch ops)" if op == "linear_cross_entropy" else "")


def _cuda_state(op: str, compiled: bool, why: str, cuda_kernels: bool, cuda_why: str, triton: bool) -> tuple[str, str]:
    if not torch.version.cuda:
        return "none", "CPU-only torch build"
    if op == "attention":
        if triton:
            return "triton", "flash attention in Triton; sdpa for fp64, head dim > 256 or an attn_mask"
        return "torch", "scaled_dot_product_attention (triton not installed)"
    if op == "paged_attention":  # no CUDA C++ kernel: Triton, else the reference, compiled or not
        return ("triton", "no CUDA C++ kernel for this op") if triton else ("reference", "triton not installed")
    if cuda_kernels:
        return "cuda-kernel", cuda_why
    if triton:
        row = " (the row pass; the chunk loop in Python)" if op == "linear_cross_entropy" else ""
        return "triton", f"no compiled CUDA kernel: {cuda_why}{row}"
    if not compiled:
        return "reference", f"{why}; triton not installed"
    return "none", f"{cuda_why} and triton not installed: calls on CUDA tensors raise"


def op_states() -> list[OpState]:
    """Per op and device, what backend="auto" runs (outside `reference_ops()`), and why."""
    lib = _library()
    compiled, why = _compiled_status()
    cuda_kernels, cuda_why = _cuda_status()
    triton = lib.has_triton()
    states = []
    for op in OPS:
        states.append(OpState(op, "cpu", *_cpu_state(op, compiled, why), _registered_at(op, "CPU")))
        states.append(
            OpState(
                op, "cuda", *_cuda_state(op, compiled, why, cuda_kernels, cuda_why, triton), _registered_at(op, "CUDA")
            )
        )
    return states


def _format_build(name: str, m: dict[str, Any]) -> list[str]:
    if not m["loaded"]:
        built = " (the library is built)" if m["present"] else ""
        return [f"eagle_fast.{name}: not loaded: {m['status']}{built}"]
    b = m["build"]
    lines = [
        f"eagle_fast.{name}: loaded",
        f"  built against torch {b['torch_version']} (CUDA {b['torch_cuda_version'] or 'none'}), "
        f"{b['compiler']}, {b['cxx_standard']}, {b['build_type'] or 'no build type'}",
    ]
    if "cuda_archs" in b:
        lines.append(
            f"  CUDA: {', '.join(b['cuda_archs'])}; nvcc {b['nvcc_version']}, runtime headers "
            f"{b['cuda_runtime_version']}, host {b['cuda_host_compiler']}, {b['cuda_cxx_standard']}"
        )
    if "cpu_isa" in b:
        lines.append(f"  OpenMP: {b['openmp'] or 'no'}; CPU clones: {b['cpu_isa']['dispatch']}")
        for op, c in b["cpu_isa"]["ops"].items():
            lines.append(f"    {op:<22} {c['selected']:<16} (of {', '.join(c['targets'])})")
    return lines


def show() -> str:
    """The report as text."""
    info = build_info()
    lines = [
        f"eagle_fast {info['eagle_fast']}: python {info['python']}, torch {info['torch']} "
        f"(CUDA {info['torch_cuda'] or 'none'}), triton {info['triton'] or 'not installed'}",
        f"CUDA device: {info['cuda_device'] or 'none visible (the cuda rows say what CUDA tensors would run)'}",
        f"EAGLE_FAST_DISABLE_COMPILED: {info['EAGLE_FAST_DISABLE_COMPILED'] or 'unset'}",
        "",
    ]
    lines += _format_build("_C", info["_C"])
    if "_C_cuda" in info:
        lines += _format_build("_C_cuda", info["_C_cuda"])
    lines += [f"warning: {w}" for w in info["warnings"]]
    lines += ["", "ops (backend='auto'):"]
    for s in op_states():
        where = f"  [{s.registered_at}]" if s.registered_at else ""
        lines.append(f"  {s.op:<22} {s.device:<4} {IMPL_LABELS[s.impl]}: {s.why}{where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eagle_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps({"build": build_info(), "ops": [dataclasses.asdict(s) for s in op_states()]}, indent=2))
    else:
        print(show())
    return 0


if __name__ == "__main__":
    sys.exit(main())
