"""Build-time metadata provider (scikit-build-core, [[tool.dynamic-metadata]] in pyproject.toml):
adds `torch==<the torch this build compiles against>` to the wheel's dependencies.

eagle_fast._C links torch's C++ API, which has no stable ABI across releases: a wheel built with
torch X.Y.Z only loads with X.Y.Z. The pin is the public version, without the local label
(+cu130, +cpu): PyPI cannot serve local versions, and a build of the same release for another
CUDA only costs the optional _C_cuda, which eagle_fast skips when it does not load.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class TorchRequirement:
    def __init__(self) -> None:
        self.state = "wheel"

    def build_state(self, state: str) -> None:
        self.state = state

    def dynamic_wheel(self, settings: Mapping[str, Any]) -> dict[str, bool]:
        # the SDist cannot know the torch its wheels will be built with
        return {"dependencies": True}

    def dynamic_metadata(self, settings: Mapping[str, Any], project: Mapping[str, Any]) -> dict[str, list[str]]:
        if self.state == "sdist":
            return {"dependencies": ["torch"]}
        return {"dependencies": [f"torch=={built_torch_version()}"]}


def built_torch_version() -> str:
    """The public version of the torch importable by this interpreter, which is the one CMake
    compiles against (CMakeLists.txt asks the same interpreter)."""
    from packaging.version import Version

    try:
        import torch
    except ImportError as exc:
        raise RuntimeError(
            "eagle_fast is compiled against the installed torch: install torch first, then build with "
            "`pip install --no-build-isolation .` (or `pip wheel --no-build-isolation --no-deps .`)"
        ) from exc
    return Version(str(torch.__version__)).public
