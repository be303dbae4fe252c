"""The embedded demo dataset: small synthetic ultrasound-like images whose class is decided by one lesion in an organ.

Every image shows an organ (an echo-textured blob with a bright capsule) on a streaky tissue background. Inside the
organ sits one small lesion (about 2-4 % of the image) whose shape and texture give the class:

- ``cyst``: smooth, round to oval, homogeneous and almost free of speckle;
- ``nodule``: solid, oval and gently lobulated, with coarse internal texture and bright punctate foci;
- ``spiculated_mass``: irregular and angular, with thin spicules radiating out of it.

Every lesion is markedly darker than the tissue around it (hypoechoic, 0.22-0.4 of it) by a ratio drawn from the same
range for all classes, so its mean intensity does not give the class away. Everything else is class-independent
nuisance: background level and texture, gradients and depth attenuation, speckle grain, noise, brightness and contrast,
and 1-3 distractor lesions of random classes outside the organ. Distractors carry their class's shape and texture but
are hyperechoic (1.5-2x the tissue), like the bright look-alikes of real scans: a classifier that pools the whole image
sees lesion shapes of every class, while the one dark lesion that counts is what a box-prompted segmenter finds
(``demo-lesion`` policy, lesion Dice in benchmarks/README.md).

Layout (like BUSI's): ``root/<class>/<class>_<i:03d>.png`` (8-bit grayscale), ground-truth lesion masks
``root/lesion_masks/<class>/<class>_<i:03d>_mask.png`` (0/255, the in-organ lesion only), and ``root/demo.json``
(generator version, parameters, per-image metadata, sha256 of every file), written last.

Each image has its own seed ``[seed, class index, image index]``, so adding images leaves existing ones unchanged.
Per-pixel arithmetic uses only +, -, *, /, sqrt and cumulative sums (no transcendental ufuncs, no BLAS), which keeps
the pixels bit-identical across CPUs for one numpy version.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from .images import file_sha256

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3
DEMO_MANIFEST = "demo.json"
LESION_MASKS_FOLDER = "lesion_masks"

DEMO_CLASSES: tuple[str, ...] = ("cyst", "nodule", "spiculated_mass")

DEMO_PROMPTS: dict[str, list[str]] = {
    "cyst": [
        "an ultrasound image of an organ with a simple cyst",
        "an ultrasound showing a round cyst with smooth walls and a homogeneous interior",
        "a sonogram of a well-defined oval cystic lesion without internal echoes",
        "a simple cyst with a thin smooth wall on ultrasound",
    ],
    "nodule": [
        "an ultrasound image of an organ with a solid nodule",
        "an ultrasound showing a circumscribed oval solid nodule with heterogeneous internal echoes",
        "a sonogram of a gently lobulated solid nodule with echogenic foci",
        "a solid hypoechoic nodule with internal texture on ultrasound",
    ],
    "spiculated_mass": [
        "an ultrasound image of an organ with a spiculated mass",
        "an ultrasound showing an irregular mass with spiculated margins",
        "a sonogram of an angular hypoechoic lesion with radiating spicules",
        "a suspicious irregular mass with spiculated borders on ultrasound",
    ],
}

# Lesion base radius as a fraction of the image side; the area follows at roughly 2-4 % of the image.
_LESION_RADIUS = (0.085, 0.115)
# How much speckle survives inside each lesion kind (a cyst is nearly echo-free inside).
_SPECKLE_STRENGTH = {"cyst": 0.15, "nodule": 1.0, "spiculated_mass": 0.9}
# Spicules add reach and area, so a spiculated mass has a smaller body.
_BODY_SCALE = {"cyst": 1.0, "nodule": 1.0, "spiculated_mass": 0.8}
_MIN_SIZE = 48
# Echogenicity relative to the tissue around it: the lesion is hypoechoic, distractors hyperechoic.
_LESION_ECHO = (0.22, 0.4)
_DISTRACTOR_ECHO = (1.5, 2.0)


@dataclass(frozen=True)
class DemoSample:
    """One rendered demo image with its ground truth."""

    image: np.ndarray  # (size, size) uint8
    lesion_mask: np.ndarray  # (size, size) bool, the in-organ lesion
    organ_mask: np.ndarray  # (size, size) bool
    class_name: str
    distractor_classes: tuple[str, ...]

    @property
    def organ_box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the organ, x1/y1 exclusive."""
        rows, cols = np.flatnonzero(self.organ_mask.any(axis=1)), np.flatnonzero(self.organ_mask.any(axis=0))
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@dataclass(frozen=True)
class _LesionShape:
    """A lesion in its own frame: lengths in units of its radius, angles as (cos, sin) pairs."""

    kind: str
    aspect: float  # minor/major axis of the base ellipse
    rotation: tuple[float, float]
    harmonics: tuple[tuple[int, float, float, float], ...]  # (order, amplitude, cos phase, sin phase)
    spicules: tuple[tuple[float, float, float, float, float], ...]  # (cos, sin, start, end, base width)
    echo_ratio: float  # echogenicity relative to the tissue around it (< 1: darker)

    @property
    def reach(self) -> float:
        """An upper bound on how far the lesion extends from its centre, in radii."""
        body = 1.0 + sum(abs(h[1]) for h in self.harmonics)
        return max([body] + [s[3] + s[4] for s in self.spicules])


# ---------------------------------------------------------------------------------------------------- fields
def _box_blur_rows(field: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)-wide window along the last axis, by cumulative sums, edges reflected."""
    if radius < 1:
        return field
    padded = np.pad(field, ((0, 0), (radius + 1, radius)), mode="symmetric")
    sums = np.cumsum(padded, axis=1)
    width = field.shape[1]
    return (sums[:, 2 * radius + 1 : 2 * radius + 1 + width] - sums[:, :width]) / (2 * radius + 1)


def _smooth(field: np.ndarray, radius_x: int, radius_y: int, passes: int = 2) -> np.ndarray:
    """Repeated box blurs: close to a Gaussian, exact in order of summation."""
    for _ in range(passes):
        field = _box_blur_rows(field, radius_x)
        field = _box_blur_rows(field.T, radius_y).T
    return field


def _standardise(field: np.ndarray) -> np.ndarray:
    centred = field - field.mean()
    spread = float(np.sqrt((centred * centred).mean()))
    return centred / spread if spread > 0 else centred


def _value_noise(rng: np.random.Generator, shape: tuple[int, int], cells_y: int, cells_x: int) -> np.ndarray:
    """A smooth zero-mean unit-variance field: a coarse random grid interpolated with smoothstep weights."""
    height, width = shape
    coarse = rng.standard_normal((cells_y + 2, cells_x + 2))
    pos_y = (np.arange(height) + 0.5) * (cells_y / height) + 0.5
    pos_x = (np.arange(width) + 0.5) * (cells_x / width) + 0.5
    index_y, index_x = pos_y.astype(np.int64), pos_x.astype(np.int64)
    frac_y, frac_x = pos_y - index_y, pos_x - index_x
    weight_y = (frac_y * frac_y * (3.0 - 2.0 * frac_y))[:, None]
    weight_x = (frac_x * frac_x * (3.0 - 2.0 * frac_x))[None, :]
    top = coarse[index_y][:, index_x] * (1.0 - weight_x) + coarse[index_y][:, index_x + 1] * weight_x
    bottom = coarse[index_y + 1][:, index_x] * (1.0 - weight_x) + coarse[index_y + 1][:, index_x + 1] * weight_x
    return _standardise(top * (1.0 - weight_y) + bottom * weight_y)


def _speckle(rng: np.random.Generator, shape: tuple[int, int], grain: int) -> np.ndarray:
    """Fully developed speckle: the magnitude of a smoothed complex Gaussian field (Rayleigh), scaled to mean 1."""
    real = _smooth(rng.standard_normal(shape), grain, grain, passes=1)
    imaginary = _smooth(rng.standard_normal(shape), grain, grain, passes=1)
    magnitude = np.sqrt(real * real + imaginary * imaginary)
    return magnitude / magnitude.mean()


def _harmonic_radius(cos_t: np.ndarray, sin_t: np.ndarray, harmonics) -> np.ndarray:
    """1 + sum a_k cos(k t + phase_k), with cos(k t) and sin(k t) built by complex multiplication (no trig ufuncs)."""
    radius = np.ones_like(cos_t)
    if not harmonics:
        return radius
    top = max(h[0] for h in harmonics)
    cos_k, sin_k = cos_t, sin_t
    by_order = {h[0]: h for h in harmonics}
    for order in range(1, top + 1):
        if order > 1:
            cos_k, sin_k = cos_k * cos_t - sin_k * sin_t, sin_k * cos_t + cos_k * sin_t
        if order in by_order:
            _, amplitude, cos_p, sin_p = by_order[order]
            radius = radius + amplitude * (cos_k * cos_p - sin_k * sin_p)
    return radius


def _unit(angle: float) -> tuple[float, float]:
    return math.cos(angle), math.sin(angle)


def _polar(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rho = np.sqrt(dx * dx + dy * dy)
    safe = np.where(rho > 0, rho, 1.0)
    return rho, np.where(rho > 0, dx / safe, 1.0), dy / safe


# ---------------------------------------------------------------------------------------------------- organ
@dataclass(frozen=True)
class _Organ:
    depth: np.ndarray  # approximate signed distance inside the boundary, in pixels (negative outside)

    @property
    def mask(self) -> np.ndarray:
        return self.depth > 0


def _draw_organ(rng: np.random.Generator, size: int, xs: np.ndarray, ys: np.ndarray) -> _Organ:
    semi_major = rng.uniform(0.29, 0.37) * size
    semi_minor = semi_major * rng.uniform(0.72, 0.9)
    cos_r, sin_r = _unit(rng.uniform(0.0, math.pi))
    extent_x = math.sqrt((semi_major * cos_r) ** 2 + (semi_minor * sin_r) ** 2)
    extent_y = math.sqrt((semi_major * sin_r) ** 2 + (semi_minor * cos_r) ** 2)
    margin = 0.03 * size
    centre_x = rng.uniform(min(extent_x + margin, size / 2), max(size - extent_x - margin, size / 2))
    centre_y = rng.uniform(min(extent_y + margin, size / 2), max(size - extent_y - margin, size / 2))
    harmonics = tuple((order, rng.uniform(0.0, 0.035), *_unit(rng.uniform(0.0, 2 * math.pi))) for order in (2, 3, 4))
    dx, dy = xs - centre_x, ys - centre_y
    along = (dx * cos_r + dy * sin_r) / semi_major
    across = (dy * cos_r - dx * sin_r) / semi_minor
    rho, cos_t, sin_t = _polar(along, across)
    # Scaling by the minor axis under-estimates the distance along the major one: conservative for "inside".
    return _Organ(depth=(_harmonic_radius(cos_t, sin_t, harmonics) - rho) * semi_minor)


# ---------------------------------------------------------------------------------------------------- lesions
def _draw_lesion(rng: np.random.Generator, kind: str, echo_range: tuple[float, float]) -> _LesionShape:
    rotation = _unit(rng.uniform(0.0, math.pi))
    echo_ratio = rng.uniform(*echo_range)
    spicules: tuple = ()
    if kind == "cyst":
        aspect, harmonics = rng.uniform(0.75, 1.0), ()
    elif kind == "nodule":
        aspect = rng.uniform(0.62, 0.85)
        harmonics = tuple((order, rng.uniform(0.03, 0.07), *_unit(rng.uniform(0.0, 2 * math.pi))) for order in (3, 4))
    else:
        aspect = rng.uniform(0.8, 1.0)
        harmonics = tuple(
            (order, rng.uniform(0.04, 0.09), *_unit(rng.uniform(0.0, 2 * math.pi))) for order in (3, 5, 7)
        )
        count = int(rng.integers(5, 10))
        offsets = rng.uniform(-0.3, 0.3, size=count)
        spicules = tuple(
            (*_unit(2 * math.pi * (j + offsets[j]) / count), rng.uniform(0.75, 0.9), rng.uniform(1.9, 2.6),
             rng.uniform(0.13, 0.21))
            for j in range(count)
        )
    return _LesionShape(kind, float(aspect), rotation, harmonics, spicules, float(echo_ratio))


def _window(centre_x: float, centre_y: float, reach_px: float, size: int) -> tuple[slice, slice]:
    low_y, high_y = max(0, int(centre_y - reach_px) - 2), min(size, int(centre_y + reach_px) + 3)
    low_x, high_x = max(0, int(centre_x - reach_px) - 2), min(size, int(centre_x + reach_px) + 3)
    return slice(low_y, max(low_y, high_y)), slice(low_x, max(low_x, high_x))


def _lesion_coverage(shape: _LesionShape, centre_x: float, centre_y: float, radius: float, size: int):
    """(window, soft coverage 0..1, mask) of a lesion placed at a centre with a radius in pixels."""
    window = _window(centre_x, centre_y, shape.reach * radius, size)
    ys = np.arange(window[0].start, window[0].stop, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(window[1].start, window[1].stop, dtype=np.float64)[None, :] + 0.5
    dx, dy = xs - centre_x, ys - centre_y
    cos_r, sin_r = shape.rotation
    along = (dx * cos_r + dy * sin_r) / radius
    across = (dy * cos_r - dx * sin_r) / radius
    rho, cos_t, sin_t = _polar(along, across / shape.aspect)
    edge_px = 1.2
    inside_px = (_harmonic_radius(cos_t, sin_t, shape.harmonics) - rho) * radius * shape.aspect
    coverage = np.clip(inside_px / edge_px + 0.5, 0.0, 1.0)
    for cos_s, sin_s, start, end, base_width in shape.spicules:
        # Distance to a tapering segment from start to end (in radii) along its direction.
        t = np.clip((along * cos_s + across * sin_s - start) / (end - start), 0.0, 1.0)
        off_x, off_y = along - (start + t * (end - start)) * cos_s, across - (start + t * (end - start)) * sin_s
        distance_px = np.sqrt(off_x * off_x + off_y * off_y) * radius
        half_width_px = np.maximum(base_width * radius * (1.0 - t), 0.7)
        coverage = np.maximum(coverage, np.clip((half_width_px - distance_px) / edge_px + 0.5, 0.0, 1.0))
    return window, coverage, coverage >= 0.5


def _lesion_texture(rng: np.random.Generator, shape: _LesionShape, mask: np.ndarray, radius: float) -> np.ndarray:
    """The lesion's echogenicity pattern relative to its mean (mean 1 over its mask)."""
    height, width = mask.shape
    cells = max(2, int(round(max(height, width) / max(radius * 0.45, 1.0))))
    if shape.kind == "cyst":
        texture = 1.0 + 0.05 * _value_noise(rng, mask.shape, 2, 2)
    elif shape.kind == "nodule":
        texture = 1.0 + 0.45 * _value_noise(rng, mask.shape, cells, cells)
        ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
        xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
        inside = np.argwhere(mask)
        focus_px = max(1.0, 0.15 * radius)
        for row, col in inside[rng.integers(0, len(inside), size=int(rng.integers(6, 11)))]:
            dx, dy = xs - (col + 0.5), ys - (row + 0.5)
            texture = texture + 3.0 * np.clip(1.0 - np.sqrt(dx * dx + dy * dy) / focus_px, 0.0, 1.0)
    else:
        texture = 1.0 + 0.25 * _value_noise(rng, mask.shape, 2 * cells, 2 * cells)
    texture = np.maximum(texture, 0.05)
    return texture / texture[mask].mean()


def _paint_lesion(rng, shape, window, coverage, mask, radius, echo, speckle_strength) -> None:
    """Scale the tissue under the lesion by its echo ratio and texture; set how much speckle survives there."""
    texture = _lesion_texture(rng, shape, mask, radius)
    echo[window] *= 1.0 - coverage + coverage * shape.echo_ratio * texture
    speckle_strength[window] *= 1.0 - coverage + coverage * _SPECKLE_STRENGTH[shape.kind]


def _place_in_organ(rng, shape, organ: _Organ, radius: float, size: int, margin_px: float):
    """(radius, window, coverage, mask) of the lesion placed wholly margin_px inside the organ, shrunk if it must be."""
    inside = organ.depth > margin_px
    deep = np.argwhere(organ.depth > 0.5 * shape.reach * radius)
    if len(deep) == 0:
        deep = np.argwhere(organ.depth == organ.depth.max())
    for _ in range(30):
        for _ in range(40):
            row, col = deep[rng.integers(0, len(deep))]
            centre_x, centre_y = col + rng.uniform(0.0, 1.0), row + rng.uniform(0.0, 1.0)
            window, coverage, mask = _lesion_coverage(shape, centre_x, centre_y, radius, size)
            if mask.any() and not (mask & ~inside[window]).any():
                return radius, window, coverage, mask
        radius *= 0.9
    raise RuntimeError(f"no place for a lesion inside the organ at image size {size}; use a larger size")


def _place_outside(rng, shape, organ: _Organ, taken: np.ndarray, radius: float, size: int, gap_px: float):
    """(window, coverage, mask) of the lesion placed gap_px away from the organ and earlier distractors, or None."""
    blocked = (organ.depth > -gap_px) | taken
    for _ in range(30):
        centre_x, centre_y = rng.uniform(0.04, 0.96) * size, rng.uniform(0.04, 0.96) * size
        window, coverage, mask = _lesion_coverage(shape, centre_x, centre_y, radius, size)
        if mask.any() and not (mask & blocked[window]).any():
            return window, coverage, mask
    return None


# ---------------------------------------------------------------------------------------------------- one image
def _tissue_layers(rng: np.random.Generator, size: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Streaky background echo: horizontally stretched texture plus a few bright fascia lines."""
    layers = 1.0 + rng.uniform(0.15, 0.3) * _value_noise(
        rng, (size, size), int(rng.integers(10, 18)), int(rng.integers(3, 6))
    )
    t = xs / size - 0.5
    thickness = max(1.0, rng.uniform(0.006, 0.014) * size)
    for _ in range(int(rng.integers(2, 5))):
        level, slope, bend = (rng.uniform(0.05, 0.95) * size, rng.uniform(-0.15, 0.15) * size,
                              rng.uniform(-0.3, 0.3) * size)
        curve = level + slope * t + bend * t * t
        layers = layers + rng.uniform(0.3, 0.9) * np.clip(1.0 - np.abs(ys - curve) / thickness, 0.0, 1.0)
    # A floor keeps the darkest tissue well above a lesion's echo: no lesion-dark blobs in the background.
    return np.maximum(layers, 0.5)


def render_demo_sample(class_index: int, index: int, size: int = 256, seed: int = 0) -> DemoSample:
    """Render demo image ``index`` of class ``DEMO_CLASSES[class_index]``; a pure function of its arguments."""
    if not 0 <= class_index < len(DEMO_CLASSES):
        raise ValueError(f"class_index must be in 0..{len(DEMO_CLASSES) - 1}, got {class_index}")
    if size < _MIN_SIZE:
        raise ValueError(f"demo images need size >= {_MIN_SIZE} pixels to draw a lesion, got {size}")
    rng = np.random.default_rng([seed, class_index, index])
    scale = size / 256.0
    ys = np.arange(size, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(size, dtype=np.float64)[None, :] + 0.5

    background_level = rng.uniform(0.3, 0.55)
    echo = background_level * _tissue_layers(rng, size, xs, ys)

    organ = _draw_organ(rng, size, xs, ys)
    organ_cover = np.clip(organ.depth / 1.5 + 0.5, 0.0, 1.0)
    # The organ is brighter or darker than its surroundings, never about the same, so its outline shows.
    organ_ratio = rng.uniform(1.3, 1.7) if rng.uniform() < 0.5 else rng.uniform(0.6, 0.78)
    organ_cells = int(rng.integers(5, 10))
    organ_echo = background_level * organ_ratio * (1.0 + rng.uniform(0.1, 0.25) * _value_noise(
        rng, (size, size), organ_cells, organ_cells))
    capsule_px = max(1.0, rng.uniform(0.008, 0.014) * size)
    capsule = np.clip(1.0 - np.abs(organ.depth) / capsule_px, 0.0, 1.0)
    echo = echo * (1.0 - organ_cover) + organ_echo * organ_cover + rng.uniform(0.5, 1.0) * background_level * capsule

    grain_background = max(1, int(round(rng.uniform(0.6, 2.6) * scale)))
    grain_organ = max(1, int(round(rng.uniform(0.6, 2.6) * scale)))
    speckle = _speckle(rng, (size, size), grain_background) * (1.0 - organ_cover)
    speckle = speckle + _speckle(rng, (size, size), grain_organ) * organ_cover
    speckle_strength = np.full((size, size), rng.uniform(0.45, 0.8))

    class_name = DEMO_CLASSES[class_index]
    lesion = _draw_lesion(rng, class_name, _LESION_ECHO)
    radius = rng.uniform(*_LESION_RADIUS) * _BODY_SCALE[class_name] * size
    radius, window, coverage, mask = _place_in_organ(rng, lesion, organ, radius, size, capsule_px + 2.0)
    _paint_lesion(rng, lesion, window, coverage, mask, radius, echo, speckle_strength)
    lesion_mask = np.zeros((size, size), dtype=bool)
    lesion_mask[window] = mask

    taken = np.zeros((size, size), dtype=bool)
    distractors: list[str] = []
    for _ in range(int(rng.integers(1, 4))):
        kind = DEMO_CLASSES[int(rng.integers(0, len(DEMO_CLASSES)))]
        shape = _draw_lesion(rng, kind, _DISTRACTOR_ECHO)
        distractor_radius = rng.uniform(*_LESION_RADIUS) * _BODY_SCALE[kind] * rng.uniform(0.8, 1.05) * size
        placed = _place_outside(rng, shape, organ, taken, distractor_radius, size, gap_px=4.0 * scale + capsule_px)
        if placed is None:
            continue
        d_window, d_coverage, d_mask = placed
        _paint_lesion(rng, shape, d_window, d_coverage, d_mask, distractor_radius, echo, speckle_strength)
        taken[d_window] |= d_mask
        distractors.append(kind)

    intensity = echo * (1.0 + speckle_strength * (speckle - 1.0))
    tilt_x, tilt_y = _unit(rng.uniform(0.0, 2 * math.pi))
    tilt = rng.uniform(0.0, 0.6) * ((xs / size - 0.5) * tilt_x + (ys / size - 0.5) * tilt_y)
    attenuation = rng.uniform(0.0, 0.45) * (ys / size)
    intensity = intensity * np.maximum(1.0 + tilt - attenuation, 0.25)
    intensity = intensity + rng.uniform(0.01, 0.06) * rng.standard_normal((size, size))
    gain, offset = rng.uniform(150.0, 230.0), rng.uniform(8.0, 30.0)
    image = np.clip(np.round(gain * intensity + offset), 0, 255).astype(np.uint8)
    return DemoSample(image, lesion_mask, organ.mask, class_name, tuple(distractors))


# ---------------------------------------------------------------------------------------------------- files
def _image_name(class_name: str, index: int) -> str:
    return f"{class_name}_{index:03d}"


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write atomically (temporary file + rename) unless the file already holds exactly these bytes."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
    return True


def _owned_files(root: Path) -> list[Path]:
    """Files in the demo's folders that this generator names: images, masks, and temporary leftovers."""
    pattern = re.compile(r"^(?:{0})_\d{{3,}}(?:_mask)?\.png$|^\..*\.tmp$".format("|".join(DEMO_CLASSES)))
    folders = [root / c for c in DEMO_CLASSES] + [root / LESION_MASKS_FOLDER / c for c in DEMO_CLASSES]
    return [
        path for folder in folders if folder.is_dir() for path in folder.iterdir()
        if path.is_file() and pattern.match(path.name)
    ]


def _planned_files(images_per_class: int) -> list[str]:
    return [
        relative
        for name in DEMO_CLASSES
        for index in range(images_per_class)
        for relative in (f"{name}/{_image_name(name, index)}.png",
                         f"{LESION_MASKS_FOLDER}/{name}/{_image_name(name, index)}_mask.png")
    ]


def _complete_summary(root: Path, params: dict) -> dict | None:
    """The stored summary when root already holds exactly the demo these params describe, else None."""
    try:
        summary = json.loads((root / DEMO_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("generator_version") != GENERATOR_VERSION:
        return None
    files = summary.get("files")
    if summary.get("params") != params or not isinstance(files, dict):
        return None
    if sorted(files) != sorted(_planned_files(params["images_per_class"])) or len(_owned_files(root)) != len(files):
        return None
    for relative, digest in files.items():
        path = root / relative
        if not path.is_file() or file_sha256(path) != digest:
            return None
    return summary


def generate_demo(root: Path, images_per_class: int = 40, size: int = 256, seed: int = 0) -> dict:
    """Write the demo dataset under ``root`` (see the module docstring) and return its summary.

    Does nothing when ``root/demo.json`` already describes these parameters and every file matches its hash.
    Otherwise renders every image, rewrites only the files whose bytes differ, removes files of the generator's
    naming pattern that these parameters do not produce, and writes ``demo.json`` last. The returned summary is
    the content of ``demo.json`` plus ``files_written`` (how many files this call wrote).
    """
    if images_per_class < 1:
        raise ValueError(f"images_per_class must be at least 1, got {images_per_class}")
    if size < _MIN_SIZE:
        raise ValueError(f"demo images need size >= {_MIN_SIZE} pixels to draw a lesion, got {size}")
    root = Path(root)
    params = {"images_per_class": int(images_per_class), "size": int(size), "seed": int(seed)}
    existing = _complete_summary(root, params)
    if existing is not None:
        return {**existing, "files_written": 0}

    log.info("generating the demo dataset at %s (%d classes x %d images, %d px)", root, len(DEMO_CLASSES),
             images_per_class, size)
    files: dict[str, str] = {}
    samples: list[dict] = []
    written = 0
    for class_index, class_name in enumerate(DEMO_CLASSES):
        for index in range(images_per_class):
            sample = render_demo_sample(class_index, index, size=size, seed=seed)
            name = _image_name(class_name, index)
            image_path = f"{class_name}/{name}.png"
            mask_path = f"{LESION_MASKS_FOLDER}/{class_name}/{name}_mask.png"
            for relative, array in ((image_path, sample.image), (mask_path, sample.lesion_mask.astype(np.uint8) * 255)):
                data = _png_bytes(array)
                written += _write_if_changed(root / relative, data)
                files[relative] = hashlib.sha256(data).hexdigest()
            samples.append({
                "image": image_path,
                "mask": mask_path,
                "class": class_name,
                "lesion_area_fraction": round(float(sample.lesion_mask.mean()), 5),
                "organ_box": list(sample.organ_box),
                "distractors": list(sample.distractor_classes),
            })
    for path in _owned_files(root):
        if path.relative_to(root).as_posix() not in files:
            path.unlink()
    summary = {
        "generator": "medfocus.pipeline.demo",
        "generator_version": GENERATOR_VERSION,
        "params": params,
        "classes": list(DEMO_CLASSES),
        "counts": {name: images_per_class for name in DEMO_CLASSES},
        "environment": {"numpy": np.__version__, "pillow": PIL.__version__},
        "samples": samples,
        "files": files,
    }
    written += _write_if_changed(root / DEMO_MANIFEST, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return {**summary, "files_written": written}


def ensure_demo(root: Path, **kwargs) -> Path:
    """Generate the demo dataset under ``root`` if it is missing, incomplete or made with other parameters."""
    generate_demo(Path(root), **kwargs)
    return Path(root)
