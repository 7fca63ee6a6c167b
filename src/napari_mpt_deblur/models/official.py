"""Import of checkpoints saved by the MPT paper's reference code.

A reference checkpoint is a plain ``state_dict`` (tensors only). Its key names
are mapped onto :class:`~napari_mpt_deblur.models.mpt.MPT`; every key must be
consumed and every parameter filled, or the import fails with the list of what
did not match. Channels, per-level block counts, heads and FFN width are read
from the shapes; the pyramid scales cannot be, so they come from the paper
preset unless the caller gives them.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..config import MPTConfig
from .windows import relative_position_index

PREFIXES = ("module.Network.", "module.")

# Reference stage name -> our stage path.
STAGES = {
    "encoder_level1": "encoders.0",
    "encoder_level2": "encoders.1",
    "encoder_level3": "encoders.2",
    "latent": "latent",
    "decoder_level3": "decoders.0",
    "decoder_level2": "decoders.1",
    "decoder_level1": "decoders.2",
}
STAGE_LEVEL = {"encoder_level1": 0, "encoder_level2": 1, "encoder_level3": 2, "latent": 3}

NETWORK_KEYS = {
    "inproj.weight": "stem.weight",
    "down1_2.body.0.weight": "downsamples.0.conv.weight",
    "down2_3.body.0.weight": "downsamples.1.conv.weight",
    "down3_4.body.0.weight": "downsamples.2.conv.weight",
    "up4_3.body.0.weight": "upsamples.0.conv.weight",
    "up3_2.body.0.weight": "upsamples.1.conv.weight",
    "up2_1.body.0.weight": "upsamples.2.conv.weight",
    "output.weight": "head.weight",
}

# Reference key inside a block -> our key; 1x1 conv weights are stored as (out, in).
BLOCK_KEYS = {
    "norm1.body.weight": "norm1.weight",
    "norm1.body.bias": "norm1.bias",
    "norm2.0.body.weight": "norm2a.weight",
    "norm2.0.body.bias": "norm2a.bias",
    "norm2.1.body.weight": "norm2b.weight",
    "norm2.1.body.bias": "norm2b.bias",
    "attn.temperature.0": "isca.temperature",
    "attn.project_out.0.weight": "isca.project_out",
    "attn.temperature.1": "cswa.temperature",
    "attn.q.1.weight": "cswa.to_q",
    "attn.q_dwconv.1.weight": "cswa.q_dwconv",
    "attn.kv.1.weight": "cswa.to_kv",
    "attn.kv_dwconv.1.weight": "cswa.kv_dwconv",
    "attn.project_out.1.weight": "cswa.project_out",
    "attn.relative_position_bias_table": "cswa.relative_position_bias_table",
    "attn.downsamp.downproj.weight": "cswa.pool_proj",
    "ffn.project_in1.weight": "ffn.context_in",
    "ffn.dwconv1.weight": "ffn.context_dwconv",
    "ffn.project_in2.weight": "ffn.spatial_in",
    "ffn.project_out.weight": "ffn.project_out",
}
# Our fused ISCA projections are the concatenation of two reference tensors (Q first).
FUSED_BLOCK_KEYS = {
    "isca.to_qkv": ("attn.q.0.weight", "attn.kv.0.weight"),
    "isca.qkv_dwconv": ("attn.q_dwconv.0.weight", "attn.kv_dwconv.0.weight"),
}
DERIVED_BLOCK_KEYS = ("attn.relative_position_index",)

_BLOCK_RE = re.compile(r"^(encoder_level[123]|latent|decoder_level[123])\.(\d+)\.(.+)$")


class CheckpointImportError(ValueError):
    """A reference checkpoint cannot be mapped onto the network."""


def strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.Network.`` / ``module.`` prefix that DataParallel wrappers add."""
    for prefix in PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            return {key[len(prefix) :]: value for key, value in state_dict.items()}
    return dict(state_dict)


def looks_like_reference(keys: Iterable[str]) -> bool:
    """Whether tensor names are the reference code's (with or without a wrapper prefix)."""
    keys = list(keys)
    for prefix in ("", *PREFIXES):
        names = {key[len(prefix) :] for key in keys if key.startswith(prefix)}
        if "inproj.weight" in names and any(name.startswith("encoder_level1.") for name in names):
            return True
    return False


def infer_config(state_dict: Mapping[str, Tensor], scales: Sequence[Sequence[float]] | None = None) -> MPTConfig:
    """Read the architecture from a reference ``state_dict``'s shapes.

    Parameters
    ----------
    state_dict
        Reference checkpoint, prefix already stripped.
    scales
        Pyramid scale of every block per level. Default: the paper preset's,
        which only fits checkpoints with 6 blocks per level.
    """
    if "inproj.weight" not in state_dict:
        raise CheckpointImportError("not a reference MPT checkpoint: it has no 'inproj.weight'")
    stem = state_dict["inproj.weight"]
    if stem.dim() != 4:
        raise CheckpointImportError(f"'inproj.weight' should be a 4-D conv weight, got shape {tuple(stem.shape)}")
    dim, in_channels = int(stem.shape[0]), int(stem.shape[1])
    blocks = {name: set() for name in STAGE_LEVEL}
    for key in state_dict:
        match = _BLOCK_RE.match(key)
        if match and match.group(1) in blocks:
            blocks[match.group(1)].add(int(match.group(2)))
    num_blocks = []
    heads = []
    for name in STAGE_LEVEL:
        indices = blocks[name]
        if not indices or indices != set(range(len(indices))):
            raise CheckpointImportError(f"stage '{name}' has blocks {sorted(indices)}; expected 0..N-1")
        num_blocks.append(len(indices))
        table = state_dict.get(f"{name}.0.attn.relative_position_bias_table")
        if table is None or table.dim() != 2:
            raise CheckpointImportError(f"'{name}.0.attn.relative_position_bias_table' is missing or not 2-D")
        heads.append(int(table.shape[1]))
    table_rows = state_dict["encoder_level1.0.attn.relative_position_bias_table"].shape[0]
    window_size = (int(round(table_rows**0.5)) + 1) // 2
    hidden = int(state_dict["encoder_level1.0.ffn.project_in1.weight"].shape[0])
    expansion = 2.6 if int(dim * 2.6) == hidden else hidden / dim
    if scales is None:
        paper_scales = MPTConfig().scales
        if any(n != len(level) for n, level in zip(num_blocks, paper_scales)):
            raise CheckpointImportError(
                f"the checkpoint has {num_blocks} blocks per level, not the paper's [6, 6, 6, 6]; "
                "give the pyramid scales of every block (e.g. --scales '1/8,1/8,1,1;1/4,1/4,1/2,1/2;1/2,1/2;1/2,1/2')"
            )
        scales = paper_scales
    config = MPTConfig(
        in_channels=in_channels,
        out_channels=int(state_dict["output.weight"].shape[0]) if "output.weight" in state_dict else in_channels,
        dim=dim,
        num_blocks=tuple(num_blocks),
        heads=tuple(heads),
        scales=tuple(tuple(level) for level in scales),
        ffn_expansion=expansion,
        window_size=window_size,
        pairing="official",
    )
    # Blocks with r < 1 carry the pooled map's projection; check the scales agree.
    for name, level in STAGE_LEVEL.items():
        for i, r in enumerate(config.scales[level]):
            has_pool = f"{name}.{i}.attn.downsamp.downproj.weight" in state_dict
            if has_pool != (r < 1):
                raise CheckpointImportError(
                    f"block '{name}.{i}' {'has' if has_pool else 'lacks'} a pooled-map projection, "
                    f"but its scale is {r}: the given scales do not match this checkpoint"
                )
    return config


def convert_state_dict(state_dict: Mapping[str, Tensor], config: MPTConfig) -> dict[str, Tensor]:
    """Map reference keys onto ours; every reference key must be consumed.

    Raises
    ------
    CheckpointImportError
        When a key is left over or one we need is missing.
    """
    source = dict(state_dict)
    consumed: set[str] = set()
    converted: dict[str, Tensor] = {}

    def take(key: str) -> Tensor:
        if key not in source:
            raise CheckpointImportError(f"the checkpoint lacks '{key}'")
        consumed.add(key)
        return source[key]

    for ref_key, our_key in NETWORK_KEYS.items():
        converted[our_key] = take(ref_key)

    expected_index = relative_position_index(config.window_size)
    for ref_stage, our_stage in STAGES.items():
        level = int(ref_stage[-1]) - 1 if ref_stage != "latent" else 3
        for i, r in enumerate(config.scales[level]):
            ref = f"{ref_stage}.{i}."
            ours = f"{our_stage}.{i}."
            for ref_key, our_key in BLOCK_KEYS.items():
                if ref_key == "attn.downsamp.downproj.weight" and r == 1:
                    continue
                tensor = take(ref + ref_key)
                if our_key.endswith("temperature"):
                    tensor = tensor.reshape(-1)
                elif tensor.dim() == 4 and not our_key.endswith("dwconv"):  # 1x1 conv -> linear
                    tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
                converted[ours + our_key] = tensor
            for our_key, parts in FUSED_BLOCK_KEYS.items():
                tensors = [take(ref + part) for part in parts]
                if our_key.endswith("to_qkv"):
                    tensors = [t.reshape(t.shape[0], t.shape[1]) for t in tensors]
                converted[ours + our_key] = torch.cat(tensors, dim=0)
            for derived in DERIVED_BLOCK_KEYS:
                key = ref + derived
                if key in source:
                    consumed.add(key)
                    if not torch.equal(source[key].long().cpu(), expected_index):
                        raise CheckpointImportError(f"'{key}' is not Swin's relative position index")

    leftover = sorted(set(source) - consumed)
    if leftover:
        shown = ", ".join(leftover[:5]) + (" ..." if len(leftover) > 5 else "")
        raise CheckpointImportError(f"{len(leftover)} checkpoint key(s) do not fit the inferred architecture: {shown}")
    return converted


_OTHER_FORMATS = {
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
    b"\x89PNG": "a PNG image",
    b"\x89HDF": "an HDF5 file",
    b"\xff\xd8\xff": "a JPEG image",
}
"""Leading bytes of files people pass by mistake; torch's own error would blame 'Python objects'."""


def load_reference_state_dict(path: str) -> tuple[dict[str, Tensor], str]:
    """Read a reference checkpoint without unpickling code (``weights_only=True``).

    Returns the state_dict (prefix stripped) and the file's SHA-256, from one read.
    """
    try:
        data = Path(path).read_bytes()
        kind = next((name for magic, name in _OTHER_FORMATS.items() if data.startswith(magic)), None)
        if kind is not None:
            raise CheckpointImportError(f"not a PyTorch checkpoint: the file is {kind}")
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except CheckpointImportError:
        raise
    except Exception as error:  # torch raises many types for bad files
        if "Weights only load failed" in str(error):
            reason = "it holds Python objects besides tensors, which are never unpickled here"
        else:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointImportError(
            f"not a readable PyTorch checkpoint (only plain state_dicts of tensors are accepted): {reason}"
        ) from error
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if isinstance(loaded, dict) and "params" in loaded and isinstance(loaded["params"], dict):
        loaded = loaded["params"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointImportError(f"expected a state_dict of tensors, got {type(loaded).__name__}")
    return strip_prefix(loaded), hashlib.sha256(data).hexdigest()
