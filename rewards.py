"""
Verifiable rewards, one per task family, and the robust answer parser they share.

Paper mapping (PAPER.md §6):
  vqa     0-1 correctness of the text inside <answer> ... </answer> (numbers normalised)
  ground  IoU between the predicted box and the ground-truth box, in [0, 1]
  edit    a real-valued edit score in [0, 1] read from the decoded picture. The paper uses the
          EditScore reward model (a Qwen2.5-VL judge); our world is synthetic, so we can score
          exactly: the edited picture is re-read cell by cell (data.read_scene) and compared with
          the target scene: 0.5 * (instruction followed in the changed cells)
                          + 0.5 * (the rest of the picture preserved).
          Each cell earns partial credit (a third per matching kind / colour / size), so the
          reward is genuinely real-valued, which is what tree search needs (§4).
          Copying the input scores 0.5 * (partial credit of the input's changed cells) + 0.5 * 1:
          exactly 0.5 for remove / move / add, 0.5 + 0.5 * 2/3 for a recolour (kind and size still
          match): eval.py reports that baseline.
  t2i     (eval only; the paper does not RL text-to-image) mean per-cell attribute accuracy.
  caption (eval only) the same accuracy, of the scene the caption's text describes.

Parsing never raises: a missing tag, two answers, garbage or an empty response scores 0 and the
reason is returned so callers can count failures by reason in their logs.

Exercise: python -m pytest tests/test_rewards.py -q
"""
from __future__ import annotations

import re

from data import COLOURS, KINDS, SIZES, Scene, Shape

# ----------------------------------------------------------------------------------------------
# parsing

_NUM = re.compile(r"^-?\d+(\.\d+)?$")


def extract_answer(text: str) -> tuple[str | None, str]:
    """The text inside the single <answer> ... </answer> block, or (None, reason).
    reasons: ok | no_answer_tag | unclosed | multiple_answers | empty."""
    opens, closes = text.count("<answer>"), text.count("</answer>")
    if opens == 0:
        return None, "no_answer_tag"
    if opens > 1 or closes > 1:
        return None, "multiple_answers"
    if closes == 0 or text.index("</answer>") < text.index("<answer>"):
        return None, "unclosed"
    inner = text.split("<answer>", 1)[1].split("</answer>", 1)[0].strip()
    return (inner, "ok") if inner else (None, "empty")


def normalise(ans: str) -> str | None:
    """'3' / '3.0' / ' Yes ' -> '3' / '3' / 'yes'; anything else (several words, junk) -> None."""
    a = ans.strip().lower()
    if _NUM.match(a):
        v = float(a)
        return str(int(v)) if v.is_integer() else str(v)
    if a in ("yes", "no"):
        return a
    return None


def parse_vqa(text: str) -> tuple[str | None, str]:
    inner, why = extract_answer(text)
    if inner is None:
        return None, why
    v = normalise(inner)
    return (v, "ok") if v is not None else (None, "garbage")


def parse_box(text: str) -> tuple[tuple[float, float, float, float] | None, str]:
    inner, why = extract_answer(text)
    if inner is None:
        return None, why
    parts = inner.split()
    if len(parts) != 4 or not all(_NUM.match(p) for p in parts):
        return None, "bad_box"
    x0, y0, x1, y1 = (float(p) for p in parts)
    if x1 <= x0 or y1 <= y0:
        return None, "bad_box"
    return (x0, y0, x1, y1), "ok"


# ----------------------------------------------------------------------------------------------
# rewards

def vqa_reward(text: str, truth: str) -> tuple[float, str]:
    v, why = parse_vqa(text)
    if v is None:
        return 0.0, why
    return float(v == normalise(truth)), "ok"


def iou(a, b) -> float:
    """Intersection over union of boxes (x0, y0, x1, y1) with exclusive x1/y1 (pixel boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ground_reward(text: str, box) -> tuple[float, str]:
    pred, why = parse_box(text)
    if pred is None:
        return 0.0, why
    return iou(pred, box), "ok"


def cell_similarity(a, b) -> float:
    """1 if both empty; 0 if exactly one is empty; else a third per matching kind, colour, size."""
    if a is None or b is None:
        return float(a is None and b is None)
    return ((a.kind == b.kind) + (a.colour == b.colour) + (a.size == b.size)) / 3


def edit_score(source: Scene, target: Scene, pred: Scene) -> float:
    """0.5 * mean similarity over the cells the instruction changes
     + 0.5 * mean similarity over the cells it must keep."""
    changed = [i for i in range(len(target)) if source[i] != target[i]]
    kept = [i for i in range(len(target)) if source[i] == target[i]]
    follow = sum(cell_similarity(pred[i], target[i]) for i in changed) / max(len(changed), 1)
    keep = sum(cell_similarity(pred[i], target[i]) for i in kept) / max(len(kept), 1)
    return 0.5 * follow + 0.5 * keep


def parse_caption(text: str, grid: int) -> tuple[Scene | None, str]:
    """'<answer> large red circle r1c1 , small blue square r3c2 </answer>' -> a Scene (cells not
    named are empty). reasons: those of extract_answer | bad_item (not 'size colour kind rXcY', or
    a cell outside the board) | duplicate_cell. One bad item fails the whole caption: a caption that
    cannot be read back is not a description."""
    inner, why = extract_answer(text)
    if inner is None:
        return None, why
    scene: list = [None] * (grid * grid)
    for item in inner.split(","):
        w = item.split()
        m = re.fullmatch(r"r(\d+)c(\d+)", w[3]) if len(w) == 4 else None
        if (m is None or w[0] not in SIZES or w[1] not in COLOURS or w[2] not in KINDS
                or int(m[1]) >= grid or int(m[2]) >= grid):
            return None, "bad_item"
        cell = int(m[1]) * grid + int(m[2])
        if scene[cell] is not None:
            return None, "duplicate_cell"
        scene[cell] = Shape(w[2], w[1], w[0])
    return tuple(scene), "ok"


def caption_reward(text: str, scene: Scene, grid: int) -> tuple[float, str]:
    """Per-cell attribute accuracy of the scene the caption describes (an unreadable caption: 0)."""
    pred, why = parse_caption(text, grid)
    if pred is None:
        return 0.0, why
    return scene_accuracy(scene, pred), "ok"


def scene_accuracy(target: Scene, pred: Scene) -> float:
    """Text-to-image attribute accuracy: mean per-cell similarity to the described scene."""
    return sum(cell_similarity(p, t) for p, t in zip(pred, target)) / len(target)
