"""
Users' own data: JSONL rows of any of the four tasks (their own pictures, prompts and answers) loaded
into the same examples as the shape world's (METHOD.md §8), and an exporter that writes shape-world
examples in that format to start from.

    python user_data.py                              # print a few examples of each family
    python user_data.py --export=example_data --n=8  # write example data (PNG + data.jsonl)
    python train.py --data.jsonl=example_data/data.jsonl

A malformed row is a one-line error naming the file, the line, the key and the fix (load_jsonl), or
counted and skipped (data.load_user_rows, which the stages call).

Exercise it: python -m pytest tests/test_user_data.py tests/test_fuzz.py -q
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np
from PIL import Image

from config import get_config
from tokens import box_text
from world import SPLITS, Example, build_pools, ensure_images, read_scene
from world_extras import world_for

class JSONLError(ValueError):
    pass


JSONL_NEEDS = {"vqa": ("image",), "ground": ("image", "box"), "edit": ("image", "target_image"),
               "t2i": ("target_image",)}


def _jsonl_image(base: str, rel, d, where: str) -> tuple[np.ndarray, tuple[int, int]]:
    """(the picture resized to data.image_size as (S, S, 3) uint8, its original (width, height))."""
    try:
        p = os.path.join(base, rel)       # inside the try: a non-string path is a row error too
        im = Image.open(p).convert("RGB")
    except Exception as e:
        raise JSONLError(f"{where}: cannot read image {rel!r} ({type(e).__name__}); "
                         f"fix the path (relative to the JSONL file)") from None
    size = im.size
    im = im.resize((d.image_size, d.image_size), Image.BOX)
    return np.asarray(im, dtype=np.uint8), size


def _jsonl_box(b, size: tuple[int, int], d, where: str) -> tuple[int, int, int, int]:
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
    S = d.image_size
    X0, Y0 = min(int(round(x0 * S / W)), S - 1), min(int(round(y0 * S / H)), S - 1)
    X1, Y1 = min(max(int(round(x1 * S / W)), X0 + 1), S), min(max(int(round(y1 * S / H)), Y0 + 1), S)
    return X0, Y0, X1, Y1                 # at least 1 px wide and high, inside the S x S picture


def _jsonl_example(row, where: str, base: str, d) -> Example:
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
    image, size = _jsonl_image(base, row["image"], d, where) if "image" in row else (None, None)
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
        if not ans_text or "<" in ans_text:
            raise JSONLError(f"{where}: the vqa answer {ans_text!r} must be a number, yes/no or words (no tags)")
        answer = ans_text
    elif task == "ground":
        answer = _jsonl_box(row["box"], size, d, where)
        ans_text = box_text(answer)
        if "response" in row:            # the reasoning before <answer>; the box itself comes from "box"
            trace = str(row["response"]).split("<answer>")[0].replace("<think>", "").replace("</think>", "").strip()
    else:
        trace = row.get("response", "" if task == "t2i" else None)
    ex = Example(task, "user", row["prompt"].strip(), None, answer, trace, ans_text, image=image)
    if image is not None and task == "edit":     # scored as source-vs-target scenes, like ours
        ex.scene = read_scene(image, d.grid)
    if "target_image" in row:
        ex.target_image = _jsonl_image(base, row["target_image"], d, where)[0]
        ex.answer = read_scene(ex.target_image, d.grid)     # scored like the synthetic sets
    ex.split = row.get("split", "")
    if ex.split == "sft" and ex.trace is None:
        raise JSONLError(f"{where}: a row with \"split\": \"sft\" needs a 'response' (SFT trains on it)")
    return ex


def load_jsonl(path: str, d, strict: bool = True) -> tuple[list[Example], int]:
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
                ex = _jsonl_example(row, where, base, d)
                ex.key = f"user|{lineno}"
                out.append(ex)
            except JSONLError as e:
                if strict:
                    raise
                skipped.append(str(e))
    out, repeats = held_out_repeats(out, path)
    return out, skipped + repeats


def split_of(ex: Example) -> str:
    """A user row's split: its "split", else sft for a traced row and rl for an answer-only one."""
    return ex.split or ("sft" if ex.trace is not None else "rl")


def held_out_repeats(rows: list[Example], path: str) -> tuple[list[Example], list[str]]:
    """Keep the held-out splits held out: a row of eval that repeats a row of sft or rl (same task,
    prompt and picture), or a row of val that repeats one of sft, rl or eval, is dropped, as
    world.build_pools drops a split's keys seen in the splits before it. Returns (the rows kept, one
    message per dropped row, counted with the skipped rows)."""
    order = {s: i for i, s in enumerate(SPLITS)}          # sft, rl, eval, val
    rank = [order[split_of(e)] for e in rows]
    content = [(e.task, " ".join(e.prompt.split()), None if e.image is None else hashlib.sha1(e.image.tobytes()).hexdigest())
               for e in rows]
    first: dict[tuple, int] = {}                           # content -> the row of its earliest split
    for i in sorted(range(len(rows)), key=rank.__getitem__):
        first.setdefault(content[i], i)
    kept, dropped = [], []
    for i, e in enumerate(rows):
        j = first[content[i]]
        if SPLITS[rank[i]] in ("eval", "val") and rank[j] < rank[i]:
            dropped.append(f"{path}:{e.key.split('|')[1]}: {SPLITS[rank[i]]} row repeats line {rows[j].key.split('|')[1]} "
                           f"({SPLITS[rank[j]]}: same task, prompt and picture); dropped from {SPLITS[rank[i]]}, "
                           f"which must stay held out")
        else:
            kept.append(e)
    return kept, dropped


def export_examples(pools, out_dir: str, n: int, d) -> str:
    """Write n shape-world examples per task and split as PNG files + one data.jsonl in out_dir, in
    the format load_jsonl reads: sft rows with their traces, rl rows answer-only, eval and val rows
    with "split". A starting point for your own data; returns the JSONL path."""
    os.makedirs(out_dir, exist_ok=True)
    rows, world = [], world_for(d)
    for task in pools:
        for split in ("sft", "rl", "eval", "val"):
            exs = pools[task][split][:n]
            ensure_images(exs, d, world)
            for i, ex in enumerate(exs):
                name = f"{task}_{split}_{i}"
                row = {"task": task, "prompt": ex.prompt}
                if split != "sft" and split != "rl":
                    row["split"] = split
                if ex.image is not None:
                    Image.fromarray(ex.image).save(os.path.join(out_dir, name + ".png"))
                    row["image"] = name + ".png"
                if task in ("edit", "t2i"):
                    Image.fromarray(world.render(ex.answer, d.grid, d.image_size, ex.target_looks)).save(
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
    cfg, opts = get_config(extra={"export": "", "n": 8})
    pools = build_pools(cfg.data, world_for(cfg.data))
    if opts["export"]:
        print(f"wrote {export_examples(pools, opts['export'], opts['n'], cfg.data)}")
        raise SystemExit(0)
    for task in pools:
        print(f"--- {task}: " + ", ".join(f"{s}={len(v)}" for s, v in pools[task].items()))
        for ex in pools[task]["sft"][:3]:
            print(f"  [{ex.qtype}] {ex.prompt}\n     trace: {ex.trace}\n     answer: {ex.answer_text or ''}")
