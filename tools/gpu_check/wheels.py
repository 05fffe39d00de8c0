"""make gpu-wheels: what `make gpu-check` needs on a GPU machine that has no network, fetched here.

The GPU machine's own python3 is expected to hold torch, transformers, triton and peft (and what
they bring). Everything else the check uses travels in one folder (default gpu-wheels/, gitignored)
next to the tree:

- wheels, downloaded with `pip download --only-binary=:all: --no-deps` for that machine's Python
  and platform (default CPython 3.12, manylinux x86_64), pinned here to the versions the project is
  tested with; the check installs only those its python3 lacks (or has too old);
- assets/mistral_common/: the one file of mistral-common the tiny recipes read (the Llama-format
  SentencePiece model), as an asset-only stand-in package: the real wheel is 6.6 MB with 8 dependencies;
- manifest.json: what is there, for whom it was built, and its size.

cmake's wheel (~30 MB, about as much as everything else together) is left out unless asked for
(--with-cmake): GPU images usually bring a CMake, and the check falls back to it.
"""

from __future__ import annotations

import argparse
import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

# (distribution, version) per purpose. Versions follow requirements-dev.txt where it pins them.
WHEELS: dict[str, list[tuple[str, str]]] = {
    "build": [("scikit-build-core", "1.1.2"), ("pathspec", "1.1.1"), ("packaging", "26.4"), ("ninja", "1.13.2")],
    "test": [("pytest", "9.2.0"), ("pluggy", "1.7.0"), ("iniconfig", "2.3.1"), ("pygments", "2.21.0")],
    "serve": [
        ("fastapi", "0.165.0"),
        ("starlette", "1.10.0"),
        ("uvicorn", "0.54.0"),
        ("pydantic", "2.14.4"),
        ("pydantic-core", "2.50.5"),
        ("annotated-types", "0.8.0"),
        ("typing-inspection", "0.4.5"),
        ("annotated-doc", "0.0.7"),
        ("opentelemetry-api", "1.45.3"),
        ("anyio", "4.16.0"),
        ("h11", "0.16.0"),
        ("click", "8.5.1"),
        ("idna", "3.20"),
        ("typing-extensions", "4.16.0"),
    ],
    # every training run writes loss.png; transformers reads tokenizer.model through protobuf
    "train": [
        ("matplotlib", "3.11.2"),
        ("contourpy", "1.3.3"),
        ("kiwisolver", "1.5.1"),
        ("fonttools", "4.68.0"),
        ("cycler", "0.12.1"),
        ("pyparsing", "3.3.3"),
        ("python-dateutil", "4.0.0"),
        ("tzdata", "2026.6"),
        ("protobuf", "7.36.2"),
    ],
    "data": [("easy-vqa", "1.0")],  # the built-in easy-VQA set (PNG files inside the wheel)
}
CMAKE = ("cmake", "4.4.5")
# Their compiled parts are optional speedups: the pure wheel is a fraction of the size.
PREFER_PURE = {"fonttools", "protobuf"}
# Brought by torch, transformers, triton and peft on the GPU machine: never shipped, and the
# closure check below accepts them as dependencies.
ASSUMED = {
    "torch",
    "transformers",
    "triton",
    "peft",
    "accelerate",
    "numpy",
    "pillow",
    "safetensors",
    "tqdm",
    "sentencepiece",
    "tokenizers",
    "huggingface-hub",
    "hf-xet",
    "httpx",
    "httpx2",
    "httpcore",
    "certifi",
    "pyyaml",
    "regex",
    "filelock",
    "fsspec",
    "psutil",
    "jinja2",
    "markupsafe",
    "sympy",
    "mpmath",
    "networkx",
    "setuptools",
    "typer",
    "typer-slim",
    "shellingham",
    "rich",
}
TOKENIZER_SOURCE = ("mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1")
STANDIN_INIT = '''"""Asset-only stand-in for mistral-common, installed by `make gpu-check` where the real package
is absent: it carries the Llama-format SentencePiece model (data/tokenizer.model.v1) that
eagle_fast's tiny recipes read, and none of mistral-common's API."""
'''
MANYLINUX = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    """("typing-extensions", "4.16.0") from typing_extensions-4.16.0-py3-none-any.whl."""
    name, version = filename.split("-")[:2]
    return canonical(name), version


def wanted(with_cmake: bool) -> dict[str, str]:
    pins = {canonical(n): v for group in WHEELS.values() for n, v in group}
    if with_cmake:
        pins[CMAKE[0]] = CMAKE[1]
    return pins


def _pip_download(python: str, dest: str, specs: list[str], py_version: str, pure: bool) -> None:
    cmd = [
        python,
        "-m",
        "pip",
        "download",
        "-q",
        "--disable-pip-version-check",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        py_version,
        "-d",
        dest,
    ]
    if pure:
        cmd += ["--implementation", "py", "--abi", "none", "--platform", "any"]
    else:
        cmd += ["--implementation", "cp"] + [a for p in MANYLINUX + ["any"] for a in ("--platform", p)]
    subprocess.run(cmd + specs, check=True)


def wheel_requires(path: str) -> list[str]:
    """Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"))
    return msg.get_all("Requires-Dist") or []


def _packaging():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors its own copy
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def unmet(folder: str, py_version: str) -> list[str]:
    """Dependencies of the shipped wheels that are neither shipped nor assumed on the GPU machine
    (markers evaluated for Linux x86_64 and the target Python, extras ignored)."""
    Requirement = _packaging()
    env = {
        "python_version": py_version,
        "python_full_version": py_version + ".0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    shipped = {wheel_name_version(f)[0] for f in os.listdir(folder) if f.endswith(".whl")}
    missing = []
    for f in sorted(os.listdir(folder)):
        if not f.endswith(".whl"):
            continue
        for line in wheel_requires(os.path.join(folder, f)):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = canonical(req.name)
            if name not in shipped and name not in ASSUMED:
                missing.append(f"{name} (needed by {wheel_name_version(f)[0]})")
    return missing


def _tokenizer_asset(python: str, dest: str, py_version: str) -> None:
    """assets/mistral_common/: the SentencePiece model cut out of the mistral-common wheel."""
    target = os.path.join(dest, "assets", "mistral_common")
    model = os.path.join(target, "data", "tokenizer.model.v1")
    if os.path.isfile(model):
        return
    name, version, member = TOKENIZER_SOURCE
    with tempfile.TemporaryDirectory() as tmp:
        _pip_download(python, tmp, [f"{name}=={version}"], py_version, pure=True)
        (whl,) = [os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl")]
        os.makedirs(os.path.dirname(model), exist_ok=True)
        with zipfile.ZipFile(whl) as z, z.open(member) as src, open(model, "wb") as out:
            shutil.copyfileobj(src, out)
    with open(os.path.join(target, "__init__.py"), "w") as f:
        f.write(STANDIN_INIT)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def build(dest: str, python: str, py_version: str, with_cmake: bool) -> dict:
    os.makedirs(dest, exist_ok=True)
    pins = wanted(with_cmake)
    have = {wheel_name_version(f) for f in os.listdir(dest) if f.endswith(".whl")}
    for f in os.listdir(dest):  # one version of each: two would stop the install there
        if f.endswith(".whl") and pins.get(wheel_name_version(f)[0]) != wheel_name_version(f)[1]:
            os.remove(os.path.join(dest, f))
    todo = [(n, v) for n, v in pins.items() if (n, v) not in have]
    pure = [f"{n}=={v}" for n, v in todo if n in PREFER_PURE]
    binary = [f"{n}=={v}" for n, v in todo if n not in PREFER_PURE]
    if binary:
        _pip_download(python, dest, binary, py_version, pure=False)
    if pure:
        _pip_download(python, dest, pure, py_version, pure=True)
    _tokenizer_asset(python, dest, py_version)
    missing = unmet(dest, py_version)
    if missing:
        raise SystemExit(
            "gpu-wheels: dependencies neither shipped nor assumed on the GPU machine: "
            + ", ".join(missing)
            + " (add them to WHEELS in tools/gpu_check/wheels.py)"
        )
    wheels = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
    manifest = {
        "python": py_version,
        "platform": "manylinux x86_64",
        "with_cmake": with_cmake,
        "wheels": {wheel_name_version(f)[0]: f for f in wheels},
        "sizes": {f: os.path.getsize(os.path.join(dest, f)) for f in wheels},
        "assets": {"mistral_common": "assets/mistral_common/data/tokenizer.model.v1"},
    }
    with open(os.path.join(dest, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    manifest["bytes"] = folder_bytes(dest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("tools/gpu_check/wheels.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", default="gpu-wheels", help="folder to fill (default gpu-wheels)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    p.add_argument("--with-cmake", action="store_true", help="also ship cmake's wheel (~30 MB)")
    args = p.parse_args(argv)
    m = build(args.dest, sys.executable, args.python_version, args.with_cmake)
    for f, n in sorted(m["sizes"].items(), key=lambda kv: -kv[1]):
        print(f"{n / 1e6:8.2f} MB  {f}")
    cmake = "included" if args.with_cmake else "not included"
    print(
        f"{args.dest}/: {len(m['wheels'])} wheels + assets, {m['bytes'] / 2**20:.1f} MiB in all "
        f"(CPython {args.python_version}, manylinux x86_64; cmake wheel {cmake})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
