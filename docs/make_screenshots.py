"""Take the screenshots of docs/napari.md from a running napari viewer.

Opens a real viewer, loads the plugin's sample data, opens the Deblur and
Fine-tune docks through the plugin manifest, drives them as a user would
(setting their fields, clicking their buttons) and saves PNGs into
``docs/images/``. Then, in a second viewer, the Compare detections dock
deblurs a defocused stack of synthetic nuclei and compares StarDist's
detections before and after with their ground truth. Needs a display; on a
machine without one::

    xvfb-run -a -s "-screen 0 1920x1200x24" python docs/make_screenshots.py

The window is 1366 x 768, a common laptop screen, which the docks are made to
fit: the window shots show them as a laptop user sees them, the dock close-ups
show each dock's whole content (scrolled parts included). Without ``--model``
the docks use the bundled default model. To keep it fast on a CPU, the sample
stack is cropped to 3 planes (every 4th: -3, 0 and +3 um from focus) of 192 x
192 pixels around the cell, and the fine-tune runs a few steps on small
patches. The detections need StarDist (the ``stardist`` extra)
and a model: ``--stardist-model`` (default ``2D_versatile_fluo``, downloaded on
first use) or a model folder, such as the one ``python -m
napari_mpt_deblur.detection.synthetic FOLDER`` trains in about 30 s without a network.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PLUGIN = "napari-mpt-deblur"
DEBLUR = "Deblur"
FINETUNE = "Fine-tune (EFCR_ex)"
COMPARE = "Compare detections"
PARTS = ("deblur", "detections")
MAX_BYTES = 300_000
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model file to use (default: the bundled default model)")
    parser.add_argument("--out", type=Path, default=HERE / "images", help="folder for the PNGs (docs/images)")
    parser.add_argument(
        "--crop",
        type=int,
        nargs=3,
        default=(284, 330, 192),
        metavar=("Y", "X", "SIZE"),
        help="square crop of the sample's planes (default around the cell)",
    )
    parser.add_argument("--every", type=int, default=4, help="keep every n-th plane of the 9 (default 4: 3 planes)")
    parser.add_argument("--steps", type=int, default=12, help="fine-tuning steps (default 12)")
    parser.add_argument("--patch", type=int, default=64, help="fine-tuning patch size (default 64)")
    parser.add_argument("--lr", type=float, default=2e-5, help="fine-tuning learning rate (default 2e-5)")
    parser.add_argument(
        "--window", type=int, nargs=2, default=(1366, 768), metavar=("W", "H"), help="window size (default 1366 768)"
    )
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for each run")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
        help="which screenshots: the Deblur and Fine-tune docks on the sample (deblur), the Compare detections "
        "dock on synthetic nuclei (detections); default both",
    )
    parser.add_argument(
        "--stardist-model",
        default="2D_versatile_fluo",
        help="StarDist model for the detections: a pretrained name or a model folder (default 2D_versatile_fluo)",
    )
    parser.add_argument(
        "--defocus",
        type=float,
        nargs="+",
        default=(2.0, 2.5, 3.0),
        metavar="UM",
        help="distance from focus of each plane of the nuclei stack, micrometres (default 2 2.5 3)",
    )
    return parser.parse_args(argv)


def save_png(image: np.ndarray, path: Path, max_bytes: int = MAX_BYTES) -> None:
    """Write an RGB(A) array as a PNG under ``max_bytes``: lossless if it fits, else 256 colours, else smaller."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    attempts = [lambda p: p, lambda p: p.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)]
    for attempt in attempts:
        data = _png_bytes(attempt(picture))
        if len(data) <= max_bytes:
            break
    while len(data) > max_bytes:  # last resort: shrink
        picture = picture.resize((picture.width * 4 // 5, picture.height * 4 // 5), Image.Resampling.LANCZOS)
        data = _png_bytes(attempts[1](picture))
    path.write_bytes(data)
    print(f"wrote {path} ({picture.width} x {picture.height}, {len(data) // 1000} kB)")


def _png_bytes(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def content(dock):
    """A dock's whole content, scrolled-away parts included (what its scroll area holds)."""
    return dock.scroll_area.widget()


def grab(widget, path: Path, down_to=None) -> None:
    """Save a Qt widget as it is drawn on screen (only down to the bottom of the child ``down_to``, if given)."""
    from qtpy.QtCore import QRect
    from qtpy.QtGui import QImage

    settle()
    height = widget.height() if down_to is None else min(widget.height(), down_to.geometry().bottom() + 8)
    image = widget.grab(QRect(0, 0, widget.width(), height)).toImage()
    image = image.convertToFormat(QImage.Format.Format_RGBA8888)
    width, height = image.width(), image.height()
    pixels = np.frombuffer(image.constBits().asstring(image.sizeInBytes()), np.uint8)
    pixels = pixels.reshape(height, image.bytesPerLine())[:, : width * 4].reshape(height, width, 4)
    save_png(pixels, path)


def wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Process Qt events until ``condition()`` holds."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    start = time.perf_counter()
    while not condition():
        app.processEvents()
        time.sleep(0.02)
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s")


def settle(seconds: float = 0.5) -> None:
    """Let Qt repaint for a moment (docks, plots, canvas) before a screenshot."""
    end = time.perf_counter() + seconds
    wait(lambda: time.perf_counter() > end, seconds + 5, "settling")


def window_shot(viewer, path: Path) -> None:
    settle()
    save_png(viewer.screenshot(canvas_only=False, flash=False), path)


def grid(viewer):
    """The viewer's grid settings (``viewer.canvas.grid`` since napari 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def side_by_side(viewer, active) -> None:
    """Every visible layer in its own view, in one row (bottom layer of the list on the left)."""
    viewer.layers.selection.active = active
    grid(viewer).enabled = True
    grid(viewer).shape = (1, sum(layer.visible for layer in viewer.layers))
    viewer.reset_view()


def crop_sample(viewer, crop: tuple[int, int, int], every: int) -> None:
    """Crop both sample layers in place (same planes and window, so they still line up)."""
    y, x, size = crop
    for layer in viewer.layers:
        scale = list(layer.scale)
        layer.data = np.ascontiguousarray(layer.data[::every, y : y + size, x : x + size])
        scale[0] *= every
        layer.scale = scale


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if "deblur" in args.parts and deblur_and_finetune(args) != 0:
        return 1
    if "detections" in args.parts:
        return detections(args)
    return 0


def deblur_and_finetune(args: argparse.Namespace) -> int:
    """The Deblur and Fine-tune docks on the cropped sample."""
    scratch = tempfile.TemporaryDirectory(prefix="mpt-screenshots-")
    folder = Path(scratch.name)
    model_choice = str(args.model.resolve()) if args.model else "default"
    print(f"model: {model_choice}")

    import napari

    viewer = napari.Viewer(show=True, title="napari-mpt-deblur")
    viewer.window.resize(*args.window)
    viewer.open_sample(PLUGIN, "defocused_cells")
    crop_sample(viewer, tuple(args.crop), args.every)
    defocused = viewer.layers["defocused cells"]
    print("sample:", [(layer.name, layer.data.shape, tuple(layer.scale)) for layer in viewer.layers])

    # --- Deblur ----------------------------------------------------------------------------------------------------
    deblur_dock, deblur = viewer.window.add_plugin_dock_widget(PLUGIN, DEBLUR)
    if args.model:
        deblur.model_file.value = args.model.resolve()  # joins the model menu and is selected
    else:
        deblur.model.value = model_choice
    deblur.layer.value = defocused
    deblur.device.value = "cpu"
    viewer.dims.set_current_step(0, 0)  # the first plane: -3 um from focus
    settle()
    print("deblur status:", deblur.status.value)

    # lazily: the result layer appears at once; the plot shows the input's focus only
    deblur.lazy.value = True
    deblur.run_button.native.click()
    wait(lambda: "input" in deblur.focus_plot.series, args.timeout, "the input's focus profile")
    print("lazy: status:", deblur.status.value)
    print("lazy: input focus:", [round(y, 5) for _, y in deblur.focus_plot.series["input"]])
    grab(content(deblur), args.out / "deblur-lazy-widget.png", down_to=deblur.focus_plot)
    viewer.layers.remove(viewer.layers[-1])

    # all at once, with progress; the plot shows the input's and the output's focus
    deblur.lazy.value = False
    deblur.run_button.native.click()
    wait(lambda: not deblur.running, args.timeout, "deblurring")
    print("deblur status:", deblur.status.value)
    result = viewer.layers[-1]
    print("result:", result.name, result.data.shape, result.data.dtype, tuple(result.scale), result.contrast_limits)
    print("result metadata:", result.metadata.get("napari_mpt_deblur"))
    for name in ("input", "output"):
        print(f"{name} focus:", [round(y, 5) for _, y in deblur.focus_plot.series[name]])

    side_by_side(viewer, result)
    window_shot(viewer, args.out / "deblur-window.png")
    grab(content(deblur), args.out / "deblur-widget.png", down_to=deblur.focus_plot)

    # --- Fine-tune -------------------------------------------------------------------------------------------------
    grid(viewer).enabled = False
    result.visible = False
    deblur_dock.hide()
    tune_dock, tune = viewer.window.add_plugin_dock_widget(PLUGIN, FINETUNE)
    tune.model.value = model_choice
    tune.unlabeled.value = [defocused]
    tune.steps.value = args.steps
    tune.batch.value = 2
    tune.patch.value = args.patch
    tune.lr.value = args.lr
    tune.device.value = "cpu"
    tune.advanced.set_expanded(True)  # the close-up shows the small settings used
    viewer.layers.selection.active = defocused
    settle()
    tune.start_button.native.click()
    wait(lambda: not tune.running, args.timeout, "fine-tuning")
    print("fine-tune status:", tune.status.value)
    if tune.tuned_model is None:
        print("fine-tuning gave no model; see the messages above", file=sys.stderr)
        return 1
    tune.save_path.value = folder / "lite-tuned.safetensors"
    tune.save_button.native.click()
    settle()
    print("fine-tune status:", tune.status.value)
    from napari_mpt_deblur import read_model_card

    print("fine-tuned provenance:", read_model_card(folder / "lite-tuned.safetensors").provenance)
    # the saved model is chosen in "start from", and the dock times its steps once the settings rest (0.7 s): the
    # shots show that estimate, not "timing..."
    settle(1.5)
    wait(lambda: "timing" not in tune.estimate.value, args.timeout, "the time estimate")
    tune.advanced.set_expanded(False)  # as a user leaves it: the curves in view, beside the saved file's name
    settle()
    tune.reveal(tune.psnr_plot)
    window_shot(viewer, args.out / "finetune-window.png")
    tune.advanced.set_expanded(True)
    grab(content(tune), args.out / "finetune-widget.png")

    # --- before / after --------------------------------------------------------------------------------------------
    tune_dock.hide()
    deblur_dock.show()
    tuned_choice = str((folder / "lite-tuned.safetensors").resolve())
    print("deblur model menu:", [str(choice) for choice in deblur.model.choices])
    deblur.model.value = tuned_choice
    deblur.run_button.native.click()
    wait(lambda: not deblur.running, args.timeout, "deblurring with the fine-tuned model")
    print("deblur status:", deblur.status.value)
    tuned_result = viewer.layers[-1]
    tuned_result.name = "defocused cells fine-tuned"
    result.visible = True
    side_by_side(viewer, tuned_result)
    window_shot(viewer, args.out / "compare-window.png")

    viewer.close()
    scratch.cleanup()
    return 0


def defocused_nuclei(defocus_um: list[float], size: int = 256, seed: int = 11):
    """(defocused, sharp, truth): synthetic nuclei, as the tests draw them, seen through the sample's widefield optics.

    Each plane is other nuclei, ``defocus_um[i]`` micrometres from focus, with the sample's shot and read noise.
    """
    from napari_mpt_deblur.data.defocus import add_poisson_gaussian_noise, blur, widefield_psf
    from napari_mpt_deblur.detection.synthetic import synthetic_nuclei
    from napari_mpt_deblur.plugin import samples

    sharp, truth = synthetic_nuclei(len(defocus_um), size, seed, nuclei=40)
    sharp = np.clip(sharp, 0, None)
    rng = np.random.default_rng(seed)
    defocused = np.stack(
        [
            add_poisson_gaussian_noise(
                blur(plane, widefield_psf(z, **samples.PSF)), samples.PHOTONS, samples.READ_NOISE, rng
            )
            for plane, z in zip(sharp, defocus_um)
        ]
    ).astype(np.float32)
    return defocused, sharp, truth


def detections(args: argparse.Namespace) -> int:
    """The Compare detections dock: deblur, then detect, on defocused synthetic nuclei with their ground truth."""
    import napari

    from napari_mpt_deblur.detection import shared_worker

    defocused, sharp, truth = defocused_nuclei(list(args.defocus))
    viewer = napari.Viewer(show=True, title="napari-mpt-deblur")
    viewer.window.resize(*args.window)
    placement = {"scale": (1.0, 0.2, 0.2), "axis_labels": ("z", "y", "x"), "units": ("pixel",) + ("micrometer",) * 2}
    sharp_layer = viewer.add_image(sharp, name="sharp nuclei", colormap="gray", **placement)
    truth_layer = viewer.add_labels(truth, name="true nuclei", visible=False, **placement)
    before = viewer.add_image(defocused, name="nuclei", colormap="gray", **placement)
    print("nuclei:", before.data.shape, "defocus (um):", list(args.defocus))

    dock, compare = viewer.window.add_plugin_dock_widget(PLUGIN, COMPARE)
    if Path(args.stardist_model).expanduser().is_dir():
        compare.stardist_folder.value = Path(args.stardist_model).expanduser().resolve()  # joins the menu
        compare.stardist_folder.value = None  # the menu keeps it; the box would show this computer's path
    else:
        compare.stardist_model.value = args.stardist_model
    compare.model.value = str(args.model.resolve()) if args.model else "default"
    compare.device.value = "cpu"
    compare.before.value, compare.sharp.value, compare.truth.value = before, sharp_layer, truth_layer
    settle()
    compare.deblur_button.native.click()
    wait(lambda: not compare.running, args.timeout, "deblurring and detecting")
    print("compare status:", compare.status.value)
    if compare.result is None:
        print("the comparison gave no result; see the messages above", file=sys.stderr)
        viewer.close()
        shared_worker().close()
        return 1
    print(compare.result.comparison.table())

    # each image with its detections as outlines, side by side: defocused, deblurred, sharp
    deblurred = compare.after.value  # the layer the dock just added ("nuclei deblurred (<model>)")
    order = [before, deblurred, sharp_layer]
    for image in order:
        found = viewer.layers[f"{image.name} detections"]
        found.contour = 1
        viewer.layers.move(viewer.layers.index(image), len(viewer.layers))
        viewer.layers.move(viewer.layers.index(found), len(viewer.layers))
    viewer.layers.move(viewer.layers.index(truth_layer), len(viewer.layers))  # hidden, out of the pairs
    viewer.dims.set_current_step(0, len(args.defocus) - 1)  # the plane furthest from focus
    viewer.layers.selection.active = deblurred
    grid(viewer).enabled = True
    grid(viewer).stride = 2
    grid(viewer).shape = (1, 3)
    viewer.reset_view()
    window_shot(viewer, args.out / "detections-window.png")
    grab(content(compare), args.out / "detections-widget.png", down_to=compare.bar_plot)
    viewer.close()
    shared_worker().close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
