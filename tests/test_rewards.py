"""
Tests of rewards.py: the robust <answer> parser (a table of malformed answers, each with its reason,
plus a brute-force comparison against an independent token-level reference parser), boxes, IoU
(hand values and a pixel-counting brute force), and the exact edit / text-to-image scores on
hand-made scenes with every expected value worked out by hand in the comments. CPU, well under 1 s.

    python -m pytest tests/test_rewards.py -q
"""
import itertools
import math
import random

from types import SimpleNamespace

import numpy as np
import pytest

import rewards as RW  # noqa: E402
import world_extras as WX  # noqa: E402
from config import DataConfig  # noqa: E402
from world import Shape, make_edit, make_vqa, random_scene, read_scene, render  # noqa: E402
from world_extras import random_looks as data_random_looks  # noqa: E402

REASONS = {"ok", "no_answer_tag", "unclosed", "multiple_answers", "empty", "garbage", "bad_box"}

# ----------------------------------------------------------------------------------------------
# vqa: the malformed-answer table. (response text, ground truth, expected reward, expected reason)

VQA_TABLE = [
    # no tag at all
    ("<think> count 3 </think> 3", "3", 0.0, "no_answer_tag"),
    ("", "3", 0.0, "no_answer_tag"),
    ("the answer is 3 </answer>", "3", 0.0, "no_answer_tag"),
    # opened, never closed / closed before opened
    ("<think> x </think> <answer> 3", "3", 0.0, "unclosed"),
    ("</answer> 3 <answer>", "3", 0.0, "unclosed"),
    # two answer blocks (even if both are right), or a stray second close tag
    ("<answer> 3 </answer> <answer> 3 </answer>", "3", 0.0, "multiple_answers"),
    ("<answer> 3 </answer> <answer> 4", "3", 0.0, "multiple_answers"),
    ("<answer> 3 </answer> </answer>", "3", 0.0, "multiple_answers"),
    # empty answer
    ("<answer> </answer>", "3", 0.0, "empty"),
    ("<answer></answer>", "yes", 0.0, "empty"),
    ("<answer>    </answer>", "no", 0.0, "empty"),
    # garbage words, several tokens, numbers in forms the normaliser does not accept
    ("<answer> banana </answer>", "3", 0.0, "garbage"),
    ("<answer> maybe </answer>", "yes", 0.0, "garbage"),
    ("<answer> 3 4 </answer>", "3", 0.0, "garbage"),
    ("<answer> yes no </answer>", "yes", 0.0, "garbage"),
    ("<answer> 3 red </answer>", "3", 0.0, "garbage"),
    ("<answer> 1e3 </answer>", "1000", 0.0, "garbage"),
    ("<answer> 3. </answer>", "3", 0.0, "garbage"),
    ("<answer> -- </answer>", "3", 0.0, "garbage"),
    # well-formed but wrong: reward 0 with reason ok
    ("<answer> 4 </answer>", "3", 0.0, "ok"),
    ("<answer> -2 </answer>", "2", 0.0, "ok"),
    ("<answer> 3.5 </answer>", "3", 0.0, "ok"),
    ("<answer> no </answer>", "yes", 0.0, "ok"),
    # correct, including the normalisations of the docstring
    ("<think> a </think> <answer> 3 </answer>", "3", 1.0, "ok"),
    ("<answer>3</answer>", "3", 1.0, "ok"),
    ("<answer> 3.0 </answer>", "3", 1.0, "ok"),
    ("<answer> 3 </answer>", "3.0", 1.0, "ok"),
    ("<answer>  Yes  </answer>", "yes", 1.0, "ok"),
    ("<answer> NO </answer>", "no", 1.0, "ok"),
    ("<answer> yes </answer>", " Yes ", 1.0, "ok"),
    ("<answer> -2 </answer>", "-2", 1.0, "ok"),
    ("<answer> -0 </answer>", "0", 1.0, "ok"),
    ("<answer> 2.50 </answer>", "2.5", 1.0, "ok"),
    ("<answer> 12 </answer> trailing words after the block", "12", 1.0, "ok"),
]


@pytest.mark.parametrize("text,truth,want_r,want_why", VQA_TABLE)
def test_vqa_reward_table(text, truth, want_r, want_why):
    r, why = RW.vqa_reward(text, truth)           # must never raise
    assert (r, why) == (want_r, want_why), (text, r, why)
    v, pwhy = RW.parse_vqa(text)
    if want_why in ("ok",):
        assert v is not None and pwhy == "ok"
    else:
        assert v is None and pwhy == want_why


def test_normalise_by_hand():
    assert RW.normalise("3") == "3"
    assert RW.normalise("3.0") == "3"
    assert RW.normalise(" Yes ") == "yes"
    assert RW.normalise("-7") == "-7"
    assert RW.normalise("-7.00") == "-7"
    assert RW.normalise("0.25") == "0.25"
    for junk in ("", "3 4", "three", "1e3", "3.", ".5", "yes please", "+"):
        assert RW.normalise(junk) is None, junk


# an independent reference: the same spec written over a token list, no string searching
ALPHABET = ["<answer>", "</answer>", "3", "3.0", "Yes", "foo", "-1"]


def reference_vqa(tokens: list[str], truth: str) -> tuple[float, str]:
    opens = [i for i, t in enumerate(tokens) if t == "<answer>"]
    closes = [i for i, t in enumerate(tokens) if t == "</answer>"]
    if not opens:
        return 0.0, "no_answer_tag"
    if len(opens) > 1 or len(closes) > 1:
        return 0.0, "multiple_answers"
    if not closes or closes[0] < opens[0]:
        return 0.0, "unclosed"
    inner = tokens[opens[0] + 1:closes[0]]
    if not inner:
        return 0.0, "empty"
    if len(inner) > 1:
        return 0.0, "garbage"
    canon = {"3": "3", "3.0": "3", "Yes": "yes", "-1": "-1", "foo": None}[inner[0]]
    if canon is None:
        return 0.0, "garbage"
    return float(canon == truth), "ok"


def test_vqa_parser_matches_reference_on_every_short_token_string():
    """Brute force: every token string of length <= 4 over a small alphabet (2,801 strings)."""
    n = 0
    for L in range(5):
        for toks in itertools.product(ALPHABET, repeat=L):
            text = " ".join(toks)
            for truth in ("3", "yes"):
                assert RW.vqa_reward(text, truth) == reference_vqa(list(toks), truth), text
                n += 1
    assert n == 2 * sum(len(ALPHABET) ** L for L in range(5))


def test_parser_never_raises_on_random_junk():
    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "<", ">", "answer", "3", "-", ".", " ", "\n", "yes", "[MASK]", "é"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        r, why = RW.vqa_reward(text, "3")
        assert r in (0.0, 1.0) and why in REASONS
        r, why = RW.ground_reward(text, (0, 0, 4, 4))
        assert 0.0 <= r <= 1.0 and why in REASONS


# ----------------------------------------------------------------------------------------------
# boxes

BAD_BOXES = [
    "<answer> 1 2 3 </answer>",            # three numbers
    "<answer> 1 2 3 4 5 </answer>",        # five numbers
    "<answer> 1 </answer>",
    "<answer> a b c d </answer>",          # non-numbers
    "<answer> 1 2 three 4 </answer>",
    "<answer> 1 2 3 4e0 </answer>",
    "<answer> 5 2 5 8 </answer>",          # x1 == x0
    "<answer> 6 2 5 8 </answer>",          # x1 < x0
    "<answer> 1 8 5 8 </answer>",          # y1 == y0
    "<answer> 1 9 5 8 </answer>",          # y1 < y0
]


@pytest.mark.parametrize("text", BAD_BOXES)
def test_parse_box_rejects_bad_boxes(text):
    assert RW.parse_box(text) == (None, "bad_box")
    assert RW.ground_reward(text, (1, 2, 5, 8)) == (0.0, "bad_box")


def test_parse_box_passes_tag_errors_through_and_parses_good_boxes():
    assert RW.parse_box("1 2 5 8") == (None, "no_answer_tag")
    assert RW.parse_box("<answer> 1 2 5 8") == (None, "unclosed")
    assert RW.parse_box("<answer> </answer>") == (None, "empty")
    assert RW.parse_box("<answer> 1 2 5 8 </answer> <answer> 1 2 5 8 </answer>") == (None, "multiple_answers")
    assert RW.parse_box("<think> r0c0 </think> <answer> 1 2 5 8 </answer>") == ((1.0, 2.0, 5.0, 8.0), "ok")
    assert RW.parse_box("<answer> 0 0 32 32 </answer>") == ((0.0, 0.0, 32.0, 32.0), "ok")
    assert RW.parse_box("<answer> 1.5 2 5 8.25 </answer>") == ((1.5, 2.0, 5.0, 8.25), "ok")
    assert RW.parse_box("<answer> -1 -2 3 4 </answer>") == ((-1.0, -2.0, 3.0, 4.0), "ok")
    # the reward of a parsed box is its IoU with the truth: here exactly the truth
    assert RW.ground_reward("<answer> 1 2 5 8 </answer>", (1, 2, 5, 8)) == (1.0, "ok")


def test_iou_hand_values_and_symmetry():
    cases = [
        ((0, 0, 2, 2), (3, 3, 5, 5), 0.0),        # disjoint
        ((0, 0, 2, 2), (2, 0, 4, 2), 0.0),        # touching edges: x1 exclusive, no shared pixel
        ((0, 0, 2, 2), (0, 0, 2, 2), 1.0),        # identical
        ((0, 0, 2, 2), (1, 0, 3, 2), 1 / 3),      # half overlap: inter 2, union 4 + 4 - 2 = 6
        ((0, 0, 4, 4), (1, 1, 3, 3), 1 / 4),      # containment: inter 4, union 16
        ((0, 0, 4, 2), (2, 1, 6, 5), 2 / 22),     # corner overlap: inter 2x1, union 8 + 16 - 2
        ((10, 10, 16, 16), (12, 12, 14, 14), 4 / 36),
    ]
    for a, b, want in cases:
        assert math.isclose(RW.iou(a, b), want, abs_tol=1e-12), (a, b)
        assert math.isclose(RW.iou(b, a), want, abs_tol=1e-12), (b, a)
    # the reward path: a predicted box half over the truth
    r, why = RW.ground_reward("<answer> 1 0 3 2 </answer>", (0, 0, 2, 2))
    assert why == "ok" and math.isclose(r, 1 / 3)


def test_iou_matches_pixel_counting():
    """Brute force: integer boxes as sets of pixels (x1/y1 exclusive), |A & B| / |A | B|."""
    rng = random.Random(1)
    for _ in range(300):
        boxes = []
        for _ in range(2):
            x0, y0 = rng.randint(0, 10), rng.randint(0, 10)
            boxes.append((x0, y0, x0 + rng.randint(1, 6), y0 + rng.randint(1, 6)))
        a, b = boxes
        pa = np.zeros((20, 20), bool)
        pb = np.zeros((20, 20), bool)
        pa[a[1]:a[3], a[0]:a[2]] = True
        pb[b[1]:b[3], b[0]:b[2]] = True
        want = (pa & pb).sum() / (pa | pb).sum()
        assert math.isclose(RW.iou(a, b), want, abs_tol=1e-12), (a, b)
        assert RW.iou(a, b) == RW.iou(b, a)


# ----------------------------------------------------------------------------------------------
# edit / t2i scores on hand-made 2x2 scenes (cells 0..3, row-major)

A = Shape("circle", "red", "large")
B = Shape("square", "blue", "small")
C = Shape("triangle", "green", "large")
D = Shape("circle", "yellow", "small")


def test_cell_similarity_by_hand():
    assert RW.cell_similarity(None, None) == 1.0
    assert RW.cell_similarity(A, None) == 0.0 and RW.cell_similarity(None, A) == 0.0
    assert RW.cell_similarity(A, A) == 1.0
    assert RW.cell_similarity(A, Shape("square", "red", "large")) == pytest.approx(2 / 3)   # kind differs
    assert RW.cell_similarity(A, Shape("circle", "blue", "large")) == pytest.approx(2 / 3)  # colour
    assert RW.cell_similarity(A, Shape("circle", "red", "small")) == pytest.approx(2 / 3)   # size
    assert RW.cell_similarity(A, Shape("square", "blue", "large")) == pytest.approx(1 / 3)
    assert RW.cell_similarity(A, B) == 0.0                                                    # all differ
    for x, y in itertools.product([None, A, B, C, D], repeat=2):
        assert RW.cell_similarity(x, y) == RW.cell_similarity(y, x)


SOURCE = (A, B, None, C)


def test_edit_score_recolour_by_hand():
    A_yellow = Shape("circle", "yellow", "large")
    target = (A_yellow, B, None, C)                  # changed: [0]; kept: [1, 2, 3]
    # copy: follow = sim(A, A_yellow) = 2/3, keep = 1  ->  0.5 * 2/3 + 0.5 = 5/6
    assert RW.edit_score(SOURCE, target, SOURCE) == pytest.approx(5 / 6)
    assert RW.edit_score(SOURCE, target, target) == pytest.approx(1.0)
    # right edit, but B's colour damaged: keep = (2/3 + 1 + 1) / 3 = 8/9 -> 0.5 + 0.5 * 8/9 = 17/18
    damaged = (A_yellow, Shape("square", "red", "small"), None, C)
    assert RW.edit_score(SOURCE, target, damaged) == pytest.approx(17 / 18)
    # right edit, C wiped out: keep = (1 + 1 + 0) / 3 -> 0.5 + 1/3 = 5/6
    assert RW.edit_score(SOURCE, target, (A_yellow, B, None, None)) == pytest.approx(5 / 6)
    # right edit, a spurious shape in the empty cell 2: keep = (1 + 0 + 1) / 3 -> 5/6
    assert RW.edit_score(SOURCE, target, (A_yellow, B, D, C)) == pytest.approx(5 / 6)
    # wrong new colour AND wrong size: follow = 1/3 -> 0.5/3 + 0.5 = 2/3
    assert RW.edit_score(SOURCE, target, (Shape("circle", "blue", "small"), B, None, C)) == pytest.approx(2 / 3)


def test_edit_score_remove_move_add_by_hand():
    # remove B: changed [1] (B -> None); copying keeps B: follow 0, keep 1 -> 0.5
    remove = (A, None, None, C)
    assert RW.edit_score(SOURCE, remove, SOURCE) == pytest.approx(0.5)
    assert RW.edit_score(SOURCE, remove, remove) == pytest.approx(1.0)
    # remove done, but A shrunk: keep = (2/3 + 1 + 1) / 3 = 8/9 -> 0.5 + 4/9
    assert RW.edit_score(SOURCE, remove, (Shape("circle", "red", "small"), None, None, C)) == pytest.approx(0.5 + 4 / 9)
    # move C from cell 3 to cell 2: changed [2, 3]; copy: sim(None, C) = sim(C, None) = 0 -> 0.5
    move = (A, B, C, None)
    assert RW.edit_score(SOURCE, move, SOURCE) == pytest.approx(0.5)
    assert RW.edit_score(SOURCE, move, move) == pytest.approx(1.0)
    # copied to cell 2 but not removed from 3: follow (1 + 0) / 2 -> 0.25 + 0.5
    assert RW.edit_score(SOURCE, move, (A, B, C, C)) == pytest.approx(0.75)
    # moved but drawn small: follow (2/3 + 1) / 2 = 5/6 -> 5/12 + 0.5
    assert RW.edit_score(SOURCE, move, (A, B, Shape("triangle", "green", "small"), None)) == pytest.approx(11 / 12)
    # add D in cell 2: copy scores 0.5, the edit 1
    add = (A, B, D, C)
    assert RW.edit_score(SOURCE, add, SOURCE) == pytest.approx(0.5)
    assert RW.edit_score(SOURCE, add, add) == pytest.approx(1.0)
    # everything empty: follow 0 (sim(None, D) = 0), keep = (0 + 0 + 0) / 3 -> 0
    assert RW.edit_score(SOURCE, add, (None,) * 4) == pytest.approx(0.0)


def test_edit_copy_baseline_on_generated_edits():
    """On the world's own edits: copying scores 0.5 for remove / move / add (every changed cell flips
    between empty and a shape) and 0.5 + 0.5 * 2/3 for a recolour (kind and size still match);
    the target scores 1; both survive the render -> read_scene round trip."""
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(200):
        scene = random_scene(rng, 4, 3, 7)
        out = make_edit(scene, rng, 4)
        if out is None:
            continue
        _, _, target, qtype = out
        seen.add(qtype)
        want = 5 / 6 if qtype == "recolour" else 0.5
        assert RW.edit_score(scene, target, scene) == pytest.approx(want), qtype
        assert RW.edit_score(scene, target, target) == pytest.approx(1.0)
        if i < 40:      # the pictures: rendered and re-read, as the RL reward sees them
            read_src = read_scene(render(scene, 4, 32), 4)
            read_tgt = read_scene(render(target, 4, 32), 4)
            assert RW.edit_score(scene, target, read_tgt) == pytest.approx(1.0)
            assert RW.edit_score(scene, target, read_src) == pytest.approx(want)
    assert seen == {"recolour", "remove", "move", "add"}


def test_scene_accuracy_by_hand():
    target = (A, None, B, None)
    assert RW.scene_accuracy(target, target) == 1.0
    # cells: A==A 1, None==None 1, B vs None 0, None vs B' 0 -> 2/4
    assert RW.scene_accuracy(target, (A, None, None, Shape("square", "red", "small"))) == pytest.approx(0.5)
    # empty canvas: the fraction of empty cells
    assert RW.scene_accuracy(target, (None,) * 4) == pytest.approx(0.5)
    # B drawn red: 1 + 1 + 2/3 + 1 over 4
    assert RW.scene_accuracy(target, (A, None, Shape("square", "red", "small"), None)) == pytest.approx(11 / 12)


def test_trace_answer_by_hand():
    """The implied answer is recomputed from the lists, not read from the trace's last number."""
    t = "red shapes : r0c1 r2c2 . count 2 . squares : none . count 0 . 2 > 0 yes"
    assert RW.trace_answer(t, "compare") == "yes"
    assert RW.trace_answer(t, "add") == "2"
    assert RW.trace_answer(t, "diff") == "2"
    assert RW.trace_answer(t, "count") == "2"
    # a trace that wrote "count 5" for a two-cell list still implies 2
    assert RW.trace_answer("circles : r0c0 r1c1 . count 5", "count") == "2"
    assert RW.trace_answer("sides : r0c1 3 r1c1 4 . 3 + 4 = 7 <answer> 9 </answer>", "sides") == "7"
    assert RW.trace_answer("sides : r0c1 3 r1c1 . 3 = 3", "sides") is None          # a cell without a count
    assert RW.trace_answer("sides : r0c1 x r1c1 4 .", "sides") is None
    assert RW.trace_answer("red shapes : r0c1 . count 1 .", "add") is None          # the second list is missing
    assert RW.trace_answer("no lists at all", "count") is None


def test_trace_answer_recovers_the_truth_of_every_generated_trace():
    """On the world's own traces (an independent reference: world.make_vqa computes the truth from the
    scene): the lists are always read right, so the implied answer is the truth, and the answer the
    trace writes is the truth too."""
    rng = np.random.default_rng(0)
    seen = set()
    for i in range(800):
        scene = random_scene(rng, 4, 3, 7)
        prompt, trace, ans, truth, qtype = make_vqa(scene, rng, 4, level=1 + i % 4, traced=True)
        seen.add(qtype)
        assert RW.trace_answer(trace, qtype) == truth, (trace, qtype)
        assert ans == truth, (trace, qtype)
    assert seen == {"count", "compare", "add", "diff", "sides", "add3", "add4"}


# ----------------------------------------------------------------------------------------------
# constraint edits: many right pictures, graded (world_extras.constraint_score)

def board(cells: dict):
    """A 4 x 4 scene from {cell index: 'rs' / 'gc' / ...} (colour letter, kind letter), all large."""
    C = {"r": "red", "g": "green", "b": "blue", "y": "yellow"}
    K = {"c": "circle", "s": "square", "t": "triangle"}
    return tuple(Shape(K[v[1]], C[v[0]], "large") if i in cells and (v := cells[i]) else None for i in range(16))


def test_constraint_score_by_hand():
    """Row 0 holds red, red, blue (cells 0, 1, 2); row 2 holds green, green (cells 8, 9); the other
    rows are fine. 'No row repeats a colour': 2 broken rows of 4, fewest recolours 2."""
    src = board({0: "rc", 1: "rs", 2: "bt", 8: "gc", 9: "gs", 5: "yc"})
    fix = board({0: "rc", 1: "ys", 2: "bt", 8: "gc", 9: "rs", 5: "yc"})     # a fewest-recolours fix
    rows = ("rows",)
    assert WX.constraint_score(src, fix, src, 4, rows) == 0.0                  # do nothing: nothing fixed
    assert WX.constraint_score(src, fix, fix, 4, rows) == 1.0                  # the target
    other = board({0: "gc", 1: "rs", 2: "bt", 8: "yc", 9: "gs", 5: "yc"})   # another fewest fix
    assert WX.constraint_score(src, fix, other, 4, rows) == 1.0
    half = board({0: "rc", 1: "ys", 2: "bt", 8: "gc", 9: "gs", 5: "yc"})    # row 0 fixed, row 2 not
    assert WX.constraint_score(src, fix, half, 4, rows) == pytest.approx(0.5)
    # valid, but 3 recolours where 2 suffice: economy 1 - 1/6 (6 shapes)
    extra = board({0: "rc", 1: "ys", 2: "gt", 8: "gc", 9: "rs", 5: "yc"})
    assert WX.constraint_score(src, fix, extra, 4, rows) == pytest.approx(5 / 6)
    # fixes both rows but turns cell 5's circle into a square: kept = (5 + 1/2) / 6 occupied cells
    kind = board({0: "rc", 1: "ys", 2: "bt", 8: "gc", 9: "rs", 5: "ys"})
    assert WX.constraint_score(src, fix, kind, 4, rows) == pytest.approx(5.5 / 6)
    # removing a shape of each broken row also "fixes" them, but loses two of the 6 shapes: kept = 4 / 6,
    # below the 5 / 6 of one recolour too many (deleting is no shortcut)
    gone = board({0: "rc", 2: "bt", 8: "gc", 5: "yc"})
    assert WX.constraint_score(src, fix, gone, 4, rows) == pytest.approx(4 / 6)
    # a shape added where there was none: 7 occupied cells, the new one scores 0 -> kept 6 / 7
    added = board({0: "rc", 1: "ys", 2: "bt", 8: "gc", 9: "rs", 5: "yc", 15: "bs"})
    assert WX.constraint_score(src, fix, added, 4, rows) == pytest.approx(6 / 7)
    # breaking a row that was fine costs: row 1 fixed but now repeats yellow -> (1 - 1) / 1 = 0
    src2 = board({0: "rc", 1: "rs", 5: "yc", 6: "bs"})
    fix2 = board({0: "rc", 1: "gs", 5: "yc", 6: "bs"})
    bad = board({0: "rc", 1: "gs", 5: "yc", 6: "ys"})                           # row 1 now repeats yellow
    assert WX.constraint_score(src2, fix2, bad, 4, rows) == 0.0
    # columns: cells 0 and 4 share column 0
    srcc = board({0: "rc", 4: "rs"})
    fixc = board({0: "rc", 4: "bs"})
    assert WX.constraint_score(srcc, fixc, srcc, 4, ("cols",)) == 0.0
    assert WX.constraint_score(srcc, fixc, fixc, 4, ("cols",)) == 1.0
    assert WX.constraint_score(srcc, fixc, fixc, 4, ("rows",)) == 0.0      # rows were never broken: 0 / 0 fixed


def constraint_world(**looks):
    """The data config and world of the constraint edits (edit levels up to 4, optional looks) and the
    judge the rewards grade its pictures with (no VQ decoder: the tests hand it scenes)."""
    d = DataConfig(edit_max_level=4, **looks)
    w = WX.world_for(d)
    return d, w, RW.PictureJudge(None, read_scene, 4, w.graders)


def test_edit_reward_dispatches_on_the_question():
    src = board({0: "rc", 1: "rs"})
    fix = board({0: "rc", 1: "gs"})
    _, _, judge = constraint_world()
    ex = SimpleNamespace(qtype="rows", scene=src, answer=fix)
    assert RW.edit_reward(ex, fix, judge) == 1.0 and RW.edit_reward(ex, src, judge) == 0.0
    one = SimpleNamespace(qtype="recolour", scene=src, answer=fix)
    assert RW.edit_reward(one, src, judge) == pytest.approx(RW.edit_score(src, fix, src)) == pytest.approx(5 / 6)


def test_generated_constraint_edits_score_through_pictures():
    """The world's own constraint edits, rendered in random looks and re-read: the target scores 1,
    the source 0."""
    rng = np.random.default_rng(11)
    d, w, judge = constraint_world(shades=3, fills=4, floors=6)
    n = 0
    while n < 30:
        scene = random_scene(rng, 4, 3, 7)
        out = w.edit_makers[int(rng.integers(3, 5))](scene, rng, 4)
        if out is None:
            continue
        _, _, target, qtype = out
        ex = SimpleNamespace(qtype=qtype, scene=scene, answer=target)
        looks = data_random_looks(rng, target, d)
        assert RW.edit_reward(ex, read_scene(w.render(target, 4, 32, looks), 4), judge) == 1.0
        assert RW.edit_reward(ex, read_scene(w.render(scene, 4, 32, looks), 4), judge) == 0.0
        n += 1
