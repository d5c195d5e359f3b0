"""
The shape world: a Pillow-rendered toy world with exact answers, and the four task families that
stand for the paper's data (METHOD.md §8). The method modules never import it: the rollouts see
only tokens, and the rewards read a generated picture with this world's `read_scene` (passed to them
in a rewards.PictureJudge, data.picture_judge).

Paper mapping. LaViDa-R1 (arXiv 2602.14147) post-trains on four kinds of data; each becomes a family:
  * visual math / VQA (MathVista-like,       -> `vqa`:    counting, arithmetic over counts, "sides"
    arXiv 2310.02255)
  * reason-intensive grounding (LISA-like,   -> `ground`: a referring expression that needs reasoning;
    arXiv 2308.00692)                                     the answer is a box in pixel coordinates
  * image editing with reasoning (ImgEdit,   -> `edit`:   recolour / remove / move / add; the
    arXiv 2505.20275)                                     response is a short plan followed by the
                                                          edited image's VQ tokens (the "planning"
                                                          of LaViDa-O, arXiv 2509.19244)
  * text-to-image (SFT only, as in the paper)-> `t2i`:    a scene description -> the image's VQ tokens

Every scene is a `grid x grid` board; each cell is empty or holds one shape (kind, colour, size).
Because shapes are cell-aligned, `read_scene` re-reads every scored attribute from a picture exactly,
and that one function lets the rewards score edits and text-to-image (rewards.edit_score, the stand-in
for the paper's EditScore reward model) and the VQ tokenizer's reconstructions.

Each family yields four disjoint pools, as in the paper's data (plus a validation split):
  sft  -- prompt + full step-by-step reasoning trace + answer (deliberately small: data.n_sft)
  rl   -- prompt + ground-truth answer / box / target only, no trace (data.n_rl): verifiable rewards
          need no traces
  val  -- the quick evals during training and the choice of best checkpoints
  eval -- held out; any (scene, prompt) that also occurs in another pool is dropped.
Difficulty levels (draw_level, bucket; METHOD.md §8) grade vqa by composition (1: count, compare;
2: add, diff, sides; 3: the sum of three lists) and grounding by relation depth (1-3), over the same
scenes; each split draws from its own levels (data.sft_levels / rl_levels / eval_levels), so
answer-only prompts can sit beyond the traced range.

The optional parts of the world (per-cell looks that no prompt names, edit levels 2-4 with colour
constraints, vqa level 4) live in world_extras.py and plug in through one place, the `World` below:
`world_extras.world_for(data_config)` returns DEFAULT_WORLD when the config turns none of them on.

Simplified away (METHOD.md §9): real images and benchmarks (a synthetic world whose answers are
exactly checkable), SigLIP features (images enter only as VQ codes), digits drawn in the image, real
charts.

Exercise it: python user_data.py (prints samples) ; python -m pytest tests/test_data.py -q
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from tokens import TASKS, box_text

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


def render(scene: Scene, grid: int, image_size: int) -> np.ndarray:
    """Scene -> (H, W, 3) uint8 picture: every shape in full colour, solid, on a black background."""
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
    return np.asarray(img, dtype=np.uint8)


EMPTY_PEAK = 88          # a cell whose brightest pixel is below this is empty (the looks world's grey
                         # floors peak at <= 52, its darkest shape at 0.66 x 180)
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


DIM = 0.55               # a fill pattern's dimmed pixels keep this share of their brightness
FILLS_MAX = 4            # fill patterns the reader undoes (world_extras draws them as part of a shape's look)


def fill_map(fill: int, cell: int) -> np.ndarray:
    """(cell, cell) brightness factors of fill pattern `fill`: 0 solid, 1 horizontal stripes,
    2 vertical stripes, 3 checker (the odd rows / columns / squares dimmed to DIM)."""
    y, x = np.mgrid[:cell, :cell]
    odd = [np.zeros_like(y, dtype=bool), y % 2 == 1, x % 2 == 1, (x + y) % 2 == 1][fill]
    return np.where(odd, DIM, 1.0).astype(np.float32)


def read_scene(img: np.ndarray, grid: int) -> Scene:
    """Re-read every cell's (kind, colour, size) from a picture: (H, W, 3) uint8 or float in [0, 1].

    This is the scorer for edits and text-to-image, and the attribute-recovery check of the VQ
    tokenizer. Per cell: brightness = max over RGB; empty if the brightest pixel is below
    EMPTY_PEAK; colour = the palette entry nearest in chroma (colour / its brightest channel, which no
    shade changes) to the mean of the bright pixels; kind and size = the template with the highest
    cosine similarity to the brightness map divided by a fill pattern, the best over every pattern
    (the right pattern undoes a fill exactly; on a solid shape the solid one wins). It reads every
    look of world_extras; in a world without looks it is as robust to an imperfectly drawn picture
    as it has always been, which is what every measured reward was scored with.
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    image_size = img.shape[0]
    cell = image_size // grid
    shapes, maps = _templates(grid, image_size)
    unfill = np.stack([1.0 / fill_map(f, cell).ravel() for f in range(FILLS_MAX)])    # (F, c*c)
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
# task families. Each maker returns (prompt, trace, ..., qtype) or None (the scene cannot pose it).
# `trace` is the step-by-step reasoning the sft pool is traced with.

def _filters():
    # (phrase used in questions/traces, predicate)
    out = [(f"{c} shapes", (lambda s, c=c: s.colour == c)) for c in COLOURS]
    out += [(PLURAL[k], (lambda s, k=k: s.kind == k)) for k in KINDS]
    out += [(f"{z} shapes", (lambda s, z=z: s.size == z)) for z in SIZES]
    return out


FILTERS = _filters()


def _cells(scene: Scene, pred) -> list[int]:
    return [i for i, s in enumerate(scene) if s is not None and pred(s)]


def _list(cells: list[int], grid: int) -> str:
    return " ".join(cell_name(i, grid) for i in cells) if cells else "none"


def _count(cells: list[int], rng, traced: bool) -> int:
    """The count a trace writes down: len(cells). A traced example also draws one number of its stream
    per count (keep_stream): the stream every pool was built with."""
    keep_stream(rng, traced)
    return len(cells)


def keep_stream(rng, traced: bool):
    """One draw of a traced example's stream per count its trace writes. An imperfect-teacher option
    (removed) drew its miscounts there; drawing still keeps every pool, and with it every measured
    number, what it was."""
    if traced:
        rng.random()


# question types by difficulty level: how many lists the answer combines (composition), with the
# per-list reading load the same at every level (one filter over the same scenes)
VQA_LEVELS = {1: ("count", "compare"), 2: ("add", "diff", "sides"), 3: ("add3",)}   # level k >= 3: a
                                  # sum of k lists (world_extras adds level 4)


def make_vqa(scene: Scene, rng, grid: int, level: int, traced: bool):
    """(prompt, trace, the trace's answer, the true answer, qtype) of a level-`level` question:
    1 count / compare, 2 add / diff / sides, k >= 3 the sum of k counts. traced: an sft example."""
    types = VQA_LEVELS.get(level, (f"add{level}",))
    qtype = types[rng.integers(len(types))]
    if level >= 3:
        return _sum_of_counts(scene, rng, grid, level, traced)
    if qtype == "sides":
        cells = [i for i, s in enumerate(scene) if s is not None]
        # the trace lists each shape's sides and adds them
        terms = [SIDES[scene[i].kind] for i in cells]
        keep_stream(rng, traced)
        total = sum(terms)
        trace = "sides : " + " ".join(f"{cell_name(i, grid)} {t}" for i, t in zip(cells, terms))
        trace += " . " + " + ".join(str(t) for t in terms) + f" = {total}"
        truth = sum(SIDES[scene[i].kind] for i in cells)
        return "how many sides do the shapes have in total ?", trace, str(total), str(truth), qtype
    idx = rng.choice(len(FILTERS), size=2, replace=False)
    (pa, fa), (pb, fb) = FILTERS[idx[0]], FILTERS[idx[1]]
    A, B = _cells(scene, fa), _cells(scene, fb)
    a = _count(A, rng, traced)
    if qtype == "count":
        trace = f"{pa} : {_list(A, grid)} . count {a}"
        return f"how many {pa} are there ?", trace, str(a), str(len(A)), qtype
    b = _count(B, rng, traced)
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


def _sum_of_counts(scene: Scene, rng, grid: int, k: int, traced: bool):
    """Level 3 / 4: "how many A plus B plus C ?" over k distinct filters; the trace reads each list,
    counts it, and adds the counts (a filter pair may share shapes: each list counts them)."""
    picks = [FILTERS[i] for i in rng.choice(len(FILTERS), size=k, replace=False)]
    lists = [_cells(scene, f) for _, f in picks]
    counts = [_count(cells, rng, traced) for cells in lists]
    trace = " ".join(f"{p} : {_list(cells, grid)} . count {n} ." for (p, _), cells, n in zip(picks, lists, counts))
    trace += " " + " + ".join(str(n) for n in counts) + f" = {sum(counts)}"
    prompt = "how many " + " plus ".join(p for p, _ in picks) + " ?"
    return prompt, trace, str(sum(counts)), str(sum(len(c) for c in lists)), f"add{k}"


GROUND_LEVELS = {1: ("unique",), 2: ("odd_colour", "left_of", "above"), 3: ("two_hop",)}


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
    uniq = unique_pairs(scene)
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


def unique_pairs(scene: Scene) -> list[int]:
    """Cells whose (colour, kind) pair occurs exactly once: nameable as 'the red circle'."""
    pairs = [(s.colour, s.kind) if s else None for s in scene]
    return [i for i, p in enumerate(pairs) if p is not None and pairs.count(p) == 1]


def make_ground(scene: Scene, rng, grid: int, level: int):
    """Returns (prompt, trace, target cell, qtype) or None when this scene cannot pose the question.
    Levels by relation depth: 1 a unique (colour, kind), 2 one relation (left of / above) or the
    odd colour out, 3 two chained relations."""
    if level >= 3:
        return _two_hop(scene, rng, grid)
    qtype = GROUND_LEVELS[2][rng.integers(3)] if level == 2 else "unique"
    uniq = unique_pairs(scene)
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




def make_edit(scene: Scene, rng, grid: int):
    """Level 1: one operation (recolour / remove / move / add) on a shape named by a unique (colour,
    kind) pair. Returns (prompt, plan, target scene, qtype) or None. Levels 2-4: world_extras."""
    qtype = EDIT_TYPES[rng.integers(4)]
    out = one_edit(scene, rng, grid, qtype, set())
    return None if out is None else (*out[:3], qtype)


def one_edit(scene: Scene, rng, grid: int, qtype: str, busy: set[int], also: Scene | None = None):
    """One operation on `scene` that touches no cell of `busy`: (prompt, plan, target, the cells it
    touches), or None. Shapes are named by a (colour, kind) pair unique in the scene (and in `also`,
    the picture after a first operation, so that the name stays unambiguous there too)."""
    still = set(unique_pairs(also)) if also is not None else None          # nameable after the first op
    uniq = [i for i in unique_pairs(scene) if i not in busy and (still is None or i in still)]
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



def describe(scene: Scene, grid: int) -> str:
    """The text-to-image prompt: every shape with its attributes and cell, in reading order
    ("large red circle r1c1 , small blue square r3c2"); empty cells are not mentioned."""
    parts = [f"{s.words()} {cell_name(i, grid)}" for i, s in enumerate(scene) if s is not None]
    return " , ".join(parts)



# ----------------------------------------------------------------------------------------------
# the world's options, in one place


@dataclass
class World:
    """The shape world as the stages use it: what each family can pose, and how pictures are drawn,
    read and graded. DEFAULT_WORLD is the world of this file; world_extras.world_for(data config)
    returns it, or a World with the options the config turns on (the one place they plug in).
      levels       task -> the difficulty levels it can pose (a split's levels are clipped to them)
      edit_makers  edit level -> maker(scene, rng, grid) -> (prompt, plan, target, qtype) or None
      looks        None (one look per cell content) or world_extras.Looks: draws each example's
                   per-cell looks and renders them (read_scene reads every look)
      graders      edit qtype -> grade(source, target, pred, grid) for edits with many right
                   pictures (world_extras' colour constraints); any other edit is graded by
                   rewards.edit_score"""
    levels: dict
    edit_makers: dict
    looks: object | None = None
    graders: dict = field(default_factory=dict)

    def render(self, scene: Scene, grid: int, image_size: int, looks: tuple | None = None) -> np.ndarray:
        """The picture of `scene` with per-cell `looks` (None: every cell plain)."""
        if looks is None or self.looks is None:
            return render(scene, grid, image_size)
        return self.looks.render(scene, grid, image_size, looks)


DEFAULT_WORLD = World(levels={"vqa": tuple(VQA_LEVELS), "ground": tuple(GROUND_LEVELS), "edit": (1,), "t2i": (1,)},
                      edit_makers={1: make_edit})


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
    answer_text: str | None = None  # the answer the trace ends in
    image: np.ndarray | None = None         # input picture; rendered from `scene` unless user-given
    target_image: np.ndarray | None = None  # edit/t2i target picture (kept for scoring, never shown)
    key: str = ""                 # (scene, prompt) identity, for split disjointness
    split: str = ""               # JSONL rows only: the split a row asks for ("" = by its trace)
    level: int = 1                # difficulty (vqa: lists combined, ground: relation depth, edit:
                                  # operations / constraints; t2i 1)
    looks: tuple | None = None    # the input picture's per-cell looks (world_extras; None = all plain)
    target_looks: tuple | None = None   # edit / t2i: the target picture's looks


def parse_levels(text: str) -> tuple[int, ...]:
    """'1,2' -> (1, 2): a split's difficulty levels (config.validate checks the range)."""
    return tuple(sorted({int(v) for v in text.split(",") if v.strip()}))


def draw_level(rng, levels: tuple[int, ...], hard_frac: float, top: int) -> int:
    """The level of one example, from the split's `levels` clipped to the family's `top`
    (config.validate refuses a split that leaves a family no level). The split's levels (1, 2), as
    configured, draw level 2 with probability hard_frac; any other set, clipped or not, is drawn
    uniformly (so --data.edit_max_level=2 under eval_levels 1,2,3 gives edit 1 and 2 half each)."""
    given, levels = levels, tuple(v for v in levels if v <= top) or (top,)
    hard = rng.random() < hard_frac           # always drawn: every level set uses the same streams
    if levels == given == (1, 2):
        return 2 if hard else 1
    return levels[int(rng.integers(len(levels)))] if len(levels) > 1 else levels[0]


def bucket(level: int, sft_levels: tuple[int, ...]) -> str:
    """in (at most the highest level traced in SFT), edge (one above it) or far (two or more)."""
    top = max(sft_levels)
    return "in" if level <= top else "edge" if level == top + 1 else "far"


def make_example(task: str, scene: Scene, rng, d, world: World, traced: bool, level: int) -> Example | None:
    """One example of `task` on `scene` at difficulty `level` (None: the scene cannot pose such a
    question). d: the data config; traced: the sft split (its examples carry traces)."""
    if task == "vqa":
        q, trace, ans_text, truth, qtype = make_vqa(scene, rng, d.grid, level, traced)
        ex = Example(task, qtype, q, scene, truth, trace, ans_text)
    elif task == "ground":
        out = make_ground(scene, rng, d.grid, level)
        if out is None:
            return None
        q, trace, cell, qtype = out
        box = shape_box(cell, scene[cell], d.grid, d.image_size)
        ex = Example(task, qtype, q, scene, box, trace, box_text(box))
    elif task == "edit":
        out = world.edit_makers[level](scene, rng, d.grid)
        if out is None:
            return None
        q, plan, target, qtype = out
        ex = Example(task, qtype, q, scene, target, plan)
    else:
        ex = Example("t2i", "t2i", describe(scene, d.grid), None, scene, "")
    ex.key, ex.level = f"{task}|{scene_key(scene)}|{ex.prompt}", level
    return ex


SPLITS = ("sft", "rl", "eval", "val")   # val: model selection, so that eval stays held out
MAX_REDRAWS = 2000    # scenes tried for one example slot before the level is called unposable here


def build_pools(d, world: World) -> dict[str, dict[str, list[Example]]]:
    """All synthetic examples: pools[task][split]. Deterministic in d (seed and sizes).

    Example i of (task, split) is drawn from its own generator seeded by (seed, task, split, i), so
    changing n_rl does not change the sft pool. Disjointness: each split drops the keys seen in the
    splits before it (rl: sft; eval: sft, rl; val: all three), so val (model selection) never
    overlaps the held-out eval split. The scenes are random, so collisions are rare but possible.
    """
    sizes = {"sft": d.n_sft, "rl": d.n_rl, "eval": d.n_eval, "val": d.n_val}
    levels = {"sft": parse_levels(d.sft_levels), "rl": parse_levels(d.rl_levels),
              "eval": parse_levels(d.eval_levels), "val": parse_levels(d.eval_levels)}
    pools: dict[str, dict[str, list[Example]]] = {}
    for ti, task in enumerate(TASKS):   # ti seeds the family's draws: a family removed or added at
        seen: set[str] = set()          # the END of TASKS leaves the others' pools unchanged
        pools[task] = {}
        for si, split in enumerate(SPLITS):
            out, i, level, tries = [], 0, None, 0
            while len(out) < sizes[split]:
                rng = np.random.default_rng([d.seed, ti, si, i])
                i, tries = i + 1, tries + 1
                if tries > MAX_REDRAWS:
                    raise SystemExit(f"data error: {task} found no new {split} example at level {level} in "
                                     f"{MAX_REDRAWS} scenes (--data.grid={d.grid}, --data.min_shapes={d.min_shapes}, "
                                     f"--data.max_shapes={d.max_shapes}); allow more shapes, or drop level {level} "
                                     f"from --data.{'eval' if split == 'val' else split}_levels, or ask for fewer examples")
                scene = random_scene(rng, d.grid, d.min_shapes, d.max_shapes)
                drawn = draw_level(rng, levels[split], d.hard_frac, max(world.levels.get(task, (1,))))
                # a redraw (the scene cannot pose the level, or the example is a duplicate) keeps the
                # level drawn for this slot: otherwise hard levels, unposable more often, would come
                # out rarer than the split's shares say (grounding's level 2: 30 %, not 40 %)
                level = drawn if level is None else level
                ex = make_example(task, scene, rng, d, world, split == "sft", level)
                if ex is None or ex.key in seen:
                    continue
                level, tries = None, 0
                if world.looks is not None:   # the looks from a stream of their own: scenes, questions
                    world.looks.draw(np.random.default_rng([d.seed, ti, si, i - 1, 1]), ex, d)   # stay
                if split != "sft":          # answer-only pools carry no trace (rewards need none)
                    ex.trace = ex.trace if split in ("eval", "val") else None
                out.append(ex)
            seen.update(e.key for e in out)
            pools[task][split] = out
    return pools


def ensure_images(examples: list[Example], d, world: World):
    """Render input and target pictures that are not user-given (cheap: ~0.1 ms per 32 px image)."""
    for ex in examples:
        if ex.image is None and ex.scene is not None:
            ex.image = world.render(ex.scene, d.grid, d.image_size, ex.looks)
        if ex.target_image is None and ex.task in ("edit", "t2i"):
            ex.target_image = world.render(ex.answer, d.grid, d.image_size, ex.target_looks)


def cell_names(grid: int) -> list[str]:
    """Every cell's name on a grid x grid board (the tokenizer knows them all: Tokenizer.fit)."""
    return [cell_name(i, grid) for i in range(grid * grid)]
