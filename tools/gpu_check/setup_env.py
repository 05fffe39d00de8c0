"""The GPU check's environment: what the interpreter has, what the wheels folder brings, installing
the missing part into a private folder, and building eagle_fast against the interpreter's torch.

Nothing here imports torch or any third-party package at module level: the driver must start (and
report what is missing) on a bare interpreter.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile

# (import name, distribution, what needs it); checked, never imported, by the report
MODULES = [
    ("torch", "torch", "everything"),
    ("transformers", "transformers", "the model"),
    ("triton", "triton", "Triton kernels"),
    ("peft", "peft", "LoRA (not run by the check)"),
    ("numpy", "numpy", "data"),
    ("PIL", "pillow", "images"),
    ("safetensors", "safetensors", "checkpoints"),
    ("tqdm", "tqdm", "progress"),
    ("sentencepiece", "sentencepiece", "Llama tokenizer"),
    ("tokenizers", "tokenizers", "tokenizers"),
    ("huggingface_hub", "huggingface-hub", "transformers"),
    ("yaml", "pyyaml", "train --config"),
    ("google.protobuf", "protobuf", "tokenizer.model conversion"),
    ("matplotlib", "matplotlib", "loss.png of every training run"),
    ("fastapi", "fastapi", "serve"),
    ("starlette", "starlette", "serve"),
    ("uvicorn", "uvicorn", "serve"),
    ("pydantic", "pydantic", "serve"),
    ("easy_vqa", "easy-vqa", "built-in easy-VQA data"),
    ("mistral_common", "mistral-common", "Llama SentencePiece model"),
    ("pytest", "pytest", "cuda tests"),
    ("scikit_build_core", "scikit-build-core", "build"),
    ("ninja", "ninja", "build (make is the fallback)"),
    ("cmake", "cmake", "build (a cmake on PATH is the fallback)"),
    ("sklearn", "scikit-learn", "real photos in the fused_preprocess cuda test (not shipped: with scipy ~50 MB)"),
    ("deepspeed", "deepspeed", "multi-GPU ZeRO only (not run by the check)"),
]
SITECUSTOMIZE = '''"""Written by tools/gpu_check/setup_env.py: makes this folder a site directory, so that the .pth
files installed here (the editable eagle_fast's import hook) run in every Python process that has
the folder on PYTHONPATH. A sitecustomize module this one shadows still runs."""
import importlib.util as _u
import os as _os
import site as _site
import sys as _sys

_here = _os.path.dirname(_os.path.abspath(__file__))
_site.addsitedir(_here)
for _p in list(_sys.path):
    _f = _os.path.join(_p or ".", "sitecustomize.py")
    if _os.path.abspath(_p or ".") != _here and _os.path.isfile(_f):
        _spec = _u.spec_from_file_location("_shadowed_sitecustomize", _f)
        _spec.loader.exec_module(_u.module_from_spec(_spec))
        break
'''


class StepFailed(Exception):
    """A check that ran and failed; the message says what was wrong."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dist_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return False


def run_logged(cmd: list[str], log: str, timeout: float, env: dict | None = None, cwd: str | None = None) -> str:
    """Runs `cmd` with its output in `log`; returns the output's tail, or raises StepFailed with it."""
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, cwd=cwd).returncode
        except subprocess.TimeoutExpired:
            raise StepFailed(f"timed out after {timeout:.0f} s: {' '.join(cmd)}\n{tail(log)}") from None
    if rc != 0:
        raise StepFailed(f"exit {rc}: {' '.join(cmd)}\n{tail(log)}")
    return tail(log)


def tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def cmake_found() -> dict:
    """The CMake scikit-build-core would use: the `cmake` Python package, else a cmake on PATH."""
    out: dict = {"module": dist_version("cmake"), "path": shutil.which("cmake"), "path_version": None}
    if out["path"]:
        try:
            first = subprocess.run([out["path"], "--version"], capture_output=True, text=True, timeout=20).stdout
            out["path_version"] = (re.findall(r"\d+\.\d+(?:\.\d+)?", first) or [None])[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return out


def nvcc_found() -> str | None:
    """nvcc where CMakeLists.txt looks for it (CUDA_HOME, CUDA_PATH, /usr/local/cuda) or on PATH."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return shutil.which("nvcc")


def torch_info(py: str, env: dict | None = None) -> dict:
    """torch's version, CUDA build and device, asked in a subprocess (the driver never imports torch,
    so that a broken CUDA setup cannot take it down)."""
    code = (
        "import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
        "'torch_cuda': torch.version.cuda, 'cuda_available': c, "
        "'gpu': torch.cuda.get_device_name() if c else None, "
        "'gpu_memory_gib': round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if c else None}))"
    )
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        return {"torch": None, "error": "torch import timed out", "cuda_available": False}
    if out.returncode != 0:  # the exception's own line says it (e.g. No module named 'torch')
        return {"torch": None, "error": tail_text(out.stderr, 1), "cuda_available": False}
    return json.loads(out.stdout.strip().splitlines()[-1])


def tail_text(text: str, lines: int = 10) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def wheels_folder(folder: str) -> dict:
    if not os.path.isdir(folder):
        return {"path": folder, "present": False}
    wheels = sorted(f for f in os.listdir(folder) if f.endswith(".whl"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)
    manifest = {}
    if os.path.isfile(os.path.join(folder, "manifest.json")):
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
    return {
        "path": folder,
        "present": True,
        "wheels": len(wheels),
        "mib": round(size / 2**20, 1),
        "built_for_python": manifest.get("python"),
        "with_cmake": manifest.get("with_cmake"),
    }


def report(wheels: str) -> dict:
    """Everything the check depends on, as found in this interpreter and on PATH."""
    modules = {}
    for mod, dist, why in MODULES:
        present = has_module(mod)
        modules[dist] = {"importable": present, "version": dist_version(dist) if present else None, "for": why}
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "modules": modules,
        "nvcc": nvcc_found(),
        "cmake": cmake_found(),
        "nvidia_smi": shutil.which("nvidia-smi"),
        "wheels": wheels_folder(wheels),
    }


def _wheel_meta(path: str) -> tuple[str, str, list[str]]:
    import email.parser

    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
    return canonical(msg["Name"]), msg["Version"], msg.get_all("Requires-Dist") or []


def _requirement_class(folder: str):
    """packaging's Requirement: the interpreter's, else straight from the shipped wheel (zipimport)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        whl = [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("packaging-")]
        if not whl:
            return None
        sys.path.append(os.path.abspath(whl[0]))
        from packaging.requirements import Requirement
    return Requirement


def install_plan(folder: str) -> tuple[list[str], list[str]]:
    """(distributions to install from the folder, notes). A shipped distribution is installed when
    the interpreter lacks it, or when what is installed from the folder needs a newer one than the
    interpreter has (the private folder comes first on sys.path, so it shadows the old one)."""
    shipped = {}
    for f in os.listdir(folder):
        if f.endswith(".whl"):
            name, version, requires = _wheel_meta(os.path.join(folder, f))
            shipped[name] = (version, requires)
    plan = {n for n in shipped if dist_version(n) is None}
    notes = []
    Requirement = _requirement_class(folder)
    grown = Requirement is not None
    while grown:
        grown = False
        for name in sorted(plan):
            for line in shipped[name][1]:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                    continue
                dep, have = canonical(req.name), dist_version(req.name)
                if dep in plan or have is None or req.specifier.contains(have, prereleases=True):
                    continue
                if dep in shipped:
                    plan.add(dep)
                    grown = True
                    notes.append(f"{dep} {have} is older than {name} needs ({req.specifier}): shipped one shadows it")
                else:
                    notes.append(f"{dep} {have} does not satisfy {name}'s {req.specifier} and is not shipped")
    return sorted(plan), notes


def prepare_site(site_dir: str) -> None:
    os.makedirs(site_dir, exist_ok=True)
    with open(os.path.join(site_dir, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)


def install(py: str, folder: str, site_dir: str, log: str) -> dict:
    """Installs the planned wheels and the asset stand-ins into `site_dir` (on PYTHONPATH for every
    later step), never into the interpreter's own site-packages."""
    prepare_site(site_dir)
    if not os.path.isdir(folder):
        return {"installed": [], "notes": [f"no wheels folder {folder}: nothing installed (make gpu-wheels)"]}
    plan, notes = install_plan(folder)
    if plan:
        run_logged(
            [
                py,
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--find-links",
                folder,
                "--target",
                site_dir,
                *plan,
            ],
            log,
            timeout=300,
        )
    assets = os.path.join(folder, "assets")
    for name in sorted(os.listdir(assets)) if os.path.isdir(assets) else []:
        if not has_module(name):  # only where the real package is absent
            shutil.copytree(os.path.join(assets, name), os.path.join(site_dir, name), dirs_exist_ok=True)
            plan.append(f"{name} (asset stand-in)")
    return {"installed": plan, "notes": notes}


def build_env(site_dir: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site_dir, env.get("PYTHONPATH")) if p)
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    nvcc = nvcc_found()
    if nvcc and "CUDA_HOME" not in env:  # CMakeLists.txt finds the toolkit through CUDA_HOME first
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isfile(os.path.join(root, "include", "cuda.h")):
            env["CUDA_HOME"] = root
    return env


PROBE = """import dataclasses, json, eagle_fast, torch
from eagle_fast.ops import _library as lib
from eagle_fast.model import presets
from eagle_fast.train.config import TrainConfig
fields = {f.name for f in dataclasses.fields(TrainConfig)}
print(json.dumps({"eagle_fast": eagle_fast.__file__, "compiled_ops": lib.has_compiled_ops(),
                  "cuda_kernels": lib.has_cuda_kernels(), "triton": lib.has_triton(),
                  "has_packing": "packing" in fields,
                  "grids": {p: presets.PRESETS[p]["mm_grid"] for p in ("eagle-tiny-x5", "eagle-small-x5")}}))
"""


def probe(py: str, env: dict, cwd: str) -> dict:
    """What the built package offers (compiled ops, CUDA library, Triton, TrainConfig fields)."""
    out = subprocess.run([py, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    if out.returncode != 0:
        raise StepFailed("eagle_fast does not import:\n" + tail_text(out.stderr, 30))
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(py: str, repo: str, folder: str, site_dir: str, log: str, timeout: float) -> dict:
    """Editable install of the repository into `site_dir`: the build compiles against the
    interpreter's torch (no build isolation), with _C_cuda when a CUDA toolkit is found."""
    prepare_site(site_dir)
    env = build_env(site_dir)
    links = ["--find-links", folder] if os.path.isdir(folder) else []
    cmd = [
        py,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-build-isolation",
        "--no-deps",
        "--no-index",
        *links,
        "--target",
        site_dir,
        "-e",
        repo,
    ]
    run_logged(cmd, log, timeout=timeout, env=env, cwd=repo)
    info = probe(py, env, repo)
    where = os.path.dirname(os.path.realpath(info["eagle_fast"]))
    if where != os.path.realpath(os.path.join(repo, "eagle_fast")):
        raise StepFailed(f"eagle_fast imports from {where}, not from the tree under test")
    nvcc = nvcc_found()
    info["nvcc"] = nvcc
    if not info["compiled_ops"]:
        raise StepFailed("eagle_fast._C did not load after the build")
    if nvcc and not info["cuda_kernels"]:
        raise StepFailed(f"nvcc found ({nvcc}) but eagle_fast._C_cuda did not load; see {log}")
    if not nvcc:
        info["note"] = "no nvcc: the CUDA library was not built, only the Triton kernels run on the GPU"
    return info
