"""The mpt-deblur command and the packaging (console script, npe2 manifest, wheel)."""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_mpt_deblur import load_model
from napari_mpt_deblur.cli import main, parse_scales

REPO = Path(__file__).resolve().parents[1]
TINY_SCALES = "1/8,1/8,1,1;1/4,1/4,1/2,1/2;1/2,1/2;1/2,1/2"


@pytest.mark.slow
def test_import_official_then_info(tmp_path, reference_dir, capsys):
    out = tmp_path / "tiny.safetensors"
    code = main(
        ["import-official", str(reference_dir / "official_tiny_gray.pth"), "-o", str(out), "--scales", TINY_SCALES]
    )
    assert code == 0 and out.exists()
    assert load_model(out).config.pairing == "official"

    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "401,496" in printed
    assert "official_tiny_gray.pth" in printed
    assert "1/8,1/8,1,1" in printed


def test_cli_errors_are_one_line_and_nonzero(tmp_path, reference_dir, capsys):
    out = tmp_path / "tiny.safetensors"
    out.write_text("keep me")
    code = main(["import-official", str(reference_dir / "official_tiny_gray.pth"), "-o", str(out)])
    assert code == 2
    assert out.read_text() == "keep me"  # never overwritten without --overwrite
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err

    code = main(["import-official", str(reference_dir / "official_tiny_gray.pth"), "-o", str(tmp_path / "x.st")])
    assert code == 2
    assert "give the pyramid scales" in capsys.readouterr().err
    assert not (tmp_path / "x.st").exists()

    assert main(["info", str(tmp_path / "nope.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_new_preset_model_and_presets_listing(tmp_path, capsys):
    out = tmp_path / "lite.safetensors"
    assert main(["new", "lite", "-o", str(out), "--channels", "3"]) == 0
    model = load_model(out)
    assert model.config.in_channels == 3
    assert model.card.provenance["trained"] is False
    assert main(["presets"]) == 0
    assert "paper" in capsys.readouterr().out


def test_parse_scales():
    assert parse_scales("1/8, 1;1/4;1/2;1") == [[0.125, 1.0], [0.25], [0.5], [1.0]]


@pytest.mark.slow
def test_console_script_is_installed(tmp_path):
    exe = shutil.which("mpt-deblur")
    assert exe, "the mpt-deblur console script is not on PATH (is the package installed?)"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "mpt-deblur" in result.stdout


def test_npe2_discovers_the_manifest():
    from npe2 import PluginManager

    manager = PluginManager()
    manager.discover()
    manifest = manager.get_manifest("napari-mpt-deblur")
    assert manifest.display_name == "MPT Deblur"
    assert manifest.package_metadata.version


def test_wheel_ships_the_manifest(tmp_path):
    pytest.importorskip("hatchling")
    result = subprocess.run(
        [sys.executable, "-c", f"from hatchling.build import build_wheel; print(build_wheel({str(tmp_path)!r}))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    wheel = tmp_path / result.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        manifest = archive.read("napari_mpt_deblur/napari.yaml").decode()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert manifest == (REPO / "napari.yaml").read_text()
    assert names.count("napari_mpt_deblur/napari.yaml") == 1
    assert "napari_mpt_deblur:napari.yaml" in entry_points
    assert "mpt-deblur = napari_mpt_deblur.cli:main" in entry_points


def test_editable_build_puts_a_copy_of_the_root_manifest_where_npe2_reads_it(tmp_path):
    """No symlink is needed: on Windows a checked-out symlink is a text file holding a path, which npe2 cannot read."""
    pytest.importorskip("hatchling")
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "hatch_build.py", "napari.yaml", "README.md", ".gitignore"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "napari.yaml"))
    packaged = project / "src" / "napari_mpt_deblur" / "napari.yaml"
    packaged.write_text("../../napari.yaml")  # what a Windows checkout of the old symlink held
    result = subprocess.run(
        [sys.executable, "-c", f"from hatchling.build import build_editable; print(build_editable({str(tmp_path)!r}))"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert not packaged.is_symlink() and packaged.read_bytes() == (REPO / "napari.yaml").read_bytes()
    wheel = tmp_path / result.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        path_file = next(name for name in archive.namelist() if name.endswith(".pth"))
        assert Path(archive.read(path_file).decode().strip()) == project / "src"


def test_the_manifest_npe2_reads_is_the_root_manifest():
    import importlib.util

    spec = importlib.util.find_spec("napari_mpt_deblur")
    found = [Path(folder) / "napari.yaml" for folder in spec.submodule_search_locations]
    packaged = next(path for path in found if path.exists())
    assert not packaged.is_symlink()
    assert packaged.read_bytes() == (REPO / "napari.yaml").read_bytes(), (
        f"{packaged} differs from the root napari.yaml: reinstall (pip install -e .) to copy the edited manifest"
    )


def test_reference_vectors_are_in_the_repository_as_their_readme_lists_them(reference_dir):
    assert REPO in reference_dir.parents
    readme = (reference_dir / "README.md").read_text()
    listed = dict(
        reversed(line.split()) for line in readme.split("```\n", 1)[1].split("```", 1)[0].splitlines() if line
    )
    assert sorted(listed) == sorted(p.name for p in reference_dir.iterdir() if p.name != "README.md")
    for name, digest in listed.items():
        assert hashlib.sha256((reference_dir / name).read_bytes()).hexdigest() == digest, name


def readme_main_job() -> list[str]:
    """The steps of README's first command: install, sample, deblur."""
    readme = (REPO / "README.md").read_text()
    first = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    return [step.strip() for step in first.split("&&")]


@pytest.mark.slow
def test_readme_main_job_is_install_then_sample_then_deblur(tmp_path, monkeypatch, capsys):
    steps = readme_main_job()
    assert [step.split()[0] for step in steps] == ["pip", "pip", "mpt-deblur", "mpt-deblur"]
    sample, deblur = (shlex.split(step)[1:] for step in steps[2:])
    assert sample[0] == "sample" and deblur[0] == "deblur"
    assert deblur[1] == sample[sample.index("-o") + 1]  # it deblurs the sample it made
    monkeypatch.chdir(tmp_path)
    assert main(sample) == 0
    printed = capsys.readouterr().out
    assert f"wrote {sample[sample.index('-o') + 1]}" in printed and "0.2 um" in printed
    assert main(sample) == 0  # --overwrite: the command can be run again

    # the deblur step as written, on a corner of the stack (the whole one takes minutes on a small CPU)
    stack = Path(deblur[1])
    tifffile.imwrite(stack, tifffile.imread(stack)[3:5, :96, :96], imagej=True, metadata={"axes": "ZYX"})
    capsys.readouterr()
    assert main(deblur) == 0
    printed = capsys.readouterr().out  # where the result went, how long it took, the blur width it estimated
    target = deblur[deblur.index("-o") + 1]
    width = r"blur width estimated at ([\d.]+-)?[\d.]+ px( \(median [\d.]+\) over 2 planes)?"
    assert re.search(rf"^wrote {re.escape(target)} in \d+\.\d s; {width}$", printed, re.MULTILINE), printed
    assert tifffile.imread(target).shape == (2, 96, 96)


@pytest.mark.slow
def test_sample_command_writes_the_napari_sample_with_its_calibration(tmp_path, capsys):
    from napari_mpt_deblur.images import open_image
    from napari_mpt_deblur.plugin.samples import SAMPLES, defocused_cell_stack

    assert main(["sample", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in SAMPLES) and "cells-truth" in SAMPLES
    assert all(name in build_help("sample") for name in SAMPLES)

    truth, defocused = defocused_cell_stack()
    layers = {"cells": defocused, "cells-truth": truth}
    for name, suffix in (("cells", ".tif"), ("cells-truth", ".ome.zarr")):
        target = tmp_path / f"{name}{suffix}"
        assert main(["sample", name, "-o", str(target)]) == 0
        image = open_image(target)
        data, meta, _ = layers[name]
        assert image.axes == "ZYX" and np.array_equal(image.data.compute(), data)
        assert image.pixel_size == pytest.approx(meta["scale"][1:]) and image.z_spacing == pytest.approx(0.75)
    with tifffile.TiffFile(tmp_path / "cells.tif") as tif:  # Fiji reads the calibration
        assert tif.is_imagej and tif.imagej_metadata["unit"] == "micron"

    assert main(["sample", "cells", "-o", str(tmp_path / "cells.tif")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["sample", "cells"]) == 2
    assert "-o FILE" in capsys.readouterr().err


def build_help(command: str) -> str:
    from napari_mpt_deblur.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._subparsers._group_actions if a.dest == "command").choices[command].format_help()


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = [block.split("```", 1)[0].strip() for block in readme.split("```bash\n")[1:]]
    test_command = next(block for block in blocks if "pytest" in block)
    run_test = test_command.split("&&")[-1].strip()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert ci_lines[-1] == run_test
    for step in (part.strip() for part in test_command.split("&&")[:-1]):
        assert any(step.replace("pip install", "python -m pip install -q") == line for line in ci_lines), step


@pytest.mark.slow
def test_import_a_paper_shaped_checkpoint_with_default_scales(tmp_path, reference_dir, capsys):
    """The common case: a released RGB checkpoint of the paper preset, DataParallel prefix included."""
    import json

    import torch

    from napari_mpt_deblur.models.windows import relative_position_index

    state = {}
    for line in (reference_dir / "paper_config_keys_3ch.tsv").read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        state[f"module.{key}"] = (
            relative_position_index(8) if key.endswith("relative_position_index") else torch.randn(json.loads(shape))
        )
    checkpoint = tmp_path / "net_g_latest.pth"
    torch.save(state, checkpoint)
    out = tmp_path / "paper.safetensors"
    assert main(["import-official", str(checkpoint), "-o", str(out)]) == 0
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["parameters"] == 19_799_356
    assert info["architecture"]["pairing"] == "official"
    assert info["architecture"]["in_channels"] == 3
    assert len(info["provenance"]["sha256"]) == 64


def test_unwritable_output_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert main(["new", "lite", "-o", str(blocker / "model.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpt-deblur new: error:") and "\n" not in err


@pytest.mark.slow
def test_readme_python_quick_start_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Quick start: Python") :]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["restored"].shape == (1, 1, 250, 333)
    assert (tmp_path / "mine.safetensors").exists()
