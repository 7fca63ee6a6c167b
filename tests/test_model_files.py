"""Model files (safetensors + model card) and reference-checkpoint import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import tiny_config
from napari_mpt_deblur import MPT, ModelFileError, build_model, load_model, read_model_card, save_model
from napari_mpt_deblur.config import IntensityNormalization
from napari_mpt_deblur.models.official import convert_state_dict, infer_config


def _reference_state_dict(tsv: Path) -> dict[str, torch.Tensor]:
    """Random tensors with every key and shape of a reference checkpoint listing."""
    from napari_mpt_deblur.models.windows import relative_position_index

    state = {}
    for line in tsv.read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        dims = json.loads(shape)
        if key.endswith("relative_position_index"):
            state[key] = relative_position_index(8)
        else:
            state[key] = torch.randn(dims)
    return state


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 3])
def test_every_paper_key_is_consumed_and_every_parameter_filled(reference_dir, channels):
    state = _reference_state_dict(reference_dir / f"paper_config_keys_{channels}ch.tsv")
    config = infer_config(state)
    assert config == build_model("paper", channels=channels, pairing="official").config
    converted = convert_state_dict(state, config)  # raises if a key is left over
    model = MPT(config)
    assert set(converted) == set(model.state_dict())
    for key, tensor in converted.items():
        assert tensor.shape == model.state_dict()[key].shape, key
    # Same number of values on both sides (the index buffers are derived, not stored).
    reference_values = sum(t.numel() for k, t in state.items() if not k.endswith("relative_position_index"))
    assert reference_values == sum(t.numel() for t in converted.values())


@pytest.mark.slow
def test_prefixed_checkpoint_and_leftover_keys(tmp_path, reference_dir, reference_scales):
    state = torch.load(reference_dir / "official_tiny_gray.pth", weights_only=True)
    prefixed = tmp_path / "prefixed.pth"
    torch.save({f"module.Network.{k}": v for k, v in state.items()}, prefixed)
    assert load_model(prefixed, scales=reference_scales).config.dim == 8

    extra = tmp_path / "extra.pth"
    torch.save({**state, "encoder_level1.9.norm1.body.weight": torch.ones(8)}, extra)
    with pytest.raises(ModelFileError, match="blocks"):
        load_model(extra, scales=reference_scales)


def test_scales_that_do_not_fit_are_refused(reference_dir):
    path = reference_dir / "official_tiny_gray.pth"
    with pytest.raises(ModelFileError, match="give the pyramid scales"):
        load_model(path)
    wrong = [[1, 1, 1, 1], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    with pytest.raises(ModelFileError, match="pooled-map projection"):
        load_model(path, scales=wrong)


def test_pickled_code_is_never_executed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    path = tmp_path / "evil.pth"
    torch.save({"inproj.weight": Evil()}, path)
    with pytest.raises(ModelFileError, match="never unpickled"):
        load_model(path)


def test_safetensors_round_trip(tmp_path):
    model = MPT(tiny_config()).eval()
    normalization = IntensityNormalization(mode="percentile", low=2.0, high=99.5)
    path = save_model(
        model,
        tmp_path / "m.safetensors",
        normalization=normalization,
        provenance={"trained_on": "unit test"},
        tile_size=256,
    )
    loaded = load_model(path)
    assert loaded.config == model.config
    assert loaded.card.normalization == normalization
    assert loaded.card.provenance["trained_on"] == "unit test"
    assert loaded.card.tile_size == 256
    card = read_model_card(path)
    assert card.architecture == model.config
    x = torch.rand(1, 1, 70, 90)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert not list(tmp_path.glob("*.part"))  # no temporary file left behind


def test_imported_reference_model_saves_and_reloads(tmp_path, reference_dir, reference_scales):
    imported = load_model(reference_dir / "official_tiny_gray.pth", scales=reference_scales)
    path = save_model(imported, tmp_path / "imported.safetensors")
    reloaded = load_model(path)
    assert reloaded.config.pairing == "official"
    assert reloaded.card.provenance["imported_from"] == "official_tiny_gray.pth"
    assert reloaded.card.normalization.mode == "minmax"
    x = torch.rand(1, 1, 128, 128)
    with torch.no_grad():
        assert torch.equal(imported(x), reloaded(x))


def test_reference_state_dict_saved_as_safetensors_is_imported(tmp_path, reference_dir, reference_scales):
    state = torch.load(reference_dir / "official_tiny_gray.pth", weights_only=True)
    path = tmp_path / "reference.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    assert load_model(path, scales=reference_scales).config.pairing == "official"


@pytest.fixture
def model_file(tmp_path) -> Path:
    return save_model(MPT(tiny_config()), tmp_path / "good.safetensors")


def test_truncated_file_gives_a_clear_error(model_file, tmp_path):
    data = model_file.read_bytes()
    for cut in (len(data) // 2, 30, 5):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match=r"truncated|not a model file"):
            load_model(broken)


def test_foreign_and_wrong_files_give_clear_errors(model_file, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"encoder.weight": torch.ones(3, 3)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="neither a napari-mpt-deblur model"):
        load_model(foreign)

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="not a model file"):
        load_model(text)

    with pytest.raises(ModelFileError, match="no such file, and not a bundled model"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(ModelFileError, match="is a folder"):
        load_model(tmp_path)


def test_weights_that_do_not_match_the_card_are_refused(model_file, tmp_path):
    from safetensors import safe_open

    with safe_open(str(model_file), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    key = next(k for k in tensors if k.endswith("to_qkv"))

    wrong_shape = dict(tensors, **{key: torch.zeros(5, 5)})
    path = tmp_path / "shape.safetensors"
    save_file(wrong_shape, str(path), metadata=metadata)
    with pytest.raises(ModelFileError, match="has shape"):
        load_model(path)

    missing = {k: v for k, v in tensors.items() if k != key}
    save_file(missing, str(path), metadata=metadata)
    with pytest.raises(ModelFileError, match="missing"):
        load_model(path)

    diverged = dict(tensors, **{key: torch.full_like(tensors[key], float("nan"))})
    save_file(diverged, str(path), metadata=metadata)
    with pytest.raises(ModelFileError, match="NaN"):
        load_model(path)

    card = json.loads(metadata["napari_mpt_deblur"])
    card["architecture"]["heads"] = [3, 3, 3, 3]
    save_file(tensors, str(path), metadata={**metadata, "napari_mpt_deblur": json.dumps(card)})
    with pytest.raises(ModelFileError, match="invalid model card"):
        load_model(path)

    card["format_version"] = 99
    save_file(tensors, str(path), metadata={**metadata, "napari_mpt_deblur": json.dumps(card)})
    with pytest.raises(ModelFileError, match="upgrade"):
        load_model(path)


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import napari_mpt_deblur.models.files as files

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", failing_save)
    target = tmp_path / "model.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_model(MPT(tiny_config()), target)
    assert list(tmp_path.iterdir()) == []


def test_a_resaved_model_records_its_own_save_time(tmp_path):
    """A fine-tuned copy keeps its parent's provenance but not its parent's save time."""
    model = MPT(tiny_config())
    save_model(model, tmp_path / "parent.safetensors", provenance={"saved": "2000-01-01T00:00:00+00:00", "x": 1})
    child = load_model(tmp_path / "parent.safetensors")
    save_model(child, tmp_path / "child.safetensors")
    provenance = read_model_card(tmp_path / "child.safetensors").provenance
    assert provenance["x"] == 1 and not provenance["saved"].startswith("2000")
    assert provenance["software"].startswith("napari-mpt-deblur")


@pytest.mark.slow
def test_the_bundled_default_model_ships_and_deblurs_an_image_it_never_saw():
    """`load_model("default")` needs no download, is a small `lite` network that estimates the blur's width, and
    beats its blurry input by far."""
    import numpy as np

    from helpers import pattern_pairs
    from napari_mpt_deblur.data.defocus import add_poisson_gaussian_noise, blur, blur_sigma_px, widefield_psf
    from napari_mpt_deblur.inference import Deblurrer, deblur_array
    from napari_mpt_deblur.models.files import bundled_model_path

    assert bundled_model_path("default").stat().st_size < 20 * 2**20
    model = load_model("default")
    assert not model.training and model.config.in_channels == 1
    assert "bundled" in model.card.provenance["trained_on"]
    assert model.card.tile_size == 512  # tiles that agree with whole planes to > 45 dB for this model
    assert model.config.blur_estimator and model.config.width_margin == 2.0  # judges the width; reads it x2 wider

    sharp = pattern_pairs(1, 256, discs=60)[1][0]  # cells drawn by the test: never trained on
    psf = widefield_psf(2.0)
    blurry = add_poisson_gaussian_noise(blur(sharp, psf), 2000, 0.005, np.random.default_rng(0))
    deblurrer = Deblurrer(model)
    restored = deblur_array(deblurrer, blurry)
    (estimate,) = deblurrer.estimated_widths
    assert 0.5 < estimate / blur_sigma_px(psf) < 2  # measured: 2.83 px for 3.37

    def psnr(image):
        return 10 * np.log10(1 / np.mean((np.clip(image, 0, 1) - sharp) ** 2))

    assert psnr(restored) > psnr(blurry) + 1.5  # measured: 21.05 vs 18.05 dB


def _with_card(model_file: Path, target: Path, change) -> Path:
    """A copy of ``model_file`` whose model card (the parsed JSON) ``change`` edits or replaces."""
    from safetensors import safe_open

    with safe_open(str(model_file), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    card = json.loads(metadata["napari_mpt_deblur"])
    card = change(card) or card
    text = card if isinstance(card, str) else json.dumps(card)
    save_file(tensors, str(target), metadata={**metadata, "napari_mpt_deblur": text})
    return target


def _architecture(**changes):
    def change(card):
        card["architecture"].update(changes)

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_architecture(window_size=1e9), "window_size must be between"),
        (_architecture(window_size=64, scales=[[1 / 64] * 2, [1 / 2] * 2, [1.0] * 2, [1.0] * 2]), "pad to multiples"),
        (_architecture(ffn_expansion=float("nan")), "ffn_expansion must be a finite number"),
        (_architecture(ffn_expansion=1e6), r"ffn_expansion must be in \(0, 16\]"),
        (_architecture(dim=4096), "dim must be between 2 and 256"),
        (_architecture(dim="8"), "dim must be an integer"),
        (_architecture(in_channels=True, out_channels=True), "in_channels must be an integer"),
        (_architecture(num_blocks=[10**9] * 4), "num_blocks must be between"),
        (_architecture(heads={"a": 1}), "heads must be a list"),
        (_architecture(scales=[[1e-300] * 2] * 4), "scale"),
        (_architecture(num_blocks=[2, 2, 2, 2], scales=[[0.5] * 2, [0.5] * 2, [1.0] * 2, [1e400] * 2]), "scale"),
        (lambda card: {**card, "tile_size": 10**12}, "tile_size must be between"),
        (lambda card: {**card, "normalization": {"mode": "minmax", "low": float("nan")}}, "finite number"),
        (lambda card: [card], "a JSON list, not an object"),
        (lambda card: "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (lambda card: {**card, "provenance": [[1]]}, "provenance must be a JSON object"),
        (lambda card: {**card, "provenance": {"x": json.loads("[" * 40 + "]" * 40)}}, "nested more than 32"),
        (lambda card: {**card, "format_version": "1"}, "invalid format_version '1'"),
        (lambda card: {**card, "format_version": True}, "invalid format_version True"),
        (lambda card: {k: v for k, v in card.items() if k != "format_version"}, "invalid format_version None"),
    ],
)
def test_hostile_or_absurd_cards_give_one_model_file_error_line(model_file, tmp_path, change, message):
    """Every card a careless or hostile user can write is refused in one line, before any network is built."""
    path = _with_card(model_file, tmp_path / "hostile.safetensors", change)
    with pytest.raises(ModelFileError, match=message) as refused:
        load_model(path)
    assert "\n" not in str(refused.value)


def _small_file_with_a_huge_card(path: Path) -> Path:
    """Every tensor the card's network has, each of one value: a few kB whose card asks for 3.2 GB."""
    from napari_mpt_deblur.config import ModelCard, MPTConfig
    from napari_mpt_deblur.models.files import expected_shapes

    config = MPTConfig(dim=256)  # the paper's layout at the largest width allowed: 811 M parameters
    card = json.dumps({"format_version": 1, **ModelCard(config).to_dict()})
    tensors = {key: torch.zeros(1) for key in expected_shapes(config)}
    save_file(tensors, str(path), metadata={"format": "pt", "napari_mpt_deblur": card})
    return path


def test_a_card_that_does_not_describe_the_files_tensors_builds_no_network(tmp_path, monkeypatch):
    """A small file whose card asks for a network of gigabytes fails from its header: only a shapeless
    (meta-device) network is built, so opening it costs about the file's size."""
    import napari_mpt_deblur.models.files as files

    path = _small_file_with_a_huge_card(tmp_path / "huge.safetensors")
    devices = []

    def spy(config):
        devices.append(torch.empty(0).device.type)  # "meta" inside `with torch.device("meta")`
        return MPT(config)

    monkeypatch.setattr(files, "MPT", spy)
    with pytest.raises(ModelFileError, match="has shape"):
        load_model(path)
    assert devices == ["meta"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak from Linux's /proc")
def test_opening_a_file_with_a_huge_card_stays_small_in_memory(tmp_path):
    """Peak memory of a process that opens the file above, measured by the kernel (not a timing)."""
    import subprocess
    import sys

    path = _small_file_with_a_huge_card(tmp_path / "huge.safetensors")
    script = (
        "import sys\n"
        "from napari_mpt_deblur import ModelFileError, load_model\n"
        "try:\n    load_model(sys.argv[1])\nexcept ModelFileError:\n    pass\n"
        # VmHWM is this program's own peak: ru_maxrss would also count the pytest process it was forked
        # from, since Linux carries the pre-exec peak over to the new program.
        "status = open('/proc/self/status').read()\n"
        "print(next(line.split()[1] for line in status.splitlines() if line.startswith('VmHWM:')))\n"  # KiB
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) < 1.5 * 2**20  # torch itself takes about 0.4 GB; the network 3.2 GB


def test_compressed_torch_zip_is_refused_before_torch_reads_it(tmp_path, monkeypatch):
    """torch.save never compresses: a deflated entry is a crafted file (a zip bomb), refused unread."""
    import zipfile

    plain = tmp_path / "plain.pth"
    torch.save({"inproj.weight": torch.zeros(64, 1, 3, 3)}, plain)
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry))

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called on a compressed checkpoint")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(ModelFileError, match="is compressed; torch.save never compresses"):
        load_model(deflated)


def test_a_model_save_on_a_full_disk_is_one_clear_line(tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as a SafetensorError ("... (os error 28)"): it becomes an OSError
    naming the file, `mpt-deblur` prints one line, and nothing is left behind."""
    from safetensors import SafetensorError

    import napari_mpt_deblur.models.files as files
    from napari_mpt_deblur.cli import main

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(files, "save_file", full_disk)
    target = tmp_path / "model.safetensors"
    with pytest.raises(OSError, match=r"model\.safetensors: cannot write.*(disk is full|No space left)"):
        save_model(MPT(tiny_config()), target)
    assert list(tmp_path.iterdir()) == []

    assert main(["new", "lite", "-o", str(target)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "model.safetensors: cannot write" in error
    assert list(tmp_path.iterdir()) == []
