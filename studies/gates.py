"""
The gates of the levels world: is there something for RL to learn at an SFT start, before
any RL run is spent on it? Measured on the held-out EDGE bucket (the level just above the highest
one traced in SFT, world.bucket), per reasoning family (vqa, grounding):

  pass@1, pass@16   at the rollout temperature (rl.temperature), from 16 samples per prompt
                    (metrics.pass_at_k, unbiased); headroom = pass@16 - pass@1          target >= 0.20
  all_fail@8        the share of 8-sample groups in which every sample fails: per prompt with c
                    right of n, C(n - c, 8) / C(n, 8) = 1 - pass@8 (GRPO has no signal there;
                    answer-forcing is for exactly these prompts)                   target in [0.20, 0.60]
  forced_consistent answer-forced samples (rollout.force_answer: the true answer written in, the
                    reasoning inpainted) whose reasoning implies the answer it ends in:
                    rewards.trace_answer for vqa, trace_cell (below) for grounding   target >= 0.50
  blind             the share an image-blind guess gets right: vqa the most common answer of the
                    question type in the RL pool, grounding a uniformly random shape of the scene
                    (exact expectation of IoU >= 0.5)

The picture gates (--parts=pictures; real uncertainty in pictures and edits, METHOD.md §8), on the
held-out split over every level:

  t2i_image_nll     the per-token NLL (nats) of the text-to-image targets' image codes under the
                    complementary-masking estimator (likelihood.complementary: the per-token terms the
                    RL step logs as nll_image_mean)                               target >= 1.5
  edit_mean         the mean edit reward of 16 samples per prompt at the rollout temperature
                                                                                   target <= 0.8
  edit_best16       the mean over prompts of the best of those 16; gap = best16 - mean   target >= 0.15

"Right" is reward 1 for vqa and IoU >= 0.5 for grounding (metrics.RIGHT). Each call screens one
design (a name and the flags that make it: the rollout temperature, random-order unmasking, ...)
and adds it to results/gates.json, then rewrites the table and its RESULTS.md block from every
design screened so far. A design's other settings (the data, the levels, the model) are the
checkpoint's own.

    python studies/gates.py --ckpt=runs/levels/start/ckpt_sft.pt --design=base
    python studies/gates.py --ckpt=runs/levels/start/ckpt_sft.pt --design=t0.7 --rl.temperature=0.7
    python studies/gates.py --ckpt=runs/levels/start/ckpt_sft.pt --design=random_order --diffusion.remask=random
    python studies/gates.py --ckpt=runs/looks/ckpt_sft.pt --design=looks     # the looks world's start (RESULTS.md 2.0b)
    python studies/gates.py --report                      # the table again from results/gates.json

--n=100 edge prompts per family (default), --samples=16, --parts=reasoning,pictures. A design's flags are
the sampler settings the gates read (KEYS: --rl.temperature, --rl.tokens_per_step, --diffusion.remask,
...); any other key, or --report with another option, is a one-line error. About 4-7 min per design on one thread of a
2-core CPU at the toy preset.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # the method's modules live one folder up (run from the repo root)

import common  # noqa: E402
import data  # noqa: E402
import likelihood as LK  # noqa: E402
import metrics  # noqa: E402
import rewards as RW  # noqa: E402
import tokens as T  # noqa: E402
import world  # noqa: E402
from rollout import RolloutContext, force_answer, policy_sample  # noqa: E402
from study import git_commit, hardware, parse_options, publish  # noqa: E402

TASKS = ("vqa", "ground")
TARGETS = {"headroom": 0.20, "all_fail@8": (0.20, 0.60), "forced_consistent": 0.50}
PICTURE_TARGETS = {"t2i_image_nll": 1.5, "edit_mean": 0.8, "edit_gap": 0.15}
PARTS = ("reasoning", "pictures")
RESULTS = os.path.join("results", "gates.json")
OPTIONS = {"ckpt": "", "design": "base", "n": 100, "samples": 16, "parts": ",".join(PARTS), "report": False}
# the design's flags: the sampler settings the gates' sampling reads (rollout.rollout_diffusion at
# rl.temperature); the rest of the config is the checkpoint's, so any other key is a one-line error
KEYS = ("rl.temperature", "rl.tokens_per_step", "diffusion.tokens_per_step", "diffusion.block_len",
        "diffusion.image_steps", "diffusion.remask", "diffusion.dedupe")
FIXED = {"diffusion.temperature": "the gates sample at --rl.temperature (text and image)",
         "diffusion.image_temperature": "the gates sample at --rl.temperature (text and image)",
         "diffusion.cfg_scale": "the gates sample the RL policy, which never uses guidance"}


def gate_numbers(correct: list[int], n: int) -> dict:
    """From c right samples of n per prompt: mean pass@1, pass@16 (k capped at n), their difference
    (headroom) and all_fail@8 = mean C(n - c, 8) / C(n, 8) (the chance that a group of 8 of the n
    samples holds no right one)."""
    k16, k8 = min(16, n), min(8, n)
    p1 = float(np.mean([metrics.pass_at_k(n, c, 1) for c in correct]))
    p16 = float(np.mean([metrics.pass_at_k(n, c, k16) for c in correct]))
    fail8 = float(np.mean([1.0 - metrics.pass_at_k(n, c, k8) for c in correct]))
    return {"pass@1": p1, "pass@16": p16, "headroom": p16 - p1, "all_fail@8": fail8}


def passes(g: dict) -> dict:
    """Which gates a family's numbers pass (TARGETS)."""
    lo, hi = TARGETS["all_fail@8"]
    return {"headroom": g["headroom"] >= TARGETS["headroom"], "all_fail@8": lo <= g["all_fail@8"] <= hi,
            "forced_consistent": g["forced_consistent"] >= TARGETS["forced_consistent"]}


def edge_split(bundle, cfg, task: str) -> T.TaskSet:
    """The eval split's edge-bucket examples of `task` as a TaskSet of their own."""
    ts, sft = bundle.sets[task]["eval"], world.parse_levels(cfg.data.sft_levels)
    idx = [i for i, e in enumerate(ts.examples) if world.bucket(e.level, sft) == "edge"]
    if not idx:
        raise SystemExit(f"gates: the checkpoint's eval split has no {task} example one level above its "
                         f"SFT levels ({cfg.data.sft_levels}); train the start with --data.eval_levels=1,2,3,4")
    return T.TaskSet(task, [ts.examples[i] for i in idx], ts.prompt[idx],
                     None if ts.response is None else ts.response[idx], ts.layout)


_CELL = re.compile(r"^r\d+c\d+$")


def trace_cell(text: str) -> str | None:
    """The cell a grounding trace resolves to: its last cell name ("... small : r2c0" -> "r2c0"),
    grounding's analogue of rewards.trace_answer (every level's trace ends in the cell it names), or None."""
    cells = [w for w in text.split() if _CELL.match(w)]
    return cells[-1] if cells else None


def consistent(task: str, text: str, ex, cfg) -> bool:
    """Does the inpainted reasoning imply the answer it was forced to end in?"""
    if task == "vqa":
        return RW.trace_answer(text, ex.qtype) == RW.normalise(ex.answer)
    cell = cfg.data.image_size // cfg.data.grid                    # the box lies inside its shape's cell
    x0, y0 = ex.answer[0], ex.answer[1]
    return trace_cell(text) == world.cell_name(int(y0 // cell) * cfg.data.grid + int(x0 // cell), cfg.data.grid)


@torch.no_grad()
def forced_consistency(model, bundle, cfg, task: str, idx: list[int], device, autocast) -> float:
    """The share of answer-forced samples (one per prompt) whose reasoning implies the forced answer."""
    ts, tok = bundle.sets[task]["edge"], bundle.tok
    gen = torch.Generator(device=device).manual_seed(cfg.eval.seed + 7)
    ro = RolloutContext(model, tok, bundle.sets, None, cfg, device, autocast, gen)     # text only: no judge
    ok = []
    for i in range(0, len(idx), cfg.eval.batch_size):
        chunk = idx[i:i + cfg.eval.batch_size]
        exs = [ts.examples[j] for j in chunk]
        base = T.collate({task: ts}, [(task, j) for j in chunk], tok, responses=False).to(device)
        canvas, forbid = force_answer(base, exs, tok, ts.layout)
        tokens, _ = policy_sample(ro, canvas, forbid=forbid)
        for b, ex in enumerate(exs):
            ok.append(consistent(task, tok.decode(tokens[b, base.P:base.P + ts.layout.R_text].cpu()), ex, cfg))
    return float(np.mean(ok))


def blind(bundle, task: str, examples, cfg) -> float:
    """The share an image-blind guess gets right on `examples` (exact expectations; metrics.baselines'
    guesses: the most common RL-pool answer of the question type, a uniformly random shape)."""
    if task == "vqa":
        return float(np.mean([h for _, h in metrics.vqa_prior_hits(bundle, examples)]))
    return float(np.mean([np.mean([v >= 0.5 for v in x]) for x in metrics.random_shape_ious(examples, cfg.data) if x]))


@torch.no_grad()
def image_nll(model, bundle, cfg, idx: list[int], device) -> float:
    """Mean per-token NLL (nats) of the image codes of t2i targets idx (eval split) under the
    complementary estimator (one draw per row, seed eval.seed): what train.kind_stats logs for images."""
    ts, tok = bundle.sets["t2i"]["eval"], bundle.tok
    gen = torch.Generator(device=device).manual_seed(cfg.eval.seed)
    total, count = 0.0, 0
    for i in range(0, len(idx), cfg.eval.batch_size):
        batch = T.collate({"t2i": ts}, [("t2i", j) for j in idx[i:i + cfg.eval.batch_size]], tok).to(device)
        terms = LK.complementary(model, batch, tok, generator=gen)
        img = terms.scored & batch.is_image[:, batch.P:][None]                         # (D, B, R)
        total += float(-terms.logp[img].double().sum())
        count += int(img.sum())
    return total / max(count, 1)


def picture_gates(model, bundle, vq, cfg, n: int, samples: int, device, autocast) -> dict:
    """t2i_image_nll on n held-out t2i targets; edit_mean, edit_best16 (best of `samples`) and their gap
    on n held-out edit prompts, overall and per level; which PICTURE_TARGETS they pass."""
    t2i = list(range(min(n, len(bundle.sets["t2i"]["eval"]))))
    ts = bundle.sets["edit"]["eval"]
    idx = list(range(min(n, len(ts))))
    scores = metrics.sample_scores(model, bundle, vq, cfg, device, autocast, "edit", "eval", idx, samples,
                                   cfg.rl.temperature, cfg.eval.seed + 200)
    mean, best = [float(np.mean(s)) for s in scores], [max(s) for s in scores]
    out = {"t2i_image_nll": image_nll(model, bundle, cfg, t2i, device), "edit_mean": float(np.mean(mean)),
           f"edit_best{samples}": float(np.mean(best)), "n_t2i": len(t2i), "n_edit": len(idx)}
    out["edit_gap"] = out[f"edit_best{samples}"] - out["edit_mean"]
    for lv in sorted({ts.examples[i].level for i in idx}):
        on = [k for k, i in enumerate(idx) if ts.examples[i].level == lv]
        out[f"edit_L{lv}"] = {"n": len(on), "mean": float(np.mean([mean[k] for k in on])),
                              "best": float(np.mean([best[k] for k in on]))}
    out["passes"] = {"t2i_image_nll": out["t2i_image_nll"] >= PICTURE_TARGETS["t2i_image_nll"],
                     "edit_mean": out["edit_mean"] <= PICTURE_TARGETS["edit_mean"],
                     "edit_gap": out["edit_gap"] >= PICTURE_TARGETS["edit_gap"]}
    return out


def options(argv: list[str]) -> tuple:
    """(the command line's config, its options, the names given), with one-line errors for a key the
    gates do not read, --report with anything else (it only rebuilds the table) and bad values."""
    cfg_cli, opts, given = parse_options("gates.py", argv, OPTIONS, __doc__.strip(), KEYS, FIXED)
    if opts["report"] and given - {"report"}:
        raise SystemExit(f"gates.py: --report rebuilds the table from {RESULTS} and screens nothing, so "
                         f"--{sorted(given - {'report'})[0]} would change nothing; drop it or --report")
    if opts["report"]:
        return cfg_cli, opts, given
    parts = opts["parts"].split(",")
    if set(parts) - set(PARTS) or not parts:
        raise SystemExit(f"gates.py: --parts={opts['parts']}: expected a comma list of {', '.join(PARTS)}")
    for k in ("n", "samples"):
        if opts[k] < 1:
            raise SystemExit(f"gates.py: --{k}={opts[k]}: must be >= 1")
    if not opts["design"]:
        raise SystemExit("gates.py: --design=: name the design (--design=base)")
    if not opts["ckpt"]:
        raise SystemExit("gates.py: pass --ckpt=PATH (an SFT checkpoint trained with --data.eval_levels above its sft_levels)")
    return cfg_cli, opts, given


def screen(argv: list[str]) -> dict:
    cfg_cli, opts, _ = options(argv)
    parts, design = opts["parts"].split(","), opts["design"]
    torch.set_num_threads(1)
    t0 = time.time()
    cfg, bundle, model, vq, blob = data.load_run(opts["ckpt"], os.path.join("runs", "gates"), "gates")
    cfg.rl, cfg.diffusion = cfg_cli.rl, cfg_cli.diffusion          # the design: the sampler's settings
    dev, autocast = "cpu", nullcontext()
    out = {"design": design, "flags": [a for a in argv if a.partition("=")[0][2:] not in OPTIONS],
           "ckpt": opts["ckpt"], "ckpt_step": blob["step"], "sft_levels": cfg.data.sft_levels,
           "command": "python studies/gates.py " + " ".join(argv), "commit": git_commit(),
           "hardware": hardware(), "n_samples": opts["samples"]}
    for ti, task in enumerate(TASKS if "reasoning" in parts else ()):
        bundle.sets[task]["edge"] = edge = edge_split(bundle, cfg, task)
        idx = list(range(min(opts["n"], len(edge))))
        scores = metrics.sample_scores(model, bundle, vq, cfg, dev, autocast, task, "edge", idx, opts["samples"],
                                       cfg.rl.temperature, cfg.eval.seed + 100 + ti)
        g = gate_numbers([sum(x >= metrics.RIGHT[task] for x in s) for s in scores], opts["samples"])
        g["forced_consistent"] = forced_consistency(model, bundle, cfg, task, idx, dev, autocast)
        g["blind"] = blind(bundle, task, [edge.examples[i] for i in idx], cfg)
        g["n_prompts"], g["levels"] = len(idx), sorted({edge.examples[i].level for i in idx})
        g["passes"] = passes(g)
        out[task] = g
        print(f"{design} {task}: " + " | ".join(f"{k} {v:.3f}" for k, v in g.items() if isinstance(v, float)), flush=True)
    if "pictures" in parts:
        out["pictures"] = p = picture_gates(model, bundle, vq, cfg, opts["n"], opts["samples"], dev, autocast)
        print(f"{design} pictures: " + " | ".join(f"{k} {v:.3f}" for k, v in p.items() if isinstance(v, float)), flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    return out


def table(designs: list[dict]) -> str:
    rows = ["| design | checkpoint (SFT steps), commit | flags | family | pass@1 | pass@16 | headroom (>= 0.20) | "
            "all-fail@8 (0.20-0.60) | forced consistent (>= 0.50) | blind guess | gates passed |", "|" + "---|" * 11]
    for d in designs:
        for task in (t for t in TASKS if t in d):
            g = d[task]
            n_pass = sum(g["passes"].values())
            rows.append(f"| {d['design']} | `{d['ckpt']}` ({d['ckpt_step']}), {d['commit']} | `{' '.join(d['flags']) or '-'}` | {task} (L{','.join(map(str, g['levels']))}, "
                        f"{g['n_prompts']} prompts) | {g['pass@1']:.3f} | {g['pass@16']:.3f} | {g['headroom']:.3f} | "
                        f"{g['all_fail@8']:.3f} | {g['forced_consistent']:.3f} | {g['blind']:.3f} | {n_pass}/3 |")
    pics = [d for d in designs if "pictures" in d]
    if pics:
        rows += ["", "| design | checkpoint (SFT steps), commit | flags | t2i image NLL per token (>= 1.5) | edit mean (<= 0.8) | "
                 "edit best of N | gap (>= 0.15) | edit mean / best per level | gates passed |", "|" + "---|" * 9]
        for d in pics:
            p = d["pictures"]
            lv = "; ".join(f"L{k[6:]} {v['mean']:.2f} / {v['best']:.2f} ({v['n']})" for k, v in p.items() if k.startswith("edit_L"))
            rows.append(f"| {d['design']} | `{d['ckpt']}` ({d['ckpt_step']}), {d['commit']} | `{' '.join(d['flags']) or '-'}` | "
                        f"{p['t2i_image_nll']:.3f} | {p['edit_mean']:.3f} | {p['edit_best' + str(d['n_samples'])]:.3f} | {p['edit_gap']:.3f} | "
                        f"{lv} | {sum(p['passes'].values())}/3 |")
    return "\n".join(rows)


def main(argv: list[str]):
    report = options(argv)[1]["report"]
    designs = json.load(open(RESULTS))["designs"] if os.path.exists(RESULTS) else []
    if not report:
        new = screen(argv)
        designs = [d for d in designs if d["design"] != new["design"]] + [new]
    if not designs:
        raise SystemExit(f"gates: nothing screened yet ({RESULTS} is missing)")
    commits = ", ".join(dict.fromkeys(d["commit"] for d in designs))       # every commit a design ran at, in order
    res = {"command": "python studies/gates.py --ckpt=... --design=NAME [flags]", "commit": commits,
           "hardware": designs[-1]["hardware"], "seeds": [0], "study_wall_s": sum(d["seconds"] for d in designs),
           "targets": TARGETS, "picture_targets": PICTURE_TARGETS, "designs": designs}
    note = ("Every design is measured on the held-out edge bucket of its checkpoint (the level above the "
            "highest traced in SFT), 16 samples per prompt at the design's rollout temperature; one sampling seed "
            "(eval.seed). A design passes when all three gates hold for a family.")
    publish("gates", res, table(designs), note)


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
