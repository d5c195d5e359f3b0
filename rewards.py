"""
Verifiable rewards, one per task family, and the robust answer parser they share (METHOD.md §8).

The rewards of LaViDa-R1 (arXiv 2602.14147):
  vqa     0-1 correctness of the text inside <answer> ... </answer> (numbers normalised)
  ground  IoU between the predicted box and the ground-truth box, in [0, 1]
  edit    a real-valued score of the generated picture, in [0, 1]. The paper asks the EditScore
          reward model (a Qwen2.5-VL judge); our world is synthetic, so we score exactly: the
          picture is decoded (the VQ decoder) and re-read cell by cell (the world's scene reader;
          both passed in a PictureJudge) and compared with the target scene (edit_score):
              0.5 * (instruction followed in the changed cells) + 0.5 * (the rest preserved),
          each cell earning a third per matching kind / colour / size, so the reward is genuinely
          real-valued, which is what tree search needs (METHOD.md §6). Copying the input scores
          0.5 for remove / move / add, 0.5 + 0.5 * 2/3 for a recolour (metrics.baselines). Edits
          with many right pictures (the colour constraints of world_extras) bring their own grader.
  t2i     (eval only; the paper does not RL text-to-image) mean per-cell attribute accuracy.

Parsing never raises: a missing tag, two answers, garbage or an empty response scores 0 and the
reason is returned so callers can count failures by reason in their logs. score_rows applies the
right reward to a batch of sampled rows (rollouts and held-out evaluation both call it).

The file reads top-down: score_rows, the picture rewards, the vqa reward and its parser, the grounding
reward, then trace_answer (whether a reasoning trace implies its answer: answer-forcing's check).

Exercise: python -m pytest tests/test_rewards.py -q
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Callable

# ----------------------------------------------------------------------------------------------
# scoring sampled rows (rollouts and held-out evaluation share it)


def score_rows(task: str, examples, resp, layout, tok, judge):
    """Rewards of sampled responses `resp` (B, R) ids of `task`, one per example: returns (rewards
    [B floats in [0, 1]], reasons [B strings, "ok" or why the text did not parse], decoded pictures
    (B, H, W, 3) in [0, 1] or None, the scenes re-read from them or None). judge (PictureJudge)
    decodes and reads the pictures of edit and t2i: each once, in picture_rewards."""
    texts = [tok.decode(r[:layout.R_text]) for r in resp]
    if layout.n_img:
        codes = resp[:, layout.R_text:layout.R] - tok.img_offset                  # (B, n_img)
        out, pics, scenes = picture_rewards(task, examples, codes, judge)
        return out, ["ok"] * len(out), pics, scenes
    out, why = [], []
    for b, ex in enumerate(examples):
        r, w = vqa_reward(texts[b], ex.answer) if task == "vqa" else ground_reward(texts[b], ex.answer)
        out.append(r)
        why.append(w)
    return out, why, None, None


# ----------------------------------------------------------------------------------------------
# pictures: edit and text-to-image


def picture_rewards(task: str, examples, codes, judge) -> tuple[list[float], object, list]:
    """The rewards of generated pictures, codes (B, n_img): decode them, re-read their scenes, and grade
    each against its example (edit: edit_reward; t2i: scene_accuracy). Returns (rewards, pictures
    (B, H, W, 3) in [0, 1], the re-read scenes)."""
    pics = judge.decode(codes)
    scenes = [judge.read_scene(p, judge.grid) for p in pics]
    if task == "edit":
        return [edit_reward(ex, s, judge) for ex, s in zip(examples, scenes)], pics, scenes
    return [scene_accuracy(ex.answer, s) for ex, s in zip(examples, scenes)], pics, scenes


@dataclass
class PictureJudge:
    """What the rewards need to see a generated picture: the VQ decoder and the world's scene reader
    (each one call, nothing of the method inside), and the graders of edits with many right pictures
    (world_extras' colour constraints; qtype -> grade(source, target, pred, grid)). data.picture_judge
    builds it from a run's config and VQ tokenizer."""
    decode: Callable               # (B, n_img) codes -> (B, H, W, 3) pictures in [0, 1] (vq.VQVAE.decode)
    read_scene: Callable           # (picture, grid) -> the scene: one Shape or None per cell (world.read_scene)
    grid: int
    graders: dict = field(default_factory=dict)


def edit_reward(ex, pred, judge) -> float:
    """The reward of the re-read edited picture `pred` for example `ex`: edit_score against the one
    right target, or the grader of its question type when many pictures are right."""
    grade = judge.graders.get(ex.qtype)
    return grade(ex.scene, ex.answer, pred, judge.grid) if grade else edit_score(ex.scene, ex.answer, pred)


def cell_similarity(a, b) -> float:
    """1 if both empty; 0 if exactly one is empty; else a third per matching kind, colour, size."""
    if a is None or b is None:
        return float(a is None and b is None)
    return ((a.kind == b.kind) + (a.colour == b.colour) + (a.size == b.size)) / 3


def edit_score(source: tuple, target: tuple, pred: tuple) -> float:
    """0.5 * mean similarity over the cells the instruction changes
     + 0.5 * mean similarity over the cells it must keep.
    Each cell earns partial credit (a third per matching kind / colour / size), so the reward is
    genuinely real-valued, which is what tree search needs (METHOD.md §6). Copying the input scores
    exactly 0.5 for remove / move / add, 0.5 + 0.5 * 2/3 for a recolour (metrics.baselines).
    A part with no cells is vacuously met (1): an instruction that changes nothing (a user's row
    whose target is its source) gives a perfect prediction 1, not 0.5."""
    changed = [i for i in range(len(target)) if source[i] != target[i]]
    kept = [i for i in range(len(target)) if source[i] == target[i]]
    follow = sum(cell_similarity(pred[i], target[i]) for i in changed) / len(changed) if changed else 1.0
    keep = sum(cell_similarity(pred[i], target[i]) for i in kept) / len(kept) if kept else 1.0
    return 0.5 * follow + 0.5 * keep


def scene_accuracy(target: tuple, pred: tuple) -> float:
    """Text-to-image attribute accuracy: mean per-cell similarity to the described scene."""
    return sum(cell_similarity(p, t) for p, t in zip(pred, target)) / len(target)


# ----------------------------------------------------------------------------------------------
# vqa: the answer, parsed and normalised


def vqa_reward(text: str, truth: str) -> tuple[float, str]:
    """1 when the answer block matches `truth`, else 0, with the reason (rewards.REASONS). A number or
    yes/no truth is matched by normalise (exact numbers); any other truth (a user's word answer:
    "red", "dark blue") by its words, case and spacing aside."""
    want = normalise(truth)
    if want is None:                                    # a word answer
        inner, why = extract_answer(text)
        return (0.0, why) if inner is None else (float(words(inner) == words(truth)), "ok")
    v, why = parse_vqa(text)
    if v is None:
        return 0.0, why
    return float(v == want), "ok"


def words(text: str) -> str:
    """' Dark  Blue ' -> 'dark blue': a word answer as compared."""
    return " ".join(text.lower().split())


def parse_vqa(text: str) -> tuple[str | None, str]:
    inner, why = extract_answer(text)
    if inner is None:
        return None, why
    v = normalise(inner)
    return (v, "ok") if v is not None else (None, "garbage")


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


_NUM = re.compile(r"^-?\d+(\.\d+)?$")


def normalise(ans: str) -> str | None:
    """'3' / '3.0' / ' Yes ' -> '3' / '3' / 'yes'; anything else (several words, junk) -> None.
    Numbers are compared exactly, at any size (Decimal, not float: float would call
    99999999999999999999 and 100000000000000000000 the same answer)."""
    a = ans.strip().lower()
    if _NUM.match(a):
        v = Decimal(a)                                  # exact: no context rounding from a string
        return str(int(v)) if v == v.to_integral_value() else format(v, "f").rstrip("0")
    if a in ("yes", "no"):
        return a
    return None


# ----------------------------------------------------------------------------------------------
# grounding: the box, parsed, and its IoU


def ground_reward(text: str, box) -> tuple[float, str]:
    pred, why = parse_box(text)
    if pred is None:
        return 0.0, why
    return iou(pred, box), "ok"


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


def iou(a, b) -> float:
    """Intersection over union of boxes (x0, y0, x1, y1) with exclusive x1/y1 (pixel boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# the answer a reasoning trace implies (answer-forcing's check, METHOD.md §5)


def trace_answer(text: str, qtype: str) -> str | None:
    """The answer a vqa reasoning trace implies, recomputed from what it read off the picture
    (its lists), not copied from the number it wrote last: count -> the first list's length;
    compare -> "yes" if the first list is longer than the second; add / diff -> the sum / absolute
    difference of the two lengths; add3 / add4 -> the sum of the first three / four lengths; sides -> the sum of the listed side counts. "none" is an empty
    list. Returns None when the trace lacks the lists its question type needs or a side count is not
    a number. Used to check answer-forcing's inpainted reasoning against the forced answer
    (METHOD.md §5, claim C3 of §10): a trace whose lists imply another answer is not a real explanation of it."""
    lists = trace_lists(text)
    if qtype == "sides":
        if not lists or len(lists[0]) % 2:
            return None
        terms = lists[0][1::2]                     # "sides : r0c0 4 r1c2 3 ." -> cells and counts alternate
        return str(sum(int(t) for t in terms)) if all(t.isdigit() for t in terms) else None
    n = [0 if lst == ("none",) else len(lst) for lst in lists]
    if qtype == "count":
        return str(n[0]) if n else None
    if qtype in ("add3", "add4"):                  # the sum of the first k counts (difficulty levels 3, 4)
        k = int(qtype[-1])
        return str(sum(n[:k])) if len(n) >= k else None
    if len(n) < 2:
        return None
    a, b = n[0], n[1]
    return {"compare": "yes" if a > b else "no", "add": str(a + b), "diff": str(abs(a - b))}.get(qtype)


def trace_lists(text: str) -> list[tuple[str, ...]]:
    """The lists a vqa trace reads off the picture: the words between each ':' and the next '.'.
    'red shapes : r0c1 r2c2 . count 2 . squares : none . count 0 . 2 > 0 yes' -> [(r0c1, r2c2), (none,)];
    a sides trace gives one list of (cell, sides) words. A list the model never closed is dropped."""
    out, cur = [], None
    for w in text.split():
        if w == ":":
            cur = []
        elif w == "." and cur is not None:
            out.append(tuple(cur))
            cur = None
        elif cur is not None:
            cur.append(w)
    return out
