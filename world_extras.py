"""
The shape world's options (METHOD.md §8), off by default; world_for(data config) turns them on and is
the one place they join the world (world.World):

  looks        per-cell looks that no prompt names and no reward scores (a shape's shade and fill, an
               empty cell's floor), so a description does not fix its picture and the image tokens of
               text-to-image and editing carry real conditional entropy (--data.shades / fills / floors)
  edit levels  2: two operations in one instruction; 3: "recolour shapes so that no row (or column)
               repeats a colour", 4: over rows and columns, with many right pictures graded by
               constraint_score (--data.edit_max_level)
  vqa level 4  the sum of four lists (world.make_vqa poses any level k >= 3 as a sum of k lists; this
               file allows 4 when a split's levels name it: --data.eval_levels=1,2,3,4, the far
               bucket of the levels world)

The looks world of the studies is --data.edit_max_level=4 --data.shades=3 --data.fills=4
--data.floors=6 --vq.codebook_size=512, with the start it was measured from: 3800 SFT steps, 200
held-out examples (studies/study.py WORLDS["looks"]; RESULTS.md 2.0b).

Exercise it: python -m pytest tests/test_data.py -q -k "look or constraint or level"
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from world import (COLOURS, DEFAULT_WORLD, EDIT_TYPES, FILLS_MAX, Scene, Shape, World, cell_name, fill_map, one_edit,
                   parse_levels, render)

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
# None of them moves a shape's box (grounding's answer) or changes what world.read_scene reads: kind,
# colour and size stay exactly recoverable from every look (tests/test_data.py checks every one).
# data.shades = data.fills = data.floors = 1 (the default) is the world without nuisance (one look per
# content).
SHADES = (1.0, 0.82, 0.66)                       # brightness factors of the palette colour
FLOOR_GREY = (0, 52, 40, 48, 44, 52)             # peak grey level of each floor (0 = black)


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



class Looks:
    """The looks of a data config (d.shades, d.fills, d.floors): drawn per example (draw) and into the
    picture (render); world.read_scene reads the content under every one. world_for builds it when any
    of the three is > 1."""

    def draw(self, rng: np.random.Generator, ex, d):
        """Set ex.looks (the input picture's) and ex.target_looks (an edit's or t2i's target) from rng."""
        ex.looks = None if ex.task == "t2i" else random_looks(rng, ex.scene, d)
        if ex.task == "edit":
            ex.target_looks = edited_looks(ex.scene, ex.answer, ex.looks, rng, d)
        elif ex.task == "t2i":           # the prompt fixes the content, never the looks
            ex.target_looks = random_looks(rng, ex.answer, d)

    def render(self, scene: Scene, grid: int, image_size: int, looks: tuple) -> np.ndarray:
        """world.render, then each cell's look: a shape's shade and fill, an empty cell's floor."""
        img = render(scene, grid, image_size)
        if not any(looks):
            return img
        out = img.astype(np.float32).copy()
        cell = image_size // grid
        for i, (sh, lk) in enumerate(zip(scene, looks)):
            r, c = divmod(i, grid)
            patch = out[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell]                    # (c, c, 3) view
            if sh is None:
                patch += _floor_map(lk, cell)[..., None]
            else:
                shade, fill = divmod(lk, FILLS_MAX)
                patch *= (SHADES[shade] * fill_map(fill, cell))[..., None]
        return np.clip(out.round(), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# vqa level 4 and edit levels 2-4

def make_two_edits(scene: Scene, rng, grid: int):
    """Level 2: "A and B", two operations on disjoint cells, both naming shapes of the ORIGINAL
    picture by pairs that the first operation leaves unique; the plan is the two one-operation plans
    in order."""
    q1, q2 = (EDIT_TYPES[i] for i in rng.integers(4, size=2))
    first = one_edit(scene, rng, grid, q1, set())
    if first is None:
        return None
    p1, plan1, mid, busy = first
    # the second operation names shapes of the original picture and touches none of the first's cells
    second = one_edit(scene, rng, grid, q2, busy | {i for i, (a, b) in enumerate(zip(scene, mid)) if a != b}, also=mid)
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
    constraint_score); the plan names each broken unit with its repeated colours, then the
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


def constraint_level(level: int):
    """The edit maker of level 3 (rows or columns, one drawn per example) or 4 (rows and columns)."""
    def make(scene: Scene, rng, grid: int):
        return constraint_edit(scene, rng, grid, ("rows", "cols") if level >= 4 else (("rows", "cols")[rng.integers(2)],))
    return make


def constraint_score(source: Scene, target: Scene, pred: Scene, grid: int, kinds: tuple[str, ...]) -> float:
    """The reward of a constraint edit ("recolour shapes so that no row repeats a colour"; levels
    3-4), in [0, 1]: met * kept * economy, where
      met     = (broken units of source - broken units of pred) / broken units of source, clipped to
                [0, 1] (a unit is a row or column; broken: it repeats a colour, colour_conflicts):
                the share of the broken units pred fixes, less any it breaks; the source is posed
                broken, so "do nothing" earns 0
      kept    = mean over the cells holding a shape in source or pred of what the instruction may not
                change: presence, kind and size (0 if one of the two cells is empty, else half a point
                per matching kind / size); removing a shape costs its whole share, so deleting a
                conflicting shape is no cheaper than recolouring one too many
      economy = 1 - (recolours beyond the fewest needed) / (shapes in the source): the fewest are the
                target's own (fewest_recolours), so a valid edit that recolours more than it must
                earns less, and a fully valid fewest-recolours edit earns 1.
    Many pictures earn 1 (any fewest recolouring); the rest are graded, which is what best-of-N and
    tree search have to find."""
    broken = colour_conflicts(source, kinds, grid)
    met = min(1.0, max(0.0, (broken - colour_conflicts(pred, kinds, grid)) / max(1, broken)))
    sim = lambda a, b: 0.0 if a is None or b is None else ((a.kind == b.kind) + (a.size == b.size)) / 2
    occupied = [(p, s) for p, s in zip(pred, source) if p is not None or s is not None]
    kept = sum(sim(p, s) for p, s in occupied) / max(1, len(occupied))
    fewest = sum(s != t for s, t in zip(source, target))
    recoloured = sum(s is not None and p is not None and p.colour != s.colour for s, p in zip(source, pred))
    economy = 1.0 - max(0, recoloured - fewest) / max(1, sum(s is not None for s in source))
    return met * kept * economy


# ----------------------------------------------------------------------------------------------
# the one place the options join the world

MAX_EDIT_LEVEL = 4


def check_split_levels(d):
    """ValueError (one line; config.validate makes it a config error) for a split whose levels name
    none of a multi-level family's: its levels are clipped to the family's, and with none left the
    family would pose another level than the split asks for (grounding has 1-3: --data.eval_levels=4)."""
    for key in ("sft_levels", "rl_levels", "eval_levels"):
        v = getattr(d, key)
        for task, have in world_for(d).levels.items():
            if len(have) > 1 and not set(parse_levels(v)) & set(have):
                raise ValueError(f"--data.{key}={v!r}: {task} has levels {','.join(map(str, have))} only, "
                                 f"none of them asked for; add one, e.g. --data.{key}={v},{have[-1]}")


def world_for(d) -> World:
    """The world of data config `d`: DEFAULT_WORLD, plus looks when any of d.shades / fills / floors
    is above 1, edit levels 2..d.edit_max_level (levels 3-4 graded by constraint_score), and vqa
    level 4 when a split's levels name it."""
    levels = dict(DEFAULT_WORLD.levels)
    makers, graders = dict(DEFAULT_WORLD.edit_makers), dict(DEFAULT_WORLD.graders)
    if any(4 in parse_levels(v) for v in (d.sft_levels, d.rl_levels, d.eval_levels)):
        levels["vqa"] = (*levels["vqa"], 4)
    if d.edit_max_level > 1:
        makers.update({2: make_two_edits, 3: constraint_level(3), 4: constraint_level(4)})
        levels["edit"] = tuple(range(1, min(MAX_EDIT_LEVEL, d.edit_max_level) + 1))
        graders.update({q: (lambda s, t, p, g, kinds=kinds: constraint_score(s, t, p, g, kinds))
                        for q, kinds in CONSTRAINT_EDITS.items()})
    looks = Looks() if (d.shades * d.fills > 1 or d.floors > 1) else None
    if levels == DEFAULT_WORLD.levels and looks is None and graders == DEFAULT_WORLD.graders:
        return DEFAULT_WORLD
    return replace(DEFAULT_WORLD, levels=levels, edit_makers=makers, looks=looks, graders=graders)
