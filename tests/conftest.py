"""Shared fixtures: paths to the reference vectors and a small StarDist model.

Everything the tests read lies inside the repository (the reference vectors in
``tests/data/reference/``), so a fresh clone runs its own suite. Plain helper
functions (small models, synthetic images) are in ``helpers.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
"""The reference implementation's golden vectors, copied into the repository (see the README there)."""

GUI_FIXTURES = {"make_napari_viewer", "qtbot"}
"""A test that uses any of these (directly or through another fixture) opens Qt widgets: marked ``gui``."""
STARDIST_FIXTURES = {"stardist_model_dir"}
"""A test that uses any of these trains and runs StarDist (TensorFlow, in a worker process): marked ``stardist``."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by what they need, so ``-m "not gui"`` or ``-m "not stardist"`` can leave them out.

    Decided by the fixtures a test uses rather than by hand, so a new test is marked as soon as it
    asks for a viewer or the StarDist model.
    """
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & GUI_FIXTURES:
            item.add_marker(pytest.mark.gui)
        if used & STARDIST_FIXTURES:
            item.add_marker(pytest.mark.stardist)


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


@pytest.fixture(scope="session")
def stardist_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small 2-D StarDist model folder trained on synthetic nuclei (about 30 s, in a separate process).

    TensorFlow stays out of the test process: imported after a napari viewer has made an OpenGL
    context, it can crash.
    """
    import subprocess
    import sys

    from napari_mpt_deblur.detection.synthetic import MODEL_NAME

    folder = tmp_path_factory.mktemp("stardist")
    command = [sys.executable, "-m", "napari_mpt_deblur.detection.synthetic", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    model = folder / MODEL_NAME
    if done.returncode != 0 or not (model / "config.json").is_file():
        pytest.fail(f"training the test StarDist model failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return model
