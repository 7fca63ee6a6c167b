"""Model files: one ``.safetensors`` file whose metadata holds the model card.

Loading accepts four kinds of source and tells them apart by content, not by
file name: our model files, reference-code checkpoints (plain ``state_dict``s
saved by ``torch.save``, read with ``weights_only=True``), bioimage.io packages
that this package exported (:mod:`.bioimageio`), and the names of models
bundled with the package.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..atomic import atomic_write
from ..config import ConfigError, IntensityNormalization, ModelCard, MPTConfig
from .mpt import MPT, MilderBlur
from .official import (
    CheckpointImportError,
    convert_state_dict,
    infer_config,
    load_reference_state_dict,
    looks_like_reference,
    strip_prefix,
)

CARD_KEY = "napari_mpt_deblur"
"""Key of the model file's metadata entry (and of a bioimage.io package's ``config``) that holds its card."""
FORMAT_VERSION = 1
MAX_CARD_DEPTH = 32
"""Deepest nesting of JSON objects and lists a model card may have (ours: 4)."""

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
        in_focus_optics=previous.in_focus_optics if previous else None,
    )
    # when and by what this file was written (a fine-tuned copy must not keep its parent's)
    card.provenance["saved"] = datetime.now(UTC).isoformat(timespec="seconds")
    card.provenance["software"] = f"napari-mpt-deblur {__version__}"
    tensors, metadata, card = _tensors_and_metadata(model, card)
    path = Path(path)
    atomic_write(path, lambda tmp: _write_safetensors(tensors, tmp, metadata, path))
    model.card = card
    return path


def _write_safetensors(tensors: dict[str, torch.Tensor], tmp: Path, metadata: dict[str, str], target: Path) -> None:
    """``save_file``, with its I/O failures (a full disk...) raised as an ``OSError`` that names ``target``.

    safetensors reports them as a ``SafetensorError`` whose text ends with "(os error N)".
    """
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as error:
        code = re.search(r"os error (\d+)", str(error))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, f"{target}: cannot write the model file: {os.strerror(number)}") from error


MILDER_BLUR_PREFIX = "milder_blur."
"""Prefix of the tensors of a model file's second network, for milder blur (:class:`~.mpt.MilderBlur`)."""


def _tensors_and_metadata(model: MPT, card: ModelCard) -> tuple[dict[str, torch.Tensor], dict[str, str], ModelCard]:
    """The file's tensors and metadata (the network's tensors, its milder-blur network's prefixed, and the card).

    The card's ``milder_blur_below_width`` is taken from the model, the one place it is kept while it runs; the
    card as written is returned too.
    """
    milder = model.milder_blur
    card = card.replace(milder_blur_below_width=None if milder is None else float(milder.below_width))
    tensors = _float32_tensors(model)
    if milder is not None:
        tensors.update({MILDER_BLUR_PREFIX + key: value for key, value in _float32_tensors(milder.network).items()})
    metadata = {"format": "pt", CARD_KEY: json.dumps({"format_version": FORMAT_VERSION, **card.to_dict()})}
    return tensors, metadata, card


def _float32_tensors(model: MPT) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}


def _build_model(card: ModelCard, tensors: dict[str, torch.Tensor]) -> MPT:
    """The network ``card`` describes with ``tensors`` (checked already), its milder-blur network attached."""
    own = {key: value for key, value in tensors.items() if not key.startswith(MILDER_BLUR_PREFIX)}
    model = MPT(card.architecture)
    model.load_state_dict(own)
    if card.milder_blur_below_width is not None:
        milder = MPT(card.architecture)
        prefix = len(MILDER_BLUR_PREFIX)
        milder.load_state_dict({key[prefix:]: value for key, value in tensors.items() if key not in own})
        model.milder_blur = MilderBlur(milder.eval(), card.milder_blur_below_width)
    model.card = card
    return model


def model_to_bytes(model: MPT) -> bytes:
    """The model as the bytes of a model file (to send to other processes without a file)."""
    card = getattr(model, "card", None) or ModelCard(architecture=model.config)
    tensors, metadata, _ = _tensors_and_metadata(model, card)
    return safetensors.torch.save(tensors, metadata=metadata)


def model_from_bytes(data: bytes) -> MPT:
    """Inverse of :func:`model_to_bytes`: the model in eval mode on the CPU, ``model.card`` set."""
    header_size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__", {})
    card = _card_from_metadata(metadata, "model bytes")
    tensors = safetensors.torch.load(data)
    _check_shapes("model bytes", {key: tuple(t.shape) for key, t in tensors.items()}, card)
    return _build_model(card, tensors).eval()


def expected_shapes(config: MPTConfig | ModelCard) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the network ``config`` describes, allocating nothing.

    Given a card whose model holds a milder-blur network, its tensors too (prefixed :data:`MILDER_BLUR_PREFIX`).
    The network is built on PyTorch's ``meta`` device (shapes without storage), so a card that
    describes a huge network costs nothing before it is compared with the file's tensors.
    """
    card = config if isinstance(config, ModelCard) else None
    with torch.device("meta"):
        skeleton = MPT(card.architecture if card else config)
    shapes = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    if card is not None and card.milder_blur_below_width is not None:
        shapes.update({MILDER_BLUR_PREFIX + key: shape for key, shape in list(shapes.items())})
    return shapes


def _check_shapes(path: Any, shapes: dict[str, tuple[int, ...]], config: MPTConfig | ModelCard) -> None:
    """Refuse tensors (names and shapes, e.g. from a safetensors header) that do not fit the card's network(s)."""
    expected = expected_shapes(config)
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ModelFileError(
            f"{path}: the weights do not match the architecture in its metadata "
            f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise ModelFileError(f"{path}: '{key}' has shape {shapes[key]}, the architecture needs {shape}")


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
    """The validated card; every problem (bad JSON, odd types, absurd numbers) is one :class:`ModelFileError`."""
    if CARD_KEY not in metadata:
        raise ModelFileError(
            f"{path}: a .safetensors file without napari-mpt-deblur metadata (a foreign model?). "
            "Reference-code checkpoints are imported with 'mpt-deblur import-official'."
        )
    try:
        data = json.loads(metadata[CARD_KEY])
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path}: the model card in the metadata is not valid JSON ({error})") from error
    except RecursionError:
        raise ModelFileError(f"{path}: invalid model card: nested too deeply") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: invalid model card: a JSON {type(data).__name__}, not an object")
    if _nesting_depth(data) > MAX_CARD_DEPTH:
        raise ModelFileError(f"{path}: invalid model card: nested more than {MAX_CARD_DEPTH} levels deep")
    version = data.pop("format_version", None)
    # type(...) is int: "1", 1.0 and true are not versions any release writes (true == 1 in Python)
    if type(version) is not int or version < 1:
        raise ModelFileError(
            f"{path}: invalid format_version {version!r} in the model card (an integer is expected); "
            "the file was not written by napari-mpt-deblur, or was edited"
        )
    if version != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format version {version}; this napari-mpt-deblur reads version "
            f"{FORMAT_VERSION}: upgrade the package"
        )
    try:
        return ModelCard.from_dict(data)
    except ConfigError as error:
        raise ModelFileError(f"{path}: invalid model card: {error}") from error


def _nesting_depth(value: Any) -> int:
    """How deeply JSON containers nest in ``value`` (without recursion, whatever the depth)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ModelFileError(f"{path}: not a readable .safetensors file (truncated or corrupted?): {error}") from error


def _load_our_file(path: Path) -> MPT:
    card = read_model_card(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            # Names, shapes and types come from the header: a card that does not describe these very
            # tensors is refused before any network is built, so opening a file costs about its size.
            header = {key: handle.get_slice(key) for key in handle.keys()}
            _check_shapes(path, {key: tuple(part.get_shape()) for key, part in header.items()}, card)
            for key, part in header.items():
                if part.get_dtype() not in FLOAT_DTYPES:
                    raise ModelFileError(f"{path}: '{key}' is {part.get_dtype()}, not a floating-point tensor")
            tensors = {key: handle.get_tensor(key) for key in header}
    except SafetensorError as error:
        raise ModelFileError(f"{path}: the weights cannot be read (truncated or corrupted?): {error}") from error
    _check_tensors(path, tensors, {key: tuple(part.get_shape()) for key, part in header.items()})
    return _build_model(card, tensors)


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
"""safetensors dtype names of the floating-point tensors a model file may hold."""


def check_torch_zip(path: Path, data: bytes | None = None) -> None:
    """Refuse a PyTorch zip checkpoint with compressed or inconsistent entries, before torch reads it.

    ``torch.save`` stores every entry uncompressed, so a compressed entry means a crafted file, and
    inflating it could cost far more memory than the file's size (a zip bomb). Stored entries are
    no larger than the file, so reading the checkpoint costs about its size. ``data``: the
    checkpoint's bytes when it is no file of its own (a member of a package, which ``path`` names).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data) if data is not None else path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: not a readable PyTorch checkpoint (a damaged zip file: {error})") from error
    size = len(data) if data is not None else path.stat().st_size
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise ModelFileError(
                f"{path}: entry '{entry.filename}' is compressed; torch.save never compresses, "
                "so this is not a checkpoint it wrote (refused: inflating it could exhaust memory)"
            )
        if entry.file_size != entry.compress_size or entry.file_size > size:
            raise ModelFileError(f"{path}: entry '{entry.filename}' claims a size the file does not hold")
    if sum(entry.file_size for entry in entries) > size:
        raise ModelFileError(f"{path}: its entries claim more bytes than the file holds")


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Shapes (against :func:`expected_shapes`), floating point, finite values."""
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != expected[key]:
            raise ModelFileError(
                f"{path}: '{key}' has shape {tuple(tensor.shape)}, the architecture needs {expected[key]}"
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
            if zipfile.is_zipfile(source):
                check_torch_zip(Path(source))
            state_dict, digest = load_reference_state_dict(str(source))
        config = infer_config(state_dict, scales)
        converted = convert_state_dict(state_dict, config)
        expected = expected_shapes(config)
        missing = sorted(set(expected) - set(converted))
        if missing:
            raise CheckpointImportError(f"the checkpoint lacks weights for {missing[:3]}")
    except (CheckpointImportError, ConfigError) as error:
        raise ModelFileError(f"{name}: cannot import as a reference MPT checkpoint: {error}") from error
    _check_tensors(Path(name), converted, expected)  # before building: shapes that lie cost nothing
    model = MPT(config)
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
    """Load a model in eval mode from a model file, a reference checkpoint, a bioimage.io package or a bundled name.

    Parameters
    ----------
    source
        A ``.safetensors`` model file written by this package, a reference-code
        checkpoint (``.pth``), a bioimage.io package (``.zip``) this package
        exported (:mod:`~napari_mpt_deblur.models.bioimageio`; packages of other
        networks are refused), or the name of a bundled model.
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
        For a missing, truncated, corrupted, foreign or mismatched file, or a
        bioimage.io package of another network.
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
            raise ModelFileError(f"{source}: is a folder; give a model file (.safetensors, .pth or a bioimage.io .zip)")
    kind = _kind_of_file(path)
    if kind == "safetensors":
        metadata = _safetensors_metadata(path)
        if CARD_KEY in metadata:
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
        from . import bioimageio  # it imports this module, so not at the top

        # a bioimage.io package is a zip too: told apart from torch.save's by its description file
        model = bioimageio.load_package(path) if bioimageio.is_package(path) else import_official(path, scales)
    else:
        raise ModelFileError(
            f"{path}: not a model file (expected a napari-mpt-deblur .safetensors file, a PyTorch checkpoint "
            "or a bioimage.io package)"
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
        "milder_blur_below_width": None if model.milder_blur is None else model.milder_blur.below_width,
        "in_focus_optics": card.in_focus_optics.to_dict() if card and card.in_focus_optics else None,
        "provenance": card.provenance if card else {},
    }
