"""How long the docks' work takes: time left from measured tile and step times, and a fine-tune's length
estimated before it starts (no Qt, no napari: testable headless).

:class:`TimeLeft` turns the progress a job reports into the time it still needs, from the pace measured so
far. :func:`iter_measure_finetune` times real training steps of the chosen model at the chosen batch and patch
on the chosen device, so the Fine-tune dock can say what a run of N steps costs before the user starts it
(:class:`FinetuneEstimate`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

from ..models.mpt import MPT
from ..training.config import TrainConfig

LONG_RUN_S = 15 * 60
"""A fine-tune estimated to take longer than this gets a suggested number of steps that fits in it."""


def format_seconds(seconds: float) -> str:
    """'42 s', '3 min 05 s', '1 h 02 min'; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class TimeLeft:
    """The time a job still needs, from the pace of the units (tiles, steps) done so far.

    The clock starts at the first report, not when the job starts: reading the input, computing stack
    statistics and the first forward pass's set-up would otherwise make the first estimates far too long.

    Parameters
    ----------
    clock
        Seconds (monotonic); :func:`time.perf_counter` by default (tests pass their own).
    """

    def __init__(self, clock=time.perf_counter) -> None:
        self._clock = clock
        self._first: tuple[float, int] | None = None

    def update(self, done: int, total: int) -> float | None:
        """Seconds left after ``done`` of ``total`` units; None until two reports have measured a pace."""
        now = self._clock()
        if self._first is None or done < self._first[1]:
            self._first = (now, done)
            return None
        started, done_then = self._first
        if done == done_then:
            return None
        return (now - started) / (done - done_then) * max(0, total - done)

    def describe(self, done: int, total: int) -> str:
        """``'about 3 min 05 s left'`` after :meth:`update`; ``''`` while unknown."""
        left = self.update(done, total)
        return "" if left is None else f"about {format_seconds(left)} left"


@dataclass(frozen=True)
class FinetuneEstimate:
    """What a fine-tune costs on a device, from timed training steps (:func:`iter_measure_finetune`)."""

    step_s: float
    """Seconds per training step (forward, backward, optimiser) at the batch and patch measured."""
    validation_s: float
    """Seconds per validation (the network on the validation patches)."""
    device: str
    """The device the steps ran on (``cpu``, ``cuda:0``...)."""

    def total_s(self, steps: int, validations: int) -> float:
        """Seconds for ``steps`` training steps and ``validations`` validations (preparation not included)."""
        return steps * self.step_s + validations * self.validation_s

    def steps_within(self, seconds: float, validations: Callable[[int], int]) -> int:
        """The most steps that fit in ``seconds`` with ``validations(steps)`` validations, rounded down to a round
        number (10, 50 or 100 steps); at least 1."""

        def fits(steps: int) -> bool:
            return self.total_s(steps, validations(steps)) <= seconds

        low, high = 0, 1
        while fits(high) and high < 10**7:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        rounding = 100 if low >= 1000 else 50 if low >= 200 else 10 if low >= 20 else 1
        return max(1, low // rounding * rounding)


def iter_measure_finetune(
    model: MPT, config: TrainConfig, validation_patches: int = 16
) -> Generator[None, None, FinetuneEstimate]:
    """Time training steps of a copy of ``model`` as ``config`` runs them (batch, patch, loss terms, device).

    One warm-up step (first-call allocations, kernel choice), then one timed step and one timed validation
    forward pass, on random patches: the network's cost does not depend on the pixels. Preparing the
    patches (focus scores, synthetic blur) is not included. A generator that yields between the steps, so a
    worker can stop it there; it returns the estimate.
    """
    import torch

    from ..losses.efcr import EFCRConfig, EFCRLoss
    from ..runtime import resolve_device
    from ..training.engine import compute_gradients, training_autocast_dtype, training_shards

    device = resolve_device(config.device)
    network = copy.deepcopy(model).to(device).train()  # the caller's model (shared with other docks) stays as is
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr)
    loss_fn = EFCRLoss(EFCRConfig(beta=config.efcr_beta))
    generator = torch.Generator().manual_seed(0)
    shape = (config.batch_size, 1, config.patch_size, config.patch_size)
    blurry, sharp, own = (torch.rand(shape, generator=generator).to(device) for _ in range(3))
    amp_dtype = training_autocast_dtype(device, config)
    shards = training_shards(device, config.batch_size, world=1, compiled=False)  # as the training will run

    def finish() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def step() -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        compute_gradients(network, loss_fn, config, blurry, sharp, own, generator, shards, amp_dtype)
        optimizer.step()
        return finish() - started

    step()
    yield
    step_s = step()
    yield
    network.eval()
    chunk = min(4, validation_patches)  # as the training's validation runs them
    started = time.perf_counter()
    with torch.inference_mode():
        network(blurry[:1].expand(chunk, -1, -1, -1).contiguous())
    validation_s = (finish() - started) * math.ceil(validation_patches / chunk)
    return FinetuneEstimate(step_s, validation_s, str(device))
