"""Structured tasks rendered procedurally, deterministically from a seed, in the spirit of VTAB's
structured group: where is it, which way does it point, how many are there, how far is the nearest.

Every image is drawn at twice its size and downsampled (anti-aliasing). Nuisance factors (shape,
colour, size, position, background, clutter) vary freely so that no single pixel statistic gives
the label away; labels are balanced.

Two versions, both kept: version 1 (the suite's original tasks) and version 2, whose labels live at
VTAB's resolution in patch units on a 32-px input with 4-px patches (an 8 x 8 grid): one position
bin per ~0.8 patch column (VTAB's dSprites-loc: 16 bins over 14 columns), objects of 1-4 patches,
depth bins evenly spaced on the screen. Version 1 puts 16 position bins over 8 columns and its far
depth bins a tenth of a patch apart, below the grid that prompts attend over.
"""
from __future__ import annotations

import math
from functools import partial

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_S = 2 * SIZE  # drawing canvas


def _colour(rng, low=90) -> tuple[int, int, int]:
    c = rng.integers(low, 256, size=3)
    c[rng.integers(3)] = rng.integers(200, 256)  # keep one channel bright so objects stand out
    return tuple(int(v) for v in c)


def _background(rng, dark: bool = True) -> Image.Image:
    base = rng.uniform(0, 60) if dark else rng.uniform(60, 140)
    tint = rng.uniform(-15, 15, size=3)
    noise = rng.normal(0, rng.uniform(3, 12), size=(_S, _S, 3))
    ramp = np.linspace(-1, 1, _S)[None, :, None] * rng.uniform(-20, 20)
    pixels = np.clip(base + tint + noise + ramp, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _finish(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((SIZE, SIZE), Image.BOX), dtype=np.uint8)


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "triangle":
        pts = [(0, -1.2), (1.05, 0.75), (-1.05, 0.75)]
    elif kind == "ellipse":
        pts = [(1.2 * math.cos(t), 0.7 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 28, endpoint=False)]
    elif kind == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        pts = [(math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 16)
               for t in ts]
    elif kind == "arrow":  # no rotational symmetry: its orientation is well defined over 360 degrees
        pts = [(0, -1.3), (0.8, -0.2), (0.3, -0.2), (0.3, 1.1), (-0.3, 1.1), (-0.3, -0.2), (-0.8, -0.2)]
    elif kind == "cross":
        a, b = 0.35, 1.1
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
    elif kind == "flag":
        pts = [(-0.25, -1.2), (0.9, -0.8), (0.15, -0.35), (0.15, 1.2), (-0.25, 1.2)]
    else:
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _clutter(draw: ImageDraw.ImageDraw, rng, count: int) -> None:
    """Faint lines and specks that carry no label information."""
    for _ in range(count):
        x0, y0, x1, y1 = rng.uniform(0, _S, size=4)
        shade = int(rng.uniform(40, 110))
        draw.line([(x0, y0), (x1, y1)], fill=(shade, shade, shade), width=int(rng.integers(1, 3)))


def dsprites_loc(label: int, rng, bins: int = 16) -> np.ndarray:
    """A sprite whose horizontal position falls in bin ``label`` of ``bins``."""
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, int(rng.integers(0, 4)))
    r = rng.uniform(7, 16)
    lo, hi = r, _S - r
    cx = lo + (label + rng.uniform(0.05, 0.95)) * (hi - lo) / bins
    cy = rng.uniform(r, _S - r)
    kind = ["square", "ellipse", "heart", "triangle"][rng.integers(4)]
    draw.polygon(_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=_colour(rng))
    return _finish(img)


def dsprites_ori(label: int, rng, radius: tuple[float, float] = (14, 26)) -> np.ndarray:
    """An asymmetric sprite rotated into bin ``label`` of 16 (22.5 degrees each)."""
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, int(rng.integers(0, 4)))
    r = rng.uniform(*radius)
    cx, cy = rng.uniform(r + 4, _S - r - 4, size=2)
    angle = (label + rng.uniform(0.1, 0.9)) * 2 * math.pi / 16
    kind = ["arrow", "flag"][rng.integers(2)]
    draw.polygon(_polygon(kind, cx, cy, r, angle), fill=_colour(rng))
    return _finish(img)


def _place(rng, radii, tries: int = 200) -> list[tuple[float, float]]:
    placed: list[tuple[float, float, float]] = []
    for r in radii:
        for _ in range(tries):
            x, y = rng.uniform(r + 2, _S - r - 2, size=2)
            if all((x - px) ** 2 + (y - py) ** 2 > (r + pr + 3) ** 2 for px, py, pr in placed):
                placed.append((x, y, r))
                break
        else:
            raise RuntimeError("could not place objects without overlap")
    return [(x, y) for x, y, _ in placed]


def clevr_count(label: int, rng, radius: tuple[float, float] = (5, 11)) -> np.ndarray:
    """A scene holding 3 + ``label`` objects (3..10) of mixed shapes, colours and sizes."""
    img = _background(rng, dark=False)
    draw = ImageDraw.Draw(img)
    count = 3 + label
    radii = sorted(rng.uniform(*radius, size=count), reverse=True)
    for (x, y), r in zip(_place(rng, radii), radii):
        kind = ["square", "ellipse", "triangle"][rng.integers(3)]
        fill = _colour(rng, low=40)
        shadow = [(px + 2, py + 3) for px, py in _polygon(kind, x, y, r, rng.uniform(0, 2 * math.pi))]
        draw.polygon(shadow, fill=(30, 30, 30))
        draw.polygon(_polygon(kind, x, y, r, rng.uniform(0, 2 * math.pi)), fill=fill, outline=(20, 20, 20))
    return _finish(img)


DIST_NEAR, DIST_FAR, HORIZON = 1.0, 7.0, 0.3


def clevr_dist(label: int, rng, screen_bins: bool = False) -> np.ndarray:
    """A ground-plane scene; the label is the depth bin (6) of the nearest object.

    Bins are equal in depth (version 1: the far ones a few pixels apart on screen) or, with
    ``screen_bins``, equal in the height of the ground contact on screen (version 2).
    """
    img = _background(rng, dark=False)
    draw = ImageDraw.Draw(img)
    horizon = HORIZON * _S
    sky = tuple(int(v) for v in rng.uniform(120, 220, size=3))
    draw.rectangle([0, 0, _S, horizon], fill=sky)
    focal = (_S - horizon) * DIST_NEAR * 0.92
    if screen_bins:  # ground-contact heights from the nearest to the farthest depth, evenly split
        heights = np.linspace(focal / DIST_NEAR, focal / DIST_FAR, 7)
        nearest = focal / rng.uniform(heights[label + 1], heights[label])
    else:
        edges = np.linspace(DIST_NEAR, DIST_FAR, 7)
        nearest = rng.uniform(edges[label], edges[label + 1])
    others = rng.uniform(nearest, DIST_FAR + 2, size=int(rng.integers(0, 4)))
    for z in sorted(np.concatenate([[nearest], others]), reverse=True):  # far to near
        size = rng.uniform(0.35, 0.6)  # object height in world units: size alone does not tell depth
        r = max(2.0, size * focal / z / 1.6)
        ground_y = horizon + focal / z
        x = rng.uniform(r, _S - r)
        kind = ["square", "ellipse"][rng.integers(2)]
        draw.ellipse([x - r, ground_y - r * 0.25, x + r, ground_y + r * 0.25], fill=(40, 40, 40))
        draw.polygon(_polygon(kind, x, ground_y - r, r, 0.0), fill=_colour(rng, low=40), outline=(20, 20, 20))
    return _finish(img)


TARGET_KINDS = ["heart", "arrow", "flag", "cross"]
DISTRACTOR_KINDS = ["square", "ellipse", "triangle"]


def find_shape(label: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """One small target of kind ``label`` (heart, arrow, flag, cross) among 5-8 distractor shapes.

    The mechanism task of docs/benchmarks.md: the evidence is one object of about one patch, and the
    generator knows where it is. Targets and distractors share sizes and colours; only the shape
    tells them apart. Returns the image and the target's box (x0, y0, x1, y1) as image fractions.
    """
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, int(rng.integers(0, 3)))
    radii = rng.uniform(9, 13, size=1 + int(rng.integers(5, 9)))  # 1.1-1.6 patches wide at 32 px, patch 4
    centres = _place(rng, radii)
    for (x, y), r in zip(centres[1:], radii[1:]):
        kind = DISTRACTOR_KINDS[rng.integers(len(DISTRACTOR_KINDS))]
        draw.polygon(_polygon(kind, x, y, r, rng.uniform(0, 2 * math.pi)), fill=_colour(rng))
    (x, y), r = centres[0], radii[0]
    outline = _polygon(TARGET_KINDS[label], x, y, r, rng.uniform(0, 2 * math.pi))
    draw.polygon(outline, fill=_colour(rng))
    xs, ys = zip(*outline)
    box = np.clip(np.array([min(xs), min(ys), max(xs), max(ys)]) / _S, 0.0, 1.0)
    return _finish(img), box.astype(np.float32)


def box_patches(box, grid: tuple[int, int]) -> np.ndarray:
    """Indices (row-major) of the patches of an (h, w) grid that a fractional box overlaps."""
    gh, gw = grid
    x0, y0, x1, y1 = box
    cols = range(int(math.floor(x0 * gw)), max(int(math.ceil(x1 * gw)), int(math.floor(x0 * gw)) + 1))
    rows = range(int(math.floor(y0 * gh)), max(int(math.ceil(y1 * gh)), int(math.floor(y0 * gh)) + 1))
    return np.array([r * gw + c for r in rows for c in cols if r < gh and c < gw], dtype=np.int64)


# name -> (renderer, number of classes, group, class names)
PROCEDURAL_TASKS = {
    "dsprites-loc": (dsprites_loc, 16, "structured", [f"x-bin-{i}" for i in range(16)]),
    "dsprites-ori": (dsprites_ori, 16, "structured", [f"angle-bin-{i}" for i in range(16)]),
    "clevr-count": (clevr_count, 8, "structured", [str(i) for i in range(3, 11)]),
    "clevr-dist": (clevr_dist, 6, "structured", [f"depth-bin-{i}" for i in range(6)]),
}
# Version 2: the same tasks at VTAB's label resolution in patch units (see the module docstring).
PROCEDURAL_TASKS_V2 = {
    "dsprites-loc": (partial(dsprites_loc, bins=8), 8, "structured", [f"x-bin-{i}" for i in range(8)]),
    "dsprites-ori": (partial(dsprites_ori, radius=(20, 30)), 16, "structured", [f"angle-bin-{i}" for i in range(16)]),
    "clevr-count": (partial(clevr_count, radius=(7, 12)), 8, "structured", [str(i) for i in range(3, 11)]),
    "clevr-dist": (partial(clevr_dist, screen_bins=True), 6, "structured", [f"depth-bin-{i}" for i in range(6)]),
}
VERSIONS = {1: PROCEDURAL_TASKS, 2: PROCEDURAL_TASKS_V2}
# Tasks outside the benchmark suite whose renderers also return the evidence's box (for pointing scores).
MECHANISM_TASKS = {"find-shape": (find_shape, 4, "mechanism", TARGET_KINDS)}


def tasks_of(version: int) -> dict:
    if version not in VERSIONS:
        raise ValueError(f"procedural tasks have versions {', '.join(map(str, VERSIONS))}; got {version!r}")
    return VERSIONS[version]


def render(task: str, count: int, seed: int, version: int = 1):
    """``count`` images of a task with balanced, shuffled labels, fully determined by ``seed``.

    Returns (images, labels), and for the mechanism tasks (images, labels, boxes).
    """
    table = MECHANISM_TASKS if task in MECHANISM_TASKS else tasks_of(version)
    renderer, num_classes, _, _ = table[task]
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % num_classes)
    drawn = [renderer(int(label), rng) for label in labels]
    if task in MECHANISM_TASKS:
        return np.stack([d[0] for d in drawn]), labels.astype(np.int64), np.stack([d[1] for d in drawn])
    return np.stack(drawn), labels.astype(np.int64)
