"""Shared fixtures. Without a GPU, Triton kernels run in its CPU interpreter: the variable must be
set before triton is first imported, hence here at the top of the test session."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def _real_photos() -> dict[str, np.ndarray]:
    """Real photos shipped by packages: scikit-learn's china/flower, matplotlib's grace_hopper."""
    import matplotlib.cbook
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.array(Image.open(f).convert("RGB"))
    return {"china": china.copy(), "flower": flower.copy(), "grace_hopper": hopper}  # writable copies


@pytest.fixture(scope="session")
def real_photos() -> dict[str, np.ndarray]:
    return _real_photos()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
