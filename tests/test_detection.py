"""StarDist detection: the metrics, the worker process, the engine and the CLI, against a real StarDist model."""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
import tifffile
from scipy.ndimage import gaussian_filter

from napari_mpt_deblur.cli import main
from napari_mpt_deblur.detection import (
    DetectionCancelled,
    DetectionError,
    DetectionSettings,
    StarDistWorker,
    WorkerCrashed,
    compare,
    compare_labels,
    detect,
    iter_detect,
    shared_worker,
)
from napari_mpt_deblur.detection.synthetic import synthetic_nuclei
from napari_mpt_deblur.detection.worker import pretrained_cache_folder


def blurred(images: np.ndarray, sigma: float = 3.0, seed: int = 0) -> np.ndarray:
    """Defocus-like blur with a little noise, per plane."""
    rng = np.random.default_rng(seed)
    out = np.stack([gaussian_filter(plane, sigma) for plane in images])
    return (out + rng.normal(0, 0.02, out.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def worker():
    with StarDistWorker() as started:
        yield started


@pytest.fixture(scope="module")
def field():
    """Two planes of held-out synthetic nuclei (not the training seed) with their ground truth."""
    return synthetic_nuclei(2, 128, seed=7)


@pytest.fixture(scope="module", autouse=True)
def _stop_shared_worker():
    yield
    shared_worker().close()


# --- metrics --------------------------------------------------------------------------------------------------------


def test_matching_counts_true_and_false_positives_exactly():
    truth = np.zeros((32, 32), np.int32)
    truth[2:10, 2:10] = 1
    truth[20:28, 20:28] = 2
    predicted = np.zeros_like(truth)
    predicted[2:10, 2:10] = 5  # a perfect match, numbered differently
    predicted[2:10, 20:28] = 6  # a false positive; truth object 2 is missed
    comparison = compare_labels({"blurry": predicted, "sharp": truth}, truth)
    scores = comparison.reports["blurry"].scores
    assert [(s.tp, s.fp, s.fn) for s in scores] == [(1, 1, 1)] * 3
    assert scores[0].ap == pytest.approx(1 / 3) and scores[0].f1 == pytest.approx(0.5)
    assert comparison.reports["sharp"].mean_ap == pytest.approx(1.0)
    assert comparison.reports["blurry"].stats.objects == 2
    assert comparison.reports["blurry"].stats.mean_area == pytest.approx(64.0)
    assert comparison.reference == "ground truth"


def test_gap_recovered_is_the_share_of_the_blurry_to_sharp_difference_in_mean_ap():
    truth = np.zeros((40, 40), np.int32)
    for i, start in enumerate((2, 12, 22, 32)):
        truth[start : start + 6, 2:8] = i + 1
    blurry = np.where(np.isin(truth, (1,)), truth, 0)  # finds 1 of 4
    deblurred = np.where(np.isin(truth, (1, 2, 3)), truth, 0)  # 3 of 4
    comparison = compare_labels({"blurry": blurry, "deblurred": deblurred, "sharp": truth}, truth)
    # mean AP: blurry 0.25, deblurred 0.75, sharp 1.0 -> (0.75 - 0.25) / (1 - 0.25)
    assert comparison.gap_recovered == pytest.approx(2 / 3)
    assert "recovers 67% of the blurry-to-sharp gap" in comparison.table()
    assert json.loads(json.dumps(comparison.to_dict()))["gap_recovered"] == pytest.approx(2 / 3)


def test_without_ground_truth_the_sharp_detections_are_the_reference_and_stacks_are_scored_per_plane():
    sharp = np.zeros((3, 20, 20), np.int32)
    sharp[:, 2:8, 2:8] = 1
    sharp[:, 12:18, 12:18] = 2
    blurry = sharp.copy()
    blurry[0] = 0  # nothing found in the first plane
    comparison = compare_labels({"blurry": blurry, "sharp": sharp}, plane_labels=["z=0", "z=1", "z=2"])
    assert comparison.reference == "detections on the sharp image"
    rows = comparison.rows()
    assert [(r["image"], r["plane"]) for r in rows[:4]] == [
        ("blurry", "z=0"),
        ("blurry", "z=1"),
        ("blurry", "z=2"),
        ("blurry", "all"),
    ]
    assert rows[0]["objects"] == 0 and rows[0]["ap@0.5"] == 0.0 and rows[1]["ap@0.5"] == 1.0
    assert rows[3]["recall@0.5"] == pytest.approx(4 / 6)


def test_images_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        compare_labels({"blurry": np.zeros((8, 8), np.int32), "deblurred": np.zeros((8, 9), np.int32)})


def test_settings_refuse_thresholds_outside_zero_to_one():
    with pytest.raises(ValueError, match="prob_thresh"):
        DetectionSettings(prob_thresh=1.5)


# --- the worker and the engine (real StarDist) ----------------------------------------------------------------------


@pytest.mark.slow
def test_detects_held_out_nuclei_and_blur_costs_average_precision(worker, stardist_model_dir, field):
    sharp, truth = field
    settings = DetectionSettings(model=str(stardist_model_dir))
    events = []
    result = compare(blurred(sharp, 4.0), sharp, None, truth, settings=settings, worker=worker, progress=events.append)
    labels = result.labels["deblurred"]  # here: the sharp field
    assert labels.shape == truth.shape and labels.dtype == np.int32
    reports = result.comparison.reports
    assert reports["deblurred"].scores[0].ap > 0.8, result.comparison.table()
    assert reports["blurry"].mean_ap < reports["deblurred"].mean_ap - 0.05, result.comparison.table()
    assert [e.planes_done for e in events] == [1, 2, 3, 4] and events[-1].planes_total == 4
    assert [e.image for e in events] == ["blurry", "blurry", "deblurred", "deblurred"]


@pytest.mark.slow
def test_rgb_planes_meet_a_grey_model_and_large_planes_go_in_tiles(worker, stardist_model_dir, field):
    sharp, truth = field
    settings = DetectionSettings(model=str(stardist_model_dir))
    rgb = np.repeat(sharp[0][..., None], 3, axis=-1)
    grey_labels = detect(sharp[0], settings=settings, worker=worker)
    rgb_labels = detect(rgb, settings=settings, worker=worker)
    assert rgb_labels.shape == sharp[0].shape
    np.testing.assert_array_equal(rgb_labels > 0, grey_labels > 0)
    tiled = detect(sharp[0], settings=DetectionSettings(model=str(stardist_model_dir), max_tile=64), worker=worker)
    score = compare_labels({"tiled": tiled}, truth[0]).reports["tiled"].scores[0]
    assert score.ap > 0.8


@pytest.mark.slow
def test_the_worker_is_reused_across_calls(worker, stardist_model_dir, field):
    settings = DetectionSettings(model=str(stardist_model_dir))
    detect(field[0][0], settings=settings, worker=worker)
    pid = worker.pid
    detect(field[0][1], settings=settings, worker=worker)
    assert worker.pid == pid


@pytest.mark.slow
def test_a_crash_in_the_worker_becomes_an_error_and_the_next_call_starts_a_new_one(stardist_model_dir, field):
    settings = DetectionSettings(model=str(stardist_model_dir))
    with StarDistWorker() as worker:
        worker.load(settings.model)
        pid = worker.pid

        def die() -> bool:  # the process dies while it works on a plane, as after a segfault
            os.kill(pid, signal.SIGKILL)
            return False

        steps = iter_detect(field[0], settings=settings, worker=worker, should_stop=die)
        with pytest.raises(WorkerCrashed, match="stopped unexpectedly .*signal 9"):
            list(steps)
        assert not worker.alive
        labels = detect(field[0][0], settings=settings, worker=worker)
        assert labels.max() > 5 and worker.pid != pid


@pytest.mark.slow
def test_stopping_interrupts_a_plane_at_once(stardist_model_dir, field):
    settings = DetectionSettings(model=str(stardist_model_dir))
    with StarDistWorker() as worker:
        worker.load(settings.model)
        with pytest.raises(DetectionCancelled):
            list(iter_detect(field[0], settings=settings, worker=worker, should_stop=lambda: True))
        assert not worker.alive
        assert detect(field[0][0], settings=settings, worker=worker).max() > 5


@pytest.mark.slow
def test_offline_a_pretrained_model_names_the_cache_folder_and_works_once_copied_there(tmp_path, stardist_model_dir):
    unreachable = "http://127.0.0.1:9"  # nothing listens: the download fails at once, as offline
    env = {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": unreachable, "HTTP_PROXY": unreachable}
    env |= {"https_proxy": unreachable, "http_proxy": unreachable, "NO_PROXY": "", "no_proxy": ""}
    cache = tmp_path / "keras" / "models" / "StarDist2D" / "2D_versatile_fluo"
    with StarDistWorker(env=env) as worker:
        with pytest.raises(DetectionError) as error:
            worker.load("2D_versatile_fluo")
        message = str(error.value)
        assert "could not be downloaded" in message and str(cache) in message
        assert "python_2D_versatile_fluo.zip" in message
        shutil.copytree(stardist_model_dir, cache, dirs_exist_ok=True)  # what a user does with the unzipped model
        info = worker.load("2D_versatile_fluo")
    assert info.folder == str(cache) and info.channels == 1


def test_pretrained_cache_folder_follows_keras_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert pretrained_cache_folder("2D_versatile_he") == tmp_path / "models" / "StarDist2D" / "2D_versatile_he"


@pytest.mark.slow
@pytest.mark.stardist  # starts the StarDist process without the test model
def test_unknown_models_and_foreign_folders_give_clear_errors(worker, tmp_path):
    with pytest.raises(DetectionError, match="unknown StarDist model 'nuclei_v9'.*2D_versatile_fluo"):
        worker.load("nuclei_v9")
    with pytest.raises(DetectionError, match="not a StarDist model folder"):
        worker.load(str(tmp_path))
    assert worker.alive  # errors leave the worker serving


# --- the CLI --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_detect_writes_labels_with_the_image_pixel_size(tmp_path, stardist_model_dir, field, capsys):
    source, target = tmp_path / "nuclei.tif", tmp_path / "labels.tif"
    tifffile.imwrite(source, field[0], imagej=True, resolution=(1 / 0.65, 1 / 0.65), metadata={"unit": "um"})
    assert main(["detect", str(source), "-o", str(target), "--stardist-model", str(stardist_model_dir)]) == 0
    assert "objects in 2 planes" in capsys.readouterr().out
    with tifffile.TiffFile(target) as tif:
        labels = tif.asarray()
        x_resolution = tif.pages[0].tags["XResolution"].value
    assert labels.shape == field[1].shape and labels.dtype == np.uint16
    assert x_resolution[1] / x_resolution[0] == pytest.approx(0.65, rel=1e-3)
    score = compare_labels({"cli": labels.astype(np.int32)}, field[1]).reports["cli"].scores[0]
    assert score.ap > 0.8
    # an existing file is kept unless --overwrite
    assert main(["detect", str(source), "-o", str(target), "--stardist-model", str(stardist_model_dir)]) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_compare_prints_a_table_and_writes_json_csv_and_labels(tmp_path, stardist_model_dir, field, capsys):
    sharp, truth = field
    paths = {name: tmp_path / f"{name}.tif" for name in ("blurry", "sharp", "truth")}
    tifffile.imwrite(paths["blurry"], blurred(sharp, 4.0))
    tifffile.imwrite(paths["sharp"], sharp)
    tifffile.imwrite(paths["truth"], truth)
    args = [
        "compare",
        "--blurry",
        str(paths["blurry"]),
        "--deblurred",
        str(paths["sharp"]),
        "--sharp",
        str(paths["sharp"]),
    ]
    args += ["--labels", str(paths["truth"]), "--stardist-model", str(stardist_model_dir), "--quiet"]
    args += [
        "--json",
        str(tmp_path / "c.json"),
        "--csv",
        str(tmp_path / "c.csv"),
        "--save-labels",
        str(tmp_path / "labels"),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mean AP" in out and "scores against the ground truth" in out
    assert "recovers 100% of the blurry-to-sharp gap" in out  # the "deblurred" image is the sharp one
    figures = json.loads((tmp_path / "c.json").read_text())
    assert figures["gap_recovered"] == pytest.approx(1.0)
    assert figures["images"]["sharp"]["scores"][0]["ap"] > 0.8
    assert len(figures["images"]["blurry"]["planes"]) == 2
    csv_lines = (tmp_path / "c.csv").read_text().splitlines()
    assert csv_lines[0].startswith("image,plane,objects") and len(csv_lines) == 1 + 3 * 3
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == [
        "blurry-labels.tif",
        "deblurred-labels.tif",
        "sharp-labels.tif",
    ]


@pytest.mark.slow
def test_cli_compare_deblurs_with_the_default_model_when_no_deblurred_image_is_given(
    tmp_path, stardist_model_dir, field, capsys
):
    blurry = tmp_path / "blurry.tif"
    tifffile.imwrite(blurry, blurred(field[0][:1], 2.0))
    args = ["compare", "--blurry", str(blurry), "--stardist-model", str(stardist_model_dir), "--quiet"]
    assert main([*args, "--json", str(tmp_path / "c.json")]) == 0
    figures = json.loads((tmp_path / "c.json").read_text())
    assert set(figures["images"]) == {"blurry", "deblurred"} and figures["reference"] is None
    assert figures["images"]["deblurred"]["stats"]["objects"] > 5


def test_cli_compare_reports_a_missing_stardist_model_folder_in_one_line(tmp_path, capsys):
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, np.zeros((64, 64), np.float32))
    missing = str(tmp_path / "no-such-model" / "here")
    args = ["compare", "--blurry", str(image), "--deblurred", str(image), "--stardist-model", missing, "--quiet"]
    assert main(args) == 2
    assert "StarDist model folder not found" in capsys.readouterr().err
