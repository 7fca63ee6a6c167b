"""Synthetic labelled nuclei, and a small StarDist model trained on them.

For tests, documentation screenshots and benchmarks that need a StarDist model without a download:
:func:`synthetic_nuclei` draws the images and their labels (numpy only);
:func:`train_stardist_model` trains a small 2-D model on them (needs the ``[stardist]`` extra).
Run as a script it trains in its own process, which keeps TensorFlow out of the caller's (imported
after a napari viewer has made an OpenGL context, it can crash; the product runs StarDist in a worker
process for the same reason)::

    python -m napari_mpt_deblur.detection.synthetic OUTPUT_FOLDER   # about 30 s on 2 CPU cores
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

MODEL_NAME = "synthetic_nuclei"
"""The name (and sub-folder) of the model :func:`train_stardist_model` writes."""


def synthetic_nuclei(count: int = 8, size: int = 128, seed: int = 0, nuclei: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """Bright, non-touching elliptical nuclei (5-9 px semi-axes) on a dark noisy background.

    Parameters
    ----------
    count
        Number of images.
    size
        Side of each (square) image in pixels.
    seed
        Seed of the random placement, shapes, brightness and noise.
    nuclei
        Nuclei per image, at most (a nucleus that would touch another is not placed).

    Returns
    -------
    images : numpy.ndarray
        float32, shape (count, size, size), in about 0..1.
    labels : numpy.ndarray
        int32 of the same shape: 0 for the background, 1, 2, ... for the nuclei of each image.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    images = np.zeros((count, size, size), np.float32)
    labels = np.zeros((count, size, size), np.int32)
    for image, label in zip(images, labels):
        placed = 0
        for _ in range(nuclei * 4):
            if placed == nuclei:
                break
            cy, cx = rng.uniform(8, size - 8, 2)
            a, b = rng.uniform(5, 9, 2)
            angle = rng.uniform(0, np.pi)
            u = (yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
            v = -(yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
            radius2 = (u / a) ** 2 + (v / b) ** 2
            if (label[(u / (a + 2)) ** 2 + (v / (b + 2)) ** 2 <= 1] > 0).any():
                continue  # keep a gap between nuclei
            placed += 1
            inside = radius2 <= 1
            label[inside] = placed
            image[inside] = rng.uniform(0.5, 1.0) * (1 - 0.3 * radius2[inside])
        image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return images, labels


def train_stardist_model(folder: str | os.PathLike) -> Path:
    """Train a small 2-D StarDist model on synthetic nuclei into ``folder / MODEL_NAME``.

    Its probability and overlap thresholds are optimised on held-out images, so they vary a little
    from run to run (read them from the model, never assume them).

    Parameters
    ----------
    folder
        Where the model folder is created.

    Returns
    -------
    pathlib.Path
        The model folder (``config.json``, ``thresholds.json``, weights), ready for
        :class:`~napari_mpt_deblur.detection.DetectionSettings` ``model=``.
    """
    from stardist.models import Config2D, StarDist2D

    images, labels = synthetic_nuclei(16, 128, seed=0)
    config = Config2D(
        n_rays=16,
        grid=(2, 2),
        n_channel_in=1,
        unet_n_depth=2,
        unet_n_filter_base=16,
        train_patch_size=(64, 64),
        train_batch_size=8,
        train_epochs=15,
        train_steps_per_epoch=20,
        train_tensorboard=False,
    )
    model = StarDist2D(config, name=MODEL_NAME, basedir=str(folder))
    model.train(list(images[:12]), list(labels[:12]), validation_data=(list(images[12:]), list(labels[12:])))
    model.optimize_thresholds(list(images[12:]), list(labels[12:]))
    return Path(folder) / MODEL_NAME


def main(argv: list[str] | None = None) -> int:
    """Train the model into the folder given on the command line (seeded) and print where it is."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m napari_mpt_deblur.detection.synthetic OUTPUT_FOLDER", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    print(train_stardist_model(Path(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
