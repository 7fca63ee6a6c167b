"""Shared fixtures: paths to the reference vectors and small models.

Everything the tests read lies inside the repository (the reference vectors in
``tests/data/reference/``), so a fresh clone runs its own suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
"""The reference implementation's golden vectors, copied into the repository (see the README there)."""


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of the reference vectors, ``tests/data/reference/``."""
    if not (REFERENCE / "official_tiny_gray.pth").is_file():
        pytest.fail(f"reference vectors not found in {REFERENCE}; they are part of the repository")
    return REFERENCE


@pytest.fixture(scope="session")
def reference_scales(reference_dir: Path) -> list[list[float]]:
    return json.loads((reference_dir / "official_tiny_gray.json").read_text())["scales"]


def tiny_config(**changes):
    """A small but complete MPT (every kind of block, both shifts) for fast tests."""
    from napari_mpt_deblur.config import MPTConfig

    base = dict(
        dim=8,
        num_blocks=(2, 2, 2, 2),
        heads=(1, 2, 2, 4),
        scales=((1 / 4, 1 / 4), (1 / 2, 1 / 2), (1.0, 1.0), (1.0, 1.0)),
    )
    base.update(changes)
    return MPTConfig(**base)


def pattern_pairs(count: int = 3, size: int = 96, seed: int = 0, discs: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Sharp synthetic cells (bright discs) and a Gaussian-blurred copy, float32 in 0..1."""
    from napari_mpt_deblur.losses.efcr import gaussian_blur

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    sharp = np.zeros((count, size, size), np.float32)
    for plane in sharp:
        for _ in range(discs):
            cy, cx, r = rng.uniform(8, size - 8), rng.uniform(8, size - 8), rng.uniform(3, 7)
            plane[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(0.5, 1.0)
    blurry = gaussian_blur(torch.from_numpy(sharp)[:, None], 9, 2.0)[:, 0].numpy()
    return blurry, sharp


@pytest.fixture(scope="session")
def stardist_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small 2-D StarDist model folder trained on synthetic nuclei (about 30 s, in a separate process)."""
    import subprocess
    import sys

    from synthetic_nuclei import MODEL_NAME

    folder = tmp_path_factory.mktemp("stardist")
    script = Path(__file__).with_name("synthetic_nuclei.py")
    done = subprocess.run(
        [sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=900, check=False
    )
    model = folder / MODEL_NAME
    if done.returncode != 0 or not (model / "config.json").is_file():
        pytest.fail(f"training the test StarDist model failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return model
