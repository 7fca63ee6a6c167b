"""Every configuration shares one base: JSON round trip, unknown keys refused, ``replace`` validated, one error type."""

from __future__ import annotations

import pytest

from napari_mpt_deblur.config import (
    ConfigError,
    DeblurSettings,
    FrozenConfig,
    IntensityNormalization,
    Microscope,
    ModelCard,
    MPTConfig,
)
from napari_mpt_deblur.data.defocus import DefocusConfig
from napari_mpt_deblur.detection.engine import DetectionSettings
from napari_mpt_deblur.losses.efcr import EFCRConfig
from napari_mpt_deblur.training.config import TrainConfig

CONFIGS = [
    MPTConfig(),
    IntensityNormalization(mode="minmax", per="stack"),
    ModelCard(MPTConfig(), tile_size=256),
    DeblurSettings(tile=256, normalization=IntensityNormalization(low=2.0)),
    Microscope(pixel_size_um=0.1),
    TrainConfig(steps=10, normalization=IntensityNormalization(high=99.0)),
    EFCRConfig(kernel_sizes=(3, 5)),
    DefocusConfig.coverage(),
    DetectionSettings(percentiles=(2.0, 99.0)),
]
"""One instance of every configuration class, with some fields off their defaults."""

INVALID_CHANGES = {
    MPTConfig: {"dim": 3},
    IntensityNormalization: {"mode": "histogram"},
    DeblurSettings: {"tile": 8},
    Microscope: {"na": 2.0},
    TrainConfig: {"steps": 0},
    EFCRConfig: {"kernel_sizes": (4,)},
    DefocusConfig: {"photons": (0.0, 1.0)},
    DetectionSettings: {"prob_thresh": 1.5},
}
"""A change each configuration refuses (a ModelCard's parts check themselves; its file-only fields are
checked when a card is read)."""


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: type(config).__name__)
def test_configurations_round_trip_through_json(config: FrozenConfig):
    assert isinstance(config, FrozenConfig)
    assert type(config).from_json(config.to_json()) == config


@pytest.mark.parametrize("config", CONFIGS, ids=lambda config: type(config).__name__)
def test_unknown_keys_and_non_objects_are_config_errors(config: FrozenConfig):
    with pytest.raises(ConfigError, match="unknown field"):
        type(config).from_dict({**config.to_dict(), "colour": "blue"})
    with pytest.raises(ConfigError, match="unknown field"):
        config.replace(colour="blue")
    with pytest.raises(ConfigError, match="JSON object"):
        type(config).from_dict([1, 2])


@pytest.mark.parametrize("config", [c for c in CONFIGS if type(c) in INVALID_CHANGES], ids=lambda c: type(c).__name__)
def test_replace_validates_the_copy_and_raises_a_value_error(config: FrozenConfig):
    change = INVALID_CHANGES[type(config)]
    with pytest.raises(ConfigError) as raised:
        config.replace(**change)
    assert isinstance(raised.value, ValueError)  # callers that catch ValueError keep working
    name = next(iter(change))
    assert config.replace(**{name: getattr(config, name)}) == config


def test_wrongly_typed_values_become_config_errors_naming_the_configuration():
    with pytest.raises(ConfigError, match="invalid train config"):
        TrainConfig.from_dict({"patch_size": "big"})
