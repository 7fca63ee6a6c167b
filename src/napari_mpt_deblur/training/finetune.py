"""Fine-tuning on a lab's own stacks (EFCR_ex), shared by the command line and the napari dock.

:func:`prepare_finetune` turns the user's planes into what :func:`~.engine.iter_train`
needs (labeled or synthetic pairs, fixed validation patches, the unlabeled
sampler) and records what was used. :class:`TrainingLog` follows a run step by
step and keeps a copy of the weights with the best validation PSNR, so a run
stopped early (or one that got worse towards the end) ends with its best weights.

Nothing here imports Qt; numpy and torch are imported on first use, so the command line starts fast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import TrainConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..models.mpt import MPT
    from .engine import TrainProgress, Validation
    from .patches import PairSampler, UnlabeledPlanes

FINETUNE_DEFAULTS = TrainConfig(
    steps=1000, batch_size=4, patch_size=128, lr=2e-5, efcr_beta=0.0, checkpoint_every=100, validate_every=100
)
"""Fine-tuning starts from a trained model: fewer, gentler steps. EFCR_ex and the re-blur term are off: on a new
domain they added nothing (beta 1e-5), cost up to 0.1 dB (beta 1e-3) or 0.6 dB (re-blur) against L1 on pairs made
from the user's sharpest planes (experiment 3 in docs/benchmarks.md)."""

SHARPEST_FRACTION = 0.25
"""Without labeled pairs, synthetic pairs are made from this fraction of the user's planes, the sharpest."""

VALIDATION_PATCHES = 8
"""Held-out patches drawn (with a fixed seed) for the validation PSNR/SSIM."""


@dataclass
class FinetuneData:
    """Everything :func:`~.engine.iter_train` needs to fine-tune, and a record of it.

    Attributes
    ----------
    sampler
        Labeled (blurry, sharp) batches: the user's pairs, or synthetic pairs
        made from the sharpest of the user's planes.
    validation
        Fixed patches drawn once from ``sampler`` (the same planes as training, so they measure
        fit to the user's images, not generalisation beyond them).
    unlabeled
        The user's own planes, for EFCR_ex's Lext and the re-blur term.
    config
        The recipe, with the starting model's intensity normalisation (patches
        must be normalised as the model's inference normalises planes).
    provenance
        What was used, for the model file's ``fine_tuned_on`` record.
    blank_planes
        Blank (constant) planes left out, unlabeled planes and labeled pairs together.
    """

    sampler: PairSampler
    validation: Validation
    unlabeled: UnlabeledPlanes
    config: TrainConfig
    provenance: dict[str, Any] = field(default_factory=dict)
    blank_planes: int = 0


def as_planes(arrays: Sequence[Any] | np.ndarray) -> list[np.ndarray]:
    """2-D float32 planes from arrays of any dimension >= 2 (leading axes flattened).

    Parameters
    ----------
    arrays
        One array, or a sequence of arrays (numpy, dask, zarr: anything ``np.asarray`` reads).

    Returns
    -------
    list of numpy.ndarray
        The planes, in order.

    Raises
    ------
    ValueError
        For an array of fewer than 2 dimensions or an empty one.
    """
    import numpy as np

    planes: list[np.ndarray] = []
    for array in arrays if isinstance(arrays, (list, tuple)) else [arrays]:
        array = np.asarray(array, dtype=np.float32)
        if array.ndim < 2 or array.size == 0:
            raise ValueError(f"need 2-D planes or stacks of them, got an array of shape {array.shape}")
        planes.extend(array.reshape(-1, *array.shape[-2:]))
    return planes


def prepare_finetune(
    model: MPT,
    unlabeled_planes: Sequence[Any] | np.ndarray,
    *,
    labeled: tuple[Sequence[Any] | np.ndarray, Sequence[Any] | np.ndarray] | None = None,
    config: TrainConfig,
    min_focus_quantile: float | None = None,
) -> FinetuneData:
    """Samplers, validation patches and a record for fine-tuning ``model`` on the user's planes.

    Parameters
    ----------
    model
        The starting model; its intensity normalisation (``model.card``) is used for every patch.
    unlabeled_planes
        The user's own planes or stacks (any dimension >= 2), e.g. a lab's z-stacks.
    labeled
        Optional (blurry, sharp) planes or stacks of equal shapes. Without them,
        labeled pairs are made by synthetic defocus of the sharpest quarter of
        ``unlabeled_planes`` (by focus score).
    config
        The recipe (:data:`FINETUNE_DEFAULTS` with the user's changes).
    min_focus_quantile
        Use only unlabeled planes whose focus score is at least this quantile (None or 0: all).

    Returns
    -------
    FinetuneData
        Ready for ``iter_train(model, data.sampler, output, data.config, validation=data.validation,
        unlabeled=data.unlabeled)``.

    Raises
    ------
    ValueError
        For no planes, only blank (constant) planes, a labeled pair of mismatched shapes, a
        quantile outside [0, 1) or a model that is not grayscale; the message says which.
    """
    from ..data.focus import sharpest_planes
    from .engine import Validation
    from .patches import LabeledPairs, SyntheticPairs, UnlabeledPlanes, drop_blank_planes

    if model.config.in_channels != 1:
        raise ValueError(f"fine-tuning needs a grayscale (1-channel) model; this one reads {model.config.in_channels}")
    card = getattr(model, "card", None)
    if card is not None and card.normalization != config.normalization:
        config = config.replace(normalization=card.normalization)
    own = as_planes(unlabeled_planes)
    if not own:
        raise ValueError("no unlabeled planes to fine-tune on")
    # blank planes (empty ends of a stack) are left out before anything ranks planes by focus
    own, blank = drop_blank_planes(own)
    if not own:
        raise ValueError(f"all {blank} unlabeled planes are blank (constant): nothing to fine-tune on")
    quantile = float(min_focus_quantile or 0.0)
    unlabeled = UnlabeledPlanes(own, config.normalization, min_focus_quantile=quantile)
    record: dict[str, Any] = {"planes": len(own) + blank, "planes_for_efcr": len(unlabeled.planes)}
    if quantile > 0:
        record["min_focus_quantile"] = quantile
    if labeled is not None:
        blurry, sharp = (as_planes(part) for part in labeled)
        sampler = LabeledPairs(blurry, sharp, config.normalization)
        record["labeled_pairs"] = len(blurry)
        blank += sampler.blank_planes
    else:
        # the sharpest planes are still noisy: as targets they would teach the network to sharpen noise
        sharpest = sharpest_planes(own, SHARPEST_FRACTION)
        sampler = SyntheticPairs(sharpest, normalization=config.normalization, denoise_targets=True)
        record["synthetic_from_sharpest_unlabeled_planes"] = SHARPEST_FRACTION
        record["denoised_targets"] = True
    if blank:
        record["blank_planes_skipped"] = blank
    validation = Validation.from_sampler(sampler, VALIDATION_PATCHES, config.patch_size)
    return FinetuneData(sampler, validation, unlabeled, config, record, blank)


@dataclass
class TrainingLog:
    """A run's history as it goes, and the weights of its best validation.

    Feed it every :class:`~.engine.TrainProgress` with :meth:`update` (in the
    thread that trains, right after the step, so the weights copied are that
    step's); :meth:`restore_best` then gives the model the best weights.
    """

    losses: list[tuple[int, float]] = field(default_factory=list)
    """(step, total loss) of every step."""
    psnr: list[tuple[int, float]] = field(default_factory=list)
    """(step, validation PSNR in dB) of every validation."""
    input_psnr: float | None = None
    """PSNR of the blurry validation input itself: the level to beat."""
    best_psnr: float | None = None
    """Best validation PSNR so far (None before the first validation)."""
    best_step: int | None = None
    """The step whose weights gave :attr:`best_psnr`."""
    best_state: dict[str, torch.Tensor] | None = None
    """A CPU copy of the weights at :attr:`best_step`."""
    step: int = 0
    """Steps done."""
    steps: int = 0
    """Steps planned."""
    elapsed_s: float = 0.0
    remaining_s: float = math.inf

    def update(self, progress: TrainProgress, model: MPT) -> bool:
        """Record one step; copies the weights when the validation PSNR improved.

        Parameters
        ----------
        progress
            What :func:`~.engine.iter_train` just yielded.
        model
            The model being trained (its weights are those of ``progress.step``).

        Returns
        -------
        bool
            True when this step's validation is the best so far.
        """
        self.step, self.steps = progress.step, progress.steps
        self.elapsed_s, self.remaining_s = progress.elapsed_s, progress.remaining_s
        self.losses.append((progress.step, float(progress.losses["total"])))
        scores = progress.validation
        if not scores:
            return False
        value = float(scores["psnr"])
        self.psnr.append((progress.step, value))
        if "input_psnr" in scores:
            self.input_psnr = float(scores["input_psnr"])
        if self.best_psnr is not None and not value > self.best_psnr:
            return False
        self.best_psnr, self.best_step = value, progress.step
        self.best_state = {key: t.detach().to("cpu", copy=True) for key, t in model.state_dict().items()}
        return True

    def restore_best(self, model: MPT) -> int:
        """Give ``model`` the best weights (it keeps its last ones when there was no validation).

        Returns
        -------
        int
            The step whose weights the model now holds.
        """
        if self.best_state is None or self.best_step is None:
            return self.step
        if self.best_step != self.step:
            model.load_state_dict(self.best_state)
        return self.best_step

    @property
    def weights_step(self) -> int:
        """The step whose weights :meth:`restore_best` keeps."""
        return self.best_step if self.best_step is not None else self.step

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly record of the run for a model file's provenance."""
        record: dict[str, Any] = {"steps_done": self.step, "steps_planned": self.steps}
        record["weights_from_step"] = self.weights_step
        if self.best_psnr is not None:
            record["best_validation_psnr"] = round(self.best_psnr, 3)
        if self.input_psnr is not None:
            record["validation_input_psnr"] = round(self.input_psnr, 3)
        return record
