"""Shared fixtures: paths to the reference vectors and small models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "official_tiny_gray.pth").exists():
        pytest.fail(f"reference vectors not found in {REFERENCE}; the tests expect shared/ beside the repository")
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
