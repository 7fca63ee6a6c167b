"""BioImage Model Zoo packages: export passes the real ``bioimageio.core`` test, also without this package,
and ``load_model`` / ``mpt-deblur deblur --model`` read our own packages back and refuse other networks'."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from helpers import tiny_config
from napari_mpt_deblur import MPT, load_model, save_model
from napari_mpt_deblur.cli import main
from napari_mpt_deblur.config import DeblurSettings, IntensityNormalization, Microscope, ModelCard
from napari_mpt_deblur.models.bioimageio import architecture_source, is_package
from napari_mpt_deblur.models.files import ModelFileError

PROVENANCE = {"trained_on": "synthetic defocus of bundled cells", "iterations": 12, "preset": "tiny"}


def needs_bioimageio():
    """Skip (saying why) where the [bioimageio] extra is not installed; the test extra installs it."""
    pytest.importorskip("bioimageio.core", reason="needs the [bioimageio] extra (bioimageio.core, bioimageio.spec)")


@pytest.fixture(scope="module")
def model() -> MPT:
    torch.manual_seed(3)
    network = MPT(tiny_config()).eval()
    network.card = ModelCard(network.config, IntensityNormalization(low=2.0, high=99.5), dict(PROVENANCE))
    return network


@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory) -> Path:
    return save_model(model, tmp_path_factory.mktemp("models") / "tiny.safetensors")


@pytest.fixture(scope="module")
def sample_plane() -> np.ndarray:
    """A real defocused plane: the 'cells' sample 1.5 um out of focus (uint16 counts, 660 x 550)."""
    from napari_mpt_deblur.plugin.samples import sample_image

    return sample_image("cells").data[6].compute()


@pytest.fixture(scope="module")
def package(model_file, sample_plane, tmp_path_factory) -> Path:
    """The tiny model file exported, with test tensors from the real sample plane."""
    needs_bioimageio()
    from napari_mpt_deblur.models.bioimageio import export_package

    return export_package(load_model(model_file), tmp_path_factory.mktemp("packages") / "tiny.zip", sample_plane)


def read_member(package: Path, name: str) -> bytes:
    with zipfile.ZipFile(package) as archive:
        return archive.read(name)


def failures(summary) -> str:
    return "\n".join(f"{d.name}: {[e.msg for e in d.errors]}" for d in summary.details if d.status != "passed")


@pytest.mark.slow
def test_an_exported_package_passes_the_bioimageio_core_test(package):
    from bioimageio.core import test_model

    summary = test_model(package)
    assert summary.status == "passed", failures(summary)
    names = [detail.name for detail in summary.details]
    assert any("Reproduce test outputs" in name for name in names)
    # bioimageio.core also runs the sizes the package allows (3 sizes x batches of 1 and 2)
    assert sum("inference for inputs with batch_size" in name for name in names) == 6


@pytest.mark.slow
def test_the_package_runs_where_napari_mpt_deblur_cannot_be_imported(package, model, tmp_path):
    """A clean environment, as far as one process can make it: importing napari_mpt_deblur fails there."""
    needs_bioimageio()
    script = textwrap.dedent(
        """
        import sys

        class Absent:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "napari_mpt_deblur":
                    raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")

        sys.meta_path.insert(0, Absent())
        import numpy as np
        import torch
        from bioimageio.core import load_model_description, test_model
        from bioimageio.core.backends.pytorch_backend import load_torch_model

        package = sys.argv[1]
        summary = test_model(package)
        print("STATUS", summary.status)
        for detail in summary.details:
            if detail.status != "passed":
                print("FAILED", detail.name, [e.msg for e in detail.errors])
        # the architecture file at sizes the package does not list (odd, oblong, batch of 2)
        network = load_torch_model(load_model_description(package).weights.pytorch_state_dict).eval()
        x = torch.from_numpy(np.random.default_rng(0).random((2, 1, 100, 70), dtype=np.float32))
        with torch.no_grad():
            np.save("odd_size_output.npy", network(x).numpy())
        print("IMPORTED", sorted(m for m in sys.modules if m.startswith("napari_mpt_deblur")))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(package)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "STATUS passed" in done.stdout, done.stdout[-3000:]
    assert "IMPORTED []" in done.stdout
    x = torch.from_numpy(np.random.default_rng(0).random((2, 1, 100, 70), dtype=np.float32))
    with torch.no_grad():
        expected = model(x).numpy()
    # the same arithmetic; only the summation order of a different thread count may differ (float32 rounding)
    np.testing.assert_allclose(np.load(tmp_path / "odd_size_output.npy"), expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_package_holds_what_the_model_zoo_asks_for(package, model, sample_plane):
    rdf = yaml.safe_load(read_member(package, "rdf.yaml"))
    assert rdf["type"] == "model" and str(rdf["format_version"]).startswith("0.5.")
    assert rdf["license"] == "BSD-3-Clause"
    assert (
        rdf["cite"][0]["doi"] == "10.48550/arXiv.2403.02611" and "Multi-Pyramid Transformer" in rdf["cite"][0]["text"]
    )
    assert set(rdf["weights"]) == {"pytorch_state_dict"}
    # the spec wraps the steps in ensure_dtype float32
    [preprocessing] = [step for step in rdf["inputs"][0]["preprocessing"] if step["id"] != "ensure_dtype"]
    assert preprocessing["id"] == "scale_range"
    kwargs = preprocessing["kwargs"]
    assert (kwargs["min_percentile"], kwargs["max_percentile"]) == (2.0, 99.5)  # the model card's
    assert kwargs["axes"] == ["channel", "y", "x"]  # each plane on its own, as the engine normalises

    # test tensors: the real plane's most varied square (cells, not background), and the engine's result on it
    test_input = np.load(io.BytesIO(read_member(package, "test_input.npy")))
    test_output = np.load(io.BytesIO(read_member(package, "test_output.npy")))
    assert test_input.shape == test_output.shape == (1, 1, 256, 256) and test_input.dtype == np.float32
    squares = {
        (top, left): sample_plane[top : top + 256, left : left + 256]
        for top in [*range(0, 660 - 256 + 1, 16), 660 - 256]  # every 16 pixels, and flush with the far edges
        for left in [*range(0, 550 - 256 + 1, 16), 550 - 256]
    }
    [where] = [key for key, square in squares.items() if np.array_equal(square, test_input[0, 0])]
    assert squares[where].std() == max(square.astype(float).std() for square in squares.values())
    from napari_mpt_deblur.inference import deblur_array

    engine = deblur_array(model, test_input[0, 0], settings=DeblurSettings(tile=0, device="cpu"))
    low, high = np.percentile(test_input, (2.0, 99.5))
    np.testing.assert_allclose(test_output[0, 0] * (high - low) + low, engine, rtol=1e-4, atol=1e-3 * (high - low))

    import imageio.v3 as iio

    cover = iio.imread(read_member(package, rdf["covers"][0]["source"]), extension=".png")
    assert cover.shape == (256, 512)  # input next to output
    before, after = cover[:, :256].astype(float), cover[:, 256:].astype(float)
    assert np.corrcoef(before.ravel(), np.clip((test_input[0, 0] - low) / (high - low), 0, 1).ravel())[0, 1] > 0.99
    assert not np.array_equal(before, after)

    documentation = read_member(package, rdf["documentation"]["source"]).decode()
    for value in PROVENANCE.values():
        assert str(value) in documentation
    assert "## Validation" in documentation and "2403.02611" in documentation

    architecture = read_member(package, rdf["weights"]["pytorch_state_dict"]["architecture"]["source"]).decode()
    assert architecture == architecture_source()
    imported = {
        line.split()[1].split(".")[0] for line in architecture.splitlines() if line.startswith(("import ", "from "))
    }
    # PyTorch and the standard library only: the file runs wherever PyTorch does
    assert imported <= {"__future__", "collections", "dataclasses", "functools", "math", "typing", "torch"}, imported
    state = torch.load(io.BytesIO(read_member(package, "weights.pt")), weights_only=True)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize(
    "normalization",
    [IntensityNormalization(mode="minmax"), IntensityNormalization(mode="fixed", low=100.0, high=1200.0)],
)
def test_every_normalisation_becomes_preprocessing_that_bioimageio_core_reproduces(
    normalization, sample_plane, tmp_path
):
    """min/max as scale_range 0 to 100, fixed values as scale_linear: bioimageio.core, given the package's
    preprocessing, must reproduce the test output made with the engine's normalisation."""
    needs_bioimageio()
    from bioimageio.core import test_model

    from napari_mpt_deblur.models.bioimageio import export_package

    torch.manual_seed(5)
    model = MPT(tiny_config()).eval()
    model.card = ModelCard(model.config, normalization)
    package = export_package(model, tmp_path / f"{normalization.mode}.zip", sample_plane, test_side=128)
    rdf = yaml.safe_load(read_member(package, "rdf.yaml"))
    [step] = [step for step in rdf["inputs"][0]["preprocessing"] if step["id"] != "ensure_dtype"]
    if normalization.mode == "minmax":
        assert step["id"] == "scale_range"
        assert (step["kwargs"]["min_percentile"], step["kwargs"]["max_percentile"]) == (0.0, 100.0)
    else:
        assert step["id"] == "scale_linear"
        assert step["kwargs"]["gain"] == pytest.approx(1 / 1100) and step["kwargs"]["offset"] == pytest.approx(-1 / 11)
    summary = test_model(package)
    assert summary.status == "passed", failures(summary)
    assert load_model(package).card.normalization == normalization


@pytest.mark.slow
def test_load_model_and_mpt_deblur_read_our_own_package(package, model_file, tmp_path, capsys):
    reloaded = load_model(package)
    original = load_model(model_file)
    assert reloaded.card.architecture == original.card.architecture
    assert reloaded.card.normalization == original.card.normalization
    assert reloaded.card.provenance == original.card.provenance
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in original.state_dict().items())
    # the napari docks' model box loads through the registry, which calls load_model
    from napari_mpt_deblur.plugin.session import Session

    assert Session().load_model(str(package)).card == reloaded.card

    stack = (np.random.default_rng(0).random((2, 70, 90)) * 4000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", stack, photometric="minisblack")
    for model, output in [(package, "via-package.tif"), (model_file, "via-file.tif")]:
        args = ["deblur", str(tmp_path / "in.tif"), "-o", str(tmp_path / output), "--model", str(model), "--quiet"]
        assert main(args) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "via-package.tif"), tifffile.imread(tmp_path / "via-file.tif")
    )


@pytest.mark.slow
def test_the_export_command(model_file, tmp_path, capsys):
    needs_bioimageio()
    image = (np.random.default_rng(1).random((3, 80, 100)) * 900 + 100).astype(np.uint16)
    tifffile.imwrite(tmp_path / "mine.tif", image, photometric="minisblack", metadata={"axes": "ZYX"})
    target = tmp_path / "mine.zip"
    args = ["export-bioimageio", str(model_file), "-o", str(target), "--image", str(tmp_path / "mine.tif")]
    assert main([*args, "--author", "A. Person", "--name", "My MPT"]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    rdf = yaml.safe_load(read_member(target, "rdf.yaml"))
    assert rdf["name"] == "My MPT" and rdf["authors"] == [{"name": "A. Person"}]
    # from the middle plane of the image: 64 x 64, the largest multiple of the network's 64 that fits
    test_input = np.load(io.BytesIO(read_member(target, "test_input.npy")))
    assert test_input.shape == (1, 1, 64, 64)
    assert any(
        np.array_equal(test_input[0, 0], image[1, top : top + 64, left : left + 64])
        for top in range(80 - 64 + 1)
        for left in range(100 - 64 + 1)
    )

    def one_line_error(argv):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "exists; pass --overwrite" in one_line_error(args)
    assert "a .zip file" in one_line_error([*args[:3], str(tmp_path / "mine.tar"), *args[4:]])
    other = str(tmp_path / "other.zip")
    assert "name" in one_line_error([*args[:3], other, *args[4:], "--name", "no/slashes, no commas"])
    assert not (tmp_path / "other.zip").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_an_rgb_model_exports_its_colours_and_refuses_a_grey_image(tmp_path, sample_plane):
    needs_bioimageio()
    from bioimageio.core import test_model
    from skimage import data

    from napari_mpt_deblur.models.bioimageio import export_package

    torch.manual_seed(4)
    model = MPT(tiny_config(in_channels=3, out_channels=3)).eval()
    with pytest.raises(ValueError, match="3-channel model needs a colour test image"):
        export_package(model, tmp_path / "grey.zip", sample_plane)
    stained = data.immunohistochemistry()[:200, :300]  # real RGB microscopy (bundled with scikit-image)
    package = export_package(model, tmp_path / "rgb.zip", stained)
    rdf = yaml.safe_load(read_member(package, "rdf.yaml"))
    assert rdf["inputs"][0]["axes"][1]["channel_names"] == ["r", "g", "b"]
    test_input = np.load(io.BytesIO(read_member(package, "test_input.npy")))
    assert test_input.shape == (1, 3, 192, 192)  # 200 rounded down to the network's multiple of 64
    summary = test_model(package)
    assert summary.status == "passed", failures(summary)
    assert load_model(package).config.in_channels == 3


def foreign_package(folder: Path) -> Path:
    """A real, valid bioimage.io package of another network: one 3x3 convolution from torch.nn."""
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as spec

    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 1, 3, padding=1)
    torch.save(network.state_dict(), folder / "conv.pt")
    x = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    np.save(folder / "in.npy", x)
    with torch.no_grad():
        np.save(folder / "out.npy", network(torch.from_numpy(x)).numpy())
    (folder / "README.md").write_text("# A convolution\n\n## Validation\n\nNone.\n")
    axes = [spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier("c")])]
    space = [spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=16, step=16)) for a in "yx"]
    out_space = [
        spec.SpaceOutputAxis(id=spec.AxisId(a), size=spec.SizeReference(tensor_id="input", axis_id=a)) for a in "yx"
    ]
    description = spec.ModelDescr(
        name="A convolution",
        description="not an MPT",
        authors=[spec.Author(name="Someone Else")],
        cite=[spec.CiteEntry(text="none", doi=spec.Doi("10.5281/zenodo.1"))],
        license=spec.LicenseId("MIT"),
        documentation=spec.FileDescr(source=folder / "README.md"),
        inputs=[
            spec.InputTensorDescr(
                id="input", axes=[*axes, *space], test_tensor=spec.FileDescr(source=folder / "in.npy")
            )
        ],
        outputs=[
            spec.OutputTensorDescr(
                id="output", axes=[*axes, *out_space], test_tensor=spec.FileDescr(source=folder / "out.npy")
            )
        ],
        weights=spec.WeightsDescr(
            pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                source=folder / "conv.pt",
                architecture=spec.ArchitectureFromLibraryDescr(
                    import_from="torch.nn",
                    callable="Conv2d",
                    kwargs=dict(in_channels=1, out_channels=1, kernel_size=3, padding=1),
                ),
                pytorch_version=spec.Version("2.1"),
            )
        ),
    )
    return save_bioimageio_package(description, output_path=folder / "conv.zip")


@pytest.mark.slow
def test_a_package_of_another_network_is_refused_clearly(tmp_path, capsys):
    needs_bioimageio()
    package = foreign_package(tmp_path)
    assert is_package(package)
    with pytest.raises(
        ModelFileError, match=r"conv.zip: a bioimage.io model \('A convolution'\) that napari-mpt-deblur"
    ):
        load_model(package)
    from napari_mpt_deblur.plugin.session import Session

    with pytest.raises(ModelFileError, match="deblurs only with MPT models"):  # the docks' model box
        Session().load_model(str(package))
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((64, 64), np.uint16))
    assert main(["deblur", str(tmp_path / "in.tif"), "-o", str(tmp_path / "out.tif"), "--model", str(package)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "deblurs only with MPT models" in err
    assert not (tmp_path / "out.tif").exists()


def rewritten(package: Path, target: Path, change) -> Path:
    """A copy of ``package`` whose rdf.yaml went through ``change`` (a dict -> None function)."""
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(target, "w") as copy:
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename == "rdf.yaml":
                rdf = yaml.safe_load(data)
                change(rdf)
                data = yaml.safe_dump(rdf).encode()
            copy.writestr(entry, data)
    return target


@pytest.mark.slow
def test_a_package_whose_card_or_weights_do_not_fit_is_refused(package, tmp_path):
    def wider(rdf):
        rdf["config"]["napari_mpt_deblur"]["architecture"]["dim"] = 16

    with pytest.raises(ModelFileError, match=r"weights.pt.*(larger than the weights|shape)"):
        load_model(rewritten(package, tmp_path / "wider.zip", wider))

    def newer(rdf):
        rdf["config"]["napari_mpt_deblur"]["format_version"] = 99

    with pytest.raises(ModelFileError, match="format version 99.*upgrade"):
        load_model(rewritten(package, tmp_path / "newer.zip", newer))

    def no_weights(rdf):
        rdf["weights"]["pytorch_state_dict"]["source"] = "elsewhere.pt"

    with pytest.raises(ModelFileError, match="weights are missing"):
        load_model(rewritten(package, tmp_path / "no-weights.zip", no_weights))

    # YAML aliases nested ten deep would stand for 10**10 strings once expanded: refused before anything grows
    lines = ["type: model", "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)]
    with zipfile.ZipFile(tmp_path / "laughs.zip", "w") as archive:
        archive.writestr("rdf.yaml", "\n".join(lines))
    with pytest.raises(ModelFileError, match="laughs.zip: its rdf.yaml is not valid YAML.*alias"):
        load_model(tmp_path / "laughs.zip")

    # a torch.save zip is still a reference checkpoint, not a package
    torch.save({"x": torch.zeros(1)}, tmp_path / "plain.pth")
    assert not is_package(tmp_path / "plain.pth")
    with pytest.raises(ModelFileError, match="plain.pth: cannot import as a reference MPT checkpoint"):
        load_model(tmp_path / "plain.pth")


def test_a_model_that_takes_the_blur_width_exports_and_its_architecture_file_builds_it(tmp_path, sample_plane):
    needs_bioimageio()
    from napari_mpt_deblur.models.bioimageio import ARCHITECTURE_CALLABLE, export_package

    torch.manual_seed(4)
    network = MPT(tiny_config(blur_conditioned=True, blur_estimator=True, width_margin=2.0)).eval()
    with torch.no_grad():  # a trained modulation: not zero
        network.blur_modulation.project.weight.normal_(0, 0.05)
    package = export_package(network, tmp_path / "width.zip", sample_plane)
    reloaded = load_model(package)
    assert reloaded.config.blur_conditioned and reloaded.config.blur_estimator
    assert reloaded.config.width_margin == 2.0
    x = torch.rand(1, 1, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, 2.0), network(x, 2.0), rtol=0, atol=0)
    # the self-contained file builds the same network (its inputs: the image; the width its own estimate)
    namespace: dict = {}
    exec(compile(architecture_source(), "mpt_architecture.py", "exec"), namespace)  # noqa: S102
    standalone = namespace[ARCHITECTURE_CALLABLE](**network.config.to_dict()).eval()
    standalone.load_state_dict(network.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(standalone(x), network(x), rtol=0, atol=0)


def test_a_package_of_a_model_with_a_milder_blur_network_holds_the_fine_tuned_one_and_says_so(tmp_path, sample_plane):
    needs_bioimageio()
    from napari_mpt_deblur.models.bioimageio import export_package
    from napari_mpt_deblur.models.mpt import MilderBlur

    torch.manual_seed(5)
    network = MPT(tiny_config(blur_conditioned=True, blur_estimator=True)).eval()
    network.milder_blur = MilderBlur(MPT(network.config).eval(), 1.5)
    optics = Microscope(na=1.4, medium="oil", pixel_size_um=0.1)  # sharpened after the network: left out too
    network.card = ModelCard(network.config, in_focus_optics=optics)
    reloaded = load_model(export_package(network, tmp_path / "tuned.zip", sample_plane))
    assert reloaded.milder_blur is None and reloaded.card.milder_blur_below_width is None
    assert "below 1.50 px" in reloaded.card.provenance["milder_blur_network"]
    assert reloaded.card.in_focus_optics is None
    assert "in-focus PSF of NA 1.4 (oil)" in reloaded.card.provenance["in_focus_sharpening"]
    x = torch.rand(1, 1, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, 1.0), network(x, 1.0), rtol=0, atol=0)
