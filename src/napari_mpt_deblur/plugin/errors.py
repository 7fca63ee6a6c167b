"""What a dock tells the user about an error that stopped its work, with what to try (no Qt, no napari).

One rule for every dock (:func:`user_message`); each dock's :class:`ErrorAdvice` (:data:`DEBLUR`,
:data:`FINETUNE`, :data:`COMPARE`) says what to try for the errors it expects. Errors nobody expects are
logged in full, since the message can only name them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import ConfigError
from ..detection.worker import DetectionError
from ..images import ImageError
from ..inference import InputError
from ..models.files import ModelFileError

logger = logging.getLogger(__name__)


def out_of_memory(error: BaseException) -> bool:
    """Whether an error says the CPU or a GPU ran out of memory."""
    import torch

    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(error).lower()


@dataclass(frozen=True)
class ErrorAdvice:
    """How one dock words its errors. Templates fill in ``{text}``, the error's message without a final full stop."""

    task: str
    """What failed, in lower case (``deblurring``): for unexpected errors and the log."""
    out_of_memory: str
    """The template for running out of memory (checked first: any error may say so)."""
    expected: Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], str]]
    """(error types, template) for the errors the dock expects; the first that matches is used."""


def user_message(error: BaseException, advice: ErrorAdvice) -> str:
    """The message for the user about ``error``, worded by a dock's ``advice``.

    Parameters
    ----------
    error
        What stopped the work.
    advice
        The dock's templates.

    Returns
    -------
    str
        The filled template of the first kind of error that matches; for another error,
        ``"<Task> failed: <type>: <message>. The Python log has the details."``, and the error with its
        traceback goes to the log.
    """
    text = (str(error) or type(error).__name__).strip().rstrip(". ")
    if out_of_memory(error):
        return advice.out_of_memory.format(text=text)
    for kinds, template in advice.expected:
        if isinstance(error, kinds):
            return template.format(text=text)
    logger.error("%s failed", advice.task, exc_info=error)
    return f"{advice.task.capitalize()} failed: {type(error).__name__}: {text}. The Python log has the details."


DEBLUR = ErrorAdvice(
    task="deblurring",
    out_of_memory="Out of memory ({text}): try smaller tiles or the CPU.",
    expected=[((InputError, ModelFileError, ConfigError), "{text}.")],  # their messages say what to do
)
"""The Deblur dock's words."""

FINETUNE = ErrorAdvice(
    task="fine-tuning",
    out_of_memory="Out of memory ({text}). Use a smaller patch or batch, or the cpu device.",
    expected=[
        (ModelFileError, "{text}. Pick another model file."),
        (FloatingPointError, "Fine-tuning diverged: {text}."),  # the engine's message says to lower the rate
        (OSError, "{text}. Check the disk space and permissions of the temporary folder."),
        (ValueError, "{text}. Check the selected layers and settings."),
    ],
)
"""The Fine-tune dock's words."""

COMPARE = ErrorAdvice(
    task="detection",
    out_of_memory="Out of memory ({text}): crop the layers, or deblur on the CPU.",
    expected=[
        (DetectionError, "Detection failed: {text}."),  # WorkerCrashed included: it says it restarts next time
        (ModelFileError, "{text}. Pick another deblurring model."),
        ((InputError, ImageError, ConfigError, ValueError), "{text}. Check the chosen layers and settings."),
    ],
)
"""The Compare detections dock's words."""
