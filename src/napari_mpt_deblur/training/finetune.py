"""Fine-tuning on a lab's own stacks (EFCR_ex), shared by the command line and the napari dock.

:func:`prepare_finetune` turns the user's planes into what :func:`~.engine.iter_train`
needs (labeled or synthetic pairs, fixed validation patches, the unlabeled
sampler) and records what was used; without labeled pairs it measures the blur in
the user's stack and draws synthetic pairs that look like their microscope's
(:mod:`~napari_mpt_deblur.data.optics`). :class:`TrainingLog` follows a run step by
step and keeps a copy of the weights with the best validation PSNR, so a run
stopped early (or one that got worse towards the end) ends with its best weights,
and the starting model's weights when the fine-tune never beat them.
:func:`run_finetune` is that loop, for the command line and the dock alike.

Nothing here imports Qt; numpy and torch are imported on first use, so the command line starts fast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TrainConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from ..config import Microscope
    from ..data.optics import BlurEstimate
    from ..models.mpt import MPT
    from .engine import TrainProgress, Validation
    from .patches import PairSampler, SyntheticPairs, UnlabeledPlanes

FINETUNE_DEFAULTS = TrainConfig(
    steps=1000, batch_size=4, patch_size=128, lr=6e-5, efcr_beta=0.0, checkpoint_every=100, validate_every=100
)
"""Fine-tuning starts from a trained model: fewer, gentler steps. EFCR_ex and the re-blur term are off: on a new
domain they added nothing (beta 1e-5), cost up to 0.1 dB (beta 1e-3) or 0.6 dB (re-blur) against L1 on pairs made
from the user's sharpest planes (experiment 3 in docs/benchmarks.md). The learning rate, 6e-5, gained 0.5 dB more
than 2e-5 at 0.3 um and 0.17 dB more at 1.2 um on a lab's Z stacks over three seeds, and the same within 0.06 dB
in focus (experiment 4)."""

SHARPEST_FRACTION = 0.25
"""Without labeled pairs, synthetic pairs are made from at most this fraction of the user's planes, the sharpest."""

FOCUS_RATIO = 0.6
"""Of the sharpest planes, only those whose focus score is at least this share of the best in their own stack
are targets of synthetic pairs. In a Z stack the planes beside focus are among the sharpest quarter but blurred
(at NA 1.4 and 0.3 um steps they score 0.4 of the plane in focus, an 80 % radius of 4 px): as targets they teach
the network to keep that blur (experiment 4: -1.33 dB at 0.3 um, -0.59 dB in focus). Planes given one by one are
each their own stack."""

PAIR_MARGIN = 48
"""Pixels of context around a synthetic pair's patch, so the blur near its border is a real one."""

VALIDATION_PATCHES = 16
"""Patches drawn (with a fixed seed) for the validation PSNR/SSIM."""

HELD_OUT_EVERY = 4
"""Without labeled pairs, every fourth of the sharpest planes (when there are at least four) is held out of
training: validation re-blurs them with the blur measured in the stack and scores undoing it. With fewer (one
Z stack has one or two planes in focus), the last quarter of each plane is held out instead, when that quarter
is wide enough for a validation patch with its margin (planes of about 900 pixels and more at patch 128)."""

MIN_GAIN_DB = 0.05
"""A fine-tune is kept only when its best validation PSNR beats the starting model's by this much;
otherwise the starting model's weights are the result (a fine-tune never makes the model worse on
what it can check)."""

GENTLE_SIGMA_PX = 1.5
GENTLE_UNBLURRED = 0.5
"""Besides the blur measured, a fine-tune without labeled pairs is scored on the same held-out planes unblurred
(half of the patches, noise only) or mildly blurred (Gaussian sigma up to 1.5 px): the planes biologists look at
most. A fine-tune learns the strong blur of a lab's stack and its score on that blur range can rise while in-focus
planes get worse (experiment 4: +0.33 dB at 1.2 um, -0.59 dB in focus), so a step is kept only when it does not
lose on these against the starting model (:data:`GENTLE_TOLERANCE_DB`)."""

GENTLE_TOLERANCE_DB = 0.0
"""How much a fine-tune's steps may lose against the starting model on the unblurred and mildly blurred
held-out patches (:data:`GENTLE_SIGMA_PX`) and still be kept: nothing."""

NO_FOCUS_LR_FACTOR = 1 / 12
NO_FOCUS_MAX_STEPS = 200
NO_FOCUS_EFCR_BETA = 1e-5
"""A stack without usable in-focus planes has no sharp targets: the fine-tune leans on the starting model
(its own deblurred planes as targets, re-blurred with the blur measured), EFCR_ex's contrast against
re-blurred copies, a twelfth of the learning rate (5e-6 at the recipe's 6e-5; a quarter, 1.5e-5, lost 0.13-0.18 dB
at 0.6 um on a time-lapse without focus in experiment 4) and at most 200 steps."""

ANCHORED_SHARE = 0.25
NO_FOCUS_ANCHORED_SHARE = 0.5
"""Share of samples that anchor the network to the starting model: unblurred input (a target plane with noise only)
whose target is the starting model's own output on it; half of them when the stack has no in-focus planes, whose
targets are only the starting model's deblurring. The fine-tune learns the lab's blur without forgetting how the
starting model treats planes in focus. There are no other unblurred samples: their targets (denoised planes in focus,
or the starting model's deblurring) are smoother than real focus, and copying them onto unblurred input taught the
network to smooth in-focus planes (experiment 4: -0.17 dB in focus with a tenth unblurred, -0.04 dB anchored;
on a time-lapse without focus -0.11 dB with a quarter anchored, -0.04 dB with half)."""

MILDER_BLUR_SHARE = 0.75
"""After a fine-tune on a stack without usable in-focus planes, planes whose estimated blur width is below this
share of the sharpest planes' (the least the stack holds) are deblurred by the starting model
(:class:`~napari_mpt_deblur.models.mpt.MilderBlur`): the fine-tune had nothing to learn there and lost up to 0.17
dB against it at 0.3 um on a lab's time-lapse (experiment 20 in docs/benchmarks.md). A quarter below, so that the
estimator's spread over planes as blurred as the sharpest (3.4-4.0 px at 0.6 um in that lab) stays with the
fine-tune; planes at 0.3 um were judged at 1.4-1.7 px."""

SHARPEN_MIN_SIGMA_PX = 0.5
"""A fine-tune on synthetic pairs has its model sharpen the output against the optics' in-focus PSF only when that
PSF is at least this wide (Gaussian sigma, pixels). One Richardson-Lucy step on the default model's output, in
focus, gains 2.1-2.8 dB for PSFs of sigma 0.68-1.37 px and loses 0.2 dB for ones of 0.39-0.42 px
(``benchmarks/in_focus_sharpening.py``, experiment 21 in docs/benchmarks.md)."""

PRIOR_TARGET_PLANES = 8
PRIOR_TARGET_SIDE = 768
"""The synthetic pairs' targets are the starting model's deblurring of at most this many of the sharpest planes
(central crops of at most this side, so a stack of large planes does not stall the start). In focus, that output
is sharper than the planes themselves, which hold the optics' own blur and noise (experiment 20: +0.34 dB in focus
and +1.40 dB at 0.3 um over the planes denoised as targets, on a lab's Z stacks, two seeds); without focus, it is
all there is."""


@dataclass
class FinetuneData:
    """Everything :func:`~.engine.iter_train` needs to fine-tune, and a record of it.

    Attributes
    ----------
    sampler
        Labeled (blurry, sharp) batches: the user's pairs, or synthetic pairs
        made from the sharpest of the user's planes.
    validation
        Fixed patches drawn once: from the user's labeled pairs, or from the sharpest planes held
        out of training, re-blurred with the blur measured in the stack (the score of undoing it).
    unlabeled
        The user's own planes, for EFCR_ex's Lext and the re-blur term.
    config
        The recipe, with the starting model's intensity normalisation (patches
        must be normalised as the model's inference normalises planes), made gentler for a stack
        without in-focus planes.
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
    estimate: BlurEstimate | None = None
    """The blur measured in the stack (None with labeled pairs)."""
    notes: list[str] = field(default_factory=list)
    """What the user should know about the data (no in-focus planes, the recipe changed for it...)."""
    gentle_validation: Validation | None = None
    """The held-out planes unblurred or mildly blurred (:data:`GENTLE_SIGMA_PX`), scored against the starting
    model by :class:`TrainingLog` (None with labeled pairs: their own validation is the truth)."""
    milder_blur_below_width: float | None = None
    """Without usable in-focus planes, the blur width (pixels) under which the fine-tuned model keeps deblurring
    with the starting model (:data:`MILDER_BLUR_SHARE`; :func:`run_finetune` attaches it); None otherwise, and for
    a model without a blur estimator."""
    in_focus_optics: Microscope | None = None
    """Optics whose in-focus PSF the fine-tuned model sharpens its output against (synthetic pairs, unless turned
    off or the PSF is narrow; :func:`run_finetune` attaches it: ``ModelCard.in_focus_optics``); None otherwise."""


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
    microscope: Microscope | None = None,
    sharpen_in_focus: bool = True,
) -> FinetuneData:
    """Samplers, validation patches and a record for fine-tuning ``model`` on the user's planes.

    Without labeled pairs the pairs are synthetic, made to look like the user's microscope: the blur across
    the stack is measured against its sharpest planes (:func:`~napari_mpt_deblur.data.optics.estimate_blur`),
    and the sharpest planes (at most a quarter, only those near their stack's focus: :data:`FOCUS_RATIO`), as the
    starting model deblurs them, are blurred again with widefield PSFs of ``microscope``'s optics and Gaussians up
    to that blur, with noise at the level measured. Every fourth of those planes (or, with fewer than four, the
    last quarter of each) is held out for validation, scored against them denoised. When even the sharpest planes
    are blurred (no usable in-focus planes), the starting model's deblurred planes become the targets and the
    recipe gentler (:data:`NO_FOCUS_LR_FACTOR`, :data:`NO_FOCUS_MAX_STEPS`, :data:`NO_FOCUS_EFCR_BETA`);
    ``notes`` says so.

    Parameters
    ----------
    model
        The starting model; its intensity normalisation (``model.card``) is used for every patch.
    unlabeled_planes
        The user's own planes or stacks (any dimension >= 2), e.g. a lab's z-stacks.
    labeled
        Optional (blurry, sharp) planes or stacks of equal shapes, used as they are.
    config
        The recipe (:data:`FINETUNE_DEFAULTS` with the user's changes).
    min_focus_quantile
        Use only unlabeled planes whose focus score is at least this quantile (None or 0: all).
    microscope
        The optics (NA, medium, wavelength, pixel size, Z step); defaults to
        :class:`~napari_mpt_deblur.data.optics.Microscope`'s.
    sharpen_in_focus
        Without labeled pairs, have the fine-tuned model sharpen its output against ``microscope``'s in-focus
        PSF (:data:`FinetuneData.in_focus_optics`) when it is at least :data:`SHARPEN_MIN_SIGMA_PX` wide: its
        targets are the starting model's output on the sharpest planes, which keeps most of the objective's own
        blur (in focus or not: experiment 21).

    Returns
    -------
    FinetuneData
        Ready for :func:`run_finetune` (or ``iter_train(model, data.sampler, output, data.config,
        validation=data.validation, unlabeled=data.unlabeled)``).

    Raises
    ------
    ValueError
        For no planes, only blank (constant) planes, a labeled pair of mismatched shapes, a
        quantile outside [0, 1) or a model that is not grayscale; the message says which.
    """
    from ..config import Microscope
    from ..data.optics import estimate_blur
    from .engine import Validation
    from .patches import LabeledPairs, SyntheticPairs, UnlabeledPlanes, is_blank

    if model.config.in_channels != 1:
        raise ValueError(f"fine-tuning needs a grayscale (1-channel) model; this one reads {model.config.in_channels}")
    card = getattr(model, "card", None)
    if card is not None and card.normalization != config.normalization:
        config = config.replace(normalization=card.normalization)
    arrays = unlabeled_planes if isinstance(unlabeled_planes, (list, tuple)) else [unlabeled_planes]
    stacks = [as_planes(array) for array in arrays]
    if not any(stacks):
        raise ValueError("no unlabeled planes to fine-tune on")
    # blank planes (empty ends of a stack) are left out before anything ranks planes by focus
    numbered = [(k, plane) for k, stack in enumerate(stacks) for plane in stack if not is_blank(plane)]
    stack_of, own = [k for k, _ in numbered], [plane for _, plane in numbered]
    blank = sum(len(stack) for stack in stacks) - len(own)
    if not own:
        raise ValueError(f"all {blank} unlabeled planes are blank (constant): nothing to fine-tune on")
    quantile = float(min_focus_quantile or 0.0)
    unlabeled = UnlabeledPlanes(own, config.normalization, min_focus_quantile=quantile)
    record: dict[str, Any] = {"planes": len(own) + blank, "planes_for_efcr": len(unlabeled.planes)}
    if quantile > 0:
        record["min_focus_quantile"] = quantile
    estimate, notes, gentle_validation, milder_below, in_focus_optics = None, [], None, None, None
    if labeled is not None:
        blurry, sharp = (as_planes(part) for part in labeled)
        sampler = LabeledPairs(blurry, sharp, config.normalization)
        record["labeled_pairs"] = len(blurry)
        blank += sampler.blank_planes
        validation = Validation.from_sampler(sampler, VALIDATION_PATCHES, config.patch_size)
    else:
        estimate = estimate_blur(own, microscope or Microscope())
        notes += estimate.notes
        defocus = estimate.defocus_config(unblurred=0.0)
        scores = estimate.focus_scores
        order = sorted(range(len(own)), key=lambda i: scores[i], reverse=True)
        if estimate.in_focus:
            best: dict[int, float] = {}  # each stack's best focus score
            for k, score in zip(stack_of, scores):
                best[k] = max(best.get(k, score), score)
            order = [i for i in order if scores[i] >= FOCUS_RATIO * best[stack_of[i]]]
        sharpest = [own[i] for i in order[: max(1, round(SHARPEST_FRACTION * len(own)))]]
        held_out = len(sharpest) >= HELD_OUT_EVERY
        held = sharpest[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY] if held_out else []
        kept = [p for i, p in enumerate(sharpest) if not held_out or i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        strips = None if held_out else _hold_out_strips(sharpest, config.patch_size + 2 * PAIR_MARGIN)
        if strips is not None:
            kept, held = strips
        if estimate.in_focus:
            # the planes in focus are noisy and hold the optics' own blur: the starting model's output on them is the
            # sharper target (experiment 20); validation scores against held-out ones denoised, the nearest to truth
            targets, held_targets, denoise = _prior_targets(model, kept), held or kept, True
            record["synthetic_from_sharpest_unlabeled_planes"] = SHARPEST_FRACTION
            record["sharp_planes"] = len(sharpest)
            record["focus_ratio"] = FOCUS_RATIO
            record["targets"] = "starting model's deblurred in-focus planes"
        else:
            targets, held_targets = _prior_targets(model, kept), _prior_targets(model, held)
            denoise = False
            changed = {
                "lr": config.lr * NO_FOCUS_LR_FACTOR,
                "lr_min": min(config.lr_min, config.lr * NO_FOCUS_LR_FACTOR),
                "steps": min(config.steps, NO_FOCUS_MAX_STEPS),
                "efcr_beta": max(config.efcr_beta, NO_FOCUS_EFCR_BETA),
            }
            changed["validate_every"] = min(config.validate_every, changed["steps"])
            changed["checkpoint_every"] = min(config.checkpoint_every, changed["steps"])
            config = config.replace(**changed)
            notes.append(
                f"fine-tuning gently: the starting model's own deblurred planes as targets, half of the samples "
                f"anchored to its output, learning rate {config.lr:.1e}, {config.steps} steps, EFCR_ex on; the "
                "starting model is kept unless this beats it"
            )
            record["targets"] = "starting model's deblurred sharpest planes (no usable in-focus planes)"
            milder_below = _milder_blur_below_width(model, sharpest)
            if milder_below is not None:
                record["milder_blur_below_width"] = round(milder_below, 3)
                notes.append(
                    f"planes judged less blurred than {milder_below:.1f} px, milder than any this stack holds, will "
                    "still be deblurred by the starting model"
                )
        if sharpen_in_focus and estimate.microscope.in_focus_sigma_px() >= SHARPEN_MIN_SIGMA_PX:
            in_focus_optics = estimate.microscope
            record["in_focus_optics"] = in_focus_optics.to_dict()
            notes.append(
                "the fine-tuned model will sharpen its output against the in-focus PSF of "
                f"{in_focus_optics.describe_in_focus()}; give your objective's optics where they differ"
            )
        sampler = SyntheticPairs(targets, defocus, normalization=config.normalization, margin=PAIR_MARGIN)
        validation_sampler = sampler
        anchored = ANCHORED_SHARE if estimate.in_focus else NO_FOCUS_ANCHORED_SHARE
        sampler = AnchoredPairs(sampler, model, anchored)
        record["anchored_to_starting_model"] = anchored
        if held_targets:
            validation_sampler = SyntheticPairs(
                held_targets, defocus, normalization=config.normalization, denoise_targets=denoise, margin=PAIR_MARGIN
            )
        if held:
            if strips is None:
                record["validation"] = f"{len(held)} of the sharpest planes held out, re-blurred as measured"
            else:
                which = "the sharpest plane" if len(held) == 1 else f"each of the {len(held)} sharpest planes"
                record["validation"] = (
                    f"the last quarter of {which} held out (too few planes to hold whole ones out), "
                    "re-blurred as measured"
                )
        else:
            record["validation"] = "patches of the training planes, re-blurred as measured (too few planes to hold out)"
        validation = Validation.from_sampler(validation_sampler, VALIDATION_PATCHES, config.patch_size)
        gentle_validation = _gentle_validation(validation_sampler, config.patch_size)
        record["denoised_validation_targets"] = denoise
        record["blur_estimate"] = estimate.to_dict()
        record["synthetic_defocus"] = defocus.to_dict()
    if blank:
        record["blank_planes_skipped"] = blank
    return FinetuneData(
        sampler,
        validation,
        unlabeled,
        config,
        record,
        blank,
        estimate,
        notes,
        gentle_validation,
        milder_below,
        in_focus_optics,
    )


def _hold_out_strips(planes: list[np.ndarray], width: int) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """Each plane cut along its longer axis: the first three quarters to train on, the last quarter held out.

    None when a held-out quarter would be narrower than ``width`` (a validation patch with its margin).
    """
    kept, held = [], []
    for plane in planes:
        axis = 1 if plane.shape[1] >= plane.shape[0] else 0
        cut = plane.shape[axis] - plane.shape[axis] // 4
        if plane.shape[axis] - cut < width:
            return None
        kept.append(plane[:, :cut] if axis == 1 else plane[:cut])
        held.append(plane[:, cut:] if axis == 1 else plane[cut:])
    return kept, held


def _gentle_validation(pairs: SyntheticPairs, patch: int) -> Validation:
    """Fixed patches of ``pairs``' planes unblurred or mildly blurred, with their noise (:data:`GENTLE_SIGMA_PX`)."""
    from .engine import Validation
    from .patches import SyntheticPairs

    sigma = min(GENTLE_SIGMA_PX, pairs.defocus.gaussian_sigma[1])
    gentle = pairs.defocus.replace(
        kinds=("gaussian",), gaussian_sigma=(0.0, sigma), no_blur_probability=GENTLE_UNBLURRED
    )
    # pairs.sharp are already denoised where the pairs denoise their targets
    sampler = SyntheticPairs(pairs.sharp, gentle, normalization=pairs.normalization, margin=pairs.margin)
    return Validation.from_sampler(sampler, VALIDATION_PATCHES, patch)


class AnchoredPairs:
    """Synthetic pairs, of which a share keeps the network where the starting model is: its output as the target.

    The anchored samples are the pairs' own sharp planes with noise only (no blur); their target is the starting
    model's output on that very input, computed with a frozen copy of it.

    Parameters
    ----------
    pairs
        The synthetic pairs to draw from.
    model
        The starting model (copied and frozen here, so training does not move the anchor).
    share
        Chance that a sample of a batch is an anchored one.
    """

    def __init__(self, pairs: Any, model: MPT, share: float) -> None:
        import copy

        from .patches import SyntheticPairs

        self.pairs, self.share = pairs, share
        self.anchor = copy.deepcopy(model).to("cpu").eval()
        for parameter in self.anchor.parameters():
            parameter.requires_grad_(False)
        unblurred = pairs.defocus.replace(no_blur_probability=1.0)
        self.unblurred = SyntheticPairs(pairs.sharp, unblurred, normalization=pairs.normalization, margin=pairs.margin)

    def sample(self, rng: np.random.Generator, batch: int, patch: int, scale_range: tuple[float, float]):
        import numpy as np
        import torch

        anchored = int((rng.random(batch) < self.share).sum())
        parts = [self.pairs.sample(rng, batch - anchored, patch, scale_range)] if anchored < batch else []
        if anchored:
            inputs, _ = self.unblurred.sample(rng, anchored, patch, scale_range)
            with torch.inference_mode():
                targets = self.anchor(torch.from_numpy(inputs)).numpy().astype(np.float32)
            parts.append((inputs, targets))
        return np.concatenate([b for b, _ in parts]), np.concatenate([s for _, s in parts])


def _milder_blur_below_width(model: MPT, sharpest: list[np.ndarray]) -> float | None:
    """:data:`MILDER_BLUR_SHARE` of the least blur width ``model``'s estimator judges in ``sharpest`` (None without
    an estimator, or when even the sharpest plane is judged unblurred)."""
    if getattr(model, "blur_estimator", None) is None:
        return None
    from ..data.optics import central_crop
    from ..inference import estimate_blur_width

    least = min(estimate_blur_width(model, central_crop(plane, PRIOR_TARGET_SIDE)) or 0.0 for plane in sharpest)
    return MILDER_BLUR_SHARE * least if least > 0 else None


def _prior_targets(model: MPT, planes: list[np.ndarray]) -> list[np.ndarray]:
    """The starting model's deblurring of (central crops of at most :data:`PRIOR_TARGET_PLANES` of) ``planes``."""
    if not planes:
        return []
    from ..config import DeblurSettings
    from ..data.optics import central_crop
    from ..inference import deblur_array

    # the network's output: a starting model that sharpens after it would have the fine-tune learn that twice
    settings = DeblurSettings(device="cpu", precision="fp32", sharpen_in_focus=False)
    crops = [central_crop(plane, PRIOR_TARGET_SIDE) for plane in planes[:PRIOR_TARGET_PLANES]]
    return [deblur_array(model, crop, axes="YX", settings=settings) for crop in crops]


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
    start_psnr: float | None = None
    """Validation PSNR of the starting model (None until :meth:`begin`)."""
    start_state: dict[str, torch.Tensor] | None = None
    """A CPU copy of the starting weights, kept when the fine-tune does not beat them."""
    kept_start: bool = False
    """True once :meth:`restore_best` gave the model back its starting weights."""
    gentle: Validation | None = None
    """Held-out patches unblurred or mildly blurred (:attr:`FinetuneData.gentle_validation`); a step that
    scores below the starting model on them by more than :data:`GENTLE_TOLERANCE_DB` is never kept."""
    gentle_start_psnr: float | None = None
    """The starting model's PSNR on :attr:`gentle` (None without it)."""
    gentle_psnr: list[tuple[int, float]] = field(default_factory=list)
    """(step, PSNR in dB on :attr:`gentle`) of every validation that was the best so far (only those could be kept)."""
    gentle_rejected: list[int] = field(default_factory=list)
    """Steps whose validation was the best so far but which lost on :attr:`gentle`: not kept."""
    step: int = 0
    """Steps done."""
    steps: int = 0
    """Steps planned."""
    elapsed_s: float = 0.0
    remaining_s: float = math.inf

    def begin(self, model: MPT, validation: Validation, gentle: Validation | None = None) -> float:
        """Score the starting model on the validation and keep a copy of its weights.

        After this, :meth:`restore_best` keeps the starting weights unless the best validation beats
        them by :data:`MIN_GAIN_DB`, and considers only steps that do not lose on ``gentle``.

        Parameters
        ----------
        model
            The starting model.
        validation
            What the fine-tune is scored on (:attr:`FinetuneData.validation`).
        gentle
            Held-out patches unblurred or mildly blurred (:attr:`FinetuneData.gentle_validation`), or None.

        Returns
        -------
        float
            The starting model's validation PSNR (dB).
        """
        self.start_state = {key: t.detach().to("cpu", copy=True) for key, t in model.state_dict().items()}
        device = next(model.parameters()).device
        scores = validation.evaluate(model, device)
        self.start_psnr, self.input_psnr = float(scores["psnr"]), float(scores["input_psnr"])
        self.gentle = gentle
        if gentle is not None:
            self.gentle_start_psnr = float(gentle.evaluate(model, device)["psnr"])
        return self.start_psnr

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
        if self.gentle is not None and self.gentle_start_psnr is not None:
            gentle = float(self.gentle.evaluate(model, next(model.parameters()).device)["psnr"])
            self.gentle_psnr.append((progress.step, gentle))
            if gentle < self.gentle_start_psnr - GENTLE_TOLERANCE_DB:
                self.gentle_rejected.append(progress.step)
                return False
        self.best_psnr, self.best_step = value, progress.step
        self.best_state = {key: t.detach().to("cpu", copy=True) for key, t in model.state_dict().items()}
        return True

    @property
    def beats_start(self) -> bool:
        """Whether the best validation beats the starting model's by :data:`MIN_GAIN_DB` (True before :meth:`begin`)."""
        if self.start_psnr is None:
            return True
        return self.best_psnr is not None and self.best_psnr >= self.start_psnr + MIN_GAIN_DB

    def restore_best(self, model: MPT, milder_blur_below_width: float | None = None) -> int:
        """Give ``model`` the best weights: the starting ones when the fine-tune did not beat them.

        Without a validation the model keeps its last weights. A fine-tuned model gets the starting weights as its
        :class:`~napari_mpt_deblur.models.mpt.MilderBlur` network when ``milder_blur_below_width`` is given (a
        stack without in-focus planes: :attr:`FinetuneData.milder_blur_below_width`) and :meth:`begin` kept them
        (not on a resumed run), and none otherwise: a milder-blur network the starting model had is dropped.

        Returns
        -------
        int
            The step whose weights the model now holds (0: the starting model's, as it was).
        """
        if not self.beats_start:  # begin() kept the starting weights with their score
            model.load_state_dict(self.start_state)
            self.kept_start = True
            return 0
        self._keep_start_for_milder_blur(model, milder_blur_below_width)
        if self.best_state is None or self.best_step is None:
            return self.step
        if self.best_step != self.step:
            model.load_state_dict(self.best_state)
        return self.best_step

    def _keep_start_for_milder_blur(self, model: MPT, below_width: float | None) -> None:
        from ..models.mpt import MPT, MilderBlur

        model.milder_blur = None
        if below_width is None or self.start_state is None:
            return
        start = MPT(model.config)
        start.load_state_dict(self.start_state)
        parameter = next(model.parameters())
        model.milder_blur = MilderBlur(start.to(device=parameter.device, dtype=parameter.dtype).eval(), below_width)

    @property
    def weights_step(self) -> int:
        """The step whose weights :meth:`restore_best` keeps (0: the starting model's)."""
        if not self.beats_start:
            return 0
        return self.best_step if self.best_step is not None else self.step

    def outcome(self) -> str:
        """One line for the user: which weights the model holds and why."""
        if self.start_psnr is not None and not self.beats_start:
            best = "no validation" if self.best_psnr is None else f"best {self.best_psnr:.2f} dB"
            text = (
                f"kept the starting model: the fine-tune did not beat it on held-out planes "
                f"({best} against {self.start_psnr:.2f} dB)"
            )
            if self.gentle_rejected:
                text += (
                    f"; {len(self.gentle_rejected)} better-scoring step(s) made planes in focus or mildly "
                    "blurred worse than the starting model did"
                )
            return text
        text = f"kept the weights of step {self.weights_step}"
        if self.best_psnr is not None:
            text += f" (val PSNR {self.best_psnr:.2f} dB"
            text += f", starting model {self.start_psnr:.2f}" if self.start_psnr is not None else ""
            text += f", input {self.input_psnr:.2f})" if self.input_psnr is not None else ")"
        return text

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly record of the run for a model file's provenance."""
        record: dict[str, Any] = {"steps_done": self.step, "steps_planned": self.steps}
        record["weights_from_step"] = self.weights_step
        if self.best_psnr is not None:
            record["best_validation_psnr"] = round(self.best_psnr, 3)
        if self.input_psnr is not None:
            record["validation_input_psnr"] = round(self.input_psnr, 3)
        if self.start_psnr is not None:
            record["starting_model_validation_psnr"] = round(self.start_psnr, 3)
            record["kept_starting_model"] = not self.beats_start
        if self.gentle_start_psnr is not None:
            record["starting_model_in_focus_or_mild_psnr"] = round(self.gentle_start_psnr, 3)
            kept = dict(self.gentle_psnr).get(self.weights_step)
            if kept is not None:
                record["in_focus_or_mild_psnr"] = round(kept, 3)
            if self.gentle_rejected:
                record["steps_rejected_for_in_focus_or_mild_loss"] = list(self.gentle_rejected)
        return record


def run_finetune(
    model: MPT,
    data: FinetuneData,
    output: str | Path,
    log: TrainingLog,
    *,
    resume: bool = False,
    provenance: dict[str, Any] | None = None,
) -> Iterator[TrainProgress]:
    """Fine-tune ``model`` as ``data`` prepares it; yields every step; ends holding the weights to keep.

    The starting model is scored first (:meth:`TrainingLog.begin`, not on a resumed run: its starting
    weights are gone), every step goes through ``log`` in this thread, and however the run ends
    (finished, closed between steps, failed) the model gets the best weights, or its starting ones
    when the fine-tune did not beat them. Checkpoints go to ``output`` as :func:`~.engine.iter_train`
    writes them; the caller saves the weights kept.
    """
    from ..config import ModelCard
    from .engine import iter_train

    if not resume:
        log.begin(model, data.validation, data.gentle_validation)
    steps = iter_train(
        model,
        data.sampler,
        output,
        data.config,
        validation=data.validation,
        unlabeled=data.unlabeled,
        resume=resume,
        provenance=provenance,
    )
    try:
        with contextlib.closing(steps):
            for event in steps:
                log.update(event, model)  # here, in the training thread: the weights are this step's
                yield event
    finally:
        log.restore_best(model, milder_blur_below_width=data.milder_blur_below_width)
        card = getattr(model, "card", None) or ModelCard(architecture=model.config)
        model.card = card.replace(in_focus_optics=data.in_focus_optics)
