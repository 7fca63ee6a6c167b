"""The training loop: one generator serving the CLI, the fine-tune dock and scripts.

``iter_train`` yields a :class:`TrainProgress` after every step; stop iterating
(or close it) and training stops cleanly between steps. Checkpoints are a model
file (``OUT.safetensors``) and a training-state file (``OUT.state.pt``: optimizer
state and step), both written atomically every ``checkpoint_every`` steps and at
the end; ``resume=True`` continues exactly where the state file says. With a
weight average (``TrainConfig.ema_decay``) the model file holds the average and the
state file the raw weights the optimizer continues from. Both files
record the checkpoint's step and the run's id, and a resume refuses a pair that
does not belong together (:func:`load_checkpoint`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write
from ..config import ConfigError
from ..losses.efcr import EFCRConfig, EFCRLoss, random_reblur
from ..models.blur_width import widen
from ..models.files import save_model
from ..models.mpt import MPT
from ..runtime import cpu_has_native_bf16, cpu_workers, map_side_by_side, resolve_device, run_to_end
from .config import INPUT_ERROR_FLOOR, OVERREAD_MAX, TrainConfig
from .patches import PairSampler, UnlabeledPlanes
from .prefetch import iter_batches
from .suite import ORIENTATIONS

STATE_FORMAT = 1


class CheckpointError(ValueError):
    """A training-state file that cannot be used to resume; the message says why."""


@dataclass(frozen=True)
class TrainProgress:
    """Where a training run stands, after a step."""

    step: int
    steps: int
    losses: dict[str, float]
    """The step's loss terms: total, l1, contrastive, positive, negative, extension."""
    lr: float
    elapsed_s: float
    """Seconds spent in this process."""
    remaining_s: float
    """Estimate from this process's mean step time."""
    validation: dict[str, float] | None = None
    """PSNR/SSIM (and the input's) on the held-out pairs, at validation steps."""
    checkpoint: Path | None = None
    """The model file written at this step, if any."""


def cosine_lr(step: int, config: TrainConfig) -> float:
    """Learning rate of step ``step`` (0-based): cosine from ``lr`` to ``lr_min`` over the run, after a linear
    rise over the first ``warmup_steps`` (step ``k`` of them at ``(k + 1) / (warmup_steps + 1)`` of its rate)."""
    progress = min(step / max(1, config.steps - 1), 1.0)
    rate = config.lr_min + 0.5 * (config.lr - config.lr_min) * (1 + math.cos(math.pi * progress))
    if step < config.warmup_steps:
        rate *= (step + 1) / (config.warmup_steps + 1)
    return rate


def state_path(model_path: str | Path) -> Path:
    """The training-state file beside a model file."""
    path = Path(model_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".state.pt")


def best_path(model_path: str | Path) -> Path:
    """The best checkpoint so far, beside a model file (``OUT.best.safetensors``).

    Written when the validation has a ``selection_score`` (the held-out suite does): the
    checkpoint with the highest score so far, never one it refuses (score ``None``).
    """
    path = Path(model_path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".best.safetensors")


def psnr(output: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> float:
    mse = F.mse_loss(output.float(), target.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(output: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM of (B, C, H, W) images (Gaussian window 11, sigma 1.5, as Wang et al.)."""
    taps = torch.arange(11, dtype=torch.float32, device=output.device) - 5
    window = torch.exp(-(taps**2) / (2 * 1.5**2))
    window = (window / window.sum()).view(1, 1, 1, -1)
    channels = output.shape[1]

    def smooth(x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, window.expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(x, window.transpose(-1, -2).expand(channels, 1, -1, 1), groups=channels)

    x, y = output.float(), target.float()
    mu_x, mu_y = smooth(x), smooth(y)
    var_x = smooth(x * x) - mu_x**2
    var_y = smooth(y * y) - mu_y**2
    cov = smooth(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


@dataclass
class Validation:
    """Held-out (blurry, sharp) patches, normalised like training patches: (N, 1, P, P) each."""

    blurry: np.ndarray
    sharp: np.ndarray
    input_scores: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_sampler(cls, sampler: PairSampler, count: int, patch: int, seed: int = 12345) -> Validation:
        """A fixed set drawn once from a sampler (fixed seed, no rescaling)."""
        blurry, sharp = sampler.sample(np.random.default_rng(seed), count, patch, (1.0, 1.0))
        return cls(blurry, sharp)

    def evaluate(self, model: MPT, device: torch.device) -> dict[str, float]:
        model.eval()
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(self.blurry), 4):
                outputs.append(model(torch.from_numpy(self.blurry[start : start + 4]).to(device)).float().cpu())
        output, sharp, blurry = torch.cat(outputs), torch.from_numpy(self.sharp), torch.from_numpy(self.blurry)
        # data range 1: patches are normalised so the blurry input spans about 0..1
        if not self.input_scores:
            self.input_scores = {"input_psnr": psnr(blurry, sharp), "input_ssim": ssim(blurry, sharp)}
        return {"psnr": psnr(output, sharp), "ssim": ssim(output, sharp), **self.input_scores}


def supervised_l1(output: torch.Tensor, sharp: torch.Tensor, blurry: torch.Tensor, weighting: str) -> torch.Tensor:
    """The L1 term of a batch, its samples weighted as ``TrainConfig.l1_weighting`` says.

    Parameters
    ----------
    output, sharp, blurry
        ``(N, C, H, W)``: the network's output, the target and the input.
    weighting
        ``uniform``: the plain mean; ``input_error``: each sample's mean absolute error times
        ``f / (f + e)``, ``e`` its input's error and ``f`` the floor, then the mean over samples.

    Returns
    -------
    torch.Tensor
        A scalar; either way a mean over samples, so the shards of a batch add up to it.
    """
    if weighting == "uniform":
        return F.l1_loss(output, sharp)
    per_sample = (output.float() - sharp).abs().flatten(1).mean(dim=1)
    input_error = (blurry - sharp).abs().flatten(1).mean(dim=1)
    return (per_sample * (INPUT_ERROR_FLOOR / (INPUT_ERROR_FLOOR + input_error))).mean()


PSNR_LOSS_FLOOR = 1e-5
"""Added to each sample's MSE before its logarithm: a sample past 50 dB weighs no more than one at 50 dB."""

LOG_L1_FLOOR = PSNR_LOSS_FLOOR**0.5
"""Added to each sample's mean absolute error before its logarithm (``log_l1``): the same 50 dB."""


def supervised_pixel_loss(output: torch.Tensor, sharp: torch.Tensor, kind: str) -> torch.Tensor:
    """The supervised term of :attr:`TrainConfig.pixel_loss` other than plain ``l1``.

    ``mse``: the batch's mean squared error; ``psnr``: the mean of each sample's
    ``10 log10(MSE + floor)`` (minus its PSNR on the normalised range), averaged as the suite
    averages decibels; ``log_l1``: the mean of each sample's ``20 log10(L1 + floor)``, weighing the
    samples as ``psnr`` does while keeping L1's distance. Each is a mean over samples, so the
    shards of a batch add up to it.
    """
    if kind == "mse":
        return F.mse_loss(output, sharp)
    error = (output.float() - sharp).flatten(1)
    if kind == "log_l1":
        return (20 * torch.log10(error.abs().mean(dim=1) + LOG_L1_FLOOR)).mean()
    return (10 * torch.log10(error.square().mean(dim=1) + PSNR_LOSS_FLOOR)).mean()


def turn(images: torch.Tensor, orientation: int) -> torch.Tensor:
    """``(N, C, H, W)`` images in orientation ``orientation`` of the suite's :data:`ORIENTATIONS`, as
    :func:`~.suite.orient` turns a case: ``orientation % 4`` quarter turns, mirrored for 4-7."""
    turned = torch.rot90(images, orientation % 4, dims=(-2, -1))
    return turned.flip(-1) if orientation >= 4 else turned


def turn_back(images: torch.Tensor, orientation: int) -> torch.Tensor:
    """The inverse of :func:`turn`."""
    unmirrored = images.flip(-1) if orientation >= 4 else images
    return torch.rot90(unmirrored, -(orientation % 4), dims=(-2, -1))


def orientation_consistent_l1(
    model: torch.nn.Module, blurry: torch.Tensor, sharp: torch.Tensor, config: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """The L1 term with the orientation-consistency term of ``TrainConfig.orientation_weight``.

    The batch passes through the network as it is and turned by one of the 7 other
    orientations, drawn from ``generator`` (per shard when a step is cut into shards).
    Returns the mean of the two outputs' L1 to ``sharp`` plus the weight times the L1
    between the outputs (the turned one turned back), and the terms. Both are means
    over samples, so shards add up to the batch.
    """
    orientation = int(torch.randint(1, ORIENTATIONS, (1,), generator=generator))
    output = model(blurry)
    turned_output = turn_back(model(turn(blurry, orientation)), orientation)
    l1 = (
        supervised_l1(output, sharp, blurry, config.l1_weighting)
        + supervised_l1(turned_output, sharp, blurry, config.l1_weighting)
    ) / 2
    consistency = F.l1_loss(output, turned_output)
    total = l1 + config.orientation_weight * consistency
    return total, {"l1": float(l1.detach()), "orientation": float(consistency.detach())}


def objective(
    model: torch.nn.Module,
    loss_fn: EFCRLoss,
    config: TrainConfig,
    blurry: torch.Tensor,
    sharp: torch.Tensor,
    unlabeled: torch.Tensor | None,
    generator: torch.Generator,
    widths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's loss and its terms.

    ``widths`` (B,), for a blur-conditioned network: each sample's blur width (NaN: not given),
    passed to the network in the plain supervised terms (``pixel_loss``, L1).

    ``supervised_weight * L1(net(B), S) + efcr_beta * L_CR`` on the labeled batch,
    with Lext from the unlabeled batch when there is one (EFCR_ex), or with the
    orientation-consistency term (:func:`orientation_consistent_l1`) in its L1, plus
    ``reblur_weight * L1(net(reblur(U)), U)`` on the unlabeled batch.
    """
    if config.efcr_beta > 0:
        terms = loss_fn(model, blurry, sharp, unlabeled=unlabeled, generator=generator)
        total = config.supervised_weight * terms.l1 + config.efcr_beta * terms.contrastive
        losses = terms.as_floats()
    elif config.orientation_weight > 0:
        supervised, losses = orientation_consistent_l1(model, blurry, sharp, config, generator)
        total = config.supervised_weight * supervised
    elif config.pixel_loss != "l1":
        pixel = supervised_pixel_loss(_forward(model, blurry, widths), sharp, config.pixel_loss)
        total, losses = config.supervised_weight * pixel, {config.pixel_loss: float(pixel.detach())}
    else:  # plain L1: no re-blurred forward passes
        l1 = supervised_l1(_forward(model, blurry, widths), sharp, blurry, config.l1_weighting)
        total, losses = config.supervised_weight * l1, {"l1": float(l1.detach())}
    if unlabeled is not None and config.reblur_weight > 0:
        reblurred = random_reblur(unlabeled, loss_fn.config.kernel_sizes, loss_fn.config.sigma, generator)
        reblur = F.l1_loss(model(reblurred), unlabeled)
        total = total + config.reblur_weight * reblur
        losses["reblur"] = float(reblur.detach())
    losses["total"] = float(total.detach())
    return total, losses


def _forward(model: torch.nn.Module, blurry: torch.Tensor, widths: torch.Tensor | None) -> torch.Tensor:
    """``model(blurry)``, with the samples' blur widths when there are any (a blur-conditioned network)."""
    return model(blurry) if widths is None else model(blurry, widths)


def backward_in_shards(
    model: torch.nn.Module,
    loss_fn: EFCRLoss,
    config: TrainConfig,
    blurry: torch.Tensor,
    sharp: torch.Tensor,
    unlabeled: torch.Tensor | None,
    generator: torch.Generator,
    shards: int,
    amp_dtype: torch.dtype | None = None,
    widths: torch.Tensor | None = None,
) -> dict[str, float]:
    """The step's gradients, its batch cut into ``shards`` computed side by side on the CPU; the losses.

    Every term of :func:`objective` is a mean over the samples, so the shards' losses,
    weighted by their share of the batch, add up to the batch's loss, and their
    gradients to its gradient. Each shard runs on its share of the threads: on a CPU
    that needs no thread barriers inside the many small operations of a step, and
    survives another process taking a core (``docs/benchmarks.md``, experiment 5).
    The shards' gradients are added in shard order, so a run is as reproducible as
    one without shards; the re-blur draws come from per-shard generators seeded
    from ``generator``.
    """
    batch = blurry.shape[0]
    bounds = [batch * i // shards for i in range(shards + 1)]
    seeds = torch.randint(2**62, (shards,), generator=generator).tolist()
    parameters = [p for p in model.parameters() if p.requires_grad]

    def shard(index: int) -> tuple[dict[str, float], tuple[torch.Tensor | None, ...]]:
        rows = slice(bounds[index], bounds[index + 1])
        weight = (rows.stop - rows.start) / batch
        own = unlabeled[rows] if unlabeled is not None else None
        shard_widths = widths[rows] if widths is not None else None
        shard_generator = torch.Generator().manual_seed(seeds[index])
        # Autocast is per thread: each shard's thread turns it on for itself. Its cache of weights cast to
        # bf16 is not: shards that share it and call the network twice (EFCR) get gradients that depend
        # on the threads' timing. Without the cache a run is reproducible; the casts cost little.
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None, cache_enabled=False):
            total, losses = objective(
                model, loss_fn, config, blurry[rows], sharp[rows], own, shard_generator, shard_widths
            )
        gradients = torch.autograd.grad(total * weight, parameters, allow_unused=True)
        return {name: value * weight for name, value in losses.items()}, gradients

    parts = list(map_side_by_side(shard, list(range(shards)), shards))
    for parameter, *gradients in zip(parameters, *(gradients for _, gradients in parts)):
        present = [g for g in gradients if g is not None]
        if present:
            parameter.grad = functools.reduce(torch.add, present)
    return {name: sum(losses[name] for losses, _ in parts) for name in parts[0][0]}


def compute_gradients(
    model: torch.nn.Module,
    loss_fn: EFCRLoss,
    config: TrainConfig,
    blurry: torch.Tensor,
    sharp: torch.Tensor,
    unlabeled: torch.Tensor | None,
    generator: torch.Generator,
    shards: int = 1,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    widths: torch.Tensor | None = None,
) -> dict[str, float]:
    """One step's gradients into the parameters' ``.grad`` (cleared by the caller); returns the losses.

    The step as training runs it and as the fine-tune dock times it: in ``shards``
    side by side on the CPU (:func:`backward_in_shards`), else whole, under autocast
    to ``amp_dtype`` when given, the loss scaled by ``scaler`` when given.
    """
    if shards > 1:
        return backward_in_shards(
            model, loss_fn, config, blurry, sharp, unlabeled, generator, shards, amp_dtype, widths
        )
    with torch.autocast(blurry.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        total, losses = objective(model, loss_fn, config, blurry, sharp, unlabeled, generator, widths)
    (scaler.scale(total) if scaler is not None else total).backward()
    return losses


def training_autocast_dtype(device: torch.device, config: TrainConfig) -> torch.dtype | None:
    """The autocast dtype of a training step with ``config.amp``; None (fp32) without it.

    bf16 (else fp16) on CUDA; bf16 on a CPU that computes it in hardware
    (:func:`~napari_mpt_deblur.runtime.cpu_has_native_bf16`), where a step is about 1.6x
    faster at the same loss curve (``docs/benchmarks.md``); fp32 on other CPUs and devices.
    """
    if not config.amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def training_shards(device: torch.device, batch_size: int, world: int, compiled: bool) -> int:
    """How many shards :func:`backward_in_shards` cuts a step's batch into: CPU threads' worth, else 1."""
    if device.type != "cpu" or world > 1 or compiled:
        return 1
    return cpu_workers(batch_size)


def distributed_context(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device): joins the process group when started by ``torchrun``.

    Backend gloo on CPUs, NCCL on GPUs (each rank on the GPU of its ``LOCAL_RANK``).
    A plain process is rank 0 of 1.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def save_training_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    best: dict[str, float] | None = None,
    run_id: str | None = None,
    training_seconds: float | None = None,
    average: WeightAverage | None = None,
) -> None:
    """Write the optimizer state, step, recipe, run id and the run's training time so far atomically.

    With a weight ``average`` the raw weights go here too (the model file holds the average), with
    the number of updates the average has had.

    Raises
    ------
    OSError
        When the file cannot be written (a full disk...), naming the file; nothing is left behind.
    """
    state = {"format": STATE_FORMAT, "step": step, "config": config.to_dict(), "optimizer": optimizer.state_dict()}
    if best is not None:
        state["best"] = best  # the kept checkpoint's step and score, so a resumed run keeps selecting against it
    state["run_id"] = run_id
    if training_seconds is not None:
        state["training_seconds"] = float(training_seconds)  # summed over every process that resumed the run
    if average is not None:
        state["raw_weights"] = {name: tensor.detach().cpu() for name, tensor in average.raw.state_dict().items()}
        state["average_updates"] = average.updates
    # Serialised in memory (about twice the weights' size) and written by Python: torch's own file
    # writer reports a full disk as "unexpected pos 576 vs 534"; Python's write raises ENOSPC.
    buffer = io.BytesIO()
    torch.save(state, buffer)

    def write(tmp: Path) -> None:
        try:
            with open(tmp, "wb") as handle:
                handle.write(buffer.getbuffer())
        except OSError as error:
            raise OSError(error.errno, f"{path}: cannot write the training state: {error.strerror}") from error

    atomic_write(path, write)


class WeightAverage:
    """An exponential moving average of a model's weights (``torch.optim.swa_utils.AveragedModel``).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so the average
    follows a short run instead of staying at its start.

    Parameters
    ----------
    raw
        The model being trained; the average starts as a copy of it.
    decay
        The decay once warmed up (0.999 averages over about the last thousand steps).
    updates
        Updates the average has already had (a resumed run's).
    """

    def __init__(self, raw: MPT, decay: float, updates: int = 0) -> None:
        from torch.optim.swa_utils import AveragedModel

        self.raw, self.decay = raw, decay

        def blend(averaged: list[torch.Tensor], current: list[torch.Tensor], count: torch.Tensor) -> None:
            updates = float(count)
            weight = min(self.decay, (1 + updates) / (10 + updates))
            torch._foreach_lerp_(averaged, current, 1 - weight)

        self.averaged = AveragedModel(raw, multi_avg_fn=blend)
        self.averaged.n_averaged.fill_(max(int(updates), 1))  # starts from the raw weights: count that as one

    @property
    def model(self) -> MPT:
        """The averaged network (an :class:`MPT` with the raw model's card)."""
        return self.averaged.module

    @property
    def updates(self) -> int:
        """How many steps the average has taken in."""
        return int(self.averaged.n_averaged)

    def update(self) -> None:
        """Take in the raw model's current weights."""
        self.averaged.update_parameters(self.raw)


def load_training_state(path: Path) -> dict[str, Any]:
    """The state file's content (read with ``weights_only=True``: no code is ever unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt file
        raise CheckpointError(f"{path}: not a readable training-state file ({error})") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "optimizer" not in state:
        raise CheckpointError(f"{path}: not a napari-mpt-deblur training-state file (format {STATE_FORMAT})")
    return state


def load_checkpoint(output: str | Path) -> tuple[MPT, dict[str, Any]]:
    """The model file and training state of an interrupted run, checked to be the same checkpoint.

    Parameters
    ----------
    output
        The run's model file; its state file is :func:`state_path` of it.

    Returns
    -------
    tuple
        The model (from the model file) and the state file's content.

    Raises
    ------
    CheckpointError
        When the state file or the model file is missing (resuming would start from step 0 and
        replace a trained model), or when their steps or run ids differ (a run killed between
        writing the two, or files of different runs: resuming would continue from wrong weights).
    """
    from ..models.files import load_model

    output = Path(output)
    state_file = state_path(output)
    start_over = f"to start over (replacing {output}), drop --resume and pass --overwrite"
    if not state_file.exists():
        if output.exists():
            raise CheckpointError(f"{state_file} is missing, so {output} cannot be resumed; {start_over}")
        raise CheckpointError(f"nothing to resume: neither {output} nor {state_file} exists; drop --resume")
    if not output.exists():
        raise CheckpointError(f"{output} is missing beside its state file {state_file}; {start_over}")
    state = load_training_state(state_file)
    trained = load_model(output)
    recorded = trained.card.provenance
    if recorded.get("step") != state.get("step") or recorded.get("run_id") != state.get("run_id"):
        raise CheckpointError(
            f"{output} (step {recorded.get('step')}) and {state_file} (step {state.get('step')}) are not one "
            f"checkpoint (a run killed while writing them, or files of different runs); {start_over}"
        )
    return trained, state


def iter_train(
    model: MPT,
    sampler: PairSampler,
    output: str | Path,
    config: TrainConfig | None = None,
    *,
    validation: Validation | None = None,
    unlabeled: UnlabeledPlanes | None = None,
    resume: bool = False,
    provenance: dict[str, Any] | None = None,
) -> Generator[TrainProgress, None, MPT]:
    """Train ``model`` on patches from ``sampler``, writing checkpoints to ``output``; yields after every step.

    Parameters
    ----------
    model
        The network to train (from :func:`~napari_mpt_deblur.build_model` or a model file).
        Under ``torchrun`` every process runs this same call; they train one
        model with DistributedDataParallel and rank 0 writes the files.
    sampler
        Draws (blurry, sharp) batches (:class:`~.patches.LabeledPairs`, :class:`~.patches.SyntheticPairs`).
    output
        Model file to write (``.safetensors``); the training state goes beside it (``.state.pt``).
    config
        The recipe; with ``resume``, the state file's step count and schedule are kept.
    validation
        Held-out patches for PSNR/SSIM every ``validate_every`` steps and at the end.
    unlabeled
        The user's own planes (fine-tuning): EFCR's Lext comes from them (EFCR_ex),
        and the re-blur term uses them when ``config.reblur_weight`` > 0.
    resume
        Continue from ``output`` and its state file: both must exist and be one checkpoint
        (:func:`load_checkpoint`), or a :class:`CheckpointError` says what to do.
    provenance
        Facts to record in the model file (what it was trained on).

    Returns
    -------
    MPT
        The trained model (in eval mode), also saved to ``output``.
    """
    config = config or TrainConfig()
    output = Path(output)
    device = resolve_device(config.device)
    step = 0
    optimizer_state = None
    best: dict[str, float] | None = None  # {"step", "score"} of the checkpoint kept at best_path(output)
    prior_seconds = 0.0  # training time of earlier processes of this run (resumed runs)
    run_id = uuid.uuid4().hex  # written into both files of every checkpoint: they must agree on resume
    card = getattr(model, "card", None)
    if card is not None and card.in_focus_optics is not None:
        # the sharpening after the network suited the network it was chosen for, not the one this run makes (a
        # fine-tune chooses it again when it ends: run_finetune)
        model.card = card.replace(in_focus_optics=None)
    if resume:
        trained, state = load_checkpoint(output)
        saved = TrainConfig.from_dict(state["config"])
        if saved.seed != config.seed or saved.steps != config.steps:
            raise CheckpointError(
                f"{state_path(output)}: was written for {saved.steps} steps with seed {saved.seed}; "
                f"resume with the same --steps and --seed, or start a new output"
            )
        if trained.config != model.config:
            raise CheckpointError(f"{output}: its architecture differs from the model being trained")
        if saved.trainable != config.trainable:
            raise CheckpointError(
                f"{state_path(output)}: was written training {list(saved.trainable) or 'all parameters'}; "
                "resume with the same --train-only, or start a new output"
            )
        # A run with a weight average keeps its raw weights in the state file (the model file holds the average)
        raw_weights = state.get("raw_weights")
        model.load_state_dict(trained.state_dict() if raw_weights is None else raw_weights)
        step, optimizer_state = int(state["step"]), state["optimizer"]
        run_id = state.get("run_id") or run_id  # state files of earlier versions have none
        best = state.get("best")
        prior_seconds = float(state.get("training_seconds", 0.0))
    model.to(device).train()
    rank, world, device = distributed_context(device)
    model.to(device)
    trained_parameters = select_trainable(model, config.trainable)  # before DDP, which hooks what it trains
    average = None
    if config.ema_decay > 0:
        average = WeightAverage(model, config.ema_decay, updates=state.get("average_updates", 0) if resume else 0)
        if resume and state.get("raw_weights") is not None:
            average.model.load_state_dict(trained.state_dict())  # the model file holds the average
    kept = model if average is None else average.model  # the weights validated and written to the model file
    network = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        network = torch.compile(network, dynamic=False)  # fixed patch size: one graph
    optimizer = torch.optim.AdamW(
        parameter_groups(model, trained_parameters, config),
        lr=config.lr,
        betas=config.betas,
        weight_decay=config.weight_decay,
    )
    if optimizer_state is not None:
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{state_path(output)}: optimizer state does not fit this model ({error})") from error
    loss_fn = EFCRLoss(EFCRConfig(beta=config.efcr_beta))
    amp_dtype = training_autocast_dtype(device, config)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    shards = training_shards(device, config.batch_size, world, config.compile)
    with_widths = blur_widths_trained(model, sampler, config)
    record = {"trained_steps": config.steps, "train_config": config.to_dict(), **(provenance or {})}
    if world > 1:
        record["processes"] = world  # each drew its own batch: the effective batch is batch_size x processes
    started, first_step = time.perf_counter(), step
    tile_size = getattr(getattr(model, "card", None), "tile_size", None)  # kept in every file this run writes

    def checkpoint(at: int) -> Path | None:
        if rank != 0:
            _barrier(world)
            return None
        kept.eval()
        # The state file first, then the model file. A kill between the two leaves the model file of the
        # previous checkpoint (complete, and what the user already had) beside a newer state file; both
        # record the step and run id, so a resume refuses the pair instead of mixing them.
        seconds = prior_seconds + time.perf_counter() - started
        save_training_state(state_path(output), optimizer, at, config, best, run_id, seconds, average)
        save_model(
            kept,
            output,
            normalization=config.normalization,
            provenance={**record, "step": at, "run_id": run_id, **_training_time(seconds, device)},
            tile_size=tile_size,
        )
        model.train()
        _barrier(world)
        return output

    # each step's batch comes from its own random stream: drawn here or ahead in worker processes, it is the same
    with contextlib.closing(iter_batches(sampler, config, step, rank, with_widths)) as batches:
        for batch in batches:
            numpy_rng, torch_rng = batch.numpy_rng(), torch.Generator().manual_seed(batch.torch_seed)
            blurry, sharp = torch.from_numpy(batch.blurry).to(device), torch.from_numpy(batch.sharp).to(device)
            widths = None if batch.widths is None else torch.from_numpy(batch.widths).to(device)
            if widths is not None and model.blur_estimator is not None:  # told no width, it is told its own estimate
                widths = _estimates_where_withheld(model, blurry, widths)
                if config.estimate_overread > 0:
                    widths = _overread(widths, batch.withheld, config.estimate_overread, numpy_rng)
            lr = cosine_lr(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # state files of earlier versions have no scale
            own = None
            if unlabeled is not None:
                own = unlabeled.sample(numpy_rng, config.batch_size, config.patch_size, config.scale_range)
                own = torch.from_numpy(own).to(device)
            optimizer.zero_grad(set_to_none=True)
            losses = compute_gradients(
                network, loss_fn, config, blurry, sharp, own, torch_rng, shards, amp_dtype, scaler, widths
            )
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trained_parameters, config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if average is not None:
                average.update()
            step += 1
            if not math.isfinite(losses["total"]):
                raise FloatingPointError(_diverged_message(step, losses["total"], blurry, sharp, own, config))
            scores = None
            if rank == 0 and validation is not None and (step % config.validate_every == 0 or step == config.steps):
                scores = validation.evaluate(kept, device)
                select = getattr(validation, "selection_score", None)
                score = select(scores) if select is not None else None
                if score is not None and (best is None or score > best["score"]):
                    best = {"step": step, "score": float(score)}
                    save_model(
                        kept,
                        best_path(output),
                        normalization=config.normalization,
                        provenance={
                            **record,
                            "step": step,
                            "validation": scores,
                            **_training_time(prior_seconds + time.perf_counter() - started, device),
                        },
                        tile_size=tile_size,
                    )
                model.train()
            written = checkpoint(step) if step % config.checkpoint_every == 0 or step == config.steps else None
            elapsed = time.perf_counter() - started
            remaining = elapsed / (step - first_step) * (config.steps - step)
            yield TrainProgress(step, config.steps, losses, lr, elapsed, remaining, scores, written)
    kept.eval()
    return kept


def parameter_groups(model: MPT, parameters: list[torch.nn.Parameter], config: TrainConfig) -> list[dict[str, Any]]:
    """The optimiser's groups: the blur modulation at ``modulation_lr_scale`` times the learning rate, the rest at 1."""
    modulation = getattr(model, "blur_modulation", None)
    own = {id(p) for p in modulation.parameters()} if modulation is not None else set()
    groups = [
        {"params": [p for p in parameters if id(p) not in own], "lr_scale": 1.0},
        {"params": [p for p in parameters if id(p) in own], "lr_scale": config.modulation_lr_scale},
    ]
    return [group for group in groups if group["params"]]


@torch.no_grad()
def _estimates_where_withheld(model: MPT, blurry: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """``widths`` with the withheld ones (NaN) replaced by the network's own estimate of each sample's width."""
    return torch.where(torch.isnan(widths), model.blur_estimator(blurry), widths)


def _overread(widths: torch.Tensor, estimated: np.ndarray, share: float, rng: np.random.Generator) -> torch.Tensor:
    """``widths`` with a ``share`` of the ``estimated`` ones widened by factors log-uniform in 1 to OVERREAD_MAX
    (on ``width + WIDTH_OFFSET``, the scale the estimator works on, so that an estimate of 0 is widened too)."""
    chosen = estimated & (rng.random(len(estimated)) < share)
    factors = torch.from_numpy(np.exp(rng.uniform(0.0, np.log(OVERREAD_MAX), len(estimated))).astype(np.float32))
    widened = widen(widths, factors.to(widths.device))
    return torch.where(torch.from_numpy(chosen).to(widths.device), widened, widths)


def blur_widths_trained(model: MPT, sampler: PairSampler, config: TrainConfig) -> bool:
    """Whether a run gives its samples their blur's width: a blur-conditioned network, plain supervised
    training (no EFCR, no orientation term) and a sampler that knows each sample's PSF."""
    return (
        model.config.blur_conditioned
        and config.efcr_beta == 0
        and config.orientation_weight == 0
        and hasattr(sampler, "sample_with_widths")
    )


def select_trainable(model: torch.nn.Module, prefixes: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """The parameters named by ``prefixes`` (all when empty), the others frozen (``requires_grad`` off).

    Every parameter's ``requires_grad`` is set, so a model frozen in part by an earlier run trains as asked.

    Raises
    ------
    ConfigError
        For a prefix that names no parameter of ``model`` (a typo would otherwise train nothing).
    """

    def under(name: str, prefix: str) -> bool:
        return name == prefix or name.startswith(prefix + ".")

    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(under(name, prefix) for name in names):
            raise ConfigError(f"trainable: {prefix!r} names no parameter of this network (e.g. {names[0]!r})")
    selected = []
    for name, parameter in model.named_parameters():
        chosen = not prefixes or any(under(name, prefix) for prefix in prefixes)
        parameter.requires_grad_(chosen)
        if chosen:
            selected.append(parameter)
    return selected


def _diverged_message(
    step: int,
    loss: float,
    blurry: torch.Tensor,
    sharp: torch.Tensor,
    own: torch.Tensor | None,
    config: TrainConfig,
) -> str:
    """What a non-finite loss means, naming the cause when the batch shows it."""
    batches = [blurry, sharp] if own is None else [blurry, sharp, own]
    if not all(bool(torch.isfinite(batch).all()) for batch in batches):
        return (
            f"step {step}: the loss is {loss}: the training patches hold NaN or infinite values; "
            "check the images (a damaged file, or NaN written by another program)"
        )
    return (
        f"step {step}: the loss is {loss}. Possible causes: a learning rate too high for this model and data "
        f"(lr {config.lr:g}: try a tenth of it), weights that were already diverged, or fp16 overflow on a GPU "
        "without bf16 (TrainConfig amp=False)"
    )


def _training_time(seconds: float, device: torch.device) -> dict[str, Any]:
    """What a model card says of the compute behind it: hours (wall, summed over resumes) and on what."""
    where = f"{device.type}, {torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    return {"training_hours": round(seconds / 3600, 3), "trained_on_device": where}


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def train(model: MPT, sampler: PairSampler, output: str | Path, config: TrainConfig | None = None, **kwargs) -> MPT:
    """Run :func:`iter_train` to the end; returns the trained model."""
    return run_to_end(iter_train(model, sampler, output, config, **kwargs))
