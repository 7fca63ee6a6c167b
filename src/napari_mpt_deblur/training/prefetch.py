"""Training batches, drawn in the training loop or ahead of it in worker processes: the same batches either way.

A step's batch comes from its own random stream (:func:`draw_batch`), so worker processes can draw the
batches of the coming steps while the accelerator trains on this one, and a run with workers is the run
without them, step for step (and resumes exactly). On a GPU the synthetic defocus of a large batch takes
longer than the step itself; on a 2-core CPU the workers would take cores from the step, so the loop draws
inline there (``TrainConfig.data_workers`` 0).
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import TrainConfig


@dataclass
class DrawnBatch:
    """One step's (blurry, sharp) batch and what the step draws next from the same stream."""

    blurry: np.ndarray
    """Inputs, float32 (N, C, P, P)."""
    sharp: np.ndarray
    """Targets of the same shape."""
    widths: np.ndarray | None
    """Each sample's blur width in pixels, NaN where it is withheld from the network (None: no widths drawn)."""
    torch_seed: int
    """Seed of the step's torch generator (EFCR's and the re-blur term's random draws)."""
    rng_state: dict[str, Any]
    """The step's numpy stream after the batch: the loop goes on from here (over-read widths, unlabeled planes)."""

    @property
    def withheld(self) -> np.ndarray | None:
        """Which samples are told no width (their own estimate instead, for a model that makes one)."""
        return None if self.widths is None else np.isnan(self.widths)

    def numpy_rng(self) -> np.random.Generator:
        """The step's numpy stream, where the batch left it."""
        rng = np.random.default_rng()
        rng.bit_generator.state = self.rng_state
        return rng


def draw_batch(sampler: Any, config: TrainConfig, step: int, rank: int = 0, with_widths: bool = False) -> DrawnBatch:
    """The batch of ``step``: a pure function of the recipe's seed, the step and the process's rank.

    Parameters
    ----------
    sampler
        Draws (blurry, sharp) batches, and with ``with_widths`` their blur widths (``sample_with_widths``).
    config
        The recipe (:class:`~.config.TrainConfig`): seed, batch, patch, scale range, width dropout.
    step
        The step (0-based) whose batch to draw.
    rank
        The process's rank in a distributed run (each draws its own batch).
    with_widths
        Also draw the samples' blur widths, and which are withheld (``config.blur_width_dropout``).
    """
    rng = np.random.default_rng([config.seed, step] if rank == 0 else [config.seed, step, rank])
    torch_seed = int(rng.integers(2**62))
    widths = None
    if with_widths:
        blurry, sharp, drawn = sampler.sample_with_widths(rng, config.batch_size, config.patch_size, config.scale_range)
        withheld = rng.random(len(drawn)) < config.blur_width_dropout
        widths = np.where(withheld, np.nan, drawn).astype(np.float32)
    else:
        blurry, sharp = sampler.sample(rng, config.batch_size, config.patch_size, config.scale_range)
    return DrawnBatch(blurry, sharp, widths, torch_seed, rng.bit_generator.state)


def iter_batches(
    sampler: Any, config: TrainConfig, first_step: int, rank: int = 0, with_widths: bool = False
) -> Iterator[DrawnBatch]:
    """The batches of steps ``first_step`` to ``config.steps - 1``, in order, as :func:`draw_batch` draws them.

    With ``config.data_workers`` above 0 they are drawn in that many processes (:func:`sampler_processes`),
    ``2 x data_workers`` steps ahead; closing the iterator stops them.
    """
    steps = range(first_step, config.steps)
    if config.data_workers == 0:
        yield from (draw_batch(sampler, config, step, rank, with_widths) for step in steps)
        return
    pool = sampler_processes(sampler, config.data_workers)
    upcoming = iter(steps)
    ahead: deque[Future[DrawnBatch]] = deque()
    try:
        while True:
            for step in itertools.islice(upcoming, 2 * config.data_workers - len(ahead)):
                ahead.append(pool.submit(_draw_in_worker, config, step, rank, with_widths))
            if not ahead:
                return
            yield ahead.popleft().result()
    finally:
        for future in ahead:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def sampler_processes(sampler: Any, workers: int) -> ProcessPoolExecutor:
    """``workers`` processes that each hold ``sampler`` (sent once, not with every task: it holds every training
    plane) and run torch on one thread, side by side; their tasks get it from :func:`worker_sampler`. They are
    spawned, not forked: no copy of this process's threads or GPU."""
    return ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker, initargs=(sampler,)
    )


def worker_sampler() -> Any:
    """The sampler of the worker process this runs in (:func:`sampler_processes`)."""
    return _worker_sampler


_worker_sampler: Any = None


def _start_worker(sampler: Any) -> None:
    import torch

    global _worker_sampler
    _worker_sampler = sampler
    torch.set_num_threads(1)


def _draw_in_worker(config: TrainConfig, step: int, rank: int, with_widths: bool) -> DrawnBatch:
    return draw_batch(_worker_sampler, config, step, rank, with_widths)
