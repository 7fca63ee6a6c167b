"""Named MPT configurations and the builder (a small timm-style registry)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, MPTConfig
from .mpt import MPT


@dataclass(frozen=True)
class Preset:
    name: str
    config: MPTConfig
    description: str


PRESETS: dict[str, Preset] = {}


def register_preset(name: str, config: MPTConfig, description: str) -> None:
    """Add a named configuration to the registry."""
    if name in PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    PRESETS[name] = Preset(name, config, description)


def preset_config(name: str, **overrides: Any) -> MPTConfig:
    """The configuration of preset ``name``, with some fields changed.

    Raises
    ------
    ConfigError
        For an unknown name or an invalid override.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    config = PRESETS[name].config
    if "channels" in overrides:
        channels = overrides.pop("channels")
        overrides.update(in_channels=channels, out_channels=channels)
    return config.replace(**overrides) if overrides else config


def build_model(preset_or_config: str | MPTConfig = "lite", **overrides: Any) -> MPT:
    """A freshly initialised network from a preset name or a configuration.

    Parameters
    ----------
    preset_or_config
        A registered preset name (``paper``, ``lite``) or an :class:`MPTConfig`.
    **overrides
        Configuration fields to change, e.g. ``channels=3`` or ``pairing="official"``.
    """
    if isinstance(preset_or_config, MPTConfig):
        config = preset_or_config.replace(**overrides) if overrides else preset_or_config
    else:
        config = preset_config(preset_or_config, **overrides)
    return MPT(config)


register_preset(
    "paper",
    MPTConfig(),
    "The paper's MPT: C=40, 6 blocks per level, heads 1/2/4/8, 19.8 M parameters (1 channel).",
)
register_preset(
    "lite",
    MPTConfig(
        dim=16,
        num_blocks=(2, 2, 2, 2),
        heads=(1, 2, 4, 8),
        scales=((1 / 8, 1 / 8), (1 / 4, 1 / 4), (1 / 2, 1 / 2), (1.0, 1.0)),
    ),
    "CPU-friendly MPT with the same structure: C=16, 2 blocks per level (one plain, one shifted), "
    "pyramid scales 1/8, 1/4, 1/2, 1.",
)
register_preset(
    "lite-wide",
    PRESETS["lite"].config.replace(dim=24),
    "lite at C=24: 2.2x the parameters and 2.1x the FLOPs per pixel; compared with lite at equal budget "
    "in docs/benchmarks.md (experiment 6).",
)
