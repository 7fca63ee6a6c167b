"""The training engine: a tiny model learns, stops and resumes exactly, and its file drives inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import pattern_pairs, tiny_config
from napari_mpt_deblur import MPT, load_model
from napari_mpt_deblur.inference import deblur_array
from napari_mpt_deblur.training.config import TrainConfig
from napari_mpt_deblur.training.engine import CheckpointError, Validation, iter_train, state_path, train
from napari_mpt_deblur.training.patches import LabeledPairs


def write_pair_folders(root) -> None:
    """ROOT/blurry and ROOT/sharp with two uint16 TIFFs each, matched by name."""
    import tifffile

    blurry, sharp = pattern_pairs(2, 64)
    for kind, planes in (("blurry", blurry), ("sharp", sharp)):
        (root / kind).mkdir(parents=True)
        for index, plane in enumerate(planes):
            tifffile.imwrite(root / kind / f"p{index}.tif", (plane * 1000).astype(np.uint16))


FAST = dict(batch_size=2, patch_size=48, scale_range=(1.0, 1.0), lr=2e-3, lr_min=1e-4, efcr_beta=1e-3, device="cpu")


def test_a_tiny_model_learns(tmp_path):
    blurry, sharp = pattern_pairs()
    sampler = LabeledPairs(blurry, sharp)
    validation = Validation.from_sampler(sampler, 4, 48)
    config = TrainConfig(steps=60, validate_every=30, checkpoint_every=30, **FAST)
    events = list(iter_train(MPT(tiny_config()), sampler, tmp_path / "m.safetensors", config, validation=validation))
    first = np.mean([e.losses["l1"] for e in events[:5]])
    last = np.mean([e.losses["l1"] for e in events[-5:]])
    assert last < 0.7 * first
    scores = events[-1].validation
    assert scores["psnr"] > scores["input_psnr"] + 1.0  # better than the blurry input
    assert [e.checkpoint is not None for e in events].count(True) == 2
    assert events[-1].remaining_s == 0 and events[0].lr == pytest.approx(2e-3)
    model = load_model(tmp_path / "m.safetensors")
    assert model.card.provenance["step"] == 60 and model.card.provenance["train_config"]["steps"] == 60
    out = deblur_array(model, (blurry[0] * 1000).astype(np.uint16))  # the file drives the inference engine
    assert out.shape == blurry[0].shape


def test_stop_and_resume_gives_the_same_weights(tmp_path):
    blurry, sharp = pattern_pairs(2, 64)
    sampler = LabeledPairs(blurry, sharp)
    config = TrainConfig(steps=6, checkpoint_every=3, **FAST)
    torch.manual_seed(0)
    straight = train(MPT(tiny_config()), sampler, tmp_path / "straight.safetensors", config)

    torch.manual_seed(0)
    steps = iter_train(MPT(tiny_config()), sampler, tmp_path / "resumed.safetensors", config)
    for event in steps:
        if event.step == 4:  # killed after step 4: the checkpoint of step 3 survives
            break
    steps.close()
    assert load_model(tmp_path / "resumed.safetensors").card.provenance["step"] == 3
    torch.manual_seed(123)  # a different initialisation: resume must overwrite it
    resumed = train(MPT(tiny_config()), sampler, tmp_path / "resumed.safetensors", config, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    blurry, sharp = pattern_pairs(1, 64)
    sampler = LabeledPairs(blurry, sharp)
    config = TrainConfig(steps=2, checkpoint_every=1, **FAST)
    output = tmp_path / "m.safetensors"
    train(MPT(tiny_config()), sampler, output, config)
    with pytest.raises(CheckpointError, match="same --steps"):
        train(MPT(tiny_config()), sampler, output, config.replace(steps=5), resume=True)
    with pytest.raises(CheckpointError, match="architecture differs"):
        train(MPT(tiny_config(dim=16)), sampler, output, config, resume=True)
    state_path(output).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable training-state file"):
        train(MPT(tiny_config()), sampler, output, config, resume=True)


def test_patches_are_reproducible_and_normalised():
    blurry, sharp = pattern_pairs(2, 80)
    sampler = LabeledPairs(blurry * 3000, sharp * 3000)  # raw intensities: normalised per patch
    a = sampler.sample(np.random.default_rng(5), 4, 32, (0.8, 1.2))
    b = sampler.sample(np.random.default_rng(5), 4, 32, (0.8, 1.2))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (4, 1, 32, 32) and a[0].dtype == np.float32
    assert -0.1 < np.percentile(a[0], 1) < 0.1 and 0.9 < np.percentile(a[0], 99.8) < 1.1
    with pytest.raises(ValueError, match="differ in shape"):
        LabeledPairs(blurry, sharp[:, :40])


def test_synthetic_pairs_defocus_sharp_planes_on_the_fly():
    from napari_mpt_deblur.data.defocus import DefocusConfig
    from napari_mpt_deblur.training.patches import SyntheticPairs

    _, sharp = pattern_pairs(2, 96)
    sampler = SyntheticPairs(sharp * 1000, DefocusConfig(kinds=("widefield",), noise_probability=0.0))
    blurry, target = sampler.sample(np.random.default_rng(1), 3, 48, (1.0, 1.0))
    assert blurry.shape == target.shape == (3, 1, 48, 48)
    # defocus removes detail: the blurry patches have less gradient energy than their targets
    energy = [np.abs(np.diff(x, axis=-1)).mean() for x in (blurry, target)]
    assert energy[0] < 0.8 * energy[1]
    again = sampler.sample(np.random.default_rng(1), 3, 48, (1.0, 1.0))
    np.testing.assert_array_equal(again[0], blurry)


def test_cli_trains_on_pairs_and_on_sharp_images_then_resumes(tmp_path):

    from napari_mpt_deblur.cli import main

    write_pair_folders(tmp_path / "pairs")
    model = tmp_path / "tiny.safetensors"
    from napari_mpt_deblur import save_model

    save_model(MPT(tiny_config()), model)
    common = ["--model", str(model), "--steps", "2", "--batch", "1", "--patch", "32", "--device", "cpu", "--quiet"]
    out = tmp_path / "from-pairs.safetensors"
    assert main(["train", "--pairs", str(tmp_path / "pairs"), "-o", str(out), *common]) == 0
    assert load_model(out).card.provenance["trained_on"]["pair_files"] == 2
    assert main(["train", "--pairs", str(tmp_path / "pairs"), "-o", str(out), *common]) == 2  # exists
    assert main(["train", "--pairs", str(tmp_path / "pairs"), "-o", str(out), *common, "--resume"]) == 0
    out = tmp_path / "from-sharp.safetensors"
    sharp_folder = str(tmp_path / "pairs" / "sharp")
    assert main(["train", "--sharp", sharp_folder, "--denoise-targets", "-o", str(out), *common]) == 0
    trained_on = load_model(out).card.provenance["trained_on"]
    assert trained_on["synthetic_defocus"] is True and trained_on["denoised_targets"] is True
    out = tmp_path / "from-bundled.safetensors"
    assert main(["train", "--bundled", "-o", str(out), *common, "--validate-every", "1"]) == 0
    trained_on = load_model(out).card.provenance["trained_on"]
    assert trained_on["bundled"] and trained_on["synthetic_defocus"] and trained_on["denoised_targets"]


def test_finetune_on_an_unlabeled_stack_end_to_end(tmp_path):
    """EFCR_ex + re-blur on the user's own stack; the tuned file drives the inference engine."""
    import tifffile

    from napari_mpt_deblur import save_model
    from napari_mpt_deblur.cli import main

    blurry, sharp = pattern_pairs(4, 64)
    stack = np.concatenate([sharp, blurry]) * 1000  # a lab's stack: some planes in focus, some not
    tifffile.imwrite(tmp_path / "mine.tif", stack.astype(np.uint16), photometric="minisblack")
    start = save_model(MPT(tiny_config()), tmp_path / "start.safetensors", provenance={"trained_on": "patterns"})
    out = tmp_path / "tuned.safetensors"
    args = ["finetune", "--model", str(start), "--unlabeled", str(tmp_path / "mine.tif"), "-o", str(out)]
    common = ["--steps", "3", "--batch", "2", "--patch", "32", "--reblur", "0.5", "--beta", "1e-3", "--device", "cpu"]
    assert main([*args, *common, "--quiet", "--min-focus", "0.5"]) == 0
    tuned = load_model(out)
    record = tuned.card.provenance
    assert record["fine_tuned_on"]["planes"] == 8 and record["trained_on"] == "patterns"
    assert record["train_config"]["reblur_weight"] == 0.5 and record["train_config"]["efcr_beta"] == 1e-3
    before = load_model(start).state_dict().values()
    assert not all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), before))
    assert deblur_array(tuned, stack[:2].astype(np.uint16)).shape == (2, 64, 64)


def test_unlabeled_planes_keep_the_sharp_ones():
    from napari_mpt_deblur.training.patches import UnlabeledPlanes

    blurry, sharp = pattern_pairs(3, 64)
    planes = UnlabeledPlanes(np.concatenate([blurry, sharp]), min_focus_quantile=0.5)
    assert len(planes.planes) == 3
    assert all(any(np.array_equal(p, s) for s in sharp) for p in planes.planes)
    patches = planes.sample(np.random.default_rng(0), 2, 32, (1.0, 1.0))
    assert patches.shape == (2, 1, 32, 32)


def test_distributed_data_parallel_with_two_gloo_processes(tmp_path):
    """The same `mpt-deblur train` entry point under torchrun: 2 CPU processes, one model, one file."""
    import subprocess
    import sys

    from napari_mpt_deblur import save_model

    write_pair_folders(tmp_path / "pairs")
    start = save_model(MPT(tiny_config()), tmp_path / "start.safetensors")
    out = tmp_path / "ddp.safetensors"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "napari_mpt_deblur.cli", "train", "--pairs", str(tmp_path / "pairs"), "-o", str(out),
        "--model", str(start), "--steps", "3", "--batch", "1", "--patch", "32", "--device", "cpu",
        "--checkpoint-every", "2", "--quiet",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    trained = load_model(out)
    assert trained.card.provenance["processes"] == 2 and trained.card.provenance["step"] == 3
    before = load_model(start).state_dict().values()
    assert not all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), before))


def test_bundled_training_data_is_real_microscopy_and_excludes_the_evaluation_image():
    from napari_mpt_deblur.data.bundled import evaluation_planes, training_planes

    sources = training_planes()
    assert len(sources) == 4 and all(planes for planes in sources.values())
    assert all(p.ndim == 2 and p.dtype == np.float32 for planes in sources.values() for p in planes)
    held_out = next(iter(evaluation_planes().values()))
    assert not any(p.shape == held_out.shape and np.array_equal(p, held_out) for g in sources.values() for p in g)
