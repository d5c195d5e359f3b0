"""
The toy multimodal world: a Pillow-rendered "shape world", four task families that mirror the
paper's (METHOD.md §8), the text tokenizer and the unified vocabulary of text words + VQ codes
(METHOD.md §1), the shared sequence layout and batching, and a JSONL loader for your own data (§8).

Paper mapping. LaViDa-R1 (arXiv 2602.14147) post-trains on four kinds of data; each becomes a family:
  * visual math / VQA (MathVista-like,       -> `vqa`:    counting, arithmetic over counts, "sides"
    arXiv 2310.02255)
  * reason-intensive grounding (LISA-like,   -> `ground`: a referring expression that needs reasoning;
    arXiv 2308.00692)                                     the answer is a box in pixel coordinates
  * image editing with reasoning (ImgEdit,   -> `edit`:   recolour / remove / move / add (with
    arXiv 2505.20275)                                     data.edit_max_level: two of them, or a colour
                                                          constraint with many right pictures); the
                                                          response is a short plan followed
                                                          by the edited image's VQ tokens (the "planning"
                                                          of LaViDa-O, arXiv 2509.19244)
  * text-to-image (SFT only, as in the paper)-> `t2i`:    a scene description -> the image's VQ tokens

Every scene is a `grid x grid` board; each cell is empty or holds one shape (kind, colour, size).
With data.shades / fills / floors above 1 (the looks world; off by default), each cell of a picture
also has a look that no prompt names and no reward scores (a shape's shade and fill, an empty cell's
floor; "looks" below), so a description does not fix its picture. Because
shapes are cell-aligned, `read_scene` can re-read every scored attribute from a picture exactly under
every look, and that one function scores edits, text-to-image, and the VQ tokenizer's reconstructions.

Each family yields four disjoint pools, as in the paper's data (plus a validation split):
  sft  -- prompt + full step-by-step reasoning trace + answer (deliberately small: data.n_sft)
  rl   -- prompt + ground-truth answer / box / target only, no trace (data.n_rl): verifiable rewards
          need no traces
  val  -- the quick evals during training and the choice of best checkpoints
  eval -- held out; any (scene, prompt) that also occurs in another pool is dropped.
Difficulty levels (draw_level, bucket; METHOD.md §8) grade vqa by composition (1: count, compare;
2: add, diff, sides; 3, 4: sums of three or four lists), grounding by relation depth (1-3) and edit
by what one instruction asks (1: one operation, 2: two, 3: a colour constraint over rows or columns,
4: over both), over the same scenes; each split draws from its own levels
(data.sft_levels / rl_levels / eval_levels), so answer-only prompts can sit beyond the traced range.
The traced pool can come from an imperfect teacher (data.teacher_slip: random miscounts carried
through to a wrong answer; data.teacher_bias: colours the teacher always overcounts by one;
data.teacher_box_pad: grounding boxes drawn this many pixels too loose on every side), as distilled
reasoning data and human annotations really do. Only the sft pool's traces and answers change: the
rl and eval pools keep the ground truth, so the rewards measure the truth.

Sequence layout (all families share it, so positions mean the same thing in every batch):
    [task tag] [<boi> image codes <eoi>] prompt words [PAD ...] | response (R_f positions) [PAD ...]
    |<-------------------- P = fixed prompt width -------------->|
  vqa/ground response: <think> trace </think> [EOS ...] <answer> z </answer>     (answer at the END,
                       so answer-forcing's canvas "[M] ... [M] <answer> z </answer>" is in-distribution)
  edit response:       <think> plan </think> [EOS ...] then n_img image codes
  t2i response:        n_img image codes
Text positions are masked with [MASK], image positions with [IMASK] (LaViDa-O also keeps a separate
VQ mask id), so the model always knows which modality a masked slot holds.

Simplified away (METHOD.md §9): real images and benchmarks (a synthetic world whose answers are
exactly checkable), SigLIP features (images enter only as VQ codes), digits drawn in the image, real
charts, a word-level tokenizer instead of a BPE one.

Exercise it: python data.py (prints samples) ; python -m pytest tests/test_data.py -q
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from config import TASKS, ConfigError, get_config   # family names live in one place (config.py imports nothing of ours)

# ----------------------------------------------------------------------------------------------
# the world

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
KINDS = ("circle", "square", "triangle")
SIZES = ("small", "large")
SIDES = {"circle": 0, "square": 4, "triangle": 3}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
SUPERSAMPLE = 4          # draw at 4x and box-filter down: anti-aliased, so kinds stay distinct at 8 px


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str

    def words(self) -> str:
        return f"{self.size} {self.colour} {self.kind}"


# A scene is a tuple of grid*grid cells, row-major, each a Shape or None.
Scene = tuple


def cell_name(i: int, grid: int) -> str:
    """Name of cell i (row-major) of a grid x grid board: "r{row}c{col}", e.g. cell 6 of 4x4 -> "r1c2"."""
    return f"r{i // grid}c{i % grid}"


def scene_key(scene: Scene) -> str:
    """A short string identifying the scene (one 3-letter code or "." per cell), for de-duplication."""
    return "|".join("." if s is None else f"{s.kind[0]}{s.colour[0]}{s.size[0]}" for s in scene)


def random_scene(rng: np.random.Generator, grid: int, min_shapes: int, max_shapes: int) -> Scene:
    """A grid*grid tuple with n ~ U{min_shapes..max_shapes} shapes in distinct random cells, each of
    a uniformly random kind, colour and size; None elsewhere."""
    n = int(rng.integers(min_shapes, max_shapes + 1))
    cells = rng.choice(grid * grid, size=n, replace=False)
    scene = [None] * (grid * grid)
    for c in cells:
        scene[int(c)] = Shape(KINDS[rng.integers(3)], list(COLOURS)[rng.integers(4)], SIZES[rng.integers(2)])
    return tuple(scene)


def _inset(size: str, cell: int) -> int:
    # large shapes leave a 1/8-cell margin, small ones a 1/4-cell margin (8 px cell: 6 px vs 4 px)
    return max(1, cell // 8) if size == "large" else cell // 4


def shape_box(i: int, shape: Shape, grid: int, image_size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), x1/y1 exclusive, of the shape in cell i. Grounding's answer."""
    cell = image_size // grid
    r, c = divmod(i, grid)
    m = _inset(shape.size, cell)
    return (c * cell + m, r * cell + m, (c + 1) * cell - m, (r + 1) * cell - m)


# ----------------------------------------------------------------------------------------------
# looks: what a picture shows that no prompt names and no reward scores (METHOD.md §8)
#
# A real prompt leaves most of a picture open (texture, lighting, background), so the image tokens
# of text-to-image and editing carry real conditional entropy. The shape world gets the same with
# three per-cell nuisance attributes, drawn independently and uniformly:
#   a shape's shade   its colour at one of data.shades brightness levels        (SHADES)
#   a shape's fill    solid or one of data.fills - 1 patterns of dimmed pixels  (FILLS)
#   an empty floor    black or one of data.floors - 1 dim grey patterns         (FLOORS)
# A cell's look is one integer: shade * 4 + fill for a shape (FILLS_MAX = 4 fill patterns exist),
# the floor for an empty cell; with shades 3, fills 4, floors 6 (the looks world) a shape has 3 x 4 =
# 12 looks and an empty cell 6 (entropy ln 12 and ln 6 nats).
# None of them moves a shape's box (grounding's answer) or changes what read_scene reads: kind,
# colour and size stay exactly recoverable from every look (tests/test_data.py checks every one).
# data.shades = data.fills = data.floors = 1 (the default) is the world without nuisance (one look per
# content).

SHADES = (1.0, 0.82, 0.66)                       # brightness factors of the palette colour
DIM = 0.55                                       # a fill pattern's dimmed pixels keep this share
FLOOR_GREY = (0, 52, 40, 48, 44, 52)             # peak grey level of each floor (0 = black)
EMPTY_PEAK = 88                                  # a cell whose brightest pixel is below this is empty:
                                                 # floors peak at <= 52, the darkest shape at 0.66 x 180


def _fill_map(fill: int, cell: int) -> np.ndarray:
    """(cell, cell) brightness factors of fill pattern `fill`: 0 solid, 1 horizontal stripes,
    2 vertical stripes, 3 checker (the odd rows / columns / squares dimmed to DIM)."""
    y, x = np.mgrid[:cell, :cell]
    odd = [np.zeros_like(y, dtype=bool), y % 2 == 1, x % 2 == 1, (x + y) % 2 == 1][fill]
    return np.where(odd, DIM, 1.0).astype(np.float32)


def _floor_map(floor: int, cell: int) -> np.ndarray:
    """(cell, cell) grey levels (0-255) of floor pattern `floor`: 0 black, 1 four dots, 2 a centre
    cross, 3 a frame, 4 a diagonal, 5 one speck."""
    f = np.zeros((cell, cell), dtype=np.float32)
    q, h = cell // 4, cell // 2
    if floor == 1:
        f[q::h, q::h] = 1
    elif floor == 2:
        f[h, :] = f[:, h] = 1
    elif floor == 3:
        f[0, :] = f[-1, :] = f[:, 0] = f[:, -1] = 1
    elif floor == 4:
        f[np.arange(cell), np.arange(cell)] = 1
    elif floor == 5:
        f[h - 1, h] = 1
    return f * FLOOR_GREY[floor]


FILLS_MAX = 4
MAX_LOOKS = {"shades": len(SHADES), "fills": FILLS_MAX, "floors": len(FLOOR_GREY)}   # config ranges (validate)


def random_look(rng: np.random.Generator, shape: Shape | None, d) -> int:
    """One cell's look, uniform over the data config's (d.shades, d.fills, d.floors): one draw."""
    if shape is None:
        return int(rng.integers(d.floors))
    shade, fill = divmod(int(rng.integers(d.shades * d.fills)), d.fills)
    return shade * FILLS_MAX + fill


def random_looks(rng: np.random.Generator, scene: Scene, d) -> tuple | None:
    """One uniformly random look per cell, or None (draws nothing) when the world has no nuisance."""
    if d.shades * d.fills == 1 and d.floors == 1:
        return None
    return tuple(random_look(rng, s, d) for s in scene)


def edited_looks(source: Scene, target: Scene, looks: tuple | None, rng: np.random.Generator, d) -> tuple | None:
    """The looks of an edit's target picture: a cell the edit leaves alone keeps its look (an editor
    copies what it was not asked to touch); a changed cell gets a fresh random one."""
    if looks is None:
        return None
    return tuple(lk if s == t else random_look(rng, t, d) for s, t, lk in zip(source, target, looks))


def render(scene: Scene, grid: int, image_size: int, looks: tuple | None = None) -> np.ndarray:
    """Scene -> (H, W, 3) uint8 picture on a black background. looks: one int per cell (see above;
    None = every cell's look 0: full colour, solid, black floor)."""
    S = SUPERSAMPLE
    img = Image.new("RGB", (image_size * S, image_size * S), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    for i, sh in enumerate(scene):
        if sh is None:
            continue
        x0, y0, x1, y1 = (v * S for v in shape_box(i, sh, grid, image_size))
        col = COLOURS[sh.colour]
        if sh.kind == "circle":
            draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=col)
        elif sh.kind == "square":
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=col)
        else:  # apex at the top centre, base along the bottom
            draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=col)
    img = img.resize((image_size, image_size), Image.BOX)
    if looks is None or not any(looks):
        return np.asarray(img, dtype=np.uint8)
    out = np.asarray(img, dtype=np.float32).copy()
    cell = image_size // grid
    for i, (sh, lk) in enumerate(zip(scene, looks)):
        r, c = divmod(i, grid)
        patch = out[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]                    # (c, c, 3) view
        if sh is None:
            patch += _floor_map(lk, cell)[..., None]
        else:
            shade, fill = divmod(lk, FILLS_MAX)
            patch *= (SHADES[shade] * _fill_map(fill, cell))[..., None]
    return np.clip(out.round(), 0, 255).astype(np.uint8)


_TEMPLATES: dict = {}


def _templates(grid: int, image_size: int) -> tuple[list[Shape], np.ndarray]:
    """Brightness maps of every (kind, size) drawn in cell 0, unit-normalised: (6, c*c)."""
    key = (grid, image_size)
    if key not in _TEMPLATES:
        cell = image_size // grid
        shapes = [Shape(k, "red", s) for k in KINDS for s in SIZES]
        maps = []
        for sh in shapes:
            img = render((sh,) + (None,) * (grid * grid - 1), grid, image_size)
            a = img[:cell, :cell].max(-1).astype(np.float32).ravel()
            maps.append(a / np.linalg.norm(a))
        _TEMPLATES[key] = (shapes, np.stack(maps))
    return _TEMPLATES[key]


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """Colours (..., 3) scaled so that their brightest channel is 1: a shade changes brightness, not this."""
    return rgb / np.maximum(rgb.max(-1, keepdims=True), 1e-6)


def read_scene(img: np.ndarray, grid: int) -> Scene:
    """Re-read every cell's (kind, colour, size) from a picture: (H, W, 3) uint8 or float in [0, 1].

    This is the scorer for edits and text-to-image, and the attribute-recovery check of the VQ
    tokenizer. It reads the scored content under every look (shade, fill, floor). Per cell:
    brightness = max over RGB; empty if the brightest pixel is below EMPTY_PEAK (a floor, or
    nothing); colour = the palette entry nearest in chroma (colour / its brightest channel, which no
    shade changes) to the mean of the bright pixels; kind and size = the template with the highest
    cosine similarity to the brightness map divided by a fill pattern, the best over every pattern
    (the right pattern undoes the fill exactly).
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    image_size = img.shape[0]
    cell = image_size // grid
    shapes, maps = _templates(grid, image_size)
    unfill = np.stack([1.0 / _fill_map(f, cell).ravel() for f in range(FILLS_MAX)])   # (F, c*c)
    palette = _chroma(np.array(list(COLOURS.values()), dtype=np.float32))
    out = []
    for i in range(grid * grid):
        r, c = divmod(i, grid)
        patch = img[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].astype(np.float32)   # (c, c, 3)
        bright = patch.max(-1).ravel()                                                      # (c*c,)
        if bright.max() < EMPTY_PEAK:
            out.append(None)
            continue
        px = patch.reshape(-1, 3)[bright > 0.5 * bright.max()]
        colour = list(COLOURS)[int(((palette - _chroma(px.mean(0))) ** 2).sum(1).argmin())]
        undone = bright[None] * unfill                                                      # (F, c*c)
        sim = (undone / (np.linalg.norm(undone, axis=1, keepdims=True) + 1e-8)) @ maps.T    # (F, 6)
        best = shapes[int(sim.max(0).argmax())]
        out.append(Shape(best.kind, colour, best.size))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# task families. Each maker returns (prompt, trace, answer_text, answer, qtype) or None (rejected).
# `trace` is the step-by-step reasoning a (possibly imperfect) teacher writes.

@dataclass
class Teacher:
    slip: float = 0.0      # probability that one count in a trace is off by one
    bias: str = ""         # colours always overcounted by one, comma-separated ("yellow,red")
    rng: np.random.Generator | None = None
    slipped: bool = False  # set when this trace got its one random slip
    box_pad: int = 0       # grounding: the teacher's boxes are this many pixels too big on every side

    def count(self, cells: list[int], colour: str | None) -> int:
        n = len(cells) + (1 if colour is not None and colour in self.bias.split(",") else 0)
        if not self.slipped and self.rng is not None and self.rng.random() < self.slip:
            self.slipped = True
            n = max(0, n + (1 if n == 0 or self.rng.random() < 0.5 else -1))
        return n


def _filters():
    # (phrase used in questions/traces, predicate, the colour it counts if any)
    out = [(f"{c} shapes", (lambda s, c=c: s.colour == c), c) for c in COLOURS]
    out += [(PLURAL[k], (lambda s, k=k: s.kind == k), None) for k in KINDS]
    out += [(f"{z} shapes", (lambda s, z=z: s.size == z), None) for z in SIZES]
    return out


FILTERS = _filters()


def _cells(scene: Scene, pred) -> list[int]:
    return [i for i, s in enumerate(scene) if s is not None and pred(s)]


def _list(cells: list[int], grid: int) -> str:
    return " ".join(cell_name(i, grid) for i in cells) if cells else "none"


# question types by difficulty level: how many lists the answer combines (composition), with the
# per-list reading load the same at every level (one filter over the same scenes)
VQA_LEVELS = {1: ("count", "compare"), 2: ("add", "diff", "sides"), 3: ("add3",), 4: ("add4",)}
VQA_EASY, VQA_HARD = VQA_LEVELS[1], VQA_LEVELS[2]


def make_vqa(scene: Scene, rng, grid: int, level: int, teacher: Teacher):
    """(prompt, trace, the trace's answer, the true answer, qtype) of a level-`level` question:
    1 count / compare, 2 add / diff / sides, 3 the sum of three counts, 4 the sum of four."""
    types = VQA_LEVELS[level]
    qtype = types[rng.integers(len(types))]
    if level >= 3:
        return _sum_of_counts(scene, rng, grid, level, teacher)
    if qtype == "sides":
        cells = [i for i, s in enumerate(scene) if s is not None]
        # the trace lists each shape's sides; a slip miscounts one term of the sum
        terms = [SIDES[scene[i].kind] for i in cells]
        if teacher.rng is not None and teacher.rng.random() < teacher.slip and terms:
            j = int(teacher.rng.integers(len(terms)))
            terms[j] = terms[j] + 1 if terms[j] == 0 or teacher.rng.random() < 0.5 else terms[j] - 1
        total = sum(terms)
        trace = "sides : " + " ".join(f"{cell_name(i, grid)} {t}" for i, t in zip(cells, terms))
        trace += " . " + " + ".join(str(t) for t in terms) + f" = {total}"
        truth = sum(SIDES[scene[i].kind] for i in cells)
        return "how many sides do the shapes have in total ?", trace, str(total), str(truth), qtype
    idx = rng.choice(len(FILTERS), size=2, replace=False)
    (pa, fa, ca), (pb, fb, cb) = FILTERS[idx[0]], FILTERS[idx[1]]
    A, B = _cells(scene, fa), _cells(scene, fb)
    a = teacher.count(A, ca)
    if qtype == "count":
        trace = f"{pa} : {_list(A, grid)} . count {a}"
        return f"how many {pa} are there ?", trace, str(a), str(len(A)), qtype
    b = teacher.count(B, cb)
    trace = f"{pa} : {_list(A, grid)} . count {a} . {pb} : {_list(B, grid)} . count {b} . "
    if qtype == "compare":
        ans = "yes" if a > b else "no"
        trace += f"{a} > {b} {ans}"
        truth = "yes" if len(A) > len(B) else "no"
        return f"are there more {pa} than {pb} ?", trace, ans, truth, qtype
    if qtype == "add":
        trace += f"{a} + {b} = {a + b}"
        return f"how many {pa} plus {pb} ?", trace, str(a + b), str(len(A) + len(B)), qtype
    hi, lo = max(a, b), min(a, b)
    trace += f"{hi} - {lo} = {hi - lo}"
    return (f"what is the difference between the number of {pa} and {pb} ?", trace, str(hi - lo),
            str(abs(len(A) - len(B))), qtype)


def _sum_of_counts(scene: Scene, rng, grid: int, k: int, teacher: Teacher):
    """Level 3 / 4: "how many A plus B plus C ?" over k distinct filters; the trace reads each list,
    counts it, and adds the counts (a filter pair may share shapes: each list counts them)."""
    picks = [FILTERS[i] for i in rng.choice(len(FILTERS), size=k, replace=False)]
    lists = [_cells(scene, f) for _, f, _ in picks]
    counts = [teacher.count(cells, c) for cells, (_, _, c) in zip(lists, picks)]
    trace = " ".join(f"{p} : {_list(cells, grid)} . count {n} ." for (p, _, _), cells, n in zip(picks, lists, counts))
    trace += " " + " + ".join(str(n) for n in counts) + f" = {sum(counts)}"
    prompt = "how many " + " plus ".join(p for p, _, _ in picks) + " ?"
    return prompt, trace, str(sum(counts)), str(sum(len(c) for c in lists)), f"add{k}"


GROUND_LEVELS = {1: ("unique",), 2: ("odd_colour", "left_of", "above"), 3: ("two_hop",)}
GROUND_EASY, GROUND_HARD = GROUND_LEVELS[1], GROUND_LEVELS[2]
MAX_LEVEL = {"vqa": max(VQA_LEVELS), "ground": max(GROUND_LEVELS), "edit": 4}   # t2i has level 1 only


def _relation(scene: Scene, grid: int, anchor: int, rel: str) -> tuple[list[int], str, int] | None:
    """The shapes left of (same row, before) or above (same column, before) `anchor`, and a size word
    that picks exactly one of them: (candidates, size, the picked cell), or None."""
    r, c = divmod(anchor, grid)
    cand = [r * grid + j for j in range(c)] if rel == "left_of" else [i * grid + c for i in range(r)]
    cand = [i for i in cand if scene[i] is not None]
    for size in SIZES:
        pick = [i for i in cand if scene[i].size == size]
        if len(pick) == 1:
            return cand, size, pick[0]
    return None


def _two_hop(scene: Scene, rng, grid: int):
    """Level 3 grounding: "the small shape above the large shape left of the red circle": two
    relations chained from a uniquely named anchor; the trace resolves one hop per clause."""
    uniq = _unique_pairs(scene)
    rng.shuffle(uniq)
    for anchor in uniq:
        for rel1, rel2 in (("left_of", "above"), ("above", "left_of"), ("left_of", "left_of"), ("above", "above")):
            hop1 = _relation(scene, grid, anchor, rel1)
            hop2 = hop1 and _relation(scene, grid, hop1[2], rel2)
            if not hop2:
                continue
            a = scene[anchor]
            word = {"left_of": "left", "above": "above"}
            phrase = {"left_of": "left of", "above": "above"}
            trace = (f"{a.colour} {a.kind} : {cell_name(anchor, grid)} . {word[rel1]} : {_list(hop1[0], grid)} . "
                     f"{hop1[1]} : {cell_name(hop1[2], grid)} . {word[rel2]} : {_list(hop2[0], grid)} . "
                     f"{hop2[1]} : {cell_name(hop2[2], grid)}")
            prompt = (f"where is the {hop2[1]} shape {phrase[rel2]} the {hop1[1]} shape {phrase[rel1]} "
                      f"the {a.colour} {a.kind} ?")
            return prompt, trace, hop2[2], "two_hop"
    return None


def _unique_pairs(scene: Scene) -> list[int]:
    """Cells whose (colour, kind) pair occurs exactly once: nameable as 'the red circle'."""
    pairs = [(s.colour, s.kind) if s else None for s in scene]
    return [i for i, p in enumerate(pairs) if p is not None and pairs.count(p) == 1]


def make_ground(scene: Scene, rng, grid: int, level: int):
    """Returns (prompt, trace, target cell, qtype) or None when this scene cannot pose the question.
    Levels by relation depth: 1 a unique (colour, kind), 2 one relation (left of / above) or the
    odd colour out, 3 two chained relations."""
    if level >= 3:
        return _two_hop(scene, rng, grid)
    qtype = GROUND_HARD[rng.integers(3)] if level == 2 else "unique"
    uniq = _unique_pairs(scene)
    if qtype == "unique":
        if not uniq:
            return None
        t = int(rng.choice(uniq))
        s = scene[t]
        return f"where is the {s.colour} {s.kind} ?", f"{s.colour} {s.kind} : {cell_name(t, grid)}", t, qtype
    if qtype == "odd_colour":
        counts = {c: sum(1 for s in scene if s and s.colour == c) for c in COLOURS}
        once = [c for c, n in counts.items() if n == 1]
        if len(once) != 1:
            return None
        t = next(i for i, s in enumerate(scene) if s and s.colour == once[0])
        trace = " ".join(f"{c} {n}" for c, n in counts.items() if n) + f" . once : {once[0]} . "
        trace += f"{once[0]} : {cell_name(t, grid)}"
        return "where is the shape whose colour appears only once ?", trace, t, qtype
    # relational: anchor named by a unique (colour, kind); candidates in the same row (left_of)
    # or column (above) before it; a size word picks exactly one of them
    rng.shuffle(uniq)
    for anchor in uniq:
        hop = _relation(scene, grid, anchor, qtype)
        if hop:
            (cand, size, pick), a = hop, scene[anchor]
            rel = "left of" if qtype == "left_of" else "above"
            trace = (f"{a.colour} {a.kind} : {cell_name(anchor, grid)} . {rel.split()[0]} : "
                     f"{_list(cand, grid)} . {size} : {cell_name(pick, grid)}")
            return f"where is the {size} shape {rel} the {a.colour} {a.kind} ?", trace, pick, qtype
    return None


EDIT_TYPES = ("recolour", "remove", "move", "add")


def make_edit(scene: Scene, rng, grid: int, level: int = 1):
    """Returns (prompt, plan, target scene, qtype) or None. Levels by what one instruction asks:
    1 one operation (recolour / remove / move / add), 2 two operations on different cells, 3 a colour
    constraint over the rows or the columns, 4 over both (constraint_edit). Levels 1-2 have one right
    picture; 3-4 have many (rewards.constraint_score grades them)."""
    if level >= 3:
        return constraint_edit(scene, rng, grid, ("rows", "cols") if level >= 4 else (("rows", "cols")[rng.integers(2)],))
    if level == 2:
        return _two_edits(scene, rng, grid)
    qtype = EDIT_TYPES[rng.integers(4)]
    out = _one_edit(scene, rng, grid, qtype, set())
    return None if out is None else (*out[:3], qtype)


def _one_edit(scene: Scene, rng, grid: int, qtype: str, busy: set[int], also: Scene | None = None):
    """One operation on `scene` that touches no cell of `busy`: (prompt, plan, target, the cells it
    touches), or None. Shapes are named by a (colour, kind) pair unique in the scene (and in `also`,
    the picture after a first operation, so that the name stays unambiguous there too)."""
    still = set(_unique_pairs(also)) if also is not None else None          # nameable after the first op
    uniq = [i for i in _unique_pairs(scene) if i not in busy and (still is None or i in still)]
    empty = [i for i, s in enumerate(scene) if s is None and i not in busy]
    tgt = list(scene)
    if qtype == "add":
        if not empty:
            return None
        j = int(rng.choice(empty))
        new = Shape(KINDS[rng.integers(3)], list(COLOURS)[rng.integers(4)], SIZES[rng.integers(2)])
        tgt[j] = new
        return (f"add a {new.size} {new.colour} {new.kind} at {cell_name(j, grid)}",
                f"{cell_name(j, grid)} empty . add", tuple(tgt), {j})
    if not uniq:
        return None
    t = int(rng.choice(uniq))
    s = scene[t]
    name = f"{s.colour} {s.kind}"
    if qtype == "recolour":
        newc = [c for c in COLOURS if c != s.colour][rng.integers(3)]
        tgt[t] = Shape(s.kind, newc, s.size)
        return f"make the {name} {newc}", f"{name} : {cell_name(t, grid)} . recolour {newc}", tuple(tgt), {t}
    if qtype == "remove":
        tgt[t] = None
        return f"remove the {name}", f"{name} : {cell_name(t, grid)} . remove", tuple(tgt), {t}
    if not empty:
        return None
    j = int(rng.choice(empty))
    tgt[t], tgt[j] = None, s
    return (f"move the {name} to {cell_name(j, grid)}",
            f"{name} : {cell_name(t, grid)} . move {cell_name(j, grid)}", tuple(tgt), {t, j})


def _two_edits(scene: Scene, rng, grid: int):
    """Level 2: "A and B", two operations on disjoint cells, both naming shapes of the ORIGINAL
    picture by pairs that the first operation leaves unique; the plan is the two one-operation plans
    in order."""
    q1, q2 = (EDIT_TYPES[i] for i in rng.integers(4, size=2))
    first = _one_edit(scene, rng, grid, q1, set())
    if first is None:
        return None
    p1, plan1, mid, busy = first
    # the second operation names shapes of the original picture and touches none of the first's cells
    second = _one_edit(scene, rng, grid, q2, busy | {i for i, (a, b) in enumerate(zip(scene, mid)) if a != b}, also=mid)
    if second is None:
        return None
    p2, plan2, _, cells = second
    tgt = list(mid)
    for i in cells:                       # apply the second operation's changes on top of the first
        tgt[i] = second[2][i]
    return f"{p1} and {p2}", f"{plan1} . {plan2}", tuple(tgt), "two_ops"


UNITS = {"rows": "row", "cols": "column"}


def unit_cells(kind: str, grid: int) -> list[list[int]]:
    """The cells of every row ("rows") or column ("cols") of the board, row-major."""
    return [[r * grid + c for c in range(grid)] if kind == "rows" else [c * grid + r for c in range(grid)]
            for r in range(grid)]


def repeats(scene: Scene, cells: list[int]) -> list[str]:
    """The colours that occur more than once among the shapes of `cells`, in palette order."""
    cols = [scene[i].colour for i in cells if scene[i] is not None]
    return [c for c in COLOURS if cols.count(c) > 1]


def colour_conflicts(scene: Scene, kinds: tuple[str, ...], grid: int) -> int:
    """How many units (rows and/or columns) repeat a colour."""
    return sum(bool(repeats(scene, u)) for k in kinds for u in unit_cells(k, grid))


MAX_RECOLOURS = 3      # constraint edits whose fewest recolours exceed this are not posed


def fewest_recolours(scene: Scene, kinds: tuple[str, ...], grid: int, rng) -> Scene | None:
    """A recolouring of `scene` with no colour repeated in any unit of `kinds` that changes as few
    shapes as possible (at most MAX_RECOLOURS, else None): the subsets of conflicting shapes by size,
    then every colouring of a subset, each in a random order, and the first valid one is returned (a
    random fewest solution, not uniform over all of them). Only shapes in a conflict are recoloured (a
    rare scene that needs another shape changed is not posed), and a unit holding more shapes than
    there are colours can never be fixed (None at once)."""
    units = [u for k in kinds for u in unit_cells(k, grid)]
    if any(sum(scene[i] is not None for i in u) > len(COLOURS) for u in units):
        return None
    involved = sorted({i for u in units for i in u if scene[i] is not None and scene[i].colour in repeats(scene, u)})
    names = list(COLOURS)
    for k in range(1, min(MAX_RECOLOURS, len(involved)) + 1):
        subsets = [list(s) for s in itertools.combinations(involved, k)]
        for si in rng.permutation(len(subsets)):
            cells = subsets[si]
            for ci in rng.permutation(4 ** k):
                new = list(scene)
                for j, cell in enumerate(cells):
                    colour = names[(int(ci) >> (2 * j)) & 3]
                    new[cell] = Shape(scene[cell].kind, colour, scene[cell].size)
                if any(new[c] == scene[c] for c in cells):
                    continue                    # a "recolour" to its own colour is not a change
                if colour_conflicts(tuple(new), kinds, grid) == 0:
                    return tuple(new)
    return None


def constraint_edit(scene: Scene, rng, grid: int, kinds: tuple[str, ...]):
    """Levels 3-4: "recolour shapes so that no row (and no column) repeats a colour", posed only on
    scenes that break it. The target is one fewest-recolours solution (any valid picture scores,
    rewards.constraint_score); the plan names each broken unit with its repeated colours, then the
    recolours: "row1 red . r1c3 yellow"."""
    if colour_conflicts(scene, kinds, grid) == 0:
        return None
    tgt = fewest_recolours(scene, kinds, grid, rng)
    if tgt is None:
        return None
    broken = [f"{UNITS[k][:3]}{n} " + " ".join(repeats(scene, u))
              for k in kinds for n, u in enumerate(unit_cells(k, grid)) if repeats(scene, u)]
    changes = [f"{cell_name(i, grid)} {t.colour}" for i, (s, t) in enumerate(zip(scene, tgt)) if s != t]
    what = " and no ".join(UNITS[k] for k in kinds)
    qtype = "_".join(kinds)
    return (f"recolour shapes so that no {what} repeats a colour", " . ".join(broken) + " . " + " ".join(changes),
            tgt, qtype)


CONSTRAINT_EDITS = {"rows": ("rows",), "cols": ("cols",), "rows_cols": ("rows", "cols")}   # qtype -> units


def describe(scene: Scene, grid: int) -> str:
    """The text-to-image prompt: every shape with its attributes and cell, in reading order
    ("large red circle r1c1 , small blue square r3c2"); empty cells are not mentioned."""
    parts = [f"{s.words()} {cell_name(i, grid)}" for i, s in enumerate(scene) if s is not None]
    return " , ".join(parts)


# ----------------------------------------------------------------------------------------------
# examples and pools

@dataclass
class Example:
    task: str                     # vqa | ground | edit | t2i
    qtype: str                    # question type within the family (for per-type metrics)
    prompt: str                   # question / instruction / description (words)
    scene: Scene | None           # the input picture's scene (None for t2i)
    answer: object                # vqa: "3"/"yes"; ground: (x0,y0,x1,y1); edit/t2i: a Scene
    trace: str | None = None      # reasoning text (sft pool only; None in the answer-only RL pool)
    answer_text: str | None = None  # the answer the trace ends in (may be wrong: imperfect teacher)
    image: np.ndarray | None = None         # input picture; rendered from `scene` unless user-given
    target_image: np.ndarray | None = None  # edit/t2i target picture (kept for scoring, never shown)
    key: str = ""                 # (scene, prompt) identity, for split disjointness
    split: str = ""               # JSONL rows only: the split a row asks for ("" = by its trace)
    teacher_answer: str | None = None  # eval split, biased teacher only: what the sft teacher would
                                  # have answered (eval.py measures how much of its error a model copies)
    level: int = 1                # difficulty (vqa: lists combined, ground: relation depth, edit:
                                  # operations / constraints; t2i 1)
    looks: tuple | None = None    # the input picture's per-cell looks (nuisance; None = all 0)
    target_looks: tuple | None = None   # edit / t2i: the target picture's looks


def box_text(box) -> str:
    return " ".join(str(int(v)) for v in box)


def parse_levels(text: str) -> tuple[int, ...]:
    """'1,2' -> (1, 2): a split's difficulty levels (config.validate checks the range)."""
    return tuple(sorted({int(v) for v in text.split(",") if v.strip()}))


def draw_level(rng, levels: tuple[int, ...], hard_frac: float, top: int) -> int:
    """The level of one example, from the split's `levels` clipped to the family's `top` (the top
    level when none is left). The original world, levels (1, 2), keeps its draw exactly: level 2
    with probability hard_frac; any other set is drawn uniformly."""
    levels = tuple(v for v in levels if v <= top) or (top,)
    hard = rng.random() < hard_frac           # always drawn: the pools of levels (1, 2) stay as they were
    if levels == (1, 2):
        return 2 if hard else 1
    return levels[int(rng.integers(len(levels)))] if len(levels) > 1 else levels[0]


def bucket(level: int, sft_levels: tuple[int, ...]) -> str:
    """in (at most the highest level traced in SFT), edge (one above it) or far (two or more)."""
    top = max(sft_levels)
    return "in" if level <= top else "edge" if level == top + 1 else "far"


def _make_example(task, scene, rng, cfg, teacher: Teacher | None, levels: tuple[int, ...] = (1, 2)) -> Example | None:
    d = cfg
    top = min(MAX_LEVEL["edit"], d.edit_max_level) if task == "edit" else MAX_LEVEL.get(task, 1)
    level = draw_level(rng, levels, d.hard_frac, top)      # every family draws: same streams
    if task == "vqa":
        q, trace, ans_text, truth, qtype = make_vqa(scene, rng, d.grid, level, teacher or Teacher())
        ex = Example(task, qtype, q, scene, truth, trace, ans_text)
    elif task == "ground":
        out = make_ground(scene, rng, d.grid, level)
        if out is None:
            return None
        q, trace, cell, qtype = out
        box = shape_box(cell, scene[cell], d.grid, d.image_size)
        shown = box
        if teacher is not None and teacher.box_pad:   # a loose annotator: systematic, never averages out
            p = teacher.box_pad
            shown = (max(0, box[0] - p), max(0, box[1] - p), min(d.image_size, box[2] + p),
                     min(d.image_size, box[3] + p))
        ex = Example(task, qtype, q, scene, box, trace, box_text(shown))
    elif task == "edit":
        out = make_edit(scene, rng, d.grid, level)
        if out is None:
            return None
        q, plan, target, qtype = out
        ex = Example(task, qtype, q, scene, target, plan)
    else:
        ex = Example("t2i", "t2i", describe(scene, d.grid), None, scene, "")
    ex.key, ex.level = f"{task}|{scene_key(scene)}|{ex.prompt}", level
    return ex


SPLITS = ("sft", "rl", "eval", "val")   # val: model selection, so that eval stays held out


def build_pools(dcfg) -> dict[str, dict[str, list[Example]]]:
    """All synthetic examples: pools[task][split]. Deterministic in dcfg (seed and sizes).

    Example i of (task, split) is drawn from its own generator seeded by (seed, task, split, i), so
    changing n_rl does not change the sft pool. Disjointness: each split drops the keys seen in the
    splits before it (rl: sft; eval: sft, rl; val: all three), so val (model selection) never
    overlaps the held-out eval split. The scenes are random, so collisions are rare but possible.
    ConfigError if data.teacher_bias names an unknown colour.
    """
    sizes = {"sft": dcfg.n_sft, "rl": dcfg.n_rl, "eval": dcfg.n_eval, "val": dcfg.n_val}
    levels = {"sft": parse_levels(dcfg.sft_levels), "rl": parse_levels(dcfg.rl_levels),
              "eval": parse_levels(dcfg.eval_levels), "val": parse_levels(dcfg.eval_levels)}
    bad = [c for c in dcfg.teacher_bias.split(",") if c and c not in COLOURS]
    if bad:     # a typo would silently give an unbiased teacher
        raise ConfigError(f"--data.teacher_bias={dcfg.teacher_bias!r}: unknown colour(s) {bad}; "
                          f"use a comma list of {', '.join(COLOURS)}")
    pools: dict[str, dict[str, list[Example]]] = {}
    for ti, task in enumerate(TASKS):   # ti seeds the family's draws: a family removed or added at
        seen: set[str] = set()          # the END of TASKS leaves the others' pools unchanged
        pools[task] = {}
        for si, split in enumerate(SPLITS):
            out, i = [], 0
            while len(out) < sizes[split]:
                rng = np.random.default_rng([dcfg.seed, ti, si, i])
                i += 1
                scene = random_scene(rng, dcfg.grid, dcfg.min_shapes, dcfg.max_shapes)
                teacher = (Teacher(dcfg.teacher_slip, dcfg.teacher_bias, rng, box_pad=dcfg.teacher_box_pad)
                           if split == "sft" else None)
                ex = _make_example(task, scene, rng, dcfg, teacher, levels[split])
                if ex is None or ex.key in seen:
                    continue
                # the pictures' looks from a stream of their own: the world without nuisance draws
                # nothing more, and its scenes, questions and splits stay what they were
                look_rng = np.random.default_rng([dcfg.seed, ti, si, i - 1, 1])
                ex.looks = None if task == "t2i" else random_looks(look_rng, scene, dcfg)
                if task == "edit":
                    ex.target_looks = edited_looks(scene, ex.answer, ex.looks, look_rng, dcfg)
                elif task == "t2i":           # the prompt fixes the content, never the looks
                    ex.target_looks = random_looks(look_rng, ex.answer, dcfg)
                if split != "sft":          # answer-only pools carry no trace (rewards need none)
                    ex.trace = ex.trace if split in ("eval", "val") else None
                if split in ("eval", "val") and task in ("vqa", "ground") and (dcfg.teacher_bias or dcfg.teacher_box_pad):
                    # the same draw again, answered by the systematic part of the sft teacher (no
                    # slips: rng=None), to tell "learned the truth" from "learned the teacher's error"
                    rng2 = np.random.default_rng([dcfg.seed, ti, si, i - 1])
                    scene2 = random_scene(rng2, dcfg.grid, dcfg.min_shapes, dcfg.max_shapes)
                    twin = _make_example(task, scene2, rng2, dcfg,
                                         Teacher(bias=dcfg.teacher_bias, box_pad=dcfg.teacher_box_pad), levels[split])
                    assert twin.key == ex.key
                    ex.teacher_answer = twin.answer_text
                out.append(ex)
            seen.update(e.key for e in out)
            pools[task][split] = out
    return pools


def ensure_images(examples: list[Example], dcfg):
    """Render input and target pictures that are not user-given (cheap: ~0.1 ms per 32 px image)."""
    for ex in examples:
        if ex.image is None and ex.scene is not None:
            ex.image = render(ex.scene, dcfg.grid, dcfg.image_size, ex.looks)
        if ex.target_image is None and ex.task in ("edit", "t2i"):
            ex.target_image = render(ex.answer, dcfg.grid, dcfg.image_size, ex.target_looks)


# ----------------------------------------------------------------------------------------------
# tokenizer and the unified vocabulary

SPECIALS = ["[PAD]", "[MASK]", "[IMASK]", "[EOS]", "[UNK]", "<boi>", "<eoi>", "<think>", "</think>",
            "<answer>", "</answer>", "<vqa>", "<ground>", "<edit>", "<t2i>"]


class Tokenizer:
    """Word-level tokenizer over the task language plus VQ codes at an offset.

    ids: [0, n_special) special tokens | [n_special, img_offset) words | [img_offset, +n_codes) VQ codes.
    Unknown words map to [UNK] and are counted in `self.n_unknown`, never silently dropped.
    """

    def __init__(self, words: list[str], n_codes: int):
        self.itos = SPECIALS + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.n_special = len(SPECIALS)                  # ids below this are special tokens
        self.img_offset = len(self.itos)
        self.n_codes = n_codes
        self.vocab_size = self.img_offset + n_codes
        self.n_unknown = 0
        self.PAD, self.MASK, self.IMASK, self.EOS, self.UNK = range(5)   # SPECIALS[:5]
        # readable aliases for the tags above
        self.BOI, self.EOI = self.stoi["<boi>"], self.stoi["<eoi>"]
        self.THINK, self.ETHINK = self.stoi["<think>"], self.stoi["</think>"]
        self.ANS, self.EANS = self.stoi["<answer>"], self.stoi["</answer>"]
        self.TASK = {t: self.stoi[f"<{t}>"] for t in TASKS}

    @classmethod
    def fit(cls, texts: list[str], n_codes: int, max_number: int = 64, grid: int = 0) -> "Tokenizer":
        """Vocabulary = every word in `texts`, the numbers 0..max_number (answers, box coords) and
        the cell names r0c0.. of a grid x grid board, so that every cell can be named in a trace, plan
        or prompt even when the pools happen never to mention it."""
        words = {w for t in texts for w in t.split()}
        words |= {str(i) for i in range(max_number + 1)}
        words |= {cell_name(i, grid) for i in range(grid * grid)}
        return cls(sorted(words - set(SPECIALS)), n_codes)

    def encode(self, text: str) -> list[int]:
        ids = []
        for w in text.split():
            i = self.stoi.get(w)
            if i is None:
                self.n_unknown += 1
                i = self.UNK
            ids.append(i)
        return ids

    def decode(self, ids, skip: tuple[str, ...] = ("[PAD]", "[EOS]")) -> str:
        """ids -> text; VQ codes print as <img:k>, masks as [MASK]/[IMASK]."""
        out = []
        for i in (ids.tolist() if torch.is_tensor(ids) else ids):
            if i >= self.img_offset:
                out.append(f"<img:{i - self.img_offset}>")
            elif self.itos[i] not in skip:
                out.append(self.itos[i])
        return " ".join(out)

    def state(self) -> dict:
        return {"words": self.itos[len(SPECIALS):self.img_offset], "n_codes": self.n_codes}

    @classmethod
    def from_state(cls, st: dict) -> "Tokenizer":
        return cls(st["words"], st["n_codes"])


def all_texts(pools) -> list[str]:
    """Every prompt, trace and answer text of the pools: the corpus Tokenizer.fit reads."""
    return [t for task in pools.values() for exs in task.values() for ex in exs
            for t in (ex.prompt, ex.trace or "", ex.answer_text or "")]


# ----------------------------------------------------------------------------------------------
# tokenized sets: fixed-width tensors per family, built once (common.get_bundle caches them with the
# VQ codes, so no picture is encoded twice)

@dataclass
class Layout:
    """Per-family response layout: R_text text positions then n_img image positions."""
    R_text: int
    n_img: int
    ans_len: int      # length of the '<answer> z </answer>' block at the end of the text region

    @property
    def R(self) -> int:
        return self.R_text + self.n_img


@dataclass
class TaskSet:
    """One family x split, tokenized. prompt: (N, P) PAD-padded; response: (N, R) or None."""
    task: str
    examples: list[Example]
    prompt: torch.Tensor
    response: torch.Tensor | None
    layout: Layout

    def __len__(self):
        return len(self.examples)


def response_ids(ex: Example, tok: Tokenizer, lay: Layout, target_codes=None) -> list[int]:
    """The SFT target as lay.R ids: <think> trace </think> [EOS...] <answer> z </answer> | image
    codes. target_codes: the target picture's n_img VQ codes (edit/t2i), else None."""
    text = []
    if lay.R_text:
        think = [tok.THINK] + tok.encode(ex.trace or "") + [tok.ETHINK]
        ans = [tok.ANS] + tok.encode(ex.answer_text) + [tok.EANS] if lay.ans_len else []
        if len(think) + len(ans) > lay.R_text:      # user data longer than the canvas: clip the trace
            think = think[:lay.R_text - len(ans) - 1] + [tok.ETHINK]
        text = think + [tok.EOS] * (lay.R_text - len(think) - len(ans)) + ans
    img = [] if lay.n_img == 0 else [tok.img_offset + int(c) for c in target_codes]
    return text + img


def prompt_ids(ex: Example, tok: Tokenizer, codes=None) -> list[int]:
    """[task tag] [<boi> code ... code <eoi>] prompt words, as a list of vocabulary ids.
    codes: the input picture's n_img VQ codes in [0, n_codes), row-major (None: no picture, t2i)."""
    ids = [tok.TASK[ex.task]]
    if codes is not None:
        ids += [tok.BOI] + [tok.img_offset + int(c) for c in codes] + [tok.EOI]
    return ids + tok.encode(ex.prompt)


ANSWER_TASKS = ("vqa", "ground")    # families whose text response ends in an answer block


def answer_ids(ex: Example, tok: Tokenizer) -> list[int]:
    """The '<answer> z </answer>' block of the ground truth: what answer-forcing writes in clear."""
    z = box_text(ex.answer) if ex.task == "ground" else ex.answer
    return [tok.ANS] + tok.encode(z) + [tok.EANS]


def layouts_for(pools, tok: Tokenizer, n_img: int) -> dict[str, Layout]:
    """Fixed response widths per family: the longest traced response over every pool + 2 spare."""
    lay = {}
    for task, splits in pools.items():
        exs = [e for s in splits.values() for e in s]
        ans = max((max(len(answer_ids(e, tok)), len(tok.encode(e.answer_text or "")) + 2) for e in exs),
                  default=0) if task in ANSWER_TASKS else 0
        think = max((len(tok.encode(e.trace)) + 2 for e in exs if e.trace), default=2) if task != "t2i" else 0
        R_text = 0 if task == "t2i" else think + ans + 2
        lay[task] = Layout(R_text, n_img if task in ("edit", "t2i") else 0, ans)
    return lay


def prompt_width(pools, tok: Tokenizer, n_img: int) -> int:
    """The fixed prompt width P: the longest prompt of any family (tag + picture + words), in tokens."""
    per_img = n_img + 2                                 # <boi> codes <eoi>
    return max(1 + (0 if task == "t2i" else per_img) + len(e.prompt.split())
               for task, splits in pools.items() for s in splits.values() for e in s)


def tokenize_split(task: str, examples: list[Example], tok: Tokenizer, lay: Layout, P: int,
                   codes: torch.Tensor | None, target_codes: torch.Tensor | None) -> TaskSet:
    """One family x split as fixed-width tensors. codes: (N, n_img) VQ codes of the input pictures
    (None for t2i); target_codes: (N, n_img) of the target pictures (edit/t2i, else None).
    Returns a TaskSet: prompt (N, P) PAD-padded; response (N, lay.R), or None unless every example
    carries a trace (the answer-only rl pool). ValueError if a prompt is longer than P."""
    N = len(examples)
    prompt = torch.full((N, P), tok.PAD, dtype=torch.long)
    traced = all(e.trace is not None for e in examples) and N > 0
    response = torch.full((N, lay.R), tok.PAD, dtype=torch.long) if traced else None
    for n, ex in enumerate(examples):
        p = prompt_ids(ex, tok, None if codes is None else codes[n])
        if len(p) > P:
            raise ValueError(f"{task} prompt of {len(p)} tokens exceeds the prompt width P={P}: "
                             f"shorten it or raise the width (it is computed from the pools)")
        prompt[n, :len(p)] = torch.tensor(p)
        if response is not None:
            response[n] = torch.tensor(response_ids(ex, tok, lay, None if target_codes is None else target_codes[n]))
    return TaskSet(task, examples, prompt, response, lay)


# ----------------------------------------------------------------------------------------------
# batches

@dataclass
class Batch:
    """A padded batch in the shared layout. All tensors (B, T) with T = P + R.

    tokens     token ids; the response part may hold [MASK]/[IMASK]
    valid      False at [PAD] (attention ignores those keys)
    is_prompt  the prompt part (never masked, never scored)
    is_resp    the response canvas (what diffusion masks, predicts and scores)
    is_image   response positions that hold VQ codes (masked with [IMASK], sampled from codes only)
    P          the prompt width: the response starts at column P for every row
    """
    tokens: torch.Tensor
    valid: torch.Tensor
    is_prompt: torch.Tensor
    is_resp: torch.Tensor
    is_image: torch.Tensor
    P: int
    tasks: list[str] = field(default_factory=list)

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.tokens, self.valid, self.is_prompt, self.is_resp,
                                              self.is_image)), self.P, self.tasks)

    def with_tokens(self, tokens: torch.Tensor) -> "Batch":
        return Batch(tokens, self.valid, self.is_prompt, self.is_resp, self.is_image, self.P, self.tasks)

    def rows(self, idx: torch.Tensor) -> "Batch":
        """The rows idx (B',) of this batch, in that order; a row may appear several times."""
        return Batch(*(t[idx] for t in (self.tokens, self.valid, self.is_prompt, self.is_resp, self.is_image)),
                     self.P, [self.tasks[i] for i in idx.tolist()])

    def repeat(self, n: int) -> "Batch":
        """Each row n times in a row (rows 0..n-1 = copies of row 0): a rollout group per prompt."""
        return self.rows(torch.arange(self.tokens.shape[0], device=self.tokens.device).repeat_interleave(n))

    @property
    def response(self) -> torch.Tensor:
        return self.tokens[:, self.P:]


def make_batch(prompts: torch.Tensor, responses: torch.Tensor, layouts: list[Layout], tasks: list[str],
               tok: Tokenizer) -> Batch:
    """prompts: (B, P) long; responses: (B, R_max) long, row b padded with [PAD] after its
    layouts[b].R slots (text first, then image). Returns the Batch, T = P + R_max."""
    B, P = prompts.shape
    R = responses.shape[1]
    tokens = torch.cat([prompts, responses], 1)                      # (B, P + R)
    col = torch.arange(P + R)
    is_resp = torch.zeros(B, P + R, dtype=torch.bool)
    is_image = torch.zeros_like(is_resp)
    for b, lay in enumerate(layouts):
        is_resp[b, P:P + lay.R] = True
        is_image[b, P + lay.R_text:P + lay.R] = True
    valid = (tokens != tok.PAD) | is_resp        # a response slot is valid even while masked
    is_prompt = (col < P)[None] & valid
    return Batch(tokens, valid, is_prompt, is_resp, is_image, P, list(tasks))


def cat_batches(batches: list[Batch], tok: Tokenizer) -> Batch:
    """Stack batches row-wise (e.g. SFT rows + several tasks' rollouts); responses of different
    widths are right-padded with [PAD] (not valid, not response)."""
    R = max(b.tokens.shape[1] - b.P for b in batches)
    P = batches[0].P
    assert all(b.P == P for b in batches), "cat_batches: all batches must share the prompt width"

    def pad(x, value):
        return torch.cat([x, x.new_full((x.shape[0], P + R - x.shape[1]), value)], 1)
    parts = [(pad(b.tokens, tok.PAD), pad(b.valid, False), pad(b.is_prompt, False), pad(b.is_resp, False),
              pad(b.is_image, False)) for b in batches]
    return Batch(*(torch.cat(col) for col in zip(*parts)), P, [t for b in batches for t in b.tasks])


def collate(sets: dict[str, TaskSet], items: list[tuple[str, int]], tok: Tokenizer,
            responses: bool = True) -> Batch:
    """items: (task, index) pairs -> one Batch. responses=False leaves an all-mask canvas."""
    prompts = torch.stack([sets[t].prompt[i] for t, i in items])
    lays = [sets[t].layout for t, _ in items]
    R = max(l.R for l in lays)
    resp = torch.full((len(items), R), tok.PAD, dtype=torch.long)
    for b, ((t, i), lay) in enumerate(zip(items, lays)):
        if responses:
            resp[b, :lay.R] = sets[t].response[i]
        else:
            resp[b, :lay.R_text] = tok.MASK
            resp[b, lay.R_text:lay.R] = tok.IMASK
    return make_batch(prompts, resp, lays, [t for t, _ in items], tok)


# ----------------------------------------------------------------------------------------------
# users' own data

class JSONLError(ValueError):
    pass


JSONL_NEEDS = {"vqa": ("image",), "ground": ("image", "box"), "edit": ("image", "target_image"),
               "t2i": ("target_image",)}


def _jsonl_image(base: str, rel, dcfg, where: str) -> tuple[np.ndarray, tuple[int, int]]:
    """(the picture resized to data.image_size as (S, S, 3) uint8, its original (width, height))."""
    try:
        p = os.path.join(base, rel)       # inside the try: a non-string path is a row error too
        im = Image.open(p).convert("RGB")
    except Exception as e:
        raise JSONLError(f"{where}: cannot read image {rel!r} ({type(e).__name__}); "
                         f"fix the path (relative to the JSONL file)") from None
    size = im.size
    im = im.resize((dcfg.image_size, dcfg.image_size), Image.BOX)
    return np.asarray(im, dtype=np.uint8), size


def _jsonl_box(b, size: tuple[int, int], dcfg, where: str) -> tuple[int, int, int, int]:
    """A ground row's box, checked in the pixels of its image file (0 <= x0 < x1 <= width, the same
    for y) and rescaled with the picture to data.image_size, so that the same box still frames the
    same shape after the resize."""
    num = lambda v: (type(v) is int) or (type(v) is float and math.isfinite(v))   # no bool/NaN/inf
    if not (isinstance(b, list) and len(b) == 4 and all(num(v) for v in b)):
        raise JSONLError(f"{where}: 'box' must be [x0, y0, x1, y1] numbers")
    (W, H), (x0, y0, x1, y1) = size, b
    if not (0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H):
        raise JSONLError(f"{where}: 'box' {b} must satisfy 0 <= x0 < x1 <= {W} and 0 <= y0 < y1 <= {H} "
                         f"(pixels of the {W}x{H} image file; x1, y1 exclusive)")
    S = dcfg.image_size
    X0, Y0 = min(int(round(x0 * S / W)), S - 1), min(int(round(y0 * S / H)), S - 1)
    X1, Y1 = min(max(int(round(x1 * S / W)), X0 + 1), S), min(max(int(round(y1 * S / H)), Y0 + 1), S)
    return X0, Y0, X1, Y1                 # at least 1 px wide and high, inside the S x S picture


def _jsonl_example(row, where: str, base: str, dcfg) -> Example:
    """One parsed JSONL row -> Example, or JSONLError naming the row, the key and the fix."""
    if not isinstance(row, dict):
        raise JSONLError(f"{where}: expected a JSON object, got {type(row).__name__}")
    task = row.get("task")
    if task not in JSONL_NEEDS:
        raise JSONLError(f"{where}: task {task!r} unknown; use one of {', '.join(JSONL_NEEDS)}")
    if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
        raise JSONLError(f"{where}: missing 'prompt' (a non-empty string)")
    for k in JSONL_NEEDS[task]:
        if k not in row:
            raise JSONLError(f"{where}: task {task} needs key {k!r}")
    if row.get("split", "") not in ("", *SPLITS):
        raise JSONLError(f"{where}: 'split' {row['split']!r} unknown; use one of {', '.join(SPLITS)} (or leave it out)")
    image, size = _jsonl_image(base, row["image"], dcfg, where) if "image" in row else (None, None)
    trace, ans_text, answer = None, None, None
    if task == "vqa":
        if "response" in row:
            r = str(row["response"])
            if "<answer>" not in r or "</answer>" not in r:
                raise JSONLError(f"{where}: 'response' needs '<answer> ... </answer>'")
            ans_text = r.split("<answer>")[1].split("</answer>")[0].strip()
            trace = r.split("<answer>")[0].replace("<think>", "").replace("</think>", "").strip()
        elif "answer" in row:
            ans_text = str(row["answer"]).strip()
        else:
            raise JSONLError(f"{where}: vqa needs 'response' or 'answer'")
        answer = ans_text
    elif task == "ground":
        answer = _jsonl_box(row["box"], size, dcfg, where)
        ans_text = box_text(answer)
        if "response" in row:            # the reasoning before <answer>; the box itself comes from "box"
            trace = str(row["response"]).split("<answer>")[0].replace("<think>", "").replace("</think>", "").strip()
    else:
        trace = row.get("response", "" if task == "t2i" else None)
    ex = Example(task, "user", row["prompt"].strip(), None, answer, trace, ans_text, image=image)
    if image is not None and task == "edit":     # scored as source-vs-target scenes, like ours
        ex.scene = read_scene(image, dcfg.grid)
    if "target_image" in row:
        ex.target_image = _jsonl_image(base, row["target_image"], dcfg, where)[0]
        ex.answer = read_scene(ex.target_image, dcfg.grid)     # scored like the synthetic sets
    ex.split = row.get("split", "")
    if ex.split == "sft" and ex.trace is None:
        raise JSONLError(f"{where}: a row with \"split\": \"sft\" needs a 'response' (SFT trains on it)")
    return ex


def load_jsonl(path: str, dcfg, strict: bool = True) -> tuple[list[Example], int]:
    """Read users' examples: one JSON object per line,
        {"task": "vqa"|"ground"|"edit"|"t2i", "image": "a.png", "prompt": "...",
         "response": "<think> ... </think> <answer> 3 </answer>" | "answer": "3" | "box": [x0,y0,x1,y1]
         | "target_image": "b.png", "split": "sft"|"rl"|"eval"|"val" (optional)}
    Image paths are relative to the JSONL file; pictures are resized to data.image_size and grounding
    boxes (pixels of the image file, x1 and y1 exclusive) with them. Without "split", traced rows go
    to the SFT pool and answer-only rows to the RL pool. A malformed row raises
    JSONLError('file:line: problem; fix') in strict mode, else it is skipped and its message kept.
    Returns (examples, problems: the messages of the skipped rows); JSONLError if the file does not exist.
    """
    if not os.path.exists(path):
        raise JSONLError(f"{path}: no such file; pass an existing path with --data.jsonl=...")
    base = os.path.dirname(os.path.abspath(path))
    out, skipped = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise JSONLError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise JSONLError(f"{where}: not valid JSON ({e.msg}); one object per line") from None
                ex = _jsonl_example(row, where, base, dcfg)
                ex.key = f"user|{lineno}"
                out.append(ex)
            except JSONLError as e:
                if strict:
                    raise
                skipped.append(str(e))
    return out, skipped


def export_examples(pools, out_dir: str, n: int, dcfg) -> str:
    """Write n shape-world examples per task and split as PNG files + one data.jsonl in out_dir, in
    the format load_jsonl reads: sft rows with their traces, rl rows answer-only, eval and val rows
    with "split". A starting point for your own data; returns the JSONL path."""
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for task in pools:
        for split in ("sft", "rl", "eval", "val"):
            exs = pools[task][split][:n]
            ensure_images(exs, dcfg)
            for i, ex in enumerate(exs):
                name = f"{task}_{split}_{i}"
                row = {"task": task, "prompt": ex.prompt}
                if split != "sft" and split != "rl":
                    row["split"] = split
                if ex.image is not None:
                    Image.fromarray(ex.image).save(os.path.join(out_dir, name + ".png"))
                    row["image"] = name + ".png"
                if task in ("edit", "t2i"):
                    Image.fromarray(render(ex.answer, dcfg.grid, dcfg.image_size, ex.target_looks)).save(
                        os.path.join(out_dir, name + "_target.png"))
                    row["target_image"] = name + "_target.png"
                if task == "ground":
                    row["box"] = list(ex.answer)
                if task == "vqa" and (split != "sft" or ex.trace is None):
                    row["answer"] = ex.answer
                elif split == "sft" and ex.trace is not None:
                    row["response"] = (f"<think> {ex.trace} </think> <answer> {ex.answer_text} </answer>"
                                       if task in ("vqa", "ground") else ex.trace)
                rows.append(row)
    path = os.path.join(out_dir, "data.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


if __name__ == "__main__":
    # python data.py                              print a few examples of each family
    # python data.py --export=example_data --n=8  write example data (PNG + data.jsonl) to start from
    cfg, opts = get_config(extra={"export": "", "n": 8})
    if opts["export"]:
        print(f"wrote {export_examples(build_pools(cfg.data), opts['export'], opts['n'], cfg.data)}")
        raise SystemExit(0)
    pools = build_pools(cfg.data)
    for task in pools:
        print(f"--- {task}: " + ", ".join(f"{s}={len(v)}" for s, v in pools[task].items()))
        for ex in pools[task]["sft"][:3]:
            print(f"  [{ex.qtype}] {ex.prompt}\n     trace: {ex.trace}\n     answer: {ex.answer_text or ''}")
