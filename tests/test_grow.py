"""Growing a trained network: the deeper copy deblurs exactly as before, and only its new blocks train."""

from __future__ import annotations

import pytest
import torch

from helpers import pattern_pairs, tiny_config
from napari_mpt_deblur import MPT, load_model, save_model
from napari_mpt_deblur.config import ConfigError, IntensityNormalization
from napari_mpt_deblur.models.grow import deepen
from napari_mpt_deblur.training.config import TrainConfig
from napari_mpt_deblur.training.engine import CheckpointError, iter_train, train
from napari_mpt_deblur.training.patches import LabeledPairs

FAST = dict(batch_size=2, patch_size=48, scale_range=(1.0, 1.0), lr=2e-3, lr_min=1e-4, efcr_beta=0.0, device="cpu")


def trained_like(seed: int = 0) -> MPT:
    """A tiny network with every weight random, as a trained one has (not the zero-initialised biases)."""
    torch.manual_seed(seed)
    model = MPT(tiny_config())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("level, scales", [(1, [1.0, 1.0]), (2, [0.5]), (4, [1.0, 1.0])])
def test_a_grown_network_gives_the_same_output_and_names_its_new_blocks(level, scales):
    model = trained_like()
    grown, new_blocks = deepen(model, level, scales)
    index = level - 1
    assert grown.config.num_blocks[index] == model.config.num_blocks[index] + len(scales)
    assert grown.config.scales[index][-len(scales) :] == tuple(scales)
    stages = ["latent"] if level == 4 else [f"encoders.{index}", f"decoders.{3 - level}"]
    first = model.config.num_blocks[index]
    assert new_blocks == [f"{stage}.{i}" for stage in stages for i in range(first, first + len(scales))]
    x = torch.rand(2, 1, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(grown(x), model(x), rtol=0, atol=0)
    # the old weights are all there, under their old names
    for name, value in model.state_dict().items():
        torch.testing.assert_close(grown.state_dict()[name], value, rtol=0, atol=0)


def test_growing_refuses_a_level_that_does_not_exist_or_no_blocks():
    model = trained_like()
    with pytest.raises(ConfigError, match="level must be"):
        deepen(model, 5, [1.0])
    with pytest.raises(ConfigError, match="at least one new block"):
        deepen(model, 1, [])
    with pytest.raises(ConfigError, match="scale"):
        deepen(model, 1, [0.3])


def test_a_grown_model_file_keeps_the_card_and_describes_the_new_network(tmp_path):
    model = trained_like()
    normalization = IntensityNormalization(low=2.0, high=99.0)
    save_model(model, tmp_path / "m.safetensors", normalization=normalization, tile_size=256)
    grown, _ = deepen(load_model(tmp_path / "m.safetensors"), 1, [1.0])
    save_model(grown, tmp_path / "grown.safetensors")
    again = load_model(tmp_path / "grown.safetensors")
    assert again.config == grown.config and again.card.tile_size == 256
    assert again.card.normalization == normalization


def test_training_only_the_new_blocks_leaves_every_other_weight_as_it_was(tmp_path):
    grown, new_blocks = deepen(trained_like(), 1, [1.0, 1.0])
    before = {name: value.clone() for name, value in grown.state_dict().items()}
    blurry, sharp = pattern_pairs(2, 64)
    config = TrainConfig(steps=3, checkpoint_every=3, trainable=tuple(new_blocks), **FAST)
    train(grown, LabeledPairs(blurry, sharp), tmp_path / "m.safetensors", config)
    written = load_model(tmp_path / "m.safetensors")
    assert written.card.provenance["train_config"]["trainable"] == new_blocks
    moved = set()
    for name, value in written.state_dict().items():
        if not torch.equal(value, before[name]):
            moved.add(name)
    assert moved and all(name.startswith(tuple(b + "." for b in new_blocks)) for name in moved)
    # the new blocks' output projections left zero: the network now differs from the one it grew from
    assert any(name.endswith("project_out") for name in moved)
    # the same network trained again with every parameter: none stays frozen from the run before
    train(grown, LabeledPairs(blurry, sharp), tmp_path / "all.safetensors", config.replace(trainable=()))
    assert all(parameter.requires_grad for parameter in grown.parameters())


def test_trainable_names_must_name_parameters_and_a_resume_must_keep_them(tmp_path):
    blurry, sharp = pattern_pairs(1, 64)
    sampler = LabeledPairs(blurry, sharp)
    with pytest.raises(ConfigError, match="names no parameter"):
        train(
            trained_like(), sampler, tmp_path / "x.safetensors", TrainConfig(steps=1, trainable=("decoder.9",), **FAST)
        )
    with pytest.raises(ConfigError, match="parameter-name prefixes"):
        TrainConfig(trainable="head")
    output = tmp_path / "m.safetensors"
    config = TrainConfig(steps=4, checkpoint_every=2, trainable=("head",), **FAST)
    steps = iter_train(trained_like(), sampler, output, config)
    for event in steps:
        if event.step == 2:
            break
    steps.close()
    with pytest.raises(CheckpointError, match="same --train-only"):
        train(trained_like(), sampler, output, config.replace(trainable=("stem",)), resume=True)
    train(trained_like(), sampler, output, config, resume=True)  # the same ones: it goes on
    assert load_model(output).card.provenance["step"] == 4


@pytest.mark.slow
def test_cli_grows_a_model_then_trains_its_new_blocks(tmp_path, capsys):
    from napari_mpt_deblur.cli import main

    source = tmp_path / "trained.safetensors"
    save_model(trained_like(), source)
    grown = tmp_path / "grown.safetensors"
    assert main(["grow", str(source), "-o", str(grown), "--level", "1", "--scales", "1,1"]) == 0
    printed = capsys.readouterr().out
    assert "--train-only encoders.0.2 encoders.0.3 decoders.2.2 decoders.2.3" in printed
    card = load_model(grown).card
    assert card.provenance["grown"]["new_blocks"] == ["encoders.0.2", "encoders.0.3", "decoders.2.2", "decoders.2.3"]
    assert main(["grow", str(source), "-o", str(grown), "--level", "1", "--scales", "1"]) == 2  # exists
    assert main(["grow", str(source), "-o", str(tmp_path / "x.safetensors"), "--level", "1", "--scales", "a"]) == 2

    import numpy as np
    import tifffile

    sharp = tmp_path / "sharp"
    sharp.mkdir()
    for index, plane in enumerate(pattern_pairs(2, 64)[1]):
        tifffile.imwrite(sharp / f"p{index}.tif", (plane * 1000).astype(np.uint16))
    out = tmp_path / "out.safetensors"
    common = ["--steps", "2", "--batch", "1", "--patch", "32", "--device", "cpu", "--quiet"]
    args = ["train", "--sharp", str(sharp), "--model", str(grown), "-o", str(out), *common]
    assert main([*args, "--train-only", "decoders.2.2", "decoders.2.3"]) == 0
    before, after = load_model(grown).state_dict(), load_model(out).state_dict()
    assert torch.equal(before["encoders.0.2.isca.project_out"], after["encoders.0.2.isca.project_out"])
    assert not torch.equal(before["decoders.2.2.ffn.project_out"], after["decoders.2.2.ffn.project_out"])
