"""Growing a trained network: more blocks, or a blur-width input, that change nothing until trained.

A pyramid sub-block adds three residual branches to its input (ISCA, CSWA and
the FEFN), each ending in an output projection. With those three projections
at zero the block is the identity, so a network deepened with such blocks
gives exactly the output of the network it grew from, and training starts
from that network's quality rather than from scratch. The projections still
receive gradients, so the new blocks learn from the first step.

The blur-width modulation (:class:`~.mpt.BlurModulation`) is grown the same way:
its last layer starts at zero, so the network deblurs as before, with or without a width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import ConfigError, MPTConfig
from .mpt import MPT, MilderBlur, PyramidSubBlock


def stage_names(level: int) -> list[str]:
    """Parameter-name prefixes of the stages at ``level`` (1-3: encoder and decoder; 4: the latent)."""
    if level == 4:
        return ["latent"]
    if level in (1, 2, 3):
        return [f"encoders.{level - 1}", f"decoders.{3 - level}"]
    raise ConfigError(f"level must be 1, 2, 3 or 4 (the latent), got {level}")


def deepen(model: MPT, level: int, scales: Sequence[float]) -> tuple[MPT, list[str]]:
    """A copy of ``model`` with blocks of pyramid scales ``scales`` appended to each stage at ``level``.

    Parameters
    ----------
    model
        The trained network; it is not changed.
    level
        1, 2 or 3 (the encoder and the decoder stage of that level both grow), or 4 (the latent).
    scales
        The pyramid scale of each new block (1, 1/2, 1/4, ...). Block ``i`` of a stage uses shifted
        windows when ``i`` is odd, so the new blocks continue the stage's alternation.

    Returns
    -------
    MPT, list of str
        The deeper network, in eval mode, whose output equals ``model``'s (its new blocks' output
        projections are zero), and the parameter-name prefixes of the new blocks (what
        ``TrainConfig.trainable`` takes to train them alone).
    """
    if not scales:
        raise ConfigError("give the pyramid scale of at least one new block")
    stages = stage_names(level)  # validates the level
    config = model.config
    index = level - 1
    num_blocks = list(config.num_blocks)
    level_scales = [list(s) for s in config.scales]
    first_new = num_blocks[index]
    num_blocks[index] += len(scales)
    level_scales[index] += [float(r) for r in scales]
    new_prefixes = [f"{stage}.{i}" for stage in stages for i in range(first_new, num_blocks[index])]
    grown = _grown_copy(
        model, config.replace(num_blocks=tuple(num_blocks), scales=tuple(tuple(s) for s in level_scales)), new_prefixes
    )
    with torch.no_grad():
        for prefix in new_prefixes:
            block = grown.get_submodule(prefix)
            assert isinstance(block, PyramidSubBlock)
            for projection in (block.isca.project_out, block.cswa.project_out, block.ffn.project_out):
                projection.zero_()
    return grown, new_prefixes


def condition_on_blur(model: MPT) -> MPT:
    """A copy of ``model`` that can be told the blur's width, deblurring exactly as ``model`` until trained.

    Parameters
    ----------
    model
        The trained network (without :class:`~.mpt.BlurModulation`); it is not changed.

    Returns
    -------
    MPT
        The network with the modulation (its last layer zero), in eval mode; train it with
        ``mpt-deblur train``, which gives every sample the width of its blur.
    """
    if model.config.blur_conditioned:
        raise ConfigError("the model already takes the blur's width")
    return _grown_copy(model, model.config.replace(blur_conditioned=True), ["blur_modulation"])


def add_blur_estimator(model: MPT) -> MPT:
    """A copy of a blur-conditioned ``model`` with an untrained :class:`~.blur_width.BlurWidthEstimator`.

    Its other weights and its card carry over; train the estimator with ``mpt-deblur train-estimator``.
    """
    if not model.config.blur_conditioned:
        raise ConfigError("only a model that takes the blur's width can use an estimate of it (grow --blur-width)")
    return _grown_copy(model, model.config.replace(blur_estimator=True), ["blur_estimator"])


def with_width_margin(model: MPT, margin: float) -> MPT:
    """A copy of a blur-conditioned ``model`` that reads every width it is given ``margin`` times wider.

    The weights and the card carry over, and its milder-blur network (:class:`~.mpt.MilderBlur`) reads the same
    margin; only ``MPTConfig.width_margin`` changes (validated there).
    """
    if not model.config.blur_conditioned:
        raise ConfigError("the model takes no blur width to widen (grow --blur-width)")
    config = model.config.replace(width_margin=margin)
    widened = _grown_copy(model, config, [])
    if model.milder_blur is not None:
        milder = _grown_copy(model.milder_blur.network, config, [])
        widened.milder_blur = MilderBlur(milder, model.milder_blur.below_width)
    return widened


def _grown_copy(model: MPT, config: MPTConfig, new_prefixes: list[str]) -> MPT:
    """A network of ``config`` holding ``model``'s weights, on its device, in eval mode, with its card.

    Only the parameters under ``new_prefixes`` may be new (they keep their initialisation for the caller to set);
    normalisation, tile size and provenance carry over, the architecture is the new one.
    """
    grown = MPT(config)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not key.startswith(tuple(p + "." for p in new_prefixes)) for key in missing):
        raise RuntimeError(f"growing moved existing weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
    card = getattr(model, "card", None)
    if card is not None:
        grown.card = card.replace(architecture=grown.config)
    return grown.to(next(model.parameters()).device).eval()
