"""Model files: one ``.safetensors`` file whose metadata holds the model card.

Loading accepts three kinds of source and tells them apart by content, not by
file name: our model files, reference-code checkpoints (plain ``state_dict``s
saved by ``torch.save``, read with ``weights_only=True``), and the names of
models bundled with the package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__
from ..atomic import atomic_write
from ..config import ConfigError, IntensityNormalization, ModelCard
from .mpt import MPT
from .official import (
    CheckpointImportError,
    convert_state_dict,
    infer_config,
    load_reference_state_dict,
    looks_like_reference,
    strip_prefix,
)

METADATA_KEY = "napari_mpt_deblur"
FORMAT_VERSION = 1

# Bundled model name -> file inside the package's ``weights`` folder.
BUNDLED_MODELS: dict[str, str] = {"default": "default.safetensors"}
"""``default``: the ``lite`` network trained on the bundled microscopy (docs/training.md has its command)."""

# The reference code feeds 8-bit images / 255 and 16-bit images min-max normalised per image.
REFERENCE_NORMALIZATION = IntensityNormalization(mode="minmax", per="plane")


class ModelFileError(ValueError):
    """A model file or checkpoint cannot be used; the message says why and what to do."""


def save_model(
    model: MPT,
    path: str | os.PathLike,
    *,
    normalization: IntensityNormalization | None = None,
    provenance: dict[str, Any] | None = None,
    tile_size: int | None = None,
) -> Path:
    """Write ``model`` as a model file (weights + JSON model card in the metadata).

    Missing arguments are taken from ``model.card`` when the model was loaded
    from a file. The file appears under its final name only once complete.
    """
    previous: ModelCard | None = getattr(model, "card", None)
    card = ModelCard(
        architecture=model.config,
        normalization=normalization or (previous.normalization if previous else IntensityNormalization()),
        provenance=dict(provenance if provenance is not None else (previous.provenance if previous else {})),
        tile_size=tile_size if tile_size is not None else (previous.tile_size if previous else None),
    )
    # when and by what this file was written (a fine-tuned copy must not keep its parent's)
    card.provenance["saved"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    card.provenance["software"] = f"napari-mpt-deblur {__version__}"
    tensors, metadata = _tensors_and_metadata(model, card)
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    model.card = card
    return path


def _tensors_and_metadata(model: MPT, card: ModelCard) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, **card.to_dict()})}
    return tensors, metadata


def model_to_bytes(model: MPT) -> bytes:
    """The model as the bytes of a model file (to send to other processes without a file)."""
    card = getattr(model, "card", None) or ModelCard(architecture=model.config)
    tensors, metadata = _tensors_and_metadata(model, card)
    return safetensors.torch.save(tensors, metadata=metadata)


def model_from_bytes(data: bytes) -> MPT:
    """Inverse of :func:`model_to_bytes`: the model in eval mode on the CPU, ``model.card`` set."""
    header_size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__", {})
    card = _card_from_metadata(metadata, "model bytes")
    model = MPT(card.architecture)
    model.load_state_dict(safetensors.torch.load(data))
    model.card = card
    return model.eval()


def _kind_of_file(path: Path) -> str:
    """'safetensors', 'torch' or 'unknown', from the first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04" or head[:2] == b"\x80\x02":  # torch zip / legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte little-endian header size, then JSON
        return "safetensors"
    return "unknown"


def read_model_card(path: str | os.PathLike) -> ModelCard:
    """The model card of one of our model files, without reading the weights."""
    path = Path(path)
    return _card_from_metadata(_safetensors_metadata(path), path)


def _card_from_metadata(metadata: dict[str, str], path: Any) -> ModelCard:
    if METADATA_KEY not in metadata:
        raise ModelFileError(
            f"{path}: a .safetensors file without napari-mpt-deblur metadata (a foreign model?). "
            "Reference-code checkpoints are imported with 'mpt-deblur import-official'."
        )
    try:
        data = json.loads(metadata[METADATA_KEY])
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ModelFileError(
                f"{path}: model file format version {version!r}; this napari-mpt-deblur reads version "
                f"{FORMAT_VERSION}: upgrade the package"
            )
        return ModelCard.from_dict(data)
    except (json.JSONDecodeError, AttributeError) as error:
        raise ModelFileError(f"{path}: the model card in the metadata is not valid JSON ({error})") from error
    except ConfigError as error:
        raise ModelFileError(f"{path}: invalid model card: {error}") from error


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ModelFileError(f"{path}: not a readable .safetensors file (truncated or corrupted?): {error}") from error


def _load_our_file(path: Path) -> MPT:
    card = read_model_card(path)
    model = MPT(card.architecture)
    expected = model.state_dict()
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or unexpected:
                raise ModelFileError(
                    f"{path}: the weights do not match the architecture in its metadata "
                    f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})"
                )
            tensors = {key: handle.get_tensor(key) for key in expected}
    except SafetensorError as error:
        raise ModelFileError(f"{path}: the weights cannot be read (truncated or corrupted?): {error}") from error
    _check_tensors(path, tensors, expected)
    model.load_state_dict(tensors)
    model.card = card
    return model


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise ModelFileError(
                f"{path}: '{key}' has shape {tuple(tensor.shape)}, the architecture needs {tuple(expected[key].shape)}"
            )
        if not tensor.is_floating_point():
            raise ModelFileError(f"{path}: '{key}' is {tensor.dtype}, not a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise ModelFileError(f"{path}: '{key}' holds NaN or infinite values (a diverged training run?)")


def import_official(
    source: str | os.PathLike | dict[str, torch.Tensor], scales: Sequence[Sequence[float]] | None = None
) -> MPT:
    """Build a model from a reference-code checkpoint (a path or a ``state_dict``).

    The model uses the ``official`` window pairing, so its outputs equal the
    reference code's. ``scales`` gives the pyramid scales when the checkpoint is
    not of the paper preset's shape.
    """
    name = "state_dict" if isinstance(source, dict) else Path(source).name
    try:
        if isinstance(source, dict):
            state_dict, digest = strip_prefix(source), None
        else:
            state_dict, digest = load_reference_state_dict(str(source))
        config = infer_config(state_dict, scales)
        converted = convert_state_dict(state_dict, config)
        model = MPT(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(converted))
        if missing:
            raise CheckpointImportError(f"the checkpoint lacks weights for {missing[:3]}")
    except (CheckpointImportError, ConfigError) as error:
        raise ModelFileError(f"{name}: cannot import as a reference MPT checkpoint: {error}") from error
    _check_tensors(Path(name), converted, expected)
    model.load_state_dict({key: value.float() for key, value in converted.items()})
    provenance: dict[str, Any] = {"imported_from": name, "source": "reference-code checkpoint"}
    if digest:
        provenance["sha256"] = digest
    model.card = ModelCard(config, REFERENCE_NORMALIZATION, provenance)
    return model


def bundled_model_path(name: str) -> Path:
    """Path of a model shipped inside the package."""
    filename = BUNDLED_MODELS[name]
    return Path(str(resources.files("napari_mpt_deblur") / "weights" / filename))


def load_model(
    source: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    scales: Sequence[Sequence[float]] | None = None,
) -> MPT:
    """Load a model in eval mode from a model file, a reference checkpoint or a bundled name.

    Parameters
    ----------
    source
        A ``.safetensors`` model file written by this package, a reference-code
        checkpoint (``.pth``), or the name of a bundled model.
    device
        Where to put the weights.
    scales
        Pyramid scales for a reference checkpoint that is not of the paper preset's shape.

    Returns
    -------
    MPT
        The network, in eval mode, with its :class:`ModelCard` as ``model.card``.

    Raises
    ------
    ModelFileError
        For a missing, truncated, corrupted, foreign or mismatched file.
    """
    if isinstance(source, str) and source in BUNDLED_MODELS:
        path = bundled_model_path(source)
        if not path.exists():
            raise ModelFileError(f"the bundled model {source!r} is missing from this installation ({path}); reinstall")
    else:
        path = Path(source)
        if not path.exists():
            bundled = ", ".join(sorted(BUNDLED_MODELS)) or "none in this version"
            raise ModelFileError(f"{source}: no such file, and not a bundled model name (bundled: {bundled})")
        if path.is_dir():
            raise ModelFileError(f"{source}: is a folder; give a model file (.safetensors or .pth)")
    kind = _kind_of_file(path)
    if kind == "safetensors":
        metadata = _safetensors_metadata(path)
        if METADATA_KEY in metadata:
            model = _load_our_file(path)
        else:
            # A reference state_dict re-saved as safetensors is accepted too.
            try:
                with safe_open(str(path), framework="pt") as handle:
                    keys = list(handle.keys())
                    if not looks_like_reference(keys):
                        raise ModelFileError(
                            f"{path}: a .safetensors file that is neither a napari-mpt-deblur model "
                            "(no model card in its metadata) nor a reference MPT checkpoint"
                        )
                    state_dict = {key: handle.get_tensor(key) for key in keys}
            except SafetensorError as error:
                raise ModelFileError(f"{path}: the weights cannot be read: {error}") from error
            model = import_official(state_dict, scales)
            model.card.provenance["imported_from"] = path.name
    elif kind == "torch":
        model = import_official(path, scales)
    else:
        raise ModelFileError(
            f"{path}: not a model file (expected a napari-mpt-deblur .safetensors file or a PyTorch checkpoint)"
        )
    return model.to(device).eval()


def describe_model(model: MPT) -> dict[str, Any]:
    """A JSON-ready summary: configuration, parameter count, normalisation, provenance."""
    card: ModelCard | None = getattr(model, "card", None)
    return {
        "architecture": model.config.to_dict(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "size_multiple": model.config.size_multiple,
        "normalization": asdict(card.normalization) if card else None,
        "tile_size": card.tile_size if card else None,
        "provenance": card.provenance if card else {},
    }
