"""Never corrupt, overwrite or lose a user's data (issue 18): the promises of docs/reliability.md."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch

from helpers import tiny_config
from napari_mpt_deblur import MPT, atomic, save_model
from napari_mpt_deblur.atomic import OutputExistsError, atomic_write, atomic_write_folder, remove_stale_partials
from napari_mpt_deblur.cli import main
from napari_mpt_deblur.images import is_zarr_store, open_image, output_is_complete, write_ome_zarr
from napari_mpt_deblur.inference import InputError, deblur_file


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    return save_model(MPT(tiny_config()).eval(), tmp_path_factory.mktemp("models") / "tiny.safetensors")


def write_stack(path, shape=(3, 32, 40), seed=1, **options):
    stack = (np.random.default_rng(seed).random(shape) * 4000).astype(np.uint16)
    tifffile.imwrite(path, stack, **{"photometric": "minisblack", **options})
    return stack


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def run_error(capsys, args):
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def partials(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- 1: --axes describe the array as stored -------------------------------------------------------------------------


@pytest.mark.slow
def test_axes_describe_the_array_as_stored_before_any_guess(tmp_path, model_file):
    model = ["--model", str(model_file), "--quiet"]
    source = tmp_path / "c.tif"
    # tifffile reads it as QSYX (planar RGB): the 3-entry axis is what our own guess would move last
    stack = write_stack(source, shape=(2, 3, 32, 32), photometric="rgb", planarconfig="separate")
    assert open_image(source, "ZCYX").shape == (2, 3, 32, 32)
    target = tmp_path / "o.tif"
    assert main(["deblur", str(source), "-o", str(target), *model, "--axes", "ZCYX"]) == 0
    with tifffile.TiffFile(target) as tif:
        assert tif.series[0].axes == "ZCYX" and tif.series[0].shape == stack.shape

    # plain 4-D and 5-D TIFFs (tifffile: QQYX, QQQYX) are accepted when the axes are given
    for shape, axes in (((2, 5, 32, 32), "TZYX"), ((2, 2, 5, 32, 32), "TZCYX")):
        source = tmp_path / f"plain{len(shape)}.tif"
        write_stack(source, shape=shape)
        target = tmp_path / f"plain{len(shape)}-out.tif"
        assert main(["deblur", str(source), "-o", str(target), *model, "--axes", axes]) == 0
        assert tifffile.imread(target).shape == shape


# --- 2: a Zarr store is a Zarr store by its content; inputs are never written into ----------------------------------


def test_zarr_store_typed_with_a_trailing_slash_is_one_image_never_written_into(tmp_path, model_file, capsys):
    model = ["--model", str(model_file), "--quiet"]
    stack = write_stack(tmp_path / "seed.tif", shape=(2, 32, 32))
    store = tmp_path / "z.ome.zarr"
    write_ome_zarr(store, [((slice(None),) * 3, stack)], stack.shape, stack.dtype, "ZYX")
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    assert is_zarr_store(f"{store}/")

    assert "replace the input" in run_error(capsys, ["deblur", f"{store}/", "-o", str(store), *model])
    err = run_error(capsys, ["deblur", f"{store}/", "-o", f"{store}/inner.tif", *model, "--overwrite"])
    assert "inside the input" in err
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before

    # one image to one file, slash or not, and whatever the store's name
    assert main(["deblur", f"{store}/", "-o", str(tmp_path / "z.tif"), *model]) == 0
    assert tifffile.imread(tmp_path / "z.tif").shape == stack.shape
    renamed = tmp_path / "plain-folder-name"
    store.rename(renamed)
    assert main(["deblur", f"{renamed}/", "-o", str(tmp_path / "r.tif"), *model]) == 0

    # an output inside an input folder of TIFFs needs --overwrite
    folder = tmp_path / "in"
    folder.mkdir()
    write_stack(folder / "a.tif", shape=(1, 32, 32))
    assert "inside the input folder" in run_error(capsys, ["deblur", str(folder), "-o", str(folder / "out"), *model])
    assert not (folder / "out").exists()


# --- 3: two runs to one new output never replace each other ---------------------------------------------------------


@pytest.mark.parametrize("primitive", ["renameat2", "link or mkdir"])
def test_publishing_without_overwrite_never_replaces_what_appeared_meanwhile(tmp_path, monkeypatch, primitive):
    if primitive != "renameat2":
        monkeypatch.setattr(atomic, "_renameat2_noreplace", lambda source, target: False)
    target = tmp_path / "out.tif"

    def other_run_finishes_first(path):
        path.write_text("mine")
        target.write_text("the other run's")

    with pytest.raises(OutputExistsError, match="appeared while this run was writing"):
        atomic_write(target, other_run_finishes_first, overwrite=False)
    assert target.read_text() == "the other run's" and partials(tmp_path) == []

    folder = tmp_path / "out.zarr"

    def other_folder_first(path):
        (path / "mine").write_text("x")
        folder.mkdir()
        (folder / "theirs").write_text("x")

    with pytest.raises(OutputExistsError):
        atomic_write_folder(folder, other_folder_first, overwrite=False)
    assert [p.name for p in folder.iterdir()] == ["theirs"] and partials(tmp_path) == []

    atomic_write(tmp_path / "new.tif", lambda path: path.write_text("new"), overwrite=False)
    atomic_write_folder(tmp_path / "new.zarr", lambda path: (path / "a").write_text("a"), overwrite=False)
    assert (tmp_path / "new.tif").read_text() == "new" and (tmp_path / "new.zarr" / "a").exists()


def test_a_deblur_never_replaces_an_output_another_run_wrote_meanwhile(tmp_path, model_file, capsys):
    source = tmp_path / "in.tif"
    write_stack(source)
    target = tmp_path / "out.tif"

    def another_run_finishes(event):
        if not target.exists():
            target.write_bytes(b"the other run's result")

    from napari_mpt_deblur.models.files import load_model

    with pytest.raises(OutputExistsError):
        deblur_file(load_model(model_file), source, target, progress=another_run_finishes, overwrite=False)
    assert target.read_bytes() == b"the other run's result" and partials(tmp_path) == []


# --- 5, 7: damaged pixel data and NaN: one line naming the file and the plane ---------------------------------------


def test_pixel_data_cut_short_is_one_line_naming_the_file(tmp_path, model_file, capsys):
    source = tmp_path / "cut.tif"
    write_stack(source, shape=(4, 64, 64))
    cut_in_half(source)
    args = ["deblur", str(source), "-o", str(tmp_path / "o.tif"), "--model", str(model_file), "--quiet"]
    err = run_error(capsys, args)
    assert str(source) in err and "damaged or cut short" in err
    assert partials(tmp_path) == [] and not (tmp_path / "o.tif").exists()


def test_nan_in_the_last_plane_is_refused_before_any_plane_is_deblurred(tmp_path, model_file, capsys):
    source = tmp_path / "nan.tif"
    stack = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    stack[2, 5, 5] = np.nan
    tifffile.imwrite(source, stack, photometric="minisblack", metadata={"axes": "ZYX"})
    from napari_mpt_deblur.models.files import load_model

    events = []
    with pytest.raises(InputError, match="plane Z=2 contains NaN") as raised:
        deblur_file(load_model(model_file), source, tmp_path / "o.tif", progress=events.append)
    assert str(source) in str(raised.value)
    assert events == []  # refused before the first plane was computed
    err = run_error(capsys, ["deblur", str(source), "-o", str(tmp_path / "o.tif"), "--model", str(model_file)])
    assert str(source) in err and "plane Z=2" in err


# --- 6: a batch goes on past a bad file; --skip-existing finishes it ------------------------------------------------


def test_a_batch_goes_on_past_a_bad_file_and_skip_existing_finishes_it(tmp_path, model_file, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("a.tif", "b.tif", "c.tif"):
        write_stack(inputs / name, shape=(2, 64, 64))
    good_b = (inputs / "b.tif").read_bytes()
    cut_in_half(inputs / "b.tif")
    args = ["deblur", str(inputs), "-o", str(out), "--model", str(model_file), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 of 3 inputs failed" in err and str(inputs / "b.tif") in err.splitlines()[-1]
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "c.tif"]
    assert output_is_complete(out / "a.tif", (2, 64, 64), np.uint16)

    # without a choice, existing outputs are refused before anything runs
    (inputs / "b.tif").write_bytes(good_b)
    assert "--skip-existing" in run_error(capsys, args)
    written = {name: (out / name).stat().st_mtime_ns for name in ("a.tif", "c.tif")}
    assert main([*args, "--skip-existing"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.tif", "b.tif", "c.tif"]
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written  # not redone

    # an output cut short is not complete: it is not skipped, and replacing it needs --overwrite
    cut_in_half(out / "c.tif")
    assert not output_is_complete(out / "c.tif", (2, 64, 64), np.uint16)
    assert "not a complete output" in run_error(capsys, [*args, "--skip-existing"])
    assert main([*args, "--skip-existing", "--overwrite"]) == 0
    assert output_is_complete(out / "c.tif", (2, 64, 64), np.uint16)
    assert {name: (out / name).stat().st_mtime_ns for name in ("a.tif",)} == {"a.tif": written["a.tif"]}


# --- 10: a killed run leaves nothing behind for long ----------------------------------------------------------------


def cli(*args):
    code = "import sys; from napari_mpt_deblur.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_partial(folder, process, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if partials(folder):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.kill()
    pytest.fail("the run never started writing")


@pytest.mark.slow
def test_sigterm_removes_the_partial_file_and_a_later_run_removes_a_killed_runs(tmp_path, model_file):
    source = tmp_path / "in" / "big.tif"
    source.parent.mkdir()
    write_stack(source, shape=(400, 96, 96))
    out = tmp_path / "out"
    out.mkdir()
    target = out / "big.tif"
    args = ["deblur", str(source), "-o", str(target), "--model", str(model_file), "--quiet", "--tile", "0"]

    run = cli(*args)
    wait_for_partial(out, run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM and "terminated" in err
    assert partials(out) == [] and not target.exists()

    run = cli(*args)
    wait_for_partial(out, run)
    run.kill()  # SIGKILL: no handler can run; the partial file stays
    run.communicate(timeout=60)
    [left] = partials(out)
    os.utime(out / left, (time.time() - 120, time.time() - 120))  # its owner is gone and it is idle: stale
    small = tmp_path / "in" / "small.tif"
    write_stack(small, shape=(1, 32, 32))
    assert main(["deblur", str(small), "-o", str(target), "--model", str(model_file), "--quiet"]) == 0
    assert partials(out) == [] and target.exists()


def test_only_stale_partials_of_the_same_target_are_removed(tmp_path):
    target = tmp_path / "out.tif"
    host = atomic._host_tag()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old, ancient = time.time() - 300, time.time() - 25 * 3600
        cases = {
            f".out.tif.{host}-{dead}.abcd1234.part": (old, True),  # owner gone, idle: a killed run's
            f".out.tif.{host}-{dead}.abcd1235.part": (time.time(), False),  # just written: maybe not ours to judge
            f".out.tif.{host}-{alive.pid}.abcd1236.part": (old, False),  # a run still going (or a reused pid)
            f".out.tif.otherhost-{dead}.abcd1237.part": (old, False),  # another machine's process: unknown
            f".out.tif.otherhost-{dead}.abcd1238.part": (ancient, True),  # untouched for a day
            f".other.tif.{host}-{dead}.abcd1239.part": (old, False),  # another target's
            f".out.tif.{host}-{dead}.abcd1240.old": (old, False),  # the previous output, and out.tif is missing
            "out.tif.part": (ancient, False),  # not our pattern
        }
        for name, (mtime, _) in cases.items():
            (tmp_path / name).write_text("x")
            os.utime(tmp_path / name, (mtime, mtime))
        removed = {p.name for p in remove_stale_partials(target)}
        assert removed == {name for name, (_, stale) in cases.items() if stale}
    finally:
        alive.kill()
        alive.wait()


# --- 11: the smaller ones -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_is_one_clear_line_and_leaves_nothing(tmp_path, model_file):
    source = tmp_path / "in.tif"
    write_stack(source, shape=(4, 64, 64))
    target = tmp_path / "out" / "o.tif"
    target.parent.mkdir()
    # a file size limit makes the disk 'full' after 20 kB, for this process only
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from napari_mpt_deblur.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["deblur", str(source), "-o", str(target), "--model", str(model_file), "--quiet"]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    err = done.stderr.strip()
    assert done.returncode == 2 and len(err.splitlines()) == 1, err
    assert "cannot write it" in err and "free there" in err and str(target) in err
    assert list(target.parent.iterdir()) == []

    def short_write(path):
        raise OSError("25600 requested and 3036 written")  # how numpy reports a full disk

    with pytest.raises(atomic.DiskFullError, match="the disk is full"):
        atomic_write(tmp_path / "x.bin", short_write)


def test_scheduler_addresses_that_cannot_work_are_one_line(tmp_path, model_file, capsys):
    source = tmp_path / "in.tif"
    write_stack(source)
    args = ["deblur", str(source), "-o", str(tmp_path / "o.tif"), "--model", str(model_file)]
    for address in ("not an address", "tcp://127.0.0.1:notaport", "foo://host:1"):
        assert "not a scheduler address" in run_error(capsys, [*args, "--scheduler", address])


@pytest.mark.slow
def test_a_lost_scheduler_is_one_line_and_leaves_nothing(tmp_path, model_file):
    pytest.importorskip("distributed")
    source = tmp_path / "in.tif"
    write_stack(source, shape=(300, 64, 64))
    out = tmp_path / "out"
    out.mkdir()
    scheduler = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    worker = None
    try:
        address = None
        for line in scheduler.stdout:
            if "Scheduler at:" in line:
                address = line.split("Scheduler at:")[1].strip()
                break
        assert address
        worker = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-dashboard"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        args = ["deblur", str(source), "-o", str(out / "o.tif"), "--model", str(model_file), "--quiet"]
        run = cli(*args, "--scheduler", address)
        wait_for_partial(out, run)
        time.sleep(2)
        scheduler.kill()
        _, err = run.communicate(timeout=240)
    finally:
        for process in (scheduler, worker):
            if process is not None:
                process.kill()
                process.wait()
    assert run.returncode == 2, err
    assert "lost the scheduler" in err.strip().splitlines()[-1]
    assert partials(out) == [] and not (out / "o.tif").exists()


def test_import_official_of_a_tiff_says_it_is_a_tiff(tmp_path, capsys):
    image = tmp_path / "cells.tif"
    write_stack(image)
    err = run_error(capsys, ["import-official", str(image), "-o", str(tmp_path / "m.safetensors")])
    assert "TIFF image" in err and "Python objects" not in err


def test_overlap_error_names_a_bound_not_none(tmp_path, model_file, capsys):
    source = tmp_path / "in.tif"
    write_stack(source)
    err = run_error(capsys, ["deblur", str(source), "-o", str(tmp_path / "o.tif"), "--overlap", "-1"])
    assert "overlap must be at least 0" in err and "None" not in err


def test_compare_checks_the_stardist_model_before_deblurring(tmp_path, capsys):
    source = tmp_path / "blurry.tif"
    write_stack(source)
    missing_mpt = tmp_path / "never-loaded.safetensors"  # loading it would fail: it must not be reached
    err = run_error(
        capsys,
        [
            "compare",
            "--blurry",
            str(source),
            "--model",
            str(missing_mpt),
            "--stardist-model",
            str(tmp_path / "no-such-model"),
        ],
    )
    assert "StarDist model folder not found" in err
