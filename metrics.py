"""
Held-out evaluation: fixed sets, fixed seeds, one number per task, baselines next to it, and a PNG
grid of prompts, inputs and outputs a person can look at.

What stands for the paper's benchmarks (METHOD.md §8): MathVista-style accuracy -> `vqa_acc`; LISA-Grounding mIoU and P@0.5
-> `ground_miou`, `ground_p50`; ImgEdit -> `edit_score` (our exact edit score, rewards.py);
text-to-image attribute accuracy (GenEval-like) -> `t2i_shape_acc` / `t2i_cell_acc`.

Baselines reported by the same call (a trained model must beat them clearly):
  vqa     the most common ground-truth answer of each question type in the RL pool (image-blind)
  ground  the box of a uniformly random shape of the scene (exact expectation over the shapes)
  edit    copy the input picture unchanged (0.5 + partial credit on levels 1-2, rewards.edit_score;
          0 on the constraint edits, world_extras.constraint_score)
  t2i     an empty canvas (cell accuracy = fraction of empty cells; shape accuracy 0)

For grounding it also reports the mean outward offset of the predicted boxes (`box_pad_metric`: a
box-size bias); for vqa it splits the errors into reading (a cell list of the trace is wrong) and
reasoning (every list right, the arithmetic after it wrong): `reading_metrics`.

Decoding is deterministic: text greedy (diffusion.temperature), image slots sampled at
diffusion.image_temperature with a generator seeded by eval.seed, so the same checkpoint gives the
same numbers. Exercise: python eval.py --preset=toy (evaluates runs/toy/ckpt_rl.pt, else ckpt_sft.pt;
writes metrics_eval.json and samples_eval.png next to it). Used during training by train.py / rl.py
for the quick evals on the validation split (quick_eval).
"""
from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter, defaultdict

import numpy as np
import torch
from PIL import Image, ImageDraw

import rewards as RW
from common import Stopped, check_stop, from_rank0, save_checkpoint, unwrap
from data import picture_judge
from diffusion import sample
from rollout import rollout_diffusion
from tokens import TASKS, collate, parse_mix
from world import bucket, parse_levels, shape_box
from world_extras import world_for


def box_pad_metric(exs, resp, layout, tok) -> dict:
    """ground_box_pad_px: the mean outward offset of the predicted box edges in pixels over the boxes
    that parse (0 = exact size, > 0 too loose, < 0 too tight): a bias the IoU alone does not show."""
    pads = []
    for b, e in enumerate(exs):
        box = RW.parse_box(tok.decode(resp[b][:layout.R_text]))[0]
        if box is not None:
            (x0, y0, x1, y1), (p0, q0, p1, q1) = e.answer, box
            pads.append(((x0 - p0) + (y0 - q0) + (p1 - x1) + (q1 - y1)) / 4)
    return {"ground_box_pad_px": float(np.mean(pads)) if pads else float("nan")}


def reading_metrics(exs, resp, layout, tok, rewards) -> dict:
    """Where vqa answers go wrong: *reading* (a cell list in the trace differs from the truth's) or
    *reasoning* (every list right, the count / sum / comparison after it wrong). Why: the toy's vqa
    accuracy is the product of both, and they call for different fixes (RESULTS.md, SFT).
      vqa_lists_exact       share of the ground-truth traces' lists the model reproduced exactly,
                            list by list in order
      vqa_wrong_lists_right share of the wrong answers whose lists were all exact (reasoning slips)"""
    n_lists = n_exact = n_wrong = n_wrong_read_ok = 0
    for ex, r, x in zip(exs, resp, rewards):
        if not ex.trace:
            continue
        want, got = RW.trace_lists(ex.trace), RW.trace_lists(tok.decode(r[:layout.R_text]))
        exact = [i < len(got) and got[i] == w for i, w in enumerate(want)]
        n_lists, n_exact = n_lists + len(want), n_exact + sum(exact)
        if x < 1:
            n_wrong, n_wrong_read_ok = n_wrong + 1, n_wrong_read_ok + all(exact)
    m = {}
    if n_lists:
        m["vqa_lists_exact"] = n_exact / n_lists
    if n_wrong:
        m["vqa_wrong_lists_right"] = n_wrong_read_ok / n_wrong
    return m


@torch.no_grad()
def generate(model, bundle, task: str, idx: list[int], split: str, cfg, device, autocast, seed: int):
    """Sample responses for examples `idx` of (task, split) in eval batches. Returns (B, R) ids."""
    sets = {task: bundle.sets[task][split]}
    gen = torch.Generator(device=device).manual_seed(seed)
    outs = []
    for i in range(0, len(idx), cfg.eval.batch_size):
        check_stop()                # a stop request (SIGINT/SIGTERM): common.Stopped between batches
        batch = collate(sets, [(task, j) for j in idx[i:i + cfg.eval.batch_size]], bundle.tok,
                        responses=False).to(device)
        with autocast:
            tokens, _ = sample(model, batch, bundle.tok, cfg.diffusion, generator=gen)
        outs.append(tokens[:, batch.P:batch.P + sets[task].layout.R].cpu())
    return torch.cat(outs)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on
    Code", arXiv 2107.03374): from n samples of which c are right, the probability that at least one
    of k samples drawn without replacement is right, 1 - C(n-c, k) / C(n, k). Needs 1 <= k <= n.
    Computed as a product so that it stays exact for large n."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:                   # every k-subset holds a right sample
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def best_of_k(scores, k: int) -> float:
    """The expected best score of k samples drawn without replacement from the n scored samples
    (real-valued rewards, e.g. the edit score): with s_(1) <= ... <= s_(n) sorted, sample i is the
    best of a k-subset in C(i-1, k-1) of the C(n, k) subsets, so E[max] = sum_i s_(i) C(i-1, k-1) / C(n, k)."""
    s, n = sorted(scores), len(scores)
    if not 1 <= k <= n:
        raise ValueError(f"best_of_k: need 1 <= k <= n, got n={n}, k={k}")
    return sum(x * math.comb(i, k - 1) for i, x in enumerate(s)) / math.comb(n, k)


@torch.no_grad()
def sample_scores(model, bundle, vq, cfg, device, autocast, task: str, split: str, idx: list[int], n_samples: int,
                  temperature: float, seed: int) -> list[list[float]]:
    """n_samples responses per prompt idx of (task, split) at `temperature` with the rollout
    sampler, scored: (len(idx), n_samples) rewards. Prompts are batched eval.batch_size rows at a time."""
    ts, dcfg, judge = bundle.sets[task][split], rollout_diffusion(cfg), picture_judge(cfg, vq)
    per_call = max(1, cfg.eval.batch_size // n_samples)              # prompts per sampler call
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = []
    for i in range(0, len(idx), per_call):
        check_stop()
        chunk = idx[i:i + per_call]
        batch = collate({task: ts}, [(task, j) for j in chunk], bundle.tok, responses=False)
        batch = batch.to(device).repeat(n_samples)                   # prompt-major: n_samples rows per prompt
        with autocast:
            tokens, _ = sample(model, batch, bundle.tok, dcfg, temperature=temperature,
                               image_temperature=temperature, generator=gen)
        exs = [ts.examples[j] for j in chunk for _ in range(n_samples)]
        r, _, _, _ = RW.score_rows(task, exs, tokens[:, batch.P:batch.P + ts.layout.R].cpu(), ts.layout,
                                   bundle.tok, judge)
        scores += [r[p * n_samples:(p + 1) * n_samples] for p in range(len(chunk))]
    return scores


RIGHT = {"vqa": 1.0, "ground": 0.5}      # vqa rewards are 0/1; a box counts as right at IoU >= 0.5


@torch.no_grad()
def pass_at_k_metrics(model, bundle, vq, cfg, device, autocast, n_samples: int, ks=(1, 4, 8),
                      split: str = "eval", n: int | None = None, temperature: float = 1.0) -> dict:
    """How much a policy could gain by sharpening alone: n_samples responses per held-out prompt at
    the rollout temperature (the RL policy, not greedy eval decoding), then per task
      vqa     pass@k: at least one of k samples answers right           vqa_pass@k
      ground  pass@k with "right" = IoU >= 0.5                           ground_pass@k
      edit    the expected best edit score of k samples (best-of-k)      edit_best@k
    averaged over the first n prompts (default eval.n_per_task). ks larger than n_samples are skipped."""
    n = cfg.eval.n_per_task if n is None else n
    out, was_training = {}, model.training
    model.eval()
    for task in (t for t in ("vqa", "ground", "edit") if t in bundle.sets):
        idx = list(range(min(n, len(bundle.sets[task][split]))))
        scores = sample_scores(model, bundle, vq, cfg, device, autocast, task, split, idx, n_samples,
                               temperature, cfg.eval.seed + 100 + TASKS.index(task))
        for k in (k for k in ks if k <= n_samples):
            if task == "edit":
                out[f"edit_best@{k}"] = float(np.mean([best_of_k(s, k) for s in scores]))
            else:
                out[f"{task}_pass@{k}"] = float(np.mean([pass_at_k(n_samples, sum(x >= RIGHT[task] for x in s), k)
                                                         for s in scores]))
    model.train(was_training)
    return out


def mean(xs) -> float:
    """The mean, NaN for nothing (e.g. a baseline on a JSONL eval set that has no such rows)."""
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")


def vqa_prior_hits(bundle, examples) -> list[tuple[str, bool]]:
    """(qtype, right) per vqa example for the image-blind guess: the most common answer of its
    question type in the RL pool."""
    prior = defaultdict(Counter)
    for ex in bundle.sets["vqa"]["rl"].examples:
        prior[ex.qtype][ex.answer] += 1
    return [(e.qtype, bool(prior[e.qtype]) and prior[e.qtype].most_common(1)[0][0] == e.answer) for e in examples]


def random_shape_ious(examples, d) -> list[list[float]]:
    """Per grounding example with a known scene, the IoU of every shape's box with the true box: a
    uniformly random shape's expected IoU is their mean (exact, no sampling)."""
    return [[RW.iou(shape_box(i, s, d.grid, d.image_size), e.answer) for i, s in enumerate(e.scene) if s]
            for e in examples if e.scene is not None]


def baselines(bundle, cfg) -> dict:
    """Image-blind / copy / random-choice baselines on the same held-out examples. Rows a baseline
    cannot score (a user's grounding picture whose scene is unknown) are left out of it."""
    d, out, judge = cfg.data, {}, picture_judge(cfg, None)
    ev = {t: bundle.sets[t]["eval"].examples[:cfg.eval.n_per_task] for t in bundle.sets}
    hit = vqa_prior_hits(bundle, ev["vqa"])
    out["vqa_prior_acc"] = mean(h for _, h in hit)
    out["vqa_prior_by_type"] = {q: mean(h for t, h in hit if t == q) for q in sorted({t for t, _ in hit})}
    ious = random_shape_ious(ev["ground"], d)
    out["ground_random_miou"] = mean(np.mean(x) for x in ious if x)
    out["ground_random_p50"] = mean(np.mean([v >= 0.5 for v in x]) for x in ious if x)
    out["edit_copy_score"] = mean(RW.edit_reward(e, e.scene, judge) for e in ev["edit"] if e.scene is not None)
    empty = (None,) * (d.grid * d.grid)
    out["t2i_empty_cell_acc"] = mean(RW.scene_accuracy(e.answer, empty) for e in ev["t2i"])
    out["t2i_empty_shape_acc"] = 0.0
    return out


def evaluate(model, bundle, vq, cfg, device, autocast, split: str = "eval", n: int | None = None,
             tasks=None, grid_path: str | None = None) -> dict:
    """Held-out metrics per task (and the sample grid if grid_path is given). tasks=None: every
    family the SFT mix trains (train.task_mix; the RL stage keeps training those through its SFT rows)."""
    if tasks is None:
        mix = parse_mix(cfg.train.task_mix)
        tasks = [t for t in TASKS if mix.get(t, 0) > 0]
    was_training = model.training
    model.eval()
    n = cfg.eval.n_per_task if n is None else n
    m, rows, judge = {}, {}, picture_judge(cfg, vq)
    t0 = time.time()
    for task in tasks:
        ts = bundle.sets[task][split]
        idx = list(range(min(n, len(ts))))
        # seeded by the family, not by its place in `tasks`: the SFT block of the final eval (vqa,
        # ground, edit) and a run whose mix leaves a family out sample each family alike
        resp = generate(model, bundle, task, idx, split, cfg, device, autocast, cfg.eval.seed + TASKS.index(task))
        exs = [ts.examples[i] for i in idx]
        r, why, pics, preds = RW.score_rows(task, exs, resp, ts.layout, bundle.tok, judge)
        fails = {k: v for k, v in Counter(why).items() if k != "ok"}
        if task == "ground":
            m.update(box_pad_metric(exs, resp, ts.layout, bundle.tok))
        if task in ("vqa", "ground"):
            m.update(level_metrics("vqa_acc" if task == "vqa" else "ground_miou", exs, r, cfg.data.sft_levels))
        if task == "vqa":
            m["vqa_acc"] = float(np.mean(r))
            by = defaultdict(list)
            for e, x in zip(exs, r):
                by[e.qtype].append(x)
            m["vqa_acc_by_type"] = {k: float(np.mean(v)) for k, v in sorted(by.items())}
            m["vqa_parse_fail"] = fails
            m.update(reading_metrics(exs, resp, ts.layout, bundle.tok, r))
        elif task == "ground":
            m["ground_miou"] = float(np.mean(r))
            m["ground_p50"] = float(np.mean([x >= 0.5 for x in r]))
            m["ground_parse_fail"] = fails
        elif task == "edit":
            m["edit_score"] = float(np.mean(r))
            m.update(level_metrics("edit_score", exs, r, cfg.data.sft_levels))
            # exact: the one right picture; a constraint edit has many, and any with reward 1 is exact
            m["edit_exact"] = float(np.mean([x == 1.0 if e.qtype in judge.graders else p == e.answer
                                             for p, e, x in zip(preds, exs, r)]))
        else:
            m["t2i_cell_acc"] = float(np.mean(r))
            shape_acc = [np.mean([RW.cell_similarity(p[i], s) for i, s in enumerate(e.answer) if s])
                         for p, e in zip(preds, exs)]
            m["t2i_shape_acc"] = float(np.mean(shape_acc))
        k = cfg.eval.grid_rows
        rows[task] = (exs[:k], resp[:k, :ts.layout.R_text], None if pics is None else pics[:k], r[:k])
    m["eval_seconds"] = time.time() - t0
    if grid_path:
        save_sample_grid(rows, bundle.tok, cfg, grid_path)
    model.train(was_training)
    return m


def level_metrics(name: str, exs, r, sft_levels: str) -> dict:
    """The mean reward `r` per difficulty level ({name}_L1, ...) and per bucket relative to the SFT
    levels ({name}_in / _edge / _far, world.bucket), for the buckets the examples fill; plus the
    example counts under "{name}_n" so that a reader can weigh each number."""
    by_level, by_bucket = defaultdict(list), defaultdict(list)
    for e, x in zip(exs, r):
        by_level[e.level].append(x)
        by_bucket[bucket(e.level, parse_levels(sft_levels))].append(x)
    out = {f"{name}_L{k}": float(np.mean(v)) for k, v in sorted(by_level.items())}
    out.update({f"{name}_{b}": float(np.mean(v)) for b, v in by_bucket.items()})
    out[f"{name}_n"] = {**{f"L{k}": len(v) for k, v in sorted(by_level.items())}, **{b: len(v) for b, v in by_bucket.items()}}
    return out


SELECT_KEYS = ("vqa_acc", "ground_miou", "edit_score")


def selection_score(m: dict) -> float:
    """The number a best checkpoint is chosen by: the mean of the RL tasks' headline metrics
    (vqa accuracy, grounding mIoU, edit score) among those present in m."""
    vals = [m[k] for k in SELECT_KEYS if k in m]
    return float(np.mean(vals)) if vals else float("nan")


def quick_eval(model, bundle, vq, cfg, device, autocast, tasks=None) -> dict:
    """The quick eval of the training loops: eval.curve_n examples per task of eval.curve_split
    (not the held-out split), plus "score" (selection_score) and its own "eval_seconds". None when
    a stop request cut it short (the loop then writes its checkpoint and stops)."""
    try:
        m = evaluate(model, bundle, vq, cfg, device, autocast, split=cfg.eval.curve_split,
                     n=cfg.eval.curve_n, tasks=tasks)
    except Stopped:
        print("quick eval cut short by the stop request", file=sys.stderr)
        return None
    m["score"] = selection_score(m)
    return m


def eval_and_keep_best(model, bundle, vq, cfg, ctx, stage: str, step: int, elapsed: float, best: float,
                       best_path: str, tasks=None) -> tuple[dict | None, float, float | None]:
    """The training loops' quick eval on rank 0 (quick_eval), its log line, and best_path written
    when its score beats `best`. Returns (the metrics, None on other ranks or when a stop request cut
    the eval short; the best score so far; the eval's seconds on every rank, rank 0's word, or None
    when no eval finished). Collective under DDP: every rank calls it."""
    m = quick_eval(unwrap(model), bundle, vq, cfg, ctx.device, ctx.autocast, tasks=tasks) if ctx.master else None
    if m is not None:
        ctx.log(f"{stage} eval @ {step} ({elapsed:.0f}s, {cfg.eval.curve_split}): {headline(m)}")
        if m["score"] > best:                    # the best checkpoint by the quick evals (not the held-out set)
            best = m["score"]
            save_checkpoint(best_path, model, None, step, cfg, bundle, {"score": best, "elapsed": elapsed})
    secs = from_rank0(m["eval_seconds"] if m is not None else -1.0, ctx)
    return m, best, (None if secs < 0 else secs)


def headline(m: dict) -> str:
    keys = [("vqa_acc", "vqa acc"), ("ground_miou", "ground mIoU"), ("ground_p50", "P@0.5"),
            ("edit_score", "edit"), ("t2i_shape_acc", "t2i shape acc")]
    return " | ".join(f"{name} {m[k]:.3f}" for k, name in keys if k in m)


# ----------------------------------------------------------------------------------------------
# the picture a person looks at

def _wrap(text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for w in text.split():
        if len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + [cur]


def save_sample_grid(rows: dict, tok, cfg, path: str, scale: int = 4):
    """One row per example: input picture | prompt + response text | output picture | target.
    rows[task] = (examples, text-region ids, decoded pictures or None, rewards)."""
    S, w = cfg.data.image_size * scale, world_for(cfg.data)
    text_w, row_h = 520, max(S, 130)
    n = sum(len(v[0]) for v in rows.values())
    canvas = Image.new("RGB", (3 * S + text_w + 40, n * (row_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = 8
    for task, (exs, resp, pics, r) in rows.items():
        for b, ex in enumerate(exs):
            x = 8
            if ex.image is not None or ex.scene is not None:
                img = ex.image if ex.image is not None else w.render(ex.scene, cfg.data.grid, cfg.data.image_size, ex.looks)
                canvas.paste(Image.fromarray(img).resize((S, S), Image.NEAREST), (x, y))
            x += S + 8
            text = tok.decode(resp[b])          # the text region only
            lines = [f"[{task}/{ex.qtype}] reward {r[b]:.2f}"] + _wrap(ex.prompt, 80) + ["->"] + _wrap(text, 80)
            draw.multiline_text((x, y), "\n".join(lines[:10]), fill=(0, 0, 0))
            x += text_w
            if pics is not None:
                out = (np.asarray(pics[b]) * 255).clip(0, 255).astype(np.uint8)
                canvas.paste(Image.fromarray(out).resize((S, S), Image.NEAREST), (x, y))
                tgt = w.render(ex.answer, cfg.data.grid, cfg.data.image_size, ex.target_looks)
                canvas.paste(Image.fromarray(tgt).resize((S, S), Image.NEAREST), (x + S + 8, y))
            y += row_h + 8
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)

