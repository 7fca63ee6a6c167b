"""Training a blur-conditioned network's own estimate of the blur's width.

:func:`iter_train_blur_estimator` gives a network told the blur's width
(``MPTConfig.blur_conditioned``) a :class:`~napari_mpt_deblur.models.blur_width.BlurWidthEstimator`
when it has none, and trains that alone; the deblurring weights stay as they are.
Defocusing a patch costs far more than the estimator's step, so a pool of defocused
patches is drawn once, in worker processes, and the steps crop from it. Like
:func:`~.engine.iter_train` it is a generator: it yields an :class:`EstimatorProgress`
as it goes, and closing it stops the work between steps.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch

from ..models.blur_width import WIDTH_OFFSET, quantile_loss
from ..models.grow import add_blur_estimator
from ..models.mpt import MPT
from .config import EstimatorRecipe
from .patches import SyntheticPairs
from .prefetch import sampler_processes, worker_sampler

POOL_CHUNK = 64
"""Patches a worker draws per task (progress is reported per chunk)."""


@dataclass(frozen=True)
class EstimatorProgress:
    """Where estimator training stands: drawing the pool (``phase == "drawing"``) or training."""

    phase: str
    done: int
    total: int
    loss: float | None = None
    held_out_error: float | None = None
    """Mean ``|log(estimate + 0.5) - log(width + 0.5)|`` over the held-out patches (its exp: the factor off)."""
    held_out_above: float | None = None
    """Share of held-out patches whose estimate is above their true width."""
    elapsed_s: float = 0.0


def iter_train_blur_estimator(
    model: MPT, sampler: SyntheticPairs, recipe: EstimatorRecipe | None = None
) -> Generator[EstimatorProgress, None, MPT]:
    """Train ``model``'s blur-width estimator (added when it has none); returns the model, in eval mode.

    Parameters
    ----------
    model
        A blur-conditioned network (``mpt-deblur grow --blur-width``, trained); only its estimator changes.
    sampler
        Sharp planes defocused on the fly, which report each patch's width (the training data).
    recipe
        Steps, pool and batch sizes, learning rate and seed.
    """
    recipe = recipe or EstimatorRecipe()
    if model.blur_estimator is None:
        model = add_blur_estimator(model)  # refuses a model that takes no width
    start = time.perf_counter()
    blurry, widths = [], []
    for chunk in _draw_pool(sampler, recipe):
        blurry.append(chunk[0])
        widths.append(chunk[1])
        done = sum(len(w) for w in widths)
        yield EstimatorProgress("drawing", done, recipe.pool, elapsed_s=time.perf_counter() - start)
    images, truth = torch.from_numpy(np.concatenate(blurry)), torch.from_numpy(np.concatenate(widths))
    held = max(len(truth) // 24, 1)
    images, truth, held_images, held_truth = images[held:], truth[held:], images[:held], truth[:held]

    estimator = model.blur_estimator
    torch.manual_seed(recipe.seed)
    estimator.train()
    optimizer = torch.optim.Adam(estimator.parameters(), recipe.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, recipe.steps, recipe.lr / 50)
    generator = torch.Generator().manual_seed(recipe.seed)
    running = None
    for step in range(1, recipe.steps + 1):
        rows = torch.randint(len(truth), (recipe.batch,), generator=generator)
        side = int(torch.randint(recipe.patch // 2, recipe.patch + 1, (1,), generator=generator))
        top, left = (int(v) for v in torch.randint(0, recipe.patch - side + 1, (2,), generator=generator))
        batch = images[rows, :, top : top + side, left : left + side].float()
        loss = quantile_loss(estimator.log_width(batch), truth[rows], recipe.quantile)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        report = step % 250 == 0 or step == recipe.steps
        error, above = _held_out(estimator, held_images, held_truth) if report else (None, None)
        yield EstimatorProgress("training", step, recipe.steps, running, error, above, time.perf_counter() - start)
    return model.eval()


@torch.no_grad()
def _held_out(estimator, images: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    estimator.eval()
    predicted = torch.cat([estimator.log_width(images[i : i + 64].float()) for i in range(0, len(images), 64)])
    estimator.train()
    target = torch.log(truth.float() + WIDTH_OFFSET)
    return float((predicted - target).abs().mean()), float((predicted > target).float().mean())


def _draw_pool(sampler: SyntheticPairs, recipe: EstimatorRecipe):
    """Chunks of (blurry float16 (N, 1, P, P), widths (N,)), drawn in ``recipe.workers`` processes."""
    chunks = -(-recipe.pool // POOL_CHUNK)
    tasks = [(recipe, index, min(POOL_CHUNK, recipe.pool - index * POOL_CHUNK)) for index in range(chunks)]
    if recipe.workers == 1:
        yield from (_draw_chunk(*task, sampler) for task in tasks)
        return
    with sampler_processes(sampler, recipe.workers) as pool:
        yield from pool.map(_draw_chunk, *zip(*tasks))


def _draw_chunk(recipe: EstimatorRecipe, index: int, count: int, sampler: SyntheticPairs | None = None):
    """One task's patches, from ``sampler`` or, in a worker process, from the worker's own."""
    sampler = sampler if sampler is not None else worker_sampler()
    rng = np.random.default_rng([recipe.seed, 7, index])  # one stream per chunk: the pool is the same for any workers
    blurry, _, widths = sampler.sample_with_widths(rng, count, recipe.patch, recipe.scale_range)
    return blurry.astype(np.float16), widths
