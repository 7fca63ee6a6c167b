"""Validated configuration objects that travel inside model files.

Everything here is a plain frozen dataclass that checks itself on creation and
round-trips through JSON (``to_dict`` / ``from_dict``), so a configuration read
from a file a user hands us is validated exactly like one written in code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from dataclasses import replace as dataclass_replace
from typing import Any, Literal

Pairing = Literal["aligned", "official"]
PAIRINGS: tuple[str, ...] = ("aligned", "official")


class ConfigError(ValueError):
    """A configuration (or the metadata of a model file) is invalid."""


def _check_keys(cls: type, data: dict[str, Any]) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")


def from_json_object(cls: type, data: Any, what: str) -> Any:
    """``cls(**data)`` for a dict read from JSON; every problem becomes a :class:`ConfigError` naming ``what``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object, got {type(data).__name__}")
    _check_keys(cls, data)
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"invalid {what}: {error}") from error


@dataclass(frozen=True)
class MPTConfig:
    """Architecture of a Multi-Pyramid Transformer (spec section 1)."""

    in_channels: int = 1
    """Image channels the network reads (1 for grayscale microscopy, 3 for RGB)."""

    out_channels: int = 1
    """Image channels the network writes; equal to ``in_channels`` because of the global residual."""

    dim: int = 40
    """Feature width C at level 1; level ``l`` (0-based) has ``C * 2**l`` channels."""

    num_blocks: tuple[int, int, int, int] = (6, 6, 6, 6)
    """Pyramid sub-blocks per level (levels 1-3 encoder and decoder each, then the latent)."""

    heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    """Attention heads per level; ``C * 2**l`` must be divisible by ``heads[l]``."""

    scales: tuple[tuple[float, ...], ...] = (
        (1 / 8, 1 / 8, 1 / 4, 1 / 4, 1.0, 1.0),
        (1 / 4, 1 / 4, 1 / 2, 1 / 2, 1.0, 1.0),
        (1 / 2, 1 / 2, 1 / 2, 1 / 2, 1.0, 1.0),
        (1 / 2, 1 / 2, 1 / 2, 1 / 2, 1.0, 1.0),
    )
    """Pyramid scale r of every block, per level: 1, 1/2, 1/4, ... (one entry per block)."""

    ffn_expansion: float = 2.6
    """FEFN hidden width is ``int(width * ffn_expansion)``."""

    window_size: int = 8
    """Side of the square attention window in tokens (the reference code uses 8)."""

    pairing: Pairing = "aligned"
    """How a full-resolution window finds its pooled window: ``aligned`` (the paper's
    description, default for new models) or ``official`` (bit-compatible with the
    reference code and its released checkpoints)."""

    def __post_init__(self) -> None:
        # Normalise sequences so JSON lists and tuples compare equal.
        object.__setattr__(self, "num_blocks", tuple(int(n) for n in self.num_blocks))
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "scales", tuple(tuple(float(r) for r in level) for level in self.scales))
        self._validate()

    def _validate(self) -> None:
        if self.in_channels < 1:
            raise ConfigError(f"in_channels must be a positive integer, got {self.in_channels}")
        if self.out_channels != self.in_channels:
            raise ConfigError(
                f"out_channels ({self.out_channels}) must equal in_channels ({self.in_channels}): "
                "the network adds its input to its output (global residual)"
            )
        if self.dim < 2 or self.dim % 2:
            raise ConfigError(f"dim must be an even integer >= 2 (downsampling halves it), got {self.dim}")
        if len(self.num_blocks) != 4 or len(self.heads) != 4 or len(self.scales) != 4:
            raise ConfigError("num_blocks, heads and scales must each have 4 entries (3 levels + latent)")
        for level, (n, h, level_scales) in enumerate(zip(self.num_blocks, self.heads, self.scales)):
            width = self.dim * 2**level
            if n < 1:
                raise ConfigError(f"level {level + 1}: num_blocks must be >= 1, got {n}")
            if h < 1 or width % h:
                raise ConfigError(f"level {level + 1}: width {width} is not divisible by heads={h}")
            if len(level_scales) != n:
                raise ConfigError(
                    f"level {level + 1}: {len(level_scales)} scales given for {n} blocks (one scale per block)"
                )
            for r in level_scales:
                inverse = 1.0 / r if r > 0 else 0.0
                if not (0 < r <= 1) or abs(inverse - round(inverse)) > 1e-9 or not _is_power_of_two(round(inverse)):
                    raise ConfigError(f"level {level + 1}: scale {r} is not 1, 1/2, 1/4, 1/8, ...")
        if self.ffn_expansion <= 0:
            raise ConfigError(f"ffn_expansion must be positive, got {self.ffn_expansion}")
        if self.window_size < 2 or self.window_size % 2:
            raise ConfigError(f"window_size must be an even integer >= 2, got {self.window_size}")
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")

    @property
    def size_multiple(self) -> int:
        """Height and width the network needs: every pooled map must tile into windows."""
        return max(
            int(round(self.window_size * 2**level / r))
            for level, level_scales in enumerate(self.scales)
            for r in level_scales
        )

    def replace(self, **changes: Any) -> MPTConfig:
        """A copy with some fields changed (validated again)."""
        return MPTConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["num_blocks"] = list(self.num_blocks)
        data["heads"] = list(self.heads)
        data["scales"] = [list(level) for level in self.scales]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MPTConfig:
        return from_json_object(cls, data, "architecture")

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> MPTConfig:
        return cls.from_dict(json.loads(text))


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class IntensityNormalization:
    """How image intensities are mapped to the network's input range."""

    mode: Literal["percentile", "minmax", "fixed"] = "percentile"
    """``percentile``: map the ``low``/``high`` percentiles to 0/1 (CSBDeep style);
    ``minmax``: map the minimum/maximum to 0/1 (the reference code on 16-bit data);
    ``fixed``: map the fixed values ``low``/``high`` to 0/1 (the reference code's
    8-bit data: low 0, high 255)."""

    low: float = 1.0
    """Lower percentile (``percentile`` mode) or the value mapped to 0 (``fixed`` mode)."""

    high: float = 99.8
    """Upper percentile (``percentile`` mode) or the value mapped to 1 (``fixed`` mode)."""

    per: Literal["plane", "stack"] = "plane"
    """Whether statistics are taken per 2-D plane or over the whole stack."""

    def __post_init__(self) -> None:
        if self.mode not in ("percentile", "minmax", "fixed"):
            raise ConfigError(f"normalization mode must be percentile, minmax or fixed, got {self.mode!r}")
        if self.per not in ("plane", "stack"):
            raise ConfigError(f"normalization 'per' must be plane or stack, got {self.per!r}")
        if self.mode == "percentile" and not (0 <= self.low < self.high <= 100):
            raise ConfigError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")
        if self.mode == "fixed" and not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ConfigError(f"fixed normalization needs finite values with low < high, got {self.low}, {self.high}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensityNormalization:
        if not isinstance(data, dict):
            raise ConfigError("normalization must be a JSON object")
        _check_keys(cls, data)
        return cls(**data)


@dataclass(frozen=True)
class ModelCard:
    """Everything a model file records besides its weights."""

    architecture: MPTConfig
    """The network to build."""

    normalization: IntensityNormalization = field(default_factory=IntensityNormalization)
    """Intensity normalisation the weights were trained with; inference must match it."""

    provenance: dict[str, Any] = field(default_factory=dict)
    """Free-form facts: what it was trained on, for how long, from which file it was imported."""

    tile_size: int | None = None
    """Preferred inference tile side in pixels (None: the training patch size or a default)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture.to_dict(),
            "normalization": asdict(self.normalization),
            "provenance": dict(self.provenance),
            "tile_size": self.tile_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        if not isinstance(data, dict) or "architecture" not in data:
            raise ConfigError("model card must be a JSON object with an 'architecture' entry")
        _check_keys(cls, data)
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise ConfigError("provenance must be a JSON object")
        tile_size = data.get("tile_size")
        if tile_size is not None and (not isinstance(tile_size, int) or tile_size < 8):
            raise ConfigError(f"tile_size must be an integer >= 8 or null, got {tile_size!r}")
        return cls(
            architecture=MPTConfig.from_dict(data["architecture"]),
            normalization=IntensityNormalization.from_dict(data.get("normalization", {})),
            provenance=provenance,
            tile_size=tile_size,
        )


Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class DeblurSettings:
    """How the inference engine runs a model over images (every field has a safe default)."""

    tile: int | None = None
    """Tile side in pixels. ``None``: the model file's preferred tile size, else 512;
    ``0``: whole planes, no tiling (memory grows with the plane)."""

    overlap: int | None = None
    """Pixels shared by neighbouring tiles; their outputs are blended over this width.
    ``None``: a quarter of the tile, at most 64. At most half the tile."""

    batch: int | None = None
    """Tiles per forward pass. ``None``: 1 on the CPU (batching does not speed it up
    there), 4 on a GPU. Halved automatically when a GPU runs out of memory."""

    device: str = "auto"
    """``auto`` (CUDA, then Apple MPS, then the CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""

    precision: Precision = "auto"
    """Arithmetic of the forward pass: ``auto`` (fp32 on the CPU, fp16 autocast on GPUs),
    ``fp32``, or ``fp16``/``bf16`` autocast."""

    normalization: IntensityNormalization | None = None
    """Intensity normalisation; ``None`` uses what the model file records (it was trained with it)."""

    def __post_init__(self) -> None:
        if self.tile is not None and self.tile != 0 and self.tile < 16:
            raise ConfigError(f"tile must be 0 (whole planes) or at least 16 pixels, got {self.tile}")
        if self.overlap is not None and (self.overlap < 0 or (self.tile and self.overlap > self.tile // 2)):
            raise ConfigError(f"overlap must be between 0 and half the tile ({self.tile}), got {self.overlap}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"batch must be at least 1, got {self.batch}")
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.normalization is not None and not isinstance(self.normalization, IntensityNormalization):
            raise ConfigError("normalization must be an IntensityNormalization or None")

    def replace(self, **changes: Any) -> DeblurSettings:
        """A copy with some fields changed (validated again)."""
        return dataclass_replace(self, **changes)
