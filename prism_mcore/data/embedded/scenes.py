"""Scenes of the embedded synthetic visual-reasoning task: what is drawn, how it is drawn, and how it is described.

Three kinds of small images, each a pure function of its scene description (so a scene's JSON is the ground truth
of its image):
- `ShapesScene`: up to six flat circles, squares and triangles in a 3x3 grid on a 96x96 canvas (9 image tokens);
- `DigitsScene`: two or three coloured seven-segment digits on a 96x64 canvas (6 image tokens);
- `BarsScene`: a bar chart of three or four coloured bars with values 1-5 on a 112x112 canvas (16 image tokens).

Few colours, few shapes and small numbers keep the task learnable by a tiny model in minutes of CPU training.
Seven-segment digits are drawn from rectangles rather than a font, so rendering depends on no font file and gives
the same pixels with every Pillow build.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
GRID_SIDE = 3  # shapes sit in a GRID_SIDE x GRID_SIDE grid of cells
CELL = 32  # pixels per grid cell: one merged 2x2 group of 16-pixel vision patches
MAX_BAR_VALUE = 5


def plural(count: int, noun: str) -> str:
    """`1 circle`, `2 circles`."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _jitter(rng: random.Random, reach: int) -> tuple[int, int]:
    return (rng.randint(-reach, reach), rng.randint(-reach, reach))


# ---------------------------------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    cell: int  # row-major index in the grid


@dataclass(frozen=True)
class ShapesScene:
    objects: tuple[ShapeObject, ...]  # sorted by cell
    offsets: tuple[tuple[int, int], ...]  # pixel offset of each object from its cell centre: looks only, not content

    kind: ClassVar[str] = "shapes"
    size: ClassVar[tuple[int, int]] = (GRID_SIDE * CELL, GRID_SIDE * CELL)

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        """Objects of that colour and/or shape (None matches any)."""
        return sum(1 for o in self.objects if color in (None, o.color) and shape in (None, o.shape))

    def caption_lines(self) -> list[str]:
        lines = ["Flat shapes on a white background."]
        for color in COLORS:
            for shape in SHAPES:
                if count := self.count(color, shape):
                    lines.append(f"{plural(count, f'{color} {shape}')}.")
        return lines


def sample_shapes(rng: random.Random, hard: bool) -> ShapesScene:
    count = rng.randint(3, 6) if hard else rng.randint(1, 6)
    cells = sorted(rng.sample(range(GRID_SIDE * GRID_SIDE), count))
    objects = tuple(ShapeObject(rng.choice(SHAPES), rng.choice(list(COLORS)), cell) for cell in cells)
    return ShapesScene(objects, tuple(_jitter(rng, 3) for _ in objects))


def _draw_shapes(scene: ShapesScene, draw: ImageDraw.ImageDraw) -> None:
    for obj, (dx, dy) in zip(scene.objects, scene.offsets, strict=True):
        row, col = divmod(obj.cell, GRID_SIDE)
        cx, cy = col * CELL + CELL // 2 + dx, row * CELL + CELL // 2 + dy
        fill = COLORS[obj.color]
        # About 20 pixels across: with offsets of at most 3 pixels a shape never leaves its 32-pixel cell.
        if obj.shape == "circle":
            draw.ellipse((cx - 10, cy - 10, cx + 10, cy + 10), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((cx - 9, cy - 9, cx + 9, cy + 9), fill=fill)
        else:
            draw.polygon([(cx, cy - 10), (cx - 10, cy + 9), (cx + 10, cy + 9)], fill=fill)


def _misperceive_shapes(scene: ShapesScene, rng: random.Random) -> ShapesScene:
    """Overlook one object, or see one that is not there."""
    objects, offsets = list(scene.objects), list(scene.offsets)
    free = [c for c in range(GRID_SIDE * GRID_SIDE) if c not in {o.cell for o in objects}]
    if len(objects) > 1 and (not free or rng.random() < 0.5):
        drop = rng.randrange(len(objects))
        del objects[drop], offsets[drop]
    else:
        objects.append(ShapeObject(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(free)))
        offsets.append((0, 0))
        order = sorted(range(len(objects)), key=lambda i: objects[i].cell)
        objects, offsets = [objects[i] for i in order], [offsets[i] for i in order]
    return ShapesScene(tuple(objects), tuple(offsets))


# ---------------------------------------------------------------------------------------------------------------------
# Digits

# Seven-segment encoding: a top, b upper right, c lower right, d bottom, e lower left, f upper left, g middle.
SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abdeg",
    3: "abcdg",
    4: "bcfg",
    5: "acdfg",
    6: "acdefg",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}
DIGIT_WIDTH, DIGIT_HEIGHT, STROKE = 16, 32, 4
DIGIT_CENTERS = {2: (28, 68), 3: (18, 48, 78)}  # x centres of the digit slots on the 96-pixel-wide canvas
POSITION_NAMES = {2: ("left", "right"), 3: ("left", "middle", "right")}


@dataclass(frozen=True)
class Digit:
    value: int
    color: str


@dataclass(frozen=True)
class DigitsScene:
    digits: tuple[Digit, ...]  # left to right
    offsets: tuple[tuple[int, int], ...]

    kind: ClassVar[str] = "digits"
    size: ClassVar[tuple[int, int]] = (96, 64)

    @property
    def positions(self) -> tuple[str, ...]:
        return POSITION_NAMES[len(self.digits)]

    @property
    def values(self) -> list[int]:
        return [d.value for d in self.digits]

    def caption_lines(self) -> list[str]:
        lines = [f"{len(self.digits)} coloured digits on a white background."]
        lines += [f"{pos}: {d.color} {d.value}." for pos, d in zip(self.positions, self.digits, strict=True)]
        return lines


def sample_digits(rng: random.Random, hard: bool) -> DigitsScene:
    count = 3 if hard else rng.choice((2, 3))
    digits = tuple(Digit(rng.randint(0, 9), rng.choice(list(COLORS))) for _ in range(count))
    return DigitsScene(digits, tuple(_jitter(rng, 2) for _ in digits))


def _segment_boxes(x: int, y: int) -> dict[str, tuple[int, int, int, int]]:
    w, h, t, mid = DIGIT_WIDTH, DIGIT_HEIGHT, STROKE, DIGIT_HEIGHT // 2
    return {
        "a": (x, y, x + w - 1, y + t - 1),
        "b": (x + w - t, y, x + w - 1, y + mid),
        "c": (x + w - t, y + mid, x + w - 1, y + h - 1),
        "d": (x, y + h - t, x + w - 1, y + h - 1),
        "e": (x, y + mid, x + t - 1, y + h - 1),
        "f": (x, y, x + t - 1, y + mid),
        "g": (x, y + mid - t // 2, x + w - 1, y + mid + t // 2 - 1),
    }


def _draw_digits(scene: DigitsScene, draw: ImageDraw.ImageDraw) -> None:
    top = (scene.size[1] - DIGIT_HEIGHT) // 2
    for digit, center, (dx, dy) in zip(scene.digits, DIGIT_CENTERS[len(scene.digits)], scene.offsets, strict=True):
        boxes = _segment_boxes(center - DIGIT_WIDTH // 2 + dx, top + dy)
        for segment in SEGMENTS[digit.value]:
            draw.rectangle(boxes[segment], fill=COLORS[digit.color])


def _misperceive_digits(scene: DigitsScene, rng: random.Random) -> DigitsScene:
    """Misread one digit as its neighbour value."""
    index = rng.randrange(len(scene.digits))
    digit = scene.digits[index]
    misread = Digit((digit.value + rng.choice((-1, 1))) % 10, digit.color)
    return DigitsScene(scene.digits[:index] + (misread,) + scene.digits[index + 1 :], scene.offsets)


# ---------------------------------------------------------------------------------------------------------------------
# Bars

AXIS_Y = 100  # y of the x axis on the 112x112 canvas
UNIT = 18  # pixels per unit of bar value
BAR_WIDTH = 16
CHART_LEFT, CHART_WIDTH = 8, 96


@dataclass(frozen=True)
class Bar:
    color: str
    value: int


@dataclass(frozen=True)
class BarsScene:
    bars: tuple[Bar, ...]  # left to right, distinct colours

    kind: ClassVar[str] = "bars"
    size: ClassVar[tuple[int, int]] = (112, 112)

    def value_of(self, color: str) -> int:
        return next(b.value for b in self.bars if b.color == color)

    def caption_lines(self) -> list[str]:
        lines = [f"A bar chart with {len(self.bars)} bars on a white background."]
        lines += [f"{b.color} bar: {b.value}." for b in self.bars]
        return lines


def sample_bars(rng: random.Random, hard: bool) -> BarsScene:
    colors = rng.sample(list(COLORS), 4 if hard else rng.choice((3, 4)))
    return BarsScene(tuple(Bar(color, rng.randint(1, MAX_BAR_VALUE)) for color in colors))


def bar_box(scene: BarsScene, index: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), inclusive, of bar `index`; its height is value * UNIT pixels."""
    slot = CHART_WIDTH // len(scene.bars)
    x0 = CHART_LEFT + index * slot + (slot - BAR_WIDTH) // 2
    return (x0, AXIS_Y - scene.bars[index].value * UNIT, x0 + BAR_WIDTH - 1, AXIS_Y - 1)


def _draw_bars(scene: BarsScene, draw: ImageDraw.ImageDraw) -> None:
    for value in range(1, MAX_BAR_VALUE + 1):
        y = AXIS_Y - value * UNIT
        draw.line((CHART_LEFT, y, CHART_LEFT + CHART_WIDTH - 1, y), fill=(215, 215, 215))
    for index, bar in enumerate(scene.bars):
        draw.rectangle(bar_box(scene, index), fill=COLORS[bar.color])
    draw.rectangle((CHART_LEFT, AXIS_Y, CHART_LEFT + CHART_WIDTH - 1, AXIS_Y + 1), fill=(0, 0, 0))


def _misperceive_bars(scene: BarsScene, rng: random.Random) -> BarsScene:
    """Misread one bar's value by one unit."""
    index = rng.randrange(len(scene.bars))
    bar = scene.bars[index]
    value = bar.value + (1 if bar.value == 1 else -1 if bar.value == MAX_BAR_VALUE else rng.choice((-1, 1)))
    return BarsScene(scene.bars[:index] + (Bar(bar.color, value),) + scene.bars[index + 1 :])


# ---------------------------------------------------------------------------------------------------------------------
# Common interface

Scene = ShapesScene | DigitsScene | BarsScene
SCENE_KINDS: tuple[str, ...] = ("shapes", "digits", "bars")
_SAMPLERS = {"shapes": sample_shapes, "digits": sample_digits, "bars": sample_bars}
_DRAWERS = {"shapes": _draw_shapes, "digits": _draw_digits, "bars": _draw_bars}
_MISPERCEIVERS = {"shapes": _misperceive_shapes, "digits": _misperceive_digits, "bars": _misperceive_bars}


def sample_scene(kind: str, rng: random.Random, hard: bool = False) -> Scene:
    """A random scene of `kind`; `hard` scenes have more objects (for the alignment subset)."""
    return _SAMPLERS[kind](rng, hard)


def misperceive(scene: Scene, rng: random.Random) -> Scene:
    """The scene as a weaker demonstrator sees it: one object missed, added or misread."""
    return _MISPERCEIVERS[scene.kind](scene, rng)


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", scene.size, BACKGROUND)
    _DRAWERS[scene.kind](scene, ImageDraw.Draw(image))
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding with fixed settings (and no metadata chunks), so equal images give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def content_key(scene: Scene) -> str:
    """What a scene shows, without the pixel offsets: two scenes with equal keys carry the same information."""
    data = scene_to_dict(scene)
    data.pop("offsets", None)
    return json.dumps(data, sort_keys=True)


def scene_to_dict(scene: Scene) -> dict[str, Any]:
    return {"kind": scene.kind, **asdict(scene)}


def scene_from_dict(data: dict[str, Any]) -> Scene:
    """Inverse of `scene_to_dict` (after a JSON round trip, which turns tuples into lists)."""
    offsets = tuple(tuple(o) for o in data.get("offsets", ()))
    if data["kind"] == "shapes":
        return ShapesScene(tuple(ShapeObject(**o) for o in data["objects"]), offsets)
    if data["kind"] == "digits":
        return DigitsScene(tuple(Digit(**d) for d in data["digits"]), offsets)
    if data["kind"] == "bars":
        return BarsScene(tuple(Bar(**b) for b in data["bars"]))
    raise ValueError(f"unknown scene kind {data['kind']!r}")
