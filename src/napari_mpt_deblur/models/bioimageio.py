"""BioImage Model Zoo packages (bioimage.io model format 0.5): export a model, and read back our own.

**Export** (:func:`export_package`) writes a zip that ``bioimageio.core``,
deepImageJ, ilastik and the other bioimage.io consumers run without this
package installed:

- the weights as ``pytorch_state_dict`` (a plain ``torch.save`` of the
  ``state_dict``, which consumers load with ``weights_only=True``) and the
  network as a **self-contained architecture file**: ``models/mpt.py`` and the
  modules it imports (``ops``, ``strips``, ``windows``) inlined into one, with
  the package's ``MPTConfig`` replaced by a plain class, so it needs PyTorch alone.
  Not ``torchscript``: MPT's window layouts, shift masks and memory-bounded
  chunking are computed in Python from the input's size, so a traced network
  is right only at the size it was traced at (measured: batch 2 or a
  non-square input fails), and bioimage.io consumers run other sizes. Not
  ``onnx`` for the same reason (its exporter traces too);
- the model card's percentile normalisation as the ``scale_range``
  preprocessing (``minmax`` as percentiles 0 and 100, ``fixed`` as
  ``scale_linear``), over each plane's channel, y and x as the engine does;
- test input and output tensors cut from a real image (the engine's
  normalisation and a whole-crop forward pass make the output), a cover image
  with the input next to the output, the model card's provenance in the
  documentation, the MPT paper's citation and a licence.

The model card itself travels in the package's ``config.napari_mpt_deblur``,
so **import** (:func:`load_package`, reached through
:func:`~napari_mpt_deblur.models.files.load_model`) rebuilds exactly the
exported model, with the same checks as a model file, and needs no
``bioimageio`` library. A package of any other network is refused.

Export needs the ``bioimageio`` extra (``pip install 'napari-mpt-deblur[bioimageio]'``).
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
import yaml

from .._version import __version__
from ..atomic import atomic_write
from ..config import IntensityNormalization, ModelCard
from ..images import Image, as_image
from ..normalization import intensity_range
from .files import (
    CARD_KEY,
    FORMAT_VERSION,
    ModelFileError,
    _card_from_metadata,
    _check_shapes,
    _check_tensors,
    check_torch_zip,
    expected_shapes,
)
from .mpt import MPT

DESCRIPTION_FILES = ("rdf.yaml", "bioimageio.yaml")
"""Names of the description file at the root of a bioimage.io package (format 0.5 writes ``rdf.yaml``)."""

ARCHITECTURE_FILE = "mpt_architecture.py"
ARCHITECTURE_CALLABLE = "build_mpt"
WEIGHTS_FILE = "weights.pt"
TEST_SIDE = 256
"""Side of the test tensors (rounded down to the network's size multiple, and to the image)."""

MAX_DESCRIPTION_BYTES = 2**20
"""A package's description file is refused above this size (ours: a few kB)."""

MPT_CITATION = (
    "Zhang Y, Zheng P, Yan W, Fang C, Cheng SS. A Unified Framework for Microscopy Defocus Deblur with "
    "Multi-Pyramid Transformer and Contrastive Learning. CVPR 2024."
)
MPT_DOI = "10.48550/arXiv.2403.02611"
"""The paper's arXiv DOI (no CVPR DOI exists)."""

DEFAULT_LICENSE = "BSD-3-Clause"
"""The package's own licence, which the architecture file (our code) is under."""

# Replaces the architecture's one import from the package: the fields MPT reads, without validation
# (the exporting package validated them; the package's kwargs are that validated configuration).
_INLINE_CONFIG = '''
class MPTConfig:
    """The architecture of a napari-mpt-deblur model card (napari_mpt_deblur.config.MPTConfig, inlined)."""

    def __init__(self, in_channels=1, out_channels=1, dim=40, num_blocks=(6, 6, 6, 6), heads=(1, 2, 4, 8),
                 scales=(), ffn_expansion=2.6, window_size=8, pairing="aligned", blur_conditioned=False,
                 blur_estimator=False, width_margin=1.0):
        self.in_channels, self.out_channels, self.dim = int(in_channels), int(out_channels), int(dim)
        self.num_blocks, self.heads = tuple(num_blocks), tuple(heads)
        self.scales = tuple(tuple(float(r) for r in level) for level in scales)
        self.ffn_expansion, self.window_size, self.pairing = float(ffn_expansion), int(window_size), pairing
        self.blur_conditioned, self.blur_estimator = bool(blur_conditioned), bool(blur_estimator)
        self.width_margin = float(width_margin)

    @property
    def size_multiple(self):
        """Height and width the network needs: every pooled map must tile into windows."""
        return max(
            int(round(self.window_size * 2**level / r)) for level, scales in enumerate(self.scales) for r in scales
        )


def build_mpt(**architecture):
    """The MPT network a model card's ``architecture`` describes (weights not loaded)."""
    return MPT(MPTConfig(**architecture))
'''
_ARCHITECTURE_MODULES = ("ops", "strips", "windows", "blur_width", "mpt")
"""The network's modules, as the architecture file inlines them: each needs only those before it."""


def _inlined_module(name: str) -> tuple[str, list[ast.Import | ast.ImportFrom], str, set[str]]:
    """One module of the network, split for inlining: docstring, imports, the rest, and the names it defines.

    Its ``from __future__`` import is left out (the file has one), and so are its imports from the package:
    from the other inlined modules, and ``from ..config import MPTConfig`` (inlined at the end).
    """
    path = Path(__file__).with_name(f"{name}.py")
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)
    docstring, imports, dropped, defined = "", [], set(), set()
    for index, node in enumerate(tree.body):
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            defined.add(node.name)
            continue
        if isinstance(node, ast.Assign | ast.AnnAssign):
            defined.update(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store))
            continue
        if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docstring = ast.get_source_segment(source, node) + "\n"
        elif isinstance(node, ast.ImportFrom) and node.level:
            names = [alias.name for alias in node.names]
            inlined = node.level == 1 and node.module in _ARCHITECTURE_MODULES
            if not inlined and (node.level, node.module, names) != (2, "config", ["MPTConfig"]):
                raise RuntimeError(f"{path} imports {names} from the package: the file would not run alone")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):  # the file has its own
                imports.append(node)
        else:
            continue  # other code, and the comments around it, stay
        dropped.update(range(node.lineno - 1, node.end_lineno))
    body = "".join(line for number, line in enumerate(lines) if number not in dropped).lstrip("\n")
    return docstring, imports, body, defined


def _import_block(nodes: list[ast.Import | ast.ImportFrom]) -> str:
    """The inlined modules' imports, each once, sorted as isort would: the standard library's, then PyTorch's."""
    plain = {f"import {ast.unparse(alias)}" for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    names: dict[str, set[str]] = {}
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            names.setdefault(node.module, set()).update(ast.unparse(alias) for alias in node.names)
    lines = [(line.split()[1], line) for line in plain]
    lines += [(module, f"from {module} import {', '.join(sorted(imported))}") for module, imported in names.items()]
    groups: tuple[list[str], list[str]] = ([], [])
    for module, line in sorted(lines, key=lambda item: (item[1].startswith("from "), item[0])):
        groups[module.split(".")[0] not in sys.stdlib_module_names].append(line)
    return "\n\n".join("\n".join(group) for group in groups if group) + "\n"


def architecture_source() -> str:
    """The source of the self-contained architecture file: the network's modules in one, configuration inlined.

    ``models/mpt.py``'s docstring, the standard imports of the modules in
    ``_ARCHITECTURE_MODULES`` (``ops``, ``strips``, ``windows``, ``blur_width``, ``mpt``), their
    code in that order without their imports from the package, and a plain
    ``MPTConfig`` with ``build_mpt`` at the end.

    Raises
    ------
    RuntimeError
        When a module imports from the package other than the inlined modules and
        the configuration (the file would not run alone), or two define the same name.
    """
    docstring, imports, bodies, owners = "", [], [], {}
    for name in _ARCHITECTURE_MODULES:
        module_docstring, module_imports, body, defined = _inlined_module(name)
        if name == "mpt":
            docstring = module_docstring
        imports += module_imports
        clashes = sorted(defined & owners.keys())
        if clashes:
            raise RuntimeError(f"{clashes[0]!r} is defined in models/{owners[clashes[0]]}.py and models/{name}.py")
        owners.update(dict.fromkeys(defined, name))
        bodies.append(f"# {'=' * 76} models/{name}.py\n\n\n{body}")
    # comments, not a docstring: mpt.py's own docstring and the __future__ import must stay first
    header = (
        f"# MPT, the Multi-Pyramid Transformer, as napari-mpt-deblur {__version__} defines it, needing only PyTorch:\n"
        f"# napari_mpt_deblur/models/{{{','.join(_ARCHITECTURE_MODULES)}}}.py (BSD-3-Clause) in one file, with its\n"
        f"# configuration inlined at the end, for a bioimage.io package. {ARCHITECTURE_CALLABLE}(**architecture)\n"
        "# builds the network.\n"
    )
    future = "\nfrom __future__ import annotations\n\n"
    return header + docstring + future + _import_block(imports) + "\n" + "\n\n".join(bodies) + _INLINE_CONFIG


def middle_plane(image: Image | np.ndarray, channels: int) -> np.ndarray:
    """The middle plane of ``image`` as ``(channels, Y, X)``: what the test tensors are cut from.

    Parameters
    ----------
    image
        An :class:`~napari_mpt_deblur.images.Image` or an array (axes guessed:
        ``YX``, ``ZYX``, ``YXS``...).
    channels
        The model's channels: 1 takes the first channel of a multichannel
        image; 3 needs RGB samples (``S``) or a channel axis of 3.

    Raises
    ------
    ValueError
        For a 3-channel model and an image without 3 colours.
    """
    image = as_image(image)
    axes = image.axes
    colour = "S" if "S" in axes else ("C" if "C" in axes and image.shape[axes.index("C")] in (3, 4) else None)
    index: list[int | slice] = []
    for letter, size in zip(axes, image.shape):
        if letter in "YX" or (channels == 3 and letter == colour):
            index.append(slice(None))
        elif letter in "CS":
            index.append(0)
        else:
            index.append(size // 2)
    plane = np.asarray(image.data[tuple(index)].compute(scheduler="sync"))
    kept = [a for a, i in zip(axes, index) if isinstance(i, slice)]
    if channels == 1:
        return plane[None]
    if colour is None:
        raise ValueError(f"a {channels}-channel model needs a colour test image (RGB), not one of axes {axes!r}")
    return np.moveaxis(plane, kept.index(colour), 0)[:channels]


def _busiest_square(plane: np.ndarray, side: int, step: int = 16) -> tuple[int, int]:
    """(top, left) of the ``side`` x ``side`` square of a (C, Y, X) plane whose values vary most.

    The test tensors and the cover then show cells rather than background. Positions are tried
    every ``step`` pixels (and flush with the far edges); sums over squares come from integral images.
    """
    values = plane.astype(np.float64).mean(axis=0)
    height, width = values.shape

    def square_sums(image: np.ndarray) -> np.ndarray:
        integral = np.pad(image.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        return integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side]

    mean = square_sums(values) / side**2
    variance = square_sums(values**2) / side**2 - mean**2
    tops = sorted({*range(0, height - side + 1, step), height - side})
    lefts = sorted({*range(0, width - side + 1, step), width - side})
    candidates = variance[np.ix_(tops, lefts)]
    row, column = np.unravel_index(int(np.argmax(candidates)), candidates.shape)
    return tops[row], lefts[column]


def export_package(
    model: MPT,
    path: str | os.PathLike,
    image: Image | np.ndarray,
    *,
    name: str | None = None,
    description: str | None = None,
    authors: Sequence[str] = ("napari-mpt-deblur",),
    license: str = DEFAULT_LICENSE,
    test_side: int = TEST_SIDE,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` as a bioimage.io model package (format 0.5), a ``.zip`` file.

    Parameters
    ----------
    model
        The network, with its :class:`~napari_mpt_deblur.config.ModelCard` as
        ``model.card`` (a default card otherwise).
    path
        The ``.zip`` to write; it appears under this name only once complete.
    image
        A real image, ideally one like those the model is for: the test
        tensors and the cover are the most varied square of its middle plane
        (see :func:`middle_plane`).
    name, description
        Of the package (defaults: from the architecture and the provenance).
    authors
        Names of the people who trained or exported the model.
    license
        SPDX identifier of the package's licence.
    test_side
        Side of the square test tensors, rounded down to the network's size
        multiple and to the image (at least one multiple).
    overwrite
        Replace an existing ``path`` (else :class:`~napari_mpt_deblur.atomic.OutputExistsError`).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ImportError
        Without ``bioimageio.spec`` (the ``bioimageio`` extra).
    ValueError
        For an image smaller than the network's size multiple, a 3-channel
        model and a grey image, or a normalisation the format cannot express.
    """
    try:
        from bioimageio.spec import save_bioimageio_package
        from bioimageio.spec.model import v0_5 as spec
    except ImportError as error:
        raise ImportError(
            "exporting to bioimage.io needs bioimageio.spec: pip install 'napari-mpt-deblur[bioimageio]'"
        ) from error

    card: ModelCard = getattr(model, "card", None) or ModelCard(architecture=model.config)
    if model.milder_blur is not None:  # a package holds one network: the fine-tuned one, for every plane
        card = _left_out(
            card,
            "milder_blur_network",
            f"napari-mpt-deblur's model file deblurs planes judged below {model.milder_blur.below_width:.2f} px "
            "with the starting model; this package uses the fine-tuned network for every plane",
            milder_blur_below_width=None,
        )
    if card.in_focus_optics is not None:  # a step after the network, which the package's runners would not take
        card = _left_out(
            card,
            "in_focus_sharpening",
            "napari-mpt-deblur's model file sharpens the network's output against the in-focus PSF of "
            f"{card.in_focus_optics.describe_in_focus()}; this package gives the network's output",
            in_focus_optics=None,
        )
    config = model.config
    multiple = config.size_multiple
    plane = middle_plane(image, config.in_channels)
    side = min(test_side, *plane.shape[-2:]) // multiple * multiple
    if side < multiple:
        raise ValueError(
            f"the test image's plane is {plane.shape[-2]} x {plane.shape[-1]} pixels; this network needs at least "
            f"{multiple} x {multiple}"
        )
    if not np.isfinite(plane).all():
        raise ValueError("the test image holds NaN or infinite values")
    top, left = _busiest_square(plane, side)
    crop = plane[:, top : top + side, left : left + side].astype(np.float32)
    preprocessing, low, divisor = _preprocessing(spec, card.normalization, crop)
    scaled = (crop - low) / divisor  # what the consumer's preprocessing computes
    training = model.training  # a model still being trained (the Fine-tune dock's) goes back to training
    model.eval()
    try:
        with torch.no_grad():
            parameter = next(model.parameters())
            output = model(torch.from_numpy(scaled[None]).to(parameter.device, parameter.dtype)).float().cpu().numpy()
    finally:
        model.train(training)
    test_input = crop[None]

    preset = card.provenance.get("preset")
    # bioimage.io names allow letters, digits, spaces and _+-()
    name = name or f"MPT defocus deblurring ({preset if isinstance(preset, str) else f'width {config.dim}'})"
    trained_on = card.provenance.get("trained_on")
    description = description or (
        "Defocus deblurring of microscopy images with a Multi-Pyramid Transformer (MPT)"
        + (f", trained on {trained_on}" if trained_on else "")
        + f"; exported by napari-mpt-deblur {__version__}."
    )
    input_id, output_id = spec.TensorId("raw"), spec.TensorId("deblurred")
    channel_names = [spec.Identifier(c) for c in (["intensity"] if config.in_channels == 1 else list("rgb"))]
    with tempfile.TemporaryDirectory(prefix="mpt-bioimageio-") as folder:
        files = Path(folder)
        np.save(files / "test_input.npy", test_input)
        np.save(files / "test_output.npy", output)
        # the same tensors as images, for people and tools that show samples (npy is for tests only)
        tifffile.imwrite(files / "sample_input.tif", test_input[0], photometric="minisblack")
        tifffile.imwrite(files / "sample_output.tif", output[0], photometric="minisblack")
        _write_cover(files / "cover.png", scaled, output[0])
        (files / ARCHITECTURE_FILE).write_text(architecture_source(), encoding="utf-8")
        state = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in model.state_dict().items()}
        torch.save(state, files / WEIGHTS_FILE)
        (files / "README.md").write_text(_documentation(name, description, card, side), encoding="utf-8")

        size = spec.ParameterizedSize(min=multiple, step=multiple)
        inputs = [
            spec.InputTensorDescr(
                id=input_id,
                description="raw intensities of one plane (any scale: the preprocessing normalises them)",
                axes=[
                    spec.BatchAxis(),
                    spec.ChannelAxis(channel_names=channel_names),
                    spec.SpaceInputAxis(id=spec.AxisId("y"), size=size),
                    spec.SpaceInputAxis(id=spec.AxisId("x"), size=size),
                ],
                test_tensor=spec.FileDescr(source=files / "test_input.npy"),
                sample_tensor=spec.FileDescr(source=files / "sample_input.tif"),
                data=spec.IntervalOrRatioDataDescr(type="float32"),
                preprocessing=preprocessing,
            )
        ]
        outputs = [
            spec.OutputTensorDescr(
                id=output_id,
                description="the deblurred plane, in the normalised units of the input (0 and 1 at its "
                "normalisation's low and high values)",
                axes=[
                    spec.BatchAxis(),
                    spec.ChannelAxis(channel_names=channel_names),
                    *(
                        spec.SpaceOutputAxis(id=axis, size=spec.SizeReference(tensor_id=input_id, axis_id=axis))
                        for axis in (spec.AxisId("y"), spec.AxisId("x"))
                    ),
                ],
                test_tensor=spec.FileDescr(source=files / "test_output.npy"),
                sample_tensor=spec.FileDescr(source=files / "sample_output.tif"),
                data=spec.IntervalOrRatioDataDescr(type="float32"),
            )
        ]
        weights = spec.WeightsDescr(
            pytorch_state_dict=spec.PytorchStateDictWeightsDescr(
                source=files / WEIGHTS_FILE,
                architecture=spec.ArchitectureFromFileDescr(
                    source=files / ARCHITECTURE_FILE,
                    callable=spec.Identifier(ARCHITECTURE_CALLABLE),
                    kwargs=config.to_dict(),
                ),
                pytorch_version=spec.Version(torch.__version__.split("+")[0]),
                comment="the network's state_dict (float32); the architecture file needs only PyTorch",
            )
        )
        descr = spec.ModelDescr(
            name=name,
            description=description,
            authors=[spec.Author(name=author) for author in authors],
            cite=[spec.CiteEntry(text=MPT_CITATION, doi=spec.Doi(MPT_DOI))],
            license=spec.LicenseId(license),
            documentation=spec.FileDescr(source=files / "README.md"),
            covers=[spec.FileDescr(source=files / "cover.png")],
            tags=["deblurring", "defocus", "microscopy", "transformer", "2d", "pytorch", "napari-mpt-deblur"],
            inputs=inputs,
            outputs=outputs,
            weights=weights,
            config=spec.Config(**{CARD_KEY: {"format_version": FORMAT_VERSION, **card.to_dict()}}),
        )
        # the library writes, then reloads and validates the package; only a valid one reaches the target
        packaged = save_bioimageio_package(descr, output_path=files / "package.zip")
        target = Path(path)
        atomic_write(target, lambda tmp: shutil.copyfile(packaged, tmp), overwrite=overwrite)
    return target


def _left_out(card: ModelCard, key: str, what: str, **cleared: Any) -> ModelCard:
    """``card`` without what a package cannot hold (``cleared`` fields), its provenance saying so under ``key``."""
    return card.replace(provenance={**card.provenance, key: f"left out of this package: {what}"}, **cleared)


def _preprocessing(
    spec: Any, normalization: IntensityNormalization, crop: np.ndarray
) -> tuple[list[Any], float, float]:
    """The spec's preprocessing for the card's normalisation, and the offset and divisor it applies to ``crop``.

    Statistics are taken over each plane's channel, y and x (the engine's per-plane units; a stack means
    nothing to a package that sees one plane at a time, so ``per='stack'`` exports as per plane).
    """
    if not np.ptp(crop) > 0:
        raise ValueError("the test image's plane is flat (no contrast); give an image with structure")
    low, high = intensity_range(crop, normalization)
    if normalization.mode == "fixed":
        gain = 1.0 / (high - low)
        return [spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=gain, offset=-low * gain))], low, high - low
    percentiles = (normalization.low, normalization.high) if normalization.mode == "percentile" else (0.0, 100.0)
    if percentiles[1] <= 1:
        raise ValueError(f"bioimage.io needs an upper percentile above 1, the model card has {percentiles[1]}")
    axes = [spec.AxisId("channel"), spec.AxisId("y"), spec.AxisId("x")]
    kwargs = spec.ScaleRangeKwargs(axes=axes, min_percentile=percentiles[0], max_percentile=percentiles[1])
    # scale_range divides by (high - low + eps), eps its default 1e-6
    return [spec.ScaleRangeDescr(kwargs=kwargs)], low, high - low + kwargs.eps


def _write_cover(path: Path, before: np.ndarray, after: np.ndarray) -> None:
    """A PNG of the input (left) next to the output (right), both on the input's normalised scale."""
    import imageio.v3 as iio

    side_by_side = np.concatenate([before, after], axis=-1)  # (C, Y, 2X): 2:1, as bioimage.io asks
    pixels = np.clip(np.rint(side_by_side * 255), 0, 255).astype(np.uint8)
    iio.imwrite(path, pixels[0] if pixels.shape[0] == 1 else np.moveaxis(pixels, 0, -1))


def _documentation(name: str, description: str, card: ModelCard, side: int) -> str:
    norm = card.normalization
    config = card.architecture
    if norm.mode == "percentile":
        how = f"the {norm.low:g} and {norm.high:g} percentiles of each plane map to 0 and 1 (`scale_range`)"
    elif norm.mode == "minmax":
        how = "the minimum and maximum of each plane map to 0 and 1 (`scale_range`, percentiles 0 and 100)"
    else:
        how = f"the fixed values {norm.low:g} and {norm.high:g} map to 0 and 1 (`scale_linear`)"
    if norm.per == "stack":
        how += (
            "; the model was trained with statistics over whole stacks, which a bioimage.io package cannot "
            "express: it normalises each plane"
        )
    provenance = "\n".join(f"| {key} | {json.dumps(value)} |" for key, value in card.provenance.items()) or "| | |"
    return f"""# {name}

{description}

A Multi-Pyramid Transformer (MPT) that deblurs defocused microscopy images, one
plane at a time. Exported with napari-mpt-deblur {__version__}, which also runs
it in napari and on the command line (`mpt-deblur deblur --model THIS.zip`).

## Input and output

- **Input** `raw`: `(batch, channel, y, x)`, raw intensities as float32,
  {config.in_channels} channel(s). Preprocessing: {how}.
- **Output** `deblurred`: the same shape, in those normalised units (multiply by
  the input's high - low and add low to return to its scale; napari-mpt-deblur does).
- **Sizes**: any multiple of {config.size_multiple} pixels in y and x (the network
  pads other sizes itself). The attention is global over what it sees, so
  large planes are best deblurred in overlapping tiles of about
  {card.tile_size or 512} pixels, blended (napari-mpt-deblur's engine does this).

## Weights

`pytorch_state_dict`: a plain `state_dict` and `{ARCHITECTURE_FILE}`, the
network's source with no dependency besides PyTorch (`{ARCHITECTURE_CALLABLE}(**kwargs)`
builds it from the model card's architecture). There are no `torchscript`
weights: the network computes its attention windows from the input's size in
Python, so a traced network would be right only at the traced size.

## Model card

| field | value |
| --- | --- |
| architecture | `{json.dumps(config.to_dict())}` |
| normalization | `{json.dumps(card.to_dict()["normalization"])}` |
| preferred tile size | {card.tile_size or "not set"} |

## Provenance

| fact | value |
| --- | --- |
{provenance}

## Validation

The test tensors are a {side} x {side} crop of a real image; the test output is
napari-mpt-deblur's result on it, which `bioimageio test` reproduces. To
validate the model on your data, deblur defocused planes whose in-focus plane
you also have and compare them (e.g. PSNR, SSIM, or the cell detections with
`mpt-deblur compare`), and look at the cover: input left, output right.

## Citation

{MPT_CITATION} doi:{MPT_DOI}
"""


# --- import ----------------------------------------------------------------------------------------------------------


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zip file with a bioimage.io description at its root (``rdf.yaml``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name in DESCRIPTION_FILES for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without aliases: nested aliases make a small file expand without bound (a "billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.YAMLError(f"an alias (*{event.anchor}) at {event.start_mark}; our packages never use them")
        return super().compose_node(parent, index)


def load_package(path: str | os.PathLike) -> MPT:
    """The MPT of a bioimage.io package that :func:`export_package` wrote, in eval mode on the CPU.

    Reads the model card from the package's ``config.napari_mpt_deblur`` and
    the ``pytorch_state_dict`` weights, with a model file's checks (card,
    shapes, finite floating-point values); needs no ``bioimageio`` library.
    Member sizes are checked before anything is inflated, so opening a
    package costs about the size of the model it describes.

    Raises
    ------
    ModelFileError
        For a damaged package, a package of another network (not exported
        by napari-mpt-deblur), or weights that do not fit the card.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {entry.filename: entry for entry in archive.infolist()}
            rdf_name = next((name for name in DESCRIPTION_FILES if name in entries), None)
            if rdf_name is None:
                raise ModelFileError(f"{path}: a zip file without a bioimage.io description (rdf.yaml)")
            if entries[rdf_name].file_size > MAX_DESCRIPTION_BYTES:
                raise ModelFileError(f"{path}: its {rdf_name} is implausibly large; refused")
            try:
                rdf = yaml.load(archive.read(rdf_name), Loader=_NoAliasLoader)
            except yaml.YAMLError as error:
                raise ModelFileError(f"{path}: its {rdf_name} is not valid YAML ({error})") from None
            if not isinstance(rdf, dict):
                raise ModelFileError(f"{path}: its {rdf_name} is not a bioimage.io description")
            config = rdf.get("config") if isinstance(rdf.get("config"), dict) else {}
            if rdf.get("type") != "model" or CARD_KEY not in config:
                kind = rdf.get("type") or "resource"
                raise ModelFileError(
                    f"{path}: a bioimage.io {kind} ({rdf.get('name', 'unnamed')!r}) that napari-mpt-deblur did not "
                    "export: it deblurs only with MPT models, and reads only the packages it wrote "
                    "('mpt-deblur export-bioimageio'). Run other models with bioimageio.core or the tool made for them"
                )
            card = _card_from_metadata({CARD_KEY: json.dumps(config[CARD_KEY])}, path)
            weights = (rdf.get("weights") or {}).get("pytorch_state_dict") or {}
            member = weights.get("source") if isinstance(weights, dict) else None
            if not isinstance(member, str) or member not in entries:
                raise ModelFileError(f"{path}: the package's pytorch_state_dict weights are missing")
            expected = expected_shapes(card.architecture)
            # float32 tensors plus torch.save's per-tensor records: anything far larger is not these weights
            limit = 4 * sum(int(np.prod(shape)) for shape in expected.values()) + 4096 * len(expected) + 2**20
            if entries[member].file_size > limit:
                raise ModelFileError(f"{path}: '{member}' is larger than the weights its model card describes")
            data = archive.read(member)
    except (zipfile.BadZipFile, OSError, EOFError) as error:  # a damaged member raises BadZipFile (bad CRC)
        raise ModelFileError(f"{path}: not a readable bioimage.io package (damaged or cut short?): {error}") from error
    where = Path(f"{path}!{member}")
    check_torch_zip(where, data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for damaged or non-tensor content
        raise ModelFileError(f"{where}: not a plain state_dict of tensors ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ModelFileError(f"{where}: not a state_dict of tensors")
    shapes = {key: tuple(tensor.shape) for key, tensor in state.items()}
    _check_shapes(where, shapes, card.architecture)
    _check_tensors(where, state, expected)
    model = MPT(card.architecture)
    model.load_state_dict({key: tensor.float() for key, tensor in state.items()})
    model.card = card
    return model.eval()
