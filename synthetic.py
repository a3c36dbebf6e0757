"""Synthetic street scenes: the project's default data set, generated with numpy, no download.

Not in the paper. A scene is a pure function of (scene seed, index), drawn in a few
milliseconds, so that training, the tests and the benchmarks run on a CPU with nothing to
download; data.py turns scenes into a data set (`data.build_dataset("synthetic", ...)`: split
seeds, lengths, augmentation, normalisation) like any file-backed one.

What the scenes are made to test: the classes are told apart by shape and context rather than
colour, and they hold the thin structures on which a per-pixel loss at output stride 8 goes
wrong and an affinity loss should help (paper section 4: poles, bicycles, fences, people):
wheels with 1-px spokes, rims, fence bars and limbs 1-3 px wide, poles 1-5 px wide, signs on
poles, over noisy textured backgrounds with thin pole-like distractors.

Top to bottom: the classes and the canvas; shape masks; colours and smooth noise; one drawer
per kind of object; `make_scene`, which paints a whole scene back to front.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

CLASSES = ("background", "road", "pole", "sign", "person", "bicycle", "fence", "car")
SIZE = (128, 128)  # (H, W): small enough for CPU training, a multiple of stride 8

# Scenes are painted back to front (far objects first) on a float RGB canvas; each paint call
# writes the class and the instance id of the pixels it covers, so every instance id holds one
# class only. Appearance is deliberately a weak cue: each class's colours come from a wide
# distribution that overlaps the others', objects carry texture noise, the background holds
# thin pole-like distractors (drainpipes, tree trunks, window frames), and the whole image gets
# illumination changes, pixel noise and sometimes blur. Shape and context are what separate the
# classes, and the thin parts (spokes 1 px; rims, fence bars and limbs 1-3 px; poles 1-5 px,
# wider when nearer) are where a per-pixel loss at stride 8 goes wrong.

S_BACKGROUND, S_ROAD, S_POLE, S_SIGN, S_PERSON, S_BICYCLE, S_FENCE, S_CAR = range(8)
# Mean colour per class; objects draw around it with a large spread so classes overlap.
_CLASS_COLOUR = {
    S_POLE: (150, 150, 155), S_SIGN: (200, 170, 60), S_PERSON: (190, 70, 80),
    S_BICYCLE: (90, 50, 120), S_FENCE: (170, 130, 90), S_CAR: (60, 80, 170),
}
_COLOUR_SPREAD = 40.0


class _Canvas:
    """Image, label and instance maps being painted, and the scene's random generator."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.image = np.zeros((height, width, 3), np.float32)  # [H, W, 3] RGB 0..255
        self.label = np.zeros((height, width), np.uint8)  # [H, W] class ids
        self.instance = np.zeros((height, width), np.uint8)  # [H, W] VOC-style instance ids
        self.rng = rng
        # One unit-variance noise field per scene, scaled per object: drawing fresh noise for
        # every paint call would cost most of the generation time.
        self.texture = rng.standard_normal((height, width), dtype=np.float32)  # [H, W]
        self.next_id = 2  # 0 = background region, 1 = road

    @property
    def shape(self) -> tuple[int, int]:
        return self.label.shape

    def new_instance(self) -> int:
        # A scene has at most about 30 objects, far below 255 (reserved: "not an instance").
        self.next_id += 1
        return self.next_id - 1

    def paint(self, region: tuple[slice, slice], mask: np.ndarray, cls: int, inst: int,
              colour: np.ndarray, texture: float = 6.0) -> None:
        """Fill `mask` (local to `region`) with a colour plus per-pixel texture, class and id."""
        if mask.size == 0 or not mask.any():
            return
        ys, xs = region
        noise = texture * self.texture[ys, xs][mask]  # [N] luminance texture
        self.image[ys, xs][mask] = colour + noise[:, None]
        self.label[ys, xs][mask] = cls
        self.instance[ys, xs][mask] = inst


def _grid(shape: tuple[int, int], y0: float, y1: float, x0: float, x1: float):
    """Local window [y0, y1] x [x0, x1] clipped to the canvas; pixel centres at integers."""
    h, w = shape
    ya, yb = max(int(math.floor(y0)), 0), min(int(math.ceil(y1)) + 1, h)
    xa, xb = max(int(math.floor(x0)), 0), min(int(math.ceil(x1)) + 1, w)
    yy = np.arange(ya, max(yb, ya), dtype=np.float32)[:, None]
    xx = np.arange(xa, max(xb, xa), dtype=np.float32)[None, :]
    return (slice(ya, max(yb, ya)), slice(xa, max(xb, xa))), yy, xx


def _segment(shape, p0: tuple[float, float], p1: tuple[float, float], width: float):
    """Pixels within width/2 of the segment p0-p1 (points as (y, x))."""
    (ya, xa), (yb, xb) = p0, p1
    r = width / 2
    region, yy, xx = _grid(shape, min(ya, yb) - r, max(ya, yb) + r, min(xa, xb) - r, max(xa, xb) + r)
    dy, dx = yb - ya, xb - xa
    t = np.clip(((yy - ya) * dy + (xx - xa) * dx) / max(dy * dy + dx * dx, 1e-6), 0, 1)
    d2 = (yy - ya - t * dy) ** 2 + (xx - xa - t * dx) ** 2
    return region, d2 <= r * r


def _ellipse(shape, cy: float, cx: float, ry: float, rx: float, inner: float = 0.0):
    """Filled ellipse, or a ring when `inner` (inner radius / outer radius) > 0."""
    region, yy, xx = _grid(shape, cy - ry, cy + ry, cx - rx, cx + rx)
    d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    mask = d <= 1.0
    if inner > 0:
        mask &= d > inner * inner
    return region, mask


def _rect(shape, y0: float, y1: float, x0: float, x1: float):
    """Axis-aligned rectangle covering integer rows y0..y1-1 and columns x0..x1-1."""
    h, w = shape
    ya, yb = max(int(round(y0)), 0), min(int(round(y1)), h)
    xa, xb = max(int(round(x0)), 0), min(int(round(x1)), w)
    region = (slice(ya, max(ya, yb)), slice(xa, max(xa, xb)))
    return region, np.ones((max(yb - ya, 0), max(xb - xa, 0)), bool)


def _triangle(shape, pts: Sequence[tuple[float, float]]):
    """Filled triangle (points as (y, x)) via the signs of three edge functions."""
    ys = [p[0] for p in pts]
    xs = [p[1] for p in pts]
    region, yy, xx = _grid(shape, min(ys), max(ys), min(xs), max(xs))
    signs = []
    for (ya, xa), (yb, xb) in zip(pts, pts[1:] + pts[:1]):
        signs.append((xb - xa) * (yy - ya) - (yb - ya) * (xx - xa))
    inside = (np.minimum.reduce(signs) >= 0) | (np.maximum.reduce(signs) <= 0)
    return region, inside


def _colour(rng: np.random.Generator, mean: Sequence[float], spread: float = _COLOUR_SPREAD) -> np.ndarray:
    return np.clip(np.asarray(mean, np.float32) + rng.normal(0, spread, 3), 0, 255).astype(np.float32)


def _interp_matrix(n: int, cells: int) -> np.ndarray:
    """[n, cells + 1] weights of linear interpolation from a coarse grid to n samples."""
    f = np.linspace(0, cells, n, dtype=np.float32)
    i = np.minimum(f.astype(int), cells - 1)
    m = np.zeros((n, cells + 1), np.float32)
    m[np.arange(n), i] = 1 - (f - i)
    m[np.arange(n), i + 1] = f - i
    return m


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise [H, W, channels] in about [-1, 1]: a coarse grid, bilinearly upsampled."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1, channels)).astype(np.float32)
    rows = np.tensordot(_interp_matrix(shape[0], cells), coarse, axes=(1, 0))  # [H, cells+1, C]
    field = rows.transpose(0, 2, 1) @ _interp_matrix(shape[1], cells).T  # [H, C, W]
    return np.ascontiguousarray(field.transpose(0, 2, 1))  # [H, W, C]


def _draw_background(c: _Canvas, horizon: float) -> None:
    """Sky, buildings with windows and drainpipes, trees: all class 0, instance 0."""
    rng, (h, w) = c.rng, c.shape
    sky_top, sky_bottom = _colour(rng, (140, 160, 190), 45), _colour(rng, (170, 170, 170), 45)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    c.image[:] = sky_top * (1 - t) + sky_bottom * t
    c.image += 25 * _smooth_field(rng, (h, w), 4, 3)  # clouds / haze
    x = -rng.uniform(0, 20)
    while x < w:  # a row of buildings standing on the horizon
        bw = rng.uniform(15, 45)
        top = horizon - rng.uniform(0.15, 0.95) * horizon
        wall = _colour(rng, rng.uniform(60, 190, 3), 35)
        region, mask = _rect(c.shape, top, horizon + 1, x, x + bw)
        c.paint(region, mask, S_BACKGROUND, 0, wall, texture=8)
        # Window grid in one mask; the wall strips between windows are thin background lines.
        step_y, step_x = rng.uniform(5, 10), rng.uniform(5, 10)
        gap_y, gap_x = rng.integers(1, 3), rng.integers(1, 3)
        region, yy, xx = _grid(c.shape, top + 3, horizon - 4, x + 2, x + bw - 3)
        mask = (((yy - top - 3) % step_y) < step_y - gap_y) & (((xx - x - 2) % step_x) < step_x - gap_x)
        c.paint(region, mask, S_BACKGROUND, 0, _colour(rng, wall * rng.uniform(0.4, 1.5), 25), texture=4)
        if rng.random() < 0.4:  # drainpipe: a pole-like vertical line that is background
            px = x + rng.uniform(1, bw - 2)
            region, mask = _rect(c.shape, top, horizon, px, px + rng.integers(1, 3))
            c.paint(region, mask, S_BACKGROUND, 0, _colour(rng, _CLASS_COLOUR[S_POLE]), texture=4)
        x += bw + rng.uniform(-5, 10)
    for _ in range(rng.integers(0, 3)):  # trees: a thin trunk (background) under a textured crown
        tx, base = rng.uniform(0, w), horizon + rng.uniform(0, 6)
        size = rng.uniform(8, 18)
        region, mask = _rect(c.shape, base - 2.2 * size, base, tx, tx + rng.integers(2, 4))
        c.paint(region, mask, S_BACKGROUND, 0, _colour(rng, (100, 80, 60), 40), texture=6)
        region, mask = _ellipse(c.shape, base - 2.4 * size, tx + 1, size * rng.uniform(0.7, 1.1), size)
        c.paint(region, mask, S_BACKGROUND, 0, _colour(rng, (80, 120, 60), 40), texture=18)


def _draw_road(c: _Canvas, horizon: float) -> None:
    """Ground below the horizon (class road, instance 1) with dashed lane markings."""
    rng, (h, w) = c.rng, c.shape
    region, mask = _rect(c.shape, horizon, h, 0, w)
    c.paint(region, mask, S_ROAD, 1, _colour(rng, (110, 105, 110), 35), texture=10)
    y = horizon + rng.uniform(0.3, 0.7) * (h - horizon)
    period, dash = rng.uniform(14, 24), rng.uniform(5, 10)
    region, yy, xx = _grid(c.shape, y, y + rng.integers(0, 2), 0, w)
    mask = np.broadcast_to((xx + rng.uniform(0, period)) % period < dash, yy.shape[:1] + xx.shape[1:])
    c.paint(region, mask, S_ROAD, 1, _colour(rng, (220, 220, 210), 20), texture=5)


def _draw_pole(c: _Canvas, x: float, base: float, scale: float) -> None:
    """A pole 1-5 px wide standing on the ground, maybe with a lamp arm and a sign on top."""
    rng = c.rng
    width = max(1, round(scale * rng.uniform(1.2, 3.8)))  # perspective: near poles are wider
    top = base - scale * rng.uniform(45, 85)
    colour = _colour(rng, _CLASS_COLOUR[S_POLE])
    inst = c.new_instance()
    x = round(x)
    region, mask = _rect(c.shape, top, base, x, x + width)
    c.paint(region, mask, S_POLE, inst, colour, texture=5)
    if rng.random() < 0.35:  # lamp arm, thin and slanted
        side = rng.choice([-1, 1])
        end = (top + rng.uniform(-4, 4), x + side * scale * rng.uniform(8, 16))
        region, mask = _segment(c.shape, (top, x + width / 2), end, rng.uniform(1, 2.2))
        c.paint(region, mask, S_POLE, inst, colour, texture=5)
    if rng.random() < 0.6:  # a sign plate fixed on the pole
        _draw_sign(c, top + scale * rng.uniform(3, 10), x + width / 2, scale)


def _draw_sign(c: _Canvas, cy: float, cx: float, scale: float) -> None:
    rng = c.rng
    r = scale * rng.uniform(4.5, 9)
    colour = _colour(rng, rng.choice([(200, 60, 50), (50, 80, 170), (210, 190, 60), (200, 200, 200)]), 40)
    inst = c.new_instance()
    kind = rng.integers(0, 3)
    if kind == 0:
        region, mask = _ellipse(c.shape, cy, cx, r, r)
    elif kind == 1:
        region, mask = _rect(c.shape, cy - r * 0.8, cy + r * 0.8, cx - r, cx + r)
    else:
        region, mask = _triangle(c.shape, [(cy - r, cx), (cy + 0.8 * r, cx - r), (cy + 0.8 * r, cx + r)])
    c.paint(region, mask, S_SIGN, inst, colour, texture=5)
    # An inner symbol of another colour: still the sign's class and instance.
    region, mask = _ellipse(c.shape, cy + 0.1 * r, cx, 0.45 * r, 0.45 * r, inner=rng.choice([0.0, 0.6]))
    c.paint(region, mask, S_SIGN, inst, _colour(rng, (128, 128, 128), 70), texture=5)


def _draw_person(c: _Canvas, hip: tuple[float, float], feet: Sequence[tuple[float, float]],
                 hands: Sequence[tuple[float, float]] | None, height: float) -> None:
    """A person from key points: head disc, torso, and limbs 1.5-3 px wide."""
    rng = c.rng
    inst = c.new_instance()
    hy, hx = hip
    shoulder = (hy - 0.33 * height, hx + rng.uniform(-0.04, 0.04) * height)
    skin, shirt, trousers = (_colour(rng, (170, 130, 110), 45), _colour(rng, _CLASS_COLOUR[S_PERSON]),
                             _colour(rng, _CLASS_COLOUR[S_PERSON]))
    limb = max(1.5, min(3.0, 0.06 * height))
    for foot in feet:
        region, mask = _segment(c.shape, hip, foot, limb)
        c.paint(region, mask, S_PERSON, inst, trousers)
    region, mask = _segment(c.shape, hip, shoulder, max(3.0, 0.16 * height))
    c.paint(region, mask, S_PERSON, inst, shirt)
    if hands is None:  # arms hanging or swinging
        hands = [(shoulder[0] + 0.3 * height, shoulder[1] + s * rng.uniform(0.05, 0.2) * height) for s in (-1, 1)]
    for hand in hands:
        region, mask = _segment(c.shape, shoulder, hand, max(1.2, limb - 0.6))
        c.paint(region, mask, S_PERSON, inst, skin if rng.random() < 0.5 else shirt)
    r = max(1.5, 0.075 * height)
    region, mask = _ellipse(c.shape, shoulder[0] - 1.3 * r, shoulder[1], r, r)
    c.paint(region, mask, S_PERSON, inst, skin)


def _draw_pedestrian(c: _Canvas, x: float, base: float, scale: float) -> None:
    rng = c.rng
    height = scale * rng.uniform(32, 52)
    hip = (base - 0.47 * height, x)
    stride = rng.uniform(0.0, 0.22) * height
    _draw_person(c, hip, [(base, x - stride), (base, x + stride * rng.uniform(0.2, 1.0))], None, height)


def _draw_bicycle(c: _Canvas, x: float, base: float, scale: float) -> None:
    """Two rims 1-2 px wide with 1-px spokes, a tube frame, maybe a rider on top."""
    rng = c.rng
    r = scale * rng.uniform(7, 12)
    direction = rng.choice([-1, 1])
    hub_y = base - r
    rear, front = (hub_y, x - direction * 1.3 * r), (hub_y, x + direction * 1.3 * r)
    colour = _colour(rng, _CLASS_COLOUR[S_BICYCLE])
    inst = c.new_instance()
    rim = rng.uniform(1.0, 2.2)
    for cy, cx in (rear, front):
        # Rim and spokes in one mask: each spoke is a 1-px line through the hub (2 rays).
        region, yy, xx = _grid(c.shape, cy - r, cy + r, cx - r, cx + r)
        dy, dx = yy - cy, xx - cx
        dist = np.sqrt(dy * dy + dx * dx)
        n_spokes = int(rng.integers(3, 7))
        angles = (rng.uniform(0, np.pi) + np.pi * np.arange(n_spokes) / n_spokes)[:, None, None]  # [K, 1, 1]
        line = np.abs(dy * np.cos(angles) - dx * np.sin(angles)).min(axis=0)  # distance to nearest spoke
        mask = ((dist <= r) & (dist > r - rim)) | ((line <= 0.5) & (dist <= r))
        c.paint(region, mask, S_BICYCLE, inst, colour, texture=4)
    crank = (hub_y, x)
    seat = (hub_y - 1.25 * r, x - direction * 0.35 * r)
    head = (hub_y - 1.2 * r, front[1] - direction * 0.35 * r)
    tube = rng.uniform(1.0, 2.2)
    for p0, p1 in ((rear, crank), (rear, seat), (crank, seat), (crank, head), (seat, head), (head, front)):
        region, mask = _segment(c.shape, p0, p1, tube)
        c.paint(region, mask, S_BICYCLE, inst, colour, texture=4)
    bar = (head[0] - 0.3 * r, head[1] + direction * 0.15 * r)
    region, mask = _segment(c.shape, head, bar, tube)
    c.paint(region, mask, S_BICYCLE, inst, colour, texture=4)
    if rng.random() < 0.4:  # a rider: a person (own class and instance) over the bicycle
        height = 2.6 * r
        hip = (seat[0] - 1, seat[1])
        feet = [(crank[0] + 0.3 * r, crank[1] + 0.2 * r), (crank[0] - 0.3 * r, crank[1] - 0.2 * r)]
        _draw_person(c, hip, feet, [bar], height)


def _draw_fence(c: _Canvas, x: float, base: float, scale: float) -> None:
    """Two rails and pickets 1-3 px wide with the background showing between them."""
    rng = c.rng
    length = rng.uniform(25, 80)
    height = scale * rng.uniform(12, 22)
    colour = _colour(rng, _CLASS_COLOUR[S_FENCE])
    inst = c.new_instance()
    rail = int(rng.integers(1, 3))
    for frac in (0.2, 0.7):
        y = base - height * (1 - frac)
        region, mask = _rect(c.shape, y, y + rail, x, x + length)
        c.paint(region, mask, S_FENCE, inst, colour, texture=4)
    picket = int(rng.integers(1, 4))
    for px in np.arange(x, x + length, picket + rng.uniform(2, 6)):
        region, mask = _rect(c.shape, base - height, base, px, px + picket)
        c.paint(region, mask, S_FENCE, inst, colour, texture=4)


def _draw_car(c: _Canvas, x: float, base: float, scale: float) -> None:
    """A large blob: body, cabin with windows, dark wheels (all car)."""
    rng = c.rng
    length = scale * rng.uniform(38, 62)
    body_h = 0.28 * length
    colour = _colour(rng, _CLASS_COLOUR[S_CAR], 60)
    inst = c.new_instance()
    wheel_r = 0.11 * length
    body_bottom = base - 0.8 * wheel_r
    region, mask = _rect(c.shape, body_bottom - body_h, body_bottom, x - length / 2, x + length / 2)
    c.paint(region, mask, S_CAR, inst, colour, texture=6)
    cab_y = body_bottom - body_h
    region, mask = _ellipse(c.shape, cab_y, x - 0.02 * length, 0.2 * length, 0.34 * length)
    mask &= np.arange(region[0].start, region[0].stop)[:, None] < cab_y  # upper half only
    c.paint(region, mask, S_CAR, inst, colour, texture=6)
    region, mask = _ellipse(c.shape, cab_y - 0.02 * length, x, 0.14 * length, 0.26 * length)
    mask &= np.arange(region[0].start, region[0].stop)[:, None] < cab_y - 0.03 * length
    c.paint(region, mask, S_CAR, inst, _colour(rng, (60, 70, 90), 40), texture=6)  # windows
    for wx in (x - 0.3 * length, x + 0.3 * length):
        region, mask = _ellipse(c.shape, base - wheel_r, wx, wheel_r, wheel_r)
        c.paint(region, mask, S_CAR, inst, _colour(rng, (35, 35, 35), 20), texture=4)
        region, mask = _ellipse(c.shape, base - wheel_r, wx, 0.4 * wheel_r, 0.4 * wheel_r)
        c.paint(region, mask, S_CAR, inst, _colour(rng, (160, 160, 160), 40), texture=4)


_OBJECT_DRAWERS = {  # object kind -> (drawer, min count, max count)
    "pole": (_draw_pole, 2, 5),
    "person": (_draw_pedestrian, 1, 4),
    "bicycle": (_draw_bicycle, 1, 3),
    "fence": (_draw_fence, 0, 2),
    "car": (_draw_car, 0, 2),
}


def _finish_image(c: _Canvas) -> np.ndarray:
    """Illumination change, pixel noise and sometimes blur, then uint8 [H, W, 3]."""
    rng, (h, w) = c.rng, c.shape
    image = c.image * (1 + 0.25 * _smooth_field(rng, (h, w), 3, 1))  # uneven lighting
    image += rng.uniform(-15, 15, 3).astype(np.float32)  # colour cast
    image += rng.uniform(3, 10) * rng.standard_normal((h, w, 3), dtype=np.float32)
    if rng.random() < 0.3:  # a [1, 2, 1] / 4 blur in each direction: thin parts lose contrast
        image[1:-1] = 0.25 * image[:-2] + 0.5 * image[1:-1] + 0.25 * image[2:]
        image[:, 1:-1] = 0.25 * image[:, :-2] + 0.5 * image[:, 1:-1] + 0.25 * image[:, 2:]
    return np.clip(image, 0, 255).round().astype(np.uint8)


def make_scene(scene_seed: int, index: int,
               size: tuple[int, int] = SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One street scene, a pure function of (scene_seed, index).

    Returns image uint8 [H, W, 3], label uint8 [H, W] (indices into CLASSES, no ignore),
    instance uint8 [H, W] (VOC convention: 0 = background region, 1 = road, 2.. = objects).
    """
    rng = np.random.default_rng([scene_seed, index])
    h, w = size
    c = _Canvas(h, w, rng)
    horizon = rng.uniform(0.3, 0.5) * h
    _draw_background(c, horizon)
    _draw_road(c, horizon)
    objects = []  # (base row, kind, x); painted far (small base row) to near
    for kind, (_, lo, hi) in _OBJECT_DRAWERS.items():
        for _ in range(rng.integers(lo, hi + 1)):
            objects.append((rng.uniform(horizon + 3, h - 2), kind, rng.uniform(0.05 * w, 0.95 * w)))
    objects.sort(key=lambda o: o[0])
    for base, kind, x in objects:
        scale = 0.6 + 0.8 * (base - horizon) / (h - horizon)  # perspective: nearer is larger
        _OBJECT_DRAWERS[kind][0](c, x, base, scale)
    return _finish_image(c), c.label, c.instance
