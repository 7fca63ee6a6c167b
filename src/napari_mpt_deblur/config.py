"""Validated configuration objects, and the base every configuration dataclass of the package shares.

Every configuration is a frozen dataclass derived from :class:`FrozenConfig`: it
checks itself on creation (raising :class:`ConfigError`), round-trips through JSON
(``to_dict`` / ``from_dict``) with unknown keys refused, and is copied with
``replace``, which validates the copy again. A configuration read from a file a
user hands us is therefore validated exactly like one written in code. The
classes here travel inside model files; the training recipe, the loss, the
synthetic defocus and the detection settings live beside the code they configure.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Literal, Self

Pairing = Literal["aligned", "official"]
PAIRINGS: tuple[str, ...] = ("aligned", "official")


class ConfigError(ValueError):
    """A configuration (or the metadata of a model file) is invalid.

    A ``ValueError``, so callers that catch ``ValueError`` for bad arguments keep working.
    """


def _json_ready(value: Any) -> Any:
    """``value`` with every tuple turned into a list, inside dicts and lists too (as JSON reads it back)."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


class FrozenConfig:
    """Base of the frozen configuration dataclasses: JSON round trip with unknown keys refused, and ``replace``.

    A subclass is a ``@dataclass(frozen=True)`` that validates itself in ``__post_init__``
    (raising :class:`ConfigError`) and names itself in :attr:`config_name`. Every way of
    making one (code, :meth:`from_dict`, :meth:`replace`) runs the same checks, and every
    problem, a wrongly typed value included, becomes a :class:`ConfigError`.
    """

    config_name: ClassVar[str] = "configuration"
    """What error messages call this configuration (``architecture``, ``train config``, ...)."""

    @classmethod
    def _check_keys(cls, data: dict[str, Any]) -> None:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")

    @classmethod
    def _build(cls, values: dict[str, Any]) -> Self:
        cls._check_keys(values)
        try:
            return cls(**values)
        except ConfigError:
            raise
        except (TypeError, ValueError, OverflowError) as error:
            raise ConfigError(f"invalid {cls.config_name}: {error}") from error

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Build and validate a configuration from a dict such as :meth:`to_dict` writes.

        Parameters
        ----------
        data
            Field names and values, typically read from JSON; missing fields get their defaults.

        Returns
        -------
        FrozenConfig
            An instance of the class it is called on.

        Raises
        ------
        ConfigError
            When ``data`` is not a dict, names an unknown field or holds an invalid value.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.config_name} must be a JSON object, got {type(data).__name__}")
        return cls._build(data)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (nested configurations as dicts, tuples as lists)."""
        return _json_ready(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Self:
        """:meth:`from_dict` of a JSON text."""
        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict())

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed, validated again.

        Raises
        ------
        ConfigError
            When a change names an unknown field or makes the configuration invalid.
        """
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        return self._build({**current, **changes})


def check_percentiles(low: float, high: float) -> None:
    """Raise :class:`ConfigError` unless ``0 <= low < high <= 100``."""
    if not 0 <= low < high <= 100:
        raise ConfigError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")


# Bounds of every architecture field. Model cards come from files users are handed, so a card must
# not be able to ask for a network of hundreds of gigabytes: each bound is several times the largest
# sensible value (the paper's network has dim 40, 6 blocks per level, 8 heads, window 8, FFN 2.6).
MAX_CHANNELS = 4
MAX_DIM = 256
MAX_BLOCKS = 32
MAX_HEADS = 64
MAX_WINDOW = 64
MAX_FFN_EXPANSION = 16.0
MIN_SCALE = 1 / 64
MAX_SIZE_MULTIPLE = 2048
"""Largest padding multiple (``window_size * 2**level / scale``) a network may need; the paper's needs 128."""
MAX_TILE_SIZE = 8192
"""Largest preferred tile a model card may record."""
MAX_BLUR_SIGMA_PX = 32.0
"""Largest blur width a deblur may be given (the bundled training coverage reaches about 9 pixels)."""
MAX_WIDTH_MARGIN = 8.0
"""Largest factor by which a network may read the widths it is given wider (``width_margin``)."""


def _integer(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in [low, high]; floats like 6.0 from JSON are accepted, booleans and 6.5 are not."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _real(name: str, value: Any) -> float:
    """``value`` as a finite float (NaN, infinities, booleans and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MPTConfig(FrozenConfig):
    """Architecture of a Multi-Pyramid Transformer (docs/architecture.md, "The network")."""

    config_name = "architecture"

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

    blur_conditioned: bool = False
    """Whether the network can be told the blur's width (:class:`~napari_mpt_deblur.models.mpt.BlurModulation`):
    each stage's input is then scaled and shifted per channel by a function of it. Without a width it
    judges the blur from the image alone, as an unconditioned network does."""

    blur_estimator: bool = False
    """Whether a blur-conditioned network carries its own estimate of the width
    (:class:`~napari_mpt_deblur.models.blur_width.BlurWidthEstimator`), read from each plane and used
    whenever no width is given. Without one, a network told no width judges the blur itself."""

    width_margin: float = 1.0
    """For a blur-conditioned network: every width it is given, by the user or by its own estimate, is read
    this much wider, as a factor on ``width + 0.5`` (:func:`~napari_mpt_deblur.models.blur_width.widen`), in
    :meth:`~napari_mpt_deblur.models.mpt.MPT.forward` and so in deblurring and training alike. A network
    trained with estimates and over-reads (``TrainConfig.estimate_overread``) restores more told about twice
    a width than told the width itself (experiment 18 in docs/benchmarks.md). What a run reports is the width
    given or estimated, not the widened one. 1 to :data:`MAX_WIDTH_MARGIN`."""

    def __post_init__(self) -> None:
        # Normalise sequences so JSON lists and tuples compare equal; bound every number first, so that
        # no card can ask for an absurd network (the checks below, and MPT itself, trust these ranges).
        for name in ("num_blocks", "heads", "scales"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ConfigError(f"{name} must be a list of 4 entries, got {getattr(self, name)!r}")
        object.__setattr__(self, "in_channels", _integer("in_channels", self.in_channels, 1, MAX_CHANNELS))
        object.__setattr__(self, "out_channels", _integer("out_channels", self.out_channels, 1, MAX_CHANNELS))
        object.__setattr__(self, "dim", _integer("dim", self.dim, 2, MAX_DIM))
        object.__setattr__(self, "num_blocks", tuple(_integer("num_blocks", n, 1, MAX_BLOCKS) for n in self.num_blocks))
        object.__setattr__(self, "heads", tuple(_integer("heads", h, 1, MAX_HEADS) for h in self.heads))
        scales = []
        for level in self.scales:
            if not isinstance(level, (list, tuple)) or len(level) > MAX_BLOCKS:
                raise ConfigError(f"scales must hold one list of at most {MAX_BLOCKS} numbers per level, got {level!r}")
            scales.append(tuple(_real("scale", r) for r in level))
        object.__setattr__(self, "scales", tuple(scales))
        object.__setattr__(self, "ffn_expansion", _real("ffn_expansion", self.ffn_expansion))
        object.__setattr__(self, "window_size", _integer("window_size", self.window_size, 2, MAX_WINDOW))
        if not isinstance(self.blur_conditioned, bool):
            raise ConfigError(f"blur_conditioned must be true or false, got {self.blur_conditioned!r}")
        if not isinstance(self.blur_estimator, bool):
            raise ConfigError(f"blur_estimator must be true or false, got {self.blur_estimator!r}")
        if self.blur_estimator and not self.blur_conditioned:
            raise ConfigError("blur_estimator needs blur_conditioned: only such a network can use a width")
        margin = _real("width_margin", self.width_margin)
        if not 1.0 <= margin <= MAX_WIDTH_MARGIN:
            raise ConfigError(f"width_margin must be from 1 to {MAX_WIDTH_MARGIN:g}, got {margin:g}")
        if margin != 1.0 and not self.blur_conditioned:
            raise ConfigError("width_margin needs blur_conditioned: it widens the widths the network is given")
        object.__setattr__(self, "width_margin", margin)
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
                if r < MIN_SCALE:
                    raise ConfigError(
                        f"level {level + 1}: scale {r} is below the smallest allowed, 1/{1 / MIN_SCALE:g}"
                    )
        if not 0 < self.ffn_expansion <= MAX_FFN_EXPANSION:
            raise ConfigError(f"ffn_expansion must be in (0, {MAX_FFN_EXPANSION:g}], got {self.ffn_expansion}")
        if self.window_size < 2 or self.window_size % 2:
            raise ConfigError(f"window_size must be an even integer >= 2, got {self.window_size}")
        if self.pairing not in PAIRINGS:
            raise ConfigError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if self.size_multiple > MAX_SIZE_MULTIPLE:
            raise ConfigError(
                f"window_size and scales make inputs pad to multiples of {self.size_multiple} pixels "
                f"(at most {MAX_SIZE_MULTIPLE} allowed)"
            )

    @property
    def size_multiple(self) -> int:
        """Height and width the network needs: every pooled map must tile into windows."""
        return max(
            int(round(self.window_size * 2**level / r))
            for level, level_scales in enumerate(self.scales)
            for r in level_scales
        )


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class IntensityNormalization(FrozenConfig):
    """How image intensities are mapped to the network's input range.

    :func:`napari_mpt_deblur.normalization.intensity_range` computes the range for an array.
    """

    config_name = "normalization"

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
        object.__setattr__(self, "low", _real("normalization low", self.low))
        object.__setattr__(self, "high", _real("normalization high", self.high))
        if self.mode not in ("percentile", "minmax", "fixed"):
            raise ConfigError(f"normalization mode must be percentile, minmax or fixed, got {self.mode!r}")
        if self.per not in ("plane", "stack"):
            raise ConfigError(f"normalization 'per' must be plane or stack, got {self.per!r}")
        if self.mode == "percentile":
            check_percentiles(self.low, self.high)
        if self.mode == "fixed" and not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ConfigError(f"fixed normalization needs finite values with low < high, got {self.low}, {self.high}")


@dataclass(frozen=True)
class ModelCard(FrozenConfig):
    """Everything a model file records besides its weights.

    Its architecture and normalisation check themselves; :meth:`from_dict` also checks the
    fields only a file can get wrong (the provenance's type, the tile size's range).
    """

    config_name = "model card"

    architecture: MPTConfig
    """The network to build."""

    normalization: IntensityNormalization = field(default_factory=IntensityNormalization)
    """Intensity normalisation the weights were trained with; inference must match it."""

    provenance: dict[str, Any] = field(default_factory=dict)
    """Free-form facts: what it was trained on, for how long, from which file it was imported."""

    tile_size: int | None = None
    """Preferred inference tile side in pixels (None: the training patch size or a default)."""

    milder_blur_below_width: float | None = None
    """Planes whose blur width (pixels) is below this are deblurred by a second network the file holds (tensors
    named ``milder_blur.*``): the starting model of a fine-tune on a stack with no plane in focus
    (:class:`~napari_mpt_deblur.models.mpt.MilderBlur`). None: one network for every plane."""

    in_focus_optics: Microscope | None = None
    """Optics whose in-focus PSF every output is sharpened against after the network, by one Richardson-Lucy
    step (:func:`~napari_mpt_deblur.data.optics.sharpen_in_focus`; ``DeblurSettings.sharpen_in_focus`` turns
    it off): set by a fine-tune on synthetic pairs, whose targets (the starting model's output) keep the
    objective's own blur. None: the network's output as it is."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the provenance is copied as it is."""
        data = {
            "architecture": self.architecture.to_dict(),
            "normalization": self.normalization.to_dict(),
            "provenance": dict(self.provenance),
            "tile_size": self.tile_size,
        }
        # files without these stay readable by earlier versions
        if self.milder_blur_below_width is not None:
            data["milder_blur_below_width"] = self.milder_blur_below_width
        if self.in_focus_optics is not None:
            data["in_focus_optics"] = self.in_focus_optics.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Build and validate a card read from a model file (see :meth:`FrozenConfig.from_dict`)."""
        if not isinstance(data, dict) or "architecture" not in data:
            raise ConfigError("model card must be a JSON object with an 'architecture' entry")
        cls._check_keys(data)
        provenance = data.get("provenance", {})
        if not isinstance(provenance, dict):
            raise ConfigError("provenance must be a JSON object")
        tile_size = data.get("tile_size")
        if tile_size is not None:
            tile_size = _integer("tile_size", tile_size, 8, MAX_TILE_SIZE)
        below = data.get("milder_blur_below_width")
        if below is not None and (
            isinstance(below, bool) or not isinstance(below, (int, float)) or not 0 < below < math.inf
        ):
            raise ConfigError(f"milder_blur_below_width must be a positive number of pixels, got {below!r}")
        optics = data.get("in_focus_optics")
        return cls(
            architecture=MPTConfig.from_dict(data["architecture"]),
            normalization=IntensityNormalization.from_dict(data.get("normalization", {})),
            provenance=provenance,
            tile_size=tile_size,
            milder_blur_below_width=None if below is None else float(below),
            in_focus_optics=None if optics is None else Microscope.from_dict(optics),
        )


Precision = Literal["auto", "fp32", "fp16", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class DeblurSettings(FrozenConfig):
    """How the inference engine runs a model over images (every field has a safe default)."""

    config_name = "deblur settings"

    tile: int | None = None
    """Tile side in pixels. ``None``: the model file's preferred tile size, else 512;
    ``0``: whole planes, no tiling (memory grows with the plane)."""

    overlap: int | None = None
    """Pixels shared by neighbouring tiles; their outputs are blended over this width.
    ``None``: a quarter of the tile, at most 32. At most half the tile."""

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

    sharpen_in_focus: bool = True
    """Sharpen each output against the in-focus PSF of the optics a fine-tuned model records
    (``ModelCard.in_focus_optics``); False: the network's output as it is. No effect on other models."""

    blur_sigma_px: float | None = None
    """The blur's width, for a model that takes it (``MPTConfig.blur_conditioned``): the sigma in pixels of
    the Gaussian with the PSF's 80 %-encircled-energy radius, the in-focus PSF included (about
    ``0.21 wavelength / NA`` over the pixel size in focus). ``None``: the model judges it from the image."""

    def __post_init__(self) -> None:
        if isinstance(self.normalization, dict):  # as to_dict writes it
            object.__setattr__(self, "normalization", IntensityNormalization.from_dict(self.normalization))
        if self.tile is not None and self.tile != 0 and self.tile < 16:
            raise ConfigError(f"tile must be 0 (whole planes) or at least 16 pixels, got {self.tile}")
        if self.overlap is not None and (self.overlap < 0 or (self.tile and self.overlap > self.tile // 2)):
            # without a tile size here (the model file's applies), only the lower bound can be checked
            bound = f"between 0 and half the tile ({self.tile // 2})" if self.tile else "at least 0"
            raise ConfigError(f"overlap must be {bound}, got {self.overlap}")
        if self.batch is not None and self.batch < 1:
            raise ConfigError(f"batch must be at least 1, got {self.batch}")
        if not isinstance(self.device, str) or not _DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.normalization is not None and not isinstance(self.normalization, IntensityNormalization):
            raise ConfigError("normalization must be an IntensityNormalization or None")
        if not isinstance(self.sharpen_in_focus, bool):
            raise ConfigError(f"sharpen_in_focus must be true or false, got {self.sharpen_in_focus!r}")
        if self.blur_sigma_px is not None:
            sigma = _real("blur_sigma_px", self.blur_sigma_px)
            if not 0 <= sigma <= MAX_BLUR_SIGMA_PX:
                raise ConfigError(f"blur_sigma_px must be between 0 and {MAX_BLUR_SIGMA_PX:g} pixels, got {sigma:g}")
            object.__setattr__(self, "blur_sigma_px", sigma)


MEDIA = {"air": 1.0, "water": 1.333, "silicone": 1.406, "glycerol": 1.47, "oil": 1.515}
"""Immersion media and their refractive indices."""

AIRY_SIGMA = 0.21
"""The in-focus widefield PSF as a Gaussian: sigma = 0.21 wavelength / NA."""

UNKNOWN_PIXEL_UM = 0.2
"""The pixel size the optics assume when neither the file nor the user gives one, micrometres."""


@dataclass(frozen=True)
class Microscope(FrozenConfig):
    """What the user knows about their microscope; every field has a default a widefield setup fits.

    Attributes
    ----------
    na
        Numerical aperture of the objective (below the medium's refractive index).
    medium
        Immersion medium, one of :data:`MEDIA` (air, water, silicone, glycerol, oil).
    wavelength_um
        Emission wavelength, micrometres (0.52 for GFP).
    pixel_size_um
        Pixel side in the sample, micrometres; None when neither the file nor the user says.
    z_step_um
        Distance between Z planes, micrometres; None for a single plane, a time series or unknown.
    """

    config_name = "microscope"

    na: float = 0.8
    medium: str = "water"
    wavelength_um: float = 0.52
    pixel_size_um: float | None = None
    z_step_um: float | None = None

    def __post_init__(self) -> None:
        if self.medium not in MEDIA:
            raise ConfigError(f"medium must be one of {', '.join(MEDIA)}; got {self.medium!r}")
        if not 0 < self.na < self.refractive_index:
            raise ConfigError(
                f"NA {self.na} is not possible in {self.medium} (refractive index {self.refractive_index}): "
                f"use an NA above 0 and below {self.refractive_index}, or another medium"
            )
        if not 0.2 <= self.wavelength_um <= 2.0:
            raise ConfigError(f"wavelength {self.wavelength_um} um is not an emission wavelength (give micrometres)")
        for name in ("pixel_size_um", "z_step_um"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1000:
                raise ConfigError(f"{name} must be a positive size in micrometres, got {value}")

    @property
    def refractive_index(self) -> float:
        """The medium's refractive index."""
        return MEDIA[self.medium]

    @property
    def nyquist_pixel_um(self) -> float:
        """The coarsest pixel that samples these optics without aliasing: wavelength / (2 NA)."""
        return self.wavelength_um / (2 * self.na)

    @property
    def model_pixel_um(self) -> float:
        """The pixel size used to model the PSF: the given one, at most the Nyquist size (:data:`UNKNOWN_PIXEL_UM`
        when unknown)."""
        return min(self.pixel_size_um or UNKNOWN_PIXEL_UM, self.nyquist_pixel_um)

    def in_focus_sigma_px(self) -> float:
        """The in-focus PSF's width as a Gaussian sigma, in pixels of :attr:`model_pixel_um`."""
        return AIRY_SIGMA * self.wavelength_um / self.na / self.model_pixel_um

    def describe_in_focus(self) -> str:
        """The optics and their in-focus PSF's width, in words (e.g. for a note on sharpening against it)."""
        return (
            f"NA {self.na:g} ({self.medium}), {self.wavelength_um * 1000:.0f} nm, {self.model_pixel_um:.3g} um pixels "
            f"(in-focus PSF sigma {self.in_focus_sigma_px():.2f} px)"
        )

    def optics(self) -> dict[str, float]:
        """``widefield_psf`` keyword arguments (without the defocus)."""
        return {
            "na": self.na,
            "wavelength_um": self.wavelength_um,
            "refractive_index": self.refractive_index,
            "pixel_size_um": self.model_pixel_um,
        }
