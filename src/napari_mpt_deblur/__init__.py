"""napari-mpt-deblur: defocus deblurring of microscopy images with the Multi-Pyramid Transformer.

The headless API (no Qt needed)::

    from napari_mpt_deblur import load_model, build_model, save_model
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__

# Heavy modules (torch) load on first use, so reading the napari manifest stays fast.
_LAZY = {
    "MPT": "napari_mpt_deblur.models.mpt",
    "build_model": "napari_mpt_deblur.models.presets",
    "preset_config": "napari_mpt_deblur.models.presets",
    "PRESETS": "napari_mpt_deblur.models.presets",
    "load_model": "napari_mpt_deblur.models.files",
    "save_model": "napari_mpt_deblur.models.files",
    "import_official": "napari_mpt_deblur.models.files",
    "read_model_card": "napari_mpt_deblur.models.files",
    "ModelFileError": "napari_mpt_deblur.models.files",
    "MPTConfig": "napari_mpt_deblur.config",
    "ModelCard": "napari_mpt_deblur.config",
    "IntensityNormalization": "napari_mpt_deblur.config",
    "ConfigError": "napari_mpt_deblur.config",
    "EFCRLoss": "napari_mpt_deblur.losses.efcr",
    "EFCRConfig": "napari_mpt_deblur.losses.efcr",
}

__all__ = [
    "MPT",
    "PRESETS",
    "ConfigError",
    "EFCRConfig",
    "EFCRLoss",
    "IntensityNormalization",
    "MPTConfig",
    "ModelCard",
    "ModelFileError",
    "__version__",
    "build_model",
    "import_official",
    "load_model",
    "preset_config",
    "read_model_card",
    "save_model",
]

if TYPE_CHECKING:
    from .config import ConfigError, IntensityNormalization, ModelCard, MPTConfig
    from .losses.efcr import EFCRConfig, EFCRLoss
    from .models.files import ModelFileError, import_official, load_model, read_model_card, save_model
    from .models.mpt import MPT
    from .models.presets import PRESETS, build_model, preset_config


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'napari_mpt_deblur' has no attribute {name!r}")
