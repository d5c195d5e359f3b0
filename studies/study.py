"""
Studies: one named experiment, several seeds, one table, one plot, one results file.

    python studies/study.py rl_vs_sft                          # RL vs continued SFT vs RFT in the flat world
                                                       # (start ~17 min, arms ~1 h 40 min on 2 cores; RESULTS 4.0)
    python studies/study.py rl_vs_sft --seeds=0 --arm_s=120    # a quick look
    python studies/study.py rl_vs_sft --world=levels --arms=rl,sft,rft,rft_af0.5   # the same in the levels
                                                       # world: traces for levels 1-2, RL prompts at levels 1-3,
                                                       # metrics per bucket, an 8000-step start (33-43 min at 2
                                                       # threads) then 12 runs two at a time (~1 h 40 min; RESULTS 4.6)
    python studies/study.py rl_vs_sft --report                 # rebuild the table and plot from finished runs
                                                       # (--commit=HASH: the commit the runs were made at)
    python studies/study.py af_ratio | objective | gamma | estimator    # one RL ablation (--arm_s each run)
    python studies/study.py ablations                          # all four, 33 runs of ~5 min, two at a time: ~1 h 25 min
    python studies/study.py af_ratio,gamma --world=levels --arm_s=600   # several at once: the runs they share
                                                       # (the default variant) are trained once per seed
    python studies/study.py af_ratio --world=levels --arm_s=600   # in the levels world, from
                                                       # rl_vs_sft --world=levels' start
    python studies/study.py tree                               # tree search at equal sample count (rollouts only, ~18 min)
    python studies/study.py objective --world=looks --start=runs/looks/ckpt_sft.pt   # C5, C6 on pictures with
                                                       # looks (a prompt leaves the image codes open), from the
                                                       # looks world's start (WORLDS["looks"] has its command)
    python studies/study.py tree --world=looks --start=runs/looks/ckpt_sft.pt --early_steps=0 --n_prompts=64
                                                       # C9 where edits have many graded answers (colour
                                                       # constraints), uncertainty branching included
    python studies/study.py estimator_variance                 # estimators.py on the start checkpoint, 3 seeds (~4 min)

Options: --seeds=0,1,2; --arm_s (training seconds per run); --start_steps (SFT steps of the shared
start; 0 = the world's, START_STEPS: 6000 flat, 8000 levels, 3800 looks); --start=PATH (adopt an SFT
checkpoint of the same world and length as the shared start instead of training one: one-line error
otherwise); --world=flat|levels|looks (flat and levels keep the pictures they were measured on, PLAIN;
looks is the main job with LOOKS as it was measured: 3800 SFT steps, 200 held-out); --root (where the runs go); --workers (runs side by side; rl_vs_sft
always runs two); --report (rebuild the table from finished runs, train nothing) and --commit (the
commit the runs were made at); --arms (rl_vs_sft); --n_prompts and --early_steps (tree; 0 = no early
checkpoint). Which study takes which (OPTIONS; x = used, r = also with --report):

    option         rl_vs_sft  ablations (af_ratio, objective,  tree  estimator_variance
                              gamma, estimator)
    --seeds        r          r                                x     x
    --arm_s        r          r (it names the runs)            -     -
    --start_steps  x          r (it names the runs)            x     x
    --start        x          x                                x     -
    --world        r          r                                x     -
    --root         r          r                                -     x
    --workers      -          x                                -     -
    --report       r          r                                -     -
    --commit       r          r                                -     x
    --arms         r          -                                -     -
    --n_prompts    -          -                                x     -
    --early_steps  -          -                                x     -

Any other option, a config key (--section.key=...: WORLDS, ARMS and ABLATIONS fix those), or a "-"
above is a one-line error naming it, as is an option that --report would ignore; -h lists them.

Every study writes results/<name>.json (every number, commands, commit, hardware, wall time),
results/<name>.md (the table), results/<name>.png (needs matplotlib: skipped with a note without
it) and replaces its own block in RESULTS.md (between `<!-- study:<name> -->` markers), so the page
always shows the last run. The studies of one world share that world's start: rl_vs_sft's (below),
trained once.

`rl_vs_sft` asks the question LaViDa-R1 (arXiv 2602.14147) exists to answer: after SFT has taken
all it can from the traced data, does the unified RL stage (METHOD.md §4-§6) still improve the
model, and by more than the simple alternatives? The toy mirrors the paper's situation: traces
are scarce (--data.n_sft: 1000 traced examples per family in the flat world, 3000 in the levels world), answers are cheap
(5000 answer-only RL prompts per family, rewards need no trace).

  start  one SFT checkpoint trained on the traced pool for --start_steps steps (START_STEPS: chosen
         so that continued SFT adds little on the in-levels; shared by every arm and seed; its curve
         is in start/sft_curve.json; a stored start of another length is refused, not reused)
  arms   from that checkpoint, the same wall-clock budget each (--arm_s seconds of training, quick
         evals not counted), one CPU thread each, two arms side by side (--arms picks some):
           rl         the unified objective, Eq. (U), with the flags in RL_FLAGS: mu = 2 and
                      answer-forcing on half of the all-failed groups (p = 0.5, chosen over the
                      paper's 0.1 in a one-seed screen of the levers, RESULTS.md 4.0)
           rl_af0.1   the same with the paper's p = 0.1 (the full ratio screen is `af_ratio`, below)
           sft        continued SFT on the same traced pool (lr 3e-4, the RL stage's)
           rft        rejection-sampling fine-tuning: the RL loop with A = 1 on the samples the
                      reward accepts and 0 elsewhere (rl.advantage=rft), the strongest simple
                      baseline for RL with verifiable rewards; same SFT rows, prompts and sampler
           rft_af0.5  rft that also keeps the accepted answer-forced samples (p = 0.5): SFT on
                      reasoning inpainted for the known answer (STaR's rationalisation), the
                      simple baseline that sees the same answers as rl
  select every arm keeps its best checkpoint by the quick evals on the validation split (disjoint
         from the held-out split), so an arm that degrades is not judged by its last step
  report held-out metrics (eval split, eval.n_per_task per task) of each arm's best checkpoint,
         mean and spread over seeds: results/rl_vs_sft.json, a markdown table, and
         results/rl_vs_sft.png (validation score against training seconds; needs matplotlib,
         skipped with a note without it)

The ablations (one of the paper's claims each, METHOD.md §10): RL from the start checkpoint with
ABLATION_FLAGS plus the variant's flags, --arm_s seconds each (default 240), one thread, two side by side,
judged like the rl arm (best checkpoint on val, then held-out). A run is stored under
runs/ablations/seed<s>/rl-<hash of its RL config and budget>, so the default variant that four
studies share is trained once per seed:
  af_ratio   answer-forcing injection ratio p in {0, 0.1, 0.5, 1} (paper: 10 % best, 100 % collapses):
             held-out metrics, groups with a nonzero advantage, unparsable answers, and whether the
             inpainted reasoning of the forced vqa samples implies the forced answer
             (rewards.trace_answer: the answer recomputed from the lists the trace read)
  objective  pure GRPO (no SFT rows) vs GRPO + KL to a frozen reference (k3, beta = 0.04) vs the
             unified GRPO + SFT loss: reward curves, the per-token KL variance on text vs image
             tokens, the peak memory (the unified loss needs no reference model)
  gamma      the self-distillation weight gamma in {0, 0.5, 1} of Eq. (A)
  estimator  the log-likelihood estimator inside RL (complementary, elbo_mc, mc_unweighted at 2
             passes; one_step at 1), reward curves and held-out metrics
  tree       tree search on edit at equal samples per prompt, no training: i.i.d. sampling vs
             branching early / late / in several rounds / where the policy was most uncertain
             (rollout.branch_step): mean and max reward of the group (and the max on the constraint
             edits, levels 3-4), the pictures' diversity (mean pairwise Hamming distance of their
             codes), on the start and on an early SFT checkpoint (--early_steps) where edit still has
             headroom
  estimator_variance  estimators.py (variance, bias and rank correlation against exact
             enumeration) on the start checkpoint, one run per seed
With --world=levels one of the four RL ablations (af_ratio, objective, gamma, estimator) runs on the
levels world instead: from rl_vs_sft --world=levels'
start (runs/rl_vs_sft_levels/start), into runs/ablations_levels, written as results/<name>_levels.*,
its table with the held-out in / edge / far buckets.

Every run is a plain `train.py` / `eval.py` / `estimators.py` command (printed and stored), so any
arm can be re-run or inspected by hand. Runs that finished are reused: delete a run folder to redo it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)          # the method's modules live one folder up (run from the repo root)

import common  # noqa: E402
import data  # noqa: E402
import config as C  # noqa: E402
import rollout as RO  # noqa: E402

# the pictures of the worlds measured before looks and edit levels existed (2026-12-06): one look per
# cell content, single-operation edits, the 64-code tokenizer: the same pools, pictures and codes as
# then (a world without looks reads its pictures with the solid-fill reader, world.read_scene)
PLAIN = ["--data.shades=1", "--data.fills=1", "--data.floors=1", "--data.edit_max_level=1", "--vq.codebook_size=64"]
LOOKS = ["--data.edit_max_level=4", "--data.shades=3", "--data.fills=4", "--data.floors=6", "--vq.codebook_size=512"]
# the looks world's start, as it was measured (3800 SFT steps, 200 held-out): --start=runs/looks/ckpt_sft.pt
LOOKS_START = f"python train.py --preset=toy {' '.join(LOOKS)} --train.max_steps=3800 --data.n_eval=200 --out_dir=runs/looks"
WORLDS = {
    # the flat world: scarce traces (1000 per family), a large answer-only pool, levels 1-2 everywhere,
    # 200 held-out and 200 validation examples per family
    "flat": ["--preset=toy", "--data.rl_levels=1,2", "--data.eval_levels=1,2", "--data.n_sft=1000", "--data.n_rl=5000",
             "--data.n_eval=200", "--data.n_val=200", *PLAIN],
    # the levels world: traces for levels 1-2 (the toy's 3000 per family), answer-only RL prompts
    # over levels 1-3 (the edge level 3 and the traced ones: with level 3 alone, RL's in-level vqa fell
    # 6.8 points behind continued SFT; RESULTS.md 4.6), held-out and validation sets over every level
    # (800 held-out: ~200 per vqa level, about a third per grounding level since 8e5f3b1; 368 / 245 / 187 before,
    # when a redraw could change the level: RESULTS.md 4.6, 7.1)
    "levels": ["--preset=toy", "--data.rl_levels=1,2,3", "--data.eval_levels=1,2,3,4", "--data.n_eval=800",
               "--eval.n_per_task=800", *PLAIN],
    # the main job's world with pictures that have looks (a prompt no longer fixes its picture's
    # codes) and edits with levels (two operations; colour constraints with many right pictures,
    # graded), where the claims about image tokens (C5, C6) and tree search (C9) can show. Its start
    # is LOOKS_START's SFT checkpoint: --start=runs/looks/ckpt_sft.pt adopts it
    "looks": ["--preset=toy", *LOOKS, "--data.n_eval=200", "--eval.n_per_task=200"],
}
WORLD = WORLDS["flat"]           # --world=levels switches it (set_world)
# SFT steps of each world's shared start (--start_steps=0 picks these): long enough that continued SFT
# adds little on the in-levels. On the levels world 3800 steps were not (continued SFT gained 6 points of
# in-level vqa on the start, 6.8 over RL; RESULTS.md 4.6); from 8000 it gains nothing (-2.2 and -0.8 in
# two runs), and RL's in-level vqa is 0.3 and 2.6 points behind it.
START_STEPS = {"flat": 6000, "levels": 8000, "looks": 3800}
RL_FLAGS = ["--rl.ppo_epochs=2", "--rl.af_prob=0.5"]
# the ablations vary one thing each around the paper's setting: answer-forcing at 10 %, mu = 2
ABLATION_FLAGS = ["--rl.ppo_epochs=2", "--rl.af_prob=0.1"]
ARMS = {
    "rl": ["--stage=rl", "--rl.eval_interval=15"] + RL_FLAGS,
    "rl_af0.1": ["--stage=rl", "--rl.eval_interval=15"] + ABLATION_FLAGS,
    "sft": ["--stage=sft", "--train.lr=3e-4", "--train.warmup=0", "--train.eval_interval=400"],
    "rft": ["--stage=rl", "--rl.eval_interval=15", "--rl.advantage=rft", "--rl.af_prob=0"],
    "rft_af0.5": ["--stage=rl", "--rl.eval_interval=15", "--rl.advantage=rft", "--rl.af_prob=0.5"],
}
DEFAULT_ARMS = ("rl", "rl_af0.1", "sft", "rft", "rft_af0.5")      # what --arms runs unless told
METRICS = ("vqa_acc", "ground_miou", "edit_score")
BUCKETS = tuple(f"{m}_{b}" for m in ("vqa_acc", "ground_miou", "edit_score") for b in ("in", "edge", "far"))   # where present
START_ROOT = os.path.join("runs", "rl_vs_sft")        # the shared start lives in its start/ folder

# each study's options and their defaults (the table in the module docstring); an option a study does
# not list is a one-line error, not ignored
OPTIONS = {
    "rl_vs_sft": {"seeds": "0,1,2", "arm_s": 600.0, "start_steps": 0, "start": "", "root": "", "report": False,
                  "commit": "", "arms": ",".join(DEFAULT_ARMS), "world": "flat"},
    "ablations": {"seeds": "0,1,2", "arm_s": 240.0, "start_steps": 0, "start": "", "workers": 2, "root": "",
                  "report": False, "commit": "", "world": "flat"},
    "tree": {"seeds": "0,1,2", "n_prompts": 32, "start_steps": 0, "start": "", "early_steps": 1000, "world": "flat"},
    "estimator_variance": {"seeds": "0,1,2", "start_steps": 0, "root": "", "commit": ""},
}
# the options that only matter when the study trains: with --report (read the finished runs) they are
# refused. The ablations' --arm_s and --start_steps stay: they name the runs to read (run_key)
RUN_ONLY = {"rl_vs_sft": ("start_steps", "start"), "ablations": ("start", "workers")}


def parse_options(script: str, argv: list[str], options: dict, usage: str, keys: tuple[str, ...] = (),
                  fixed: dict | None = None):
    """The command line of a study script: its own options (`options`, {name: default}) and the config
    keys in `keys` ("section.key", a whole "section.", or "preset"; the shortcuts --seed, --device, ...
    count as their keys), except those in `fixed` ({key: why the script sets it itself}). -h / --help
    prints `usage` and exits 0; any other argument is a one-line error naming it (never silently
    ignored). Returns (the preset's config with those keys, {option:
    value}, the option names and config keys given on the command line)."""
    if "-h" in argv or "--help" in argv:
        print(usage)
        raise SystemExit(0)
    given = set()
    for arg in argv:
        name = arg[2:].partition("=")[0] if arg.startswith("--") else arg
        key = C.SHORTCUTS.get(name, name)
        if name in options:
            given.add(name)
        elif key in (fixed or {}):
            raise SystemExit(f"{script}: {arg}: {fixed[key]}")
        elif any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys):
            given.add(key)
        else:
            takes = ", ".join([*("--" + o for o in options), *("--" + k + ("*" if k.endswith(".") else "") for k in keys)])
            raise SystemExit(f"{script}: {arg}: not an option of {script}; it takes {takes or 'no options'} (-h: usage)")
    cfg, opts = C.get_config(argv, extra=options)
    return cfg, opts, given


def study_options(study: str, argv: list[str], label: str = "") -> dict:
    """Parse one study's options (OPTIONS[study]) with one-line errors for an option it does not take,
    an option --report would ignore (RUN_ONLY) and a value out of range; -h lists its options."""
    script = f"study.py {label or study}"
    usage = (f"usage: python studies/study.py {label or study} [--option=value ...]; its options and defaults:\n" +
             "\n".join(f"  --{k}={v!r}" for k, v in OPTIONS[study].items()) +
             "\n(python studies/study.py -h: every study and what each option does)")
    _, opts, given = parse_options(script, argv, OPTIONS[study], usage)
    if opts.get("report"):
        for k in RUN_ONLY.get(study, ()):
            if k in given:
                raise SystemExit(f"{script}: --{k}={opts[k]}: only used when training, and --report trains nothing; "
                                 f"drop --{k} or --report")
    try:
        seeds = [int(x) for x in opts["seeds"].split(",")]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise SystemExit(f"{script}: --seeds={opts['seeds']}: expected distinct seeds >= 0, comma-separated (--seeds=0,1,2)")
    for k, lo in (("arm_s", 1e-9), ("start_steps", 0), ("workers", 1), ("n_prompts", 1), ("early_steps", 0)):
        if k in opts and opts[k] < lo:
            raise SystemExit(f"{script}: --{k}={opts[k]}: must be {'> 0' if k == 'arm_s' else f'>= {lo}'}")
    set_world(opts.get("world", "flat"))             # a study without --world runs on the flat one
    return opts


def set_world(world: str) -> str:
    """Switch WORLD to WORLDS[world] for this study (a one-line error for an unknown name); returns the
    suffix of its folders and results names: "" for flat, "_levels" for the levels world,
    "_looks" for the looks world."""
    global WORLD
    if world not in WORLDS:
        raise SystemExit(f"--world={world}: expected one of {', '.join(WORLDS)}")
    WORLD = WORLDS[world]
    return world_tag()


def start_steps(opts: dict) -> int:
    """The SFT steps of the shared start: --start_steps, or the world's (START_STEPS) when it is 0."""
    return opts["start_steps"] or START_STEPS[opts.get("world", "flat")]


def world_tag() -> str:
    return "" if WORLD == WORLDS["flat"] else "_" + next(k for k, v in WORLDS.items() if v == WORLD)


def git_commit() -> str:
    """The short commit hash of this checkout, for results files ("" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return ""


def hardware() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
           f"1 thread per run, fp32"


def run(cmd: list[str], log: str) -> float:
    """Run one command with one CPU thread, its output in `log`; returns the wall seconds. A failed
    command stops the study with its log's last lines."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        tail = open(log).read().splitlines()[-5:]
        raise SystemExit(f"study: a run failed (exit {rc}); see {log}:\n  " + "\n  ".join(tail))
    return time.time() - t0


def sft_checkpoint(out: str, steps: int) -> str:
    """SFT on the traced pool for `steps` steps into `out` (quick evals every 1000), unless a run
    finished there before; returns its checkpoint. The shared start is sft_checkpoint(root/start,
    START_STEPS[world]). A finished run of another length is refused (one line), not reused: every
    arm under the same root was trained from it, so swapping it silently would mix two starts."""
    if os.path.exists(os.path.join(out, "sft_curve.json")):          # written when the run ends
        done = json.load(open(os.path.join(out, "config.json")))["train"]["max_steps"]
        if done != steps:
            raise SystemExit(f"study: {out} holds a {done}-step SFT start, not the {steps} steps asked for; pass "
                             f"--start_steps={done} to use it, or move {os.path.dirname(out) or out} away "
                             f"(or pass --root=...) to train a new one")
    else:
        os.makedirs(out, exist_ok=True)
        run([sys.executable, "train.py", *WORLD, "--stage=sft", f"--out_dir={out}", f"--train.max_steps={steps}",
             "--train.eval_interval=1000", "--seed=0"], os.path.join(out, "run.log"))
    return os.path.join(out, "ckpt_sft.pt")


def run_commands(out: str, start: str, flags: list[str], seed: int, arm_s: float) -> tuple[list[str], list[str]]:
    """(the train.py command of one run from `start`, its eval.py command on the run's best
    checkpoint). The stage is in `flags` (--stage=rl or --stage=sft); the run trains arm_s seconds."""
    sft = "--stage=sft" in flags
    budget = ("--train.time_budget_s" if sft else "--rl.time_budget_s") + f"={arm_s}"
    steps = "--train.max_steps=1000000" if sft else "--rl.max_steps=100000"
    train_cmd = [sys.executable, "train.py", *WORLD, *flags, f"--out_dir={out}", f"--train.init_from={start}",
                 budget, steps, f"--seed={seed}"]
    best = os.path.join(out, f"ckpt_{'sft' if sft else 'rl'}_best.pt")
    eval_cmd = [sys.executable, "eval.py", *(a for a in WORLD if a.startswith("--eval.")), f"--out_dir={out}",
                f"--ckpt={best}", f"--out={os.path.join(out, 'heldout.json')}"]     # the world's held-out size
    return train_cmd, eval_cmd


def train_and_eval(out: str, start: str, flags: list[str], seed: int, arm_s: float, **tags) -> dict:
    """Train one run (unless it finished before), evaluate its best checkpoint on the held-out split."""
    train_cmd, eval_cmd = run_commands(out, start, flags, seed, arm_s)
    os.makedirs(out, exist_ok=True)
    wall = 0.0
    done = os.path.join(out, "sft_curve.json" if "--stage=sft" in flags else "rl_log.json")   # written at the end
    if not os.path.exists(done):
        wall = run(train_cmd, os.path.join(out, "train.log"))
    if not os.path.exists(os.path.join(out, "heldout.json")):
        run(eval_cmd, os.path.join(out, "eval.log"))
    return {**tags, "seed": seed, "dir": out, "wall_s": round(wall, 1),
            "command": " ".join(train_cmd[1:]), "eval_command": " ".join(eval_cmd[1:])}


def adopt_start(path: str, out: str, steps: int) -> str:
    """--start=PATH: an SFT checkpoint trained elsewhere serves as the shared start instead of one
    trained into `out` (the looks world's start is runs/looks/ckpt_sft.pt, LOOKS_START's). It must come from this world and length: the same data, VQ and model config
    as WORLD's (the arms rebuild the world's pools and tokenizer from it) and `steps` SFT steps, else a
    one-line error naming the first differing key. `out` records which file it is (given.json); a
    folder that holds another start, trained or adopted, is refused, as in sft_checkpoint."""
    if not os.path.exists(path):
        raise SystemExit(f"--start={path}: no such file; train it first (the looks world's start: {LOOKS_START}) "
                         f"or drop --start")
    theirs = torch.load(path, map_location="cpu", weights_only=False)["config"]
    ours = C.to_dict(C.get_config(list(WORLD)))
    for sec in ("data", "vq", "model"):
        k = next((k for k, v in ours[sec].items() if theirs[sec].get(k) != v), None)
        if k is not None:
            raise SystemExit(f"--start={path} was trained with --{sec}.{k}={theirs[sec].get(k)!r}, this world "
                             f"({world_tag()[1:] or 'flat'}) has {ours[sec][k]!r}: pick the matching --world")
    if theirs["train"]["max_steps"] != steps:
        raise SystemExit(f"--start={path} is a {theirs['train']['max_steps']}-step SFT start, not {steps}: pass "
                         f"--start_steps={theirs['train']['max_steps']}")
    record, given = os.path.join(out, "given.json"), os.path.abspath(path)
    other = json.load(open(record))["ckpt"] if os.path.exists(record) else \
        out if os.path.exists(os.path.join(out, "sft_curve.json")) else None
    if other not in (None, given):
        raise SystemExit(f"study: {out} holds another start ({other}); move it away or pass --root=...")
    os.makedirs(out, exist_ok=True)
    json.dump({"ckpt": given}, open(record, "w"))
    return given


def adopted(root: str) -> str:
    """The start root adopted with --start (recorded in start/given.json by adopt_start), or ""."""
    record = os.path.join(root, "start", "given.json")
    return json.load(open(record))["ckpt"] if os.path.exists(record) else ""


def start_path(root: str) -> str:
    """Where root's shared start is: adopted (--start) or trained."""
    return adopted(root) or os.path.join(root, "start", "ckpt_sft.pt")


def shared_start(root: str = START_ROOT, steps: int = START_STEPS["flat"], given: str = "") -> tuple[str, dict]:
    """(the start checkpoint every study begins from, its held-out metrics), made once, or adopted
    from --start (`given`). A root that adopted one keeps it without --start (never trains a second)."""
    out = os.path.join(root, "start")
    given = given or adopted(root)
    start = adopt_start(given, out, steps) if given else sft_checkpoint(out, steps)
    held = os.path.join(out, "heldout.json")
    if not os.path.exists(held):
        run([sys.executable, "eval.py", *WORLD, f"--out_dir={out}", f"--ckpt={start}",
             f"--out={held}"], os.path.join(out, "eval.log"))
    return start, json.load(open(held))


def arm_commands(root: str, start: str, arm: str, seed: int, arm_s: float) -> tuple[list[str], list[str], str]:
    """(the train.py command of one rl_vs_sft arm and seed, its eval.py command, its folder)."""
    out = os.path.join(root, f"seed{seed}", arm)
    return (*run_commands(out, start, ARMS[arm], seed, arm_s), out)


def arm_job(root: str, start: str, arm: str, seed: int, arm_s: float) -> dict:
    """Train one arm for one seed, then evaluate its best checkpoint on the held-out split."""
    return train_and_eval(os.path.join(root, f"seed{seed}", arm), start, ARMS[arm], seed, arm_s, arm=arm)


def curve(out: str, stage: str) -> tuple[list[float], list[float]]:
    """(training seconds, validation score) of one run's quick evals."""
    if stage == "sft":
        hist = json.load(open(os.path.join(out, "sft_curve.json")))
        return [h["seconds"] for h in hist], [h["score"] for h in hist]
    hist = [h for h in json.load(open(os.path.join(out, "rl_log.json"))) if "eval" in h]
    return [h["seconds"] for h in hist], [h["eval"]["score"] for h in hist]


def diagnostics(job: dict) -> dict:
    """What each arm did in its budget, from its own logs: optimizer updates and their rate, the
    step of the best checkpoint, and for the RL loops the share of groups with a GRPO signal (their
    rewards differ), answer-forcing's count and the rollout share of the time."""
    out, arm = job["dir"], job["arm"]
    best = torch.load(os.path.join(out, f"ckpt_{'sft' if arm == 'sft' else 'rl'}_best.pt"), map_location="cpu",
                      weights_only=False)["step"]
    if arm == "sft":
        hist = json.load(open(os.path.join(out, "sft_curve.json")))
        return {"updates": hist[-1]["step"], "train_s": hist[-1]["seconds"], "best_step": best,
                "updates_per_min": 60 * hist[-1]["step"] / hist[-1]["seconds"]}
    log = [h for h in json.load(open(os.path.join(out, "rl_log.json"))) if not h.get("nonfinite")]
    mu = json.load(open(os.path.join(out, "config.json")))["rl"]["ppo_epochs"]
    tasks = [t for t in ("vqa", "ground", "edit") if t in log[-1]]
    return {"steps": log[-1]["step"], "updates": mu * log[-1]["step"], "train_s": log[-1]["seconds"],
            "best_step": best, "updates_per_min": 60 * mu * log[-1]["step"] / log[-1]["seconds"],
            "rollout_share": sum(h["rollout_s"] for h in log) / sum(h["rollout_s"] + h["update_s"] for h in log),
            "grpo_signal": {t: float(np.mean([h[t]["grpo_nonzero_frac"] for h in log])) for t in tasks},
            "reward": {t: float(np.mean([h[t]["reward"] for h in log])) for t in tasks},
            "af_fired": sum(h[t].get("af_fired", 0) for h in log for t in ("vqa", "ground") if t in h)}


def report(root: str, jobs: list[dict], start_eval: dict, meta: dict) -> dict:
    """results/rl_vs_sft.json (per arm a list of the held-out metrics, one entry per seed), the
    table (results/rl_vs_sft.md and its block in RESULTS.md) and the plot. An arm or seed without a
    finished run is left out (and said so), so a partial study still reports what it has."""
    walls = {(j["arm"], j["seed"]): j["wall_s"] for j in jobs}
    start = start_path(root)
    # arms asked for in this call, or run before: only those count as missing where a seed lacks a run
    listed = {j["arm"] for j in jobs} | {a for d in os.listdir(root) for a in ARMS if os.path.isdir(os.path.join(root, d, a))}
    jobs, missing = [], []
    for arm in ARMS:                  # every finished run on disk, not only this call's (--arms, --seeds)
        for sd in sorted({j_sd for _, j_sd in walls} | {int(p[4:]) for p in os.listdir(root) if p.startswith("seed")}):
            train_cmd, eval_cmd, out = arm_commands(root, start, arm, sd, meta["arm_s"])
            if os.path.exists(os.path.join(out, "heldout.json")):
                jobs.append({"arm": arm, "seed": sd, "dir": out, "wall_s": walls.get((arm, sd)),
                             "command": " ".join(train_cmd[1:]), "eval_command": " ".join(eval_cmd[1:])})
            elif arm in listed:
                missing.append(f"{arm} seed {sd}")
    if missing:
        print("study: no finished run for " + ", ".join(missing) + " (left out of the table)")
    arms = [a for a in ARMS if any(j["arm"] == a for j in jobs)]
    keys = METRICS + tuple(k for k in BUCKETS if k in start_eval)       # per bucket on the levels world
    res = {"start": [{k: start_eval[k] for k in keys}]}
    for arm in arms:
        res[arm] = [{"seed": j["seed"], **{k: json.load(open(os.path.join(j["dir"], "heldout.json"))).get(k) for k in keys}}
                    for j in sorted(jobs, key=lambda j: j["seed"]) if j["arm"] == arm]
    res["diagnostics"] = {f"{j['arm']}_seed{j['seed']}": diagnostics(j) for j in jobs}
    res.update(meta, arms={a: ARMS[a] for a in arms}, not_run=missing, wall_s={f"{j['arm']}_seed{j['seed']}": j["wall_s"] for j in jobs},
               commands={f"{j['arm']}_seed{j['seed']}": [j["command"], j["eval_command"]] for j in jobs})
    lines = ["| arm | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for arm in ["start", *arms]:
        cells = []
        for k in keys:
            v = [r[k] for r in res[arm]]
            cells.append(mean_sd(v) + (f" ({' / '.join(f'{x:.3f}' for x in v)})" if len(v) > 1 else ""))
        seeds = ",".join(str(r["seed"]) for r in res[arm]) if arm != "start" else "-"
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + " |")
    res["differences"], diff_lines = differences(res, keys)
    plot(root, jobs)
    name = "rl_vs_sft" + world_tag()                                    # one results file per world
    publish(name, res, "\n".join(lines + diff_lines) + f"\n\n![{name}](results/{name}.png)", run_dir=root)
    return res


def differences(res: dict, keys: tuple[str, ...]) -> tuple[dict, list[str]]:
    """RL minus each other arm, paired by seed (the same seed's runs share data order and sampling
    seeds): per metric the mean over seeds of d_s = rl_s - other_s and its spread (population sd of
    d_s). A difference "holds" when |mean| > 2 sd with at least 2 seeds. Returns (the numbers, the
    markdown lines under the table; none without an rl arm)."""
    out, lines = {}, []
    rl = {r["seed"]: r for r in res.get("rl", [])}
    for other in [a for a in ARMS if a != "rl" and a in res]:
        pairs = [(rl[r["seed"]], r) for r in res[other] if r["seed"] in rl]
        if not pairs:
            continue
        out[f"rl-{other}"] = {"seeds": [b["seed"] for _, b in pairs]}
        for k in keys:
            d = np.array([a[k] - b[k] for a, b in pairs if a.get(k) is not None and b.get(k) is not None])
            if len(d):
                out[f"rl-{other}"][k] = {"mean": float(d.mean()), "sd": float(d.std()), "per_seed": d.tolist(),
                                         "holds": bool(len(d) > 1 and abs(d.mean()) > 2 * d.std())}
    if out:
        lines += ["", "RL minus each arm, paired by seed (points = metric x 100; mean ± sd over seeds; * = |mean| > 2 sd):", "",
                  "| difference | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for name, row in out.items():
            cells = [f"{100 * row[k]['mean']:+.1f} ± {100 * row[k]['sd']:.1f}{' *' if row[k]['holds'] else ''}"
                     if k in row else "-" for k in keys]
            lines.append(f"| {name} | {','.join(map(str, row['seeds']))} | " + " | ".join(cells) + " |")
    return out, lines


def plot(root: str, jobs: list[dict]):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colours = {"rl": "tab:red", "rl_af0.1": "tab:orange",
               "sft": "tab:blue", "rft": "tab:green", "rft_af0.5": "tab:olive"}
    for j in jobs:
        xs, ys = curve(j["dir"], "sft" if j["arm"] == "sft" else "rl")
        first = j["seed"] == min(x["seed"] for x in jobs if x["arm"] == j["arm"])
        ax.plot(xs, ys, color=colours.get(j["arm"], "tab:gray"), alpha=0.8, marker=".", label=j["arm"] if first else None)
    ax.set_xlabel("training seconds (1 CPU thread)")
    ax.set_ylabel("validation score\n(mean of vqa acc, mIoU, edit)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, "rl_vs_sft" + world_tag(), root)


def rl_vs_sft(argv: list[str]):
    opts = study_options("rl_vs_sft", argv)
    root = opts["root"] or START_ROOT + world_tag()       # runs/rl_vs_sft, runs/rl_vs_sft_levels
    seeds = [int(s) for s in opts["seeds"].split(",")]
    arms = opts["arms"].split(",")
    if set(arms) - set(ARMS):
        raise SystemExit(f"--arms={opts['arms']}: unknown arm(s) {sorted(set(arms) - set(ARMS))}; the arms are "
                         f"{', '.join(ARMS)}")
    t0 = time.time()
    specs = [(arm, s) for s in seeds for arm in arms]
    start = start_path(root)
    held = os.path.join(root, "start", "heldout.json")
    if opts["report"] and not os.path.exists(held):
        raise SystemExit(f"study.py rl_vs_sft: --report: {held} is missing (no finished start under --root={root}); "
                         f"run the study without --report first, or pass the --root / --world it ran with")
    if opts["report"]:                      # only read what the runs wrote
        jobs = [{"arm": a, "seed": s, "dir": os.path.join(root, f"seed{s}", a), "wall_s": None,
                 "command": " ".join(arm_commands(root, start, a, s, opts["arm_s"])[0][1:]), "eval_command": ""}
                for a, s in specs]
    else:
        start = shared_start(root, start_steps(opts), opts["start"])[0]
        with ThreadPoolExecutor(max_workers=2) as pool:        # two arms side by side, one thread each
            jobs = list(pool.map(lambda a_s: arm_job(root, start, a_s[0], a_s[1], opts["arm_s"]), specs))
    report(root, jobs, json.load(open(held)), meta("rl_vs_sft", argv, seeds, None if opts["report"] else t0,
                                                    opts["commit"], arm_s=opts["arm_s"], rl_flags=RL_FLAGS))


# ------------------------------------------------------------------------------------------------
# publishing: results/<name>.{json,md,png} and the study's block in RESULTS.md

def publish(name: str, res: dict, table: str, note: str = "", run_dir: str = ""):
    """Write results/<name>.json and .md (and the .md into run_dir), and replace the study's block
    in RESULTS.md (between <!-- study:<name> --> and <!-- /study:<name> -->; appended at the end
    when the page has none)."""
    os.makedirs("results", exist_ok=True)
    common.write_json(os.path.join("results", f"{name}.json"), res)
    # a plot that was not drawn (no matplotlib) is not linked
    table = re.sub(r"\n*!\[[^\]]*\]\((results/[^)]+\.png)\)",
                   lambda m: m.group(0) if os.path.exists(m.group(1)) else "", table)
    wall = (f"study wall time {res['study_wall_s']:.0f} s" if res.get("study_wall_s") is not None
            else "table rebuilt from finished runs")
    head = (f"*{time.strftime('%Y-%m-%d')} · runs at commit {res['commit']} · {res['hardware']} · seeds "
            f"{','.join(map(str, res['seeds']))} · {wall}*\n\n"
            f"    {res['command']}\n\n")
    body = (head + table + ("\n\n" + note if note else "") +
            f"\n\nEvery run's command, wall time and numbers: `results/{name}.json`.\n")
    for d in ("results", run_dir):
        if d:
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{name}.md"), "w") as f:
                f.write(body)
    print(table)
    page = "RESULTS.md"
    if not os.path.exists(page):
        return
    text = open(page).read()
    a, b = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
    block = f"{a}\n{body}{b}"
    if a in text and b in text:
        text = text[:text.index(a)] + block + text[text.index(b) + len(b):]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    with open(page, "w") as f:
        f.write(text)
    print(f"wrote results/{name}.json, results/{name}.md and its block in {page}")


def mean_sd(xs, fmt: str = ".3f") -> str:
    """'m ± sd' over seeds (population sd), or 'm' for one seed, or '-' for none."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return "-"
    v = np.array(xs, dtype=float)
    return f"{v.mean():{fmt}} ± {v.std():{fmt}}" if len(v) > 1 else f"{v.mean():{fmt}}"


def meta(name: str, argv: list[str], seeds: list[int], t0: float | None, commit: str = "", **more) -> dict:
    """The header of a results file. commit: the one the runs were made at (--commit), else HEAD's."""
    run_args = [a for a in argv if not a.startswith(("--report", "--commit", "--root", "--workers"))]
    return {"command": f"python studies/study.py {name} " + " ".join(run_args), "commit": commit or git_commit(),
            "hardware": hardware(), "seeds": seeds, "world": WORLD,
            "study_wall_s": None if t0 is None else round(time.time() - t0, 1), **more}


# ------------------------------------------------------------------------------------------------
# the RL ablations

KL_BETA = 0.04      # DeepSeekMath's GRPO coefficient; the paper's ablation value is unknown
ABLATIONS = {
    "af_ratio": {"p=0": ["--rl.af_prob=0"], "p=0.1": ["--rl.af_prob=0.1"], "p=0.5": ["--rl.af_prob=0.5"],
                 "p=1": ["--rl.af_prob=1.0"]},
    "objective": {"grpo": ["--rl.sft_rows=0"], "grpo+kl": ["--rl.sft_rows=0", f"--rl.kl_coef={KL_BETA}"],
                  "unified": []},
    "gamma": {"gamma=0": ["--rl.gamma=0"], "gamma=0.5": ["--rl.gamma=0.5"], "gamma=1": ["--rl.gamma=1"]},
    "estimator": {"complementary": ["--rl.likelihood=complementary"],
                  "elbo_mc": ["--rl.likelihood=elbo_mc", "--rl.n_mc=2"],
                  "mc_unweighted": ["--rl.likelihood=mc_unweighted", "--rl.n_mc=2"],
                  "one_step": ["--rl.likelihood=one_step"]},
}
RL_TASKS = ("vqa", "ground", "edit")


def run_summary(out: str) -> dict:
    """What one RL run did, from its rl_log.json and heldout.json: the held-out metrics of its best
    checkpoint; the training reward per step (mean over tasks); per task the mean reward of the last
    third of the steps, the share of groups with a nonzero advantage and with a GRPO signal, the
    unparsable-answer rate, and (vqa) how often a forced sample's reasoning implies its answer; the
    per-token NLL of text and image tokens, the KL term's per-token mean and variance on each
    (runs with a reference); peak memory."""
    log = [h for h in json.load(open(os.path.join(out, "rl_log.json"))) if not h.get("nonfinite")]
    held = json.load(open(os.path.join(out, "heldout.json")))
    tasks = [t for t in RL_TASKS if t in log[-1]]
    per = lambda key, t, hs=log: [h[t][key] for h in hs if key in h[t]]
    last = log[len(log) * 2 // 3:]
    forced = [(h["vqa"]["forced_consistent"], h["vqa"]["forced_rows"]) for h in log if "forced_consistent" in h.get("vqa", {})]
    per_token = {k: [h[k] for h in log if k in h] for k in ("kl_text_mean", "kl_text_var", "kl_image_mean",
                                                               "kl_image_var", "nll_text_mean", "nll_image_mean")}
    return {
        "heldout": {k: held[k] for k in (*METRICS, "ground_p50", *BUCKETS) if k in held},
        "steps": log[-1]["step"], "train_s": log[-1]["seconds"],
        "reward_curve": [float(np.mean([h[t]["reward"] for t in tasks])) for h in log],
        "reward_last_third": {t: float(np.mean(per("reward", t, last))) for t in tasks},
        "nonzero_adv": {t: float(np.mean(per("nonzero_adv_frac", t))) for t in tasks},
        "grpo_signal": {t: float(np.mean(per("grpo_nonzero_frac", t))) for t in tasks},
        "unparsable": {t: float(np.mean(per("unparsable_frac", t))) for t in ("vqa", "ground") if t in tasks},
        "forced_rows": sum(h[t].get("forced_rows", 0) for h in log for t in ("vqa", "ground") if t in h),
        "forced_consistent": (sum(c * n for c, n in forced) / sum(n for _, n in forced)) if forced else None,
        **{k: (float(np.mean(v)) if v else None) for k, v in per_token.items()},
        "peak_mem_mb": max(h.get("peak_mem_mb", 0) for h in log),
        "val_curve": curve(out, "rl"),
    }


def run_key(flags: list[str], arm_s: float, sft_steps: int) -> str:
    """The folder name of one ablation run: a hash of its RL config, budget and start (its SFT steps),
    so that a variant several studies share (the defaults: p = 0.1, unified, gamma = 0.5,
    complementary) is trained once per seed and read by each of them, and a run from another start
    is never read as this one's. Only the rl section is hashed (the other sections are fixed by
    WORLD, and each world has its own root: runs/ablations, runs/ablations_levels), and the code is
    not: after changing it, delete the root to redo the runs."""
    cfg = C.get_config([*WORLD, *flags])
    key = json.dumps([C.to_dict(cfg)["rl"], arm_s, sft_steps], sort_keys=True)
    return "rl-" + hashlib.sha1(key.encode()).hexdigest()[:10]


def ablation_table(name: str, runs: dict[str, list[dict]]) -> str:
    """Held-out metrics and training diagnostics per variant, mean ± sd over seeds."""
    cols = [("vqa", lambda r: r["heldout"]["vqa_acc"]), ("mIoU", lambda r: r["heldout"]["ground_miou"]),
            ("edit", lambda r: r["heldout"]["edit_score"]),
            ("train reward, last third", lambda r: float(np.mean(list(r["reward_last_third"].values())))),
            ("GRPO-signal groups (vqa/ground)", lambda r: (r["grpo_signal"]["vqa"] + r["grpo_signal"]["ground"]) / 2),
            ("steps", lambda r: r["steps"], ".0f")]
    if runs and any(BUCKETS[1] in r["heldout"] for rs in runs.values() for r in rs):      # the levels world
        cols[3:3] = [(f"{m} {b}", lambda r, k=f"{key}_{b}": r["heldout"].get(k))
                     for m, key in (("vqa", "vqa_acc"), ("mIoU", "ground_miou"), ("edit", "edit_score")) for b in ("in", "edge", "far")
                     if any(f"{key}_{b}" in r["heldout"] for rs in runs.values() for r in rs)]
    if name == "af_ratio":
        cols += [("nonzero-adv groups (vqa/ground)", lambda r: (r["nonzero_adv"]["vqa"] + r["nonzero_adv"]["ground"]) / 2),
                 ("unparsable (vqa/ground)", lambda r: (r["unparsable"]["vqa"] + r["unparsable"]["ground"]) / 2),
                 ("forced rows drawn (vqa + ground)", lambda r: r["forced_rows"], ".0f"),
                 ("forced vqa traces whose lists imply the forced answer", lambda r: r["forced_consistent"])]
    if name == "objective":
        cols += [("NLL per text token", lambda r: r.get("nll_text_mean"), ".3g"),
                 ("NLL per image token", lambda r: r.get("nll_image_mean"), ".3g"),
                 ("KL per text token: mean", lambda r: r["kl_text_mean"], ".3g"),
                 ("KL per text token: var", lambda r: r["kl_text_var"], ".3g"),
                 ("KL per image token: mean", lambda r: r["kl_image_mean"], ".3g"),
                 ("KL per image token: var", lambda r: r["kl_image_var"], ".3g"),
                 ("peak memory MiB", lambda r: r["peak_mem_mb"], ".0f")]
    cols = [c if len(c) == 3 else (*c, ".3f") for c in cols]          # (header, value of a run, format)
    lines = ["| variant | " + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for v, rs in runs.items():
        lines.append(f"| {v} | " + " | ".join(mean_sd([f(r) for r in rs], fmt) for _, f, fmt in cols) + " |")
    return "\n".join(lines)


def plot_ablation(name: str, runs: dict[str, list[dict]], run_dir: str = ""):
    """Training reward against RL step (a 5-step moving average, each seed a line) and the
    validation score against training seconds, one colour per variant."""
    plt = pyplot()
    if plt is None:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (v, rs) in enumerate(runs.items()):
        c = f"C{i}"
        for j, r in enumerate(rs):
            y = np.convolve(r["reward_curve"], np.ones(5) / 5, mode="valid")
            a1.plot(np.arange(len(y)) + 5, y, color=c, alpha=0.7, lw=1, label=v if j == 0 else None)
            a2.plot(*r["val_curve"], color=c, alpha=0.7, marker=".", label=v if j == 0 else None)
    a1.set(xlabel="RL step", ylabel="training reward (mean of the tasks,\n5-step moving average)", title=name)
    a2.set(xlabel="training seconds (1 CPU thread)", ylabel="validation score")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, name, run_dir)


def save_figure(fig, name: str, run_dir: str = ""):
    """results/<name>.png, and a copy in the study's run folder."""
    for d in ("results", run_dir):
        if d:
            os.makedirs(d, exist_ok=True)
            fig.savefig(os.path.join(d, f"{name}.png"), dpi=110)
    print(f"wrote results/{name}.png")


def pyplot():
    """matplotlib's pyplot (an optional extra), or None with a note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("study: matplotlib is not installed, no plot (pip install matplotlib)")
        return None


def ablation(names: list[str], argv: list[str]):
    """Train every run the named ablations need (each distinct config once per seed; --workers of
    them side by side, one thread each), then write each study's table, plot and results."""
    opts = study_options("ablations", argv, ",".join(names))
    tag = world_tag()       # the levels world: its own runs, start (rl_vs_sft --world=levels') and names
    root, seeds, t0 = opts["root"] or os.path.join("runs", "ablations" + tag), [int(x) for x in opts["seeds"].split(",")], time.time()
    start, steps = start_path(START_ROOT + tag), start_steps(opts)
    if not opts["report"]:
        start, _ = shared_start(START_ROOT + tag, steps, opts["start"])
    flags = lambda name, v: ["--stage=rl", "--rl.eval_interval=15", *ABLATION_FLAGS, *ABLATIONS[name][v]]
    out = lambda name, v, sd: os.path.join(root, f"seed{sd}", run_key(flags(name, v), opts["arm_s"], steps))
    todo = {}                                       # folder -> (flags, seed): each distinct run once
    for sd in seeds:
        for name in names:
            for v in ABLATIONS[name]:
                todo.setdefault(out(name, v, sd), (flags(name, v), sd))
    walls = {}
    if not opts["report"]:
        with ThreadPoolExecutor(max_workers=opts["workers"]) as pool:
            for j in pool.map(lambda kv: train_and_eval(kv[0], start, kv[1][0], kv[1][1], opts["arm_s"]), todo.items()):
                walls[j["dir"]] = j["wall_s"]
    for name in names:
        done = lambda v, sd: os.path.exists(os.path.join(out(name, v, sd), "heldout.json"))
        missing = [f"{v} seed {sd}" for v in ABLATIONS[name] for sd in seeds if not done(v, sd)]
        if missing:
            print(f"study {name}: no finished run for " + ", ".join(missing) + " (left out of the table)")
        runs = {v: [run_summary(out(name, v, sd)) for sd in seeds if done(v, sd)] for v in ABLATIONS[name]}
        cmds = {f"{v}_seed{sd}": " ".join(run_commands(out(name, v, sd), start, flags(name, v), sd, opts["arm_s"])[0][1:])
                for v in ABLATIONS[name] for sd in seeds}
        res = {**meta(name, argv, seeds, None if opts["report"] else t0, opts["commit"], arm_s=opts["arm_s"],
                      rl_flags=ABLATION_FLAGS, variants=ABLATIONS[name], not_run=missing),
               "runs": runs, "commands": cmds,
               "wall_s": {f"{v}_seed{sd}": walls.get(out(name, v, sd)) for v in ABLATIONS[name] for sd in seeds}}
        plot_ablation(name + tag, runs, root)
        publish(name + tag, res, ablation_table(name, runs) + f"\n\n![{name + tag}](results/{name + tag}.png)",
                run_dir=root)


# ------------------------------------------------------------------------------------------------
# tree search at equal sample count: rollouts only

# variant -> (rl.tree_schedule, samples per round); every variant of a block draws the same number
# of samples per prompt (16 or 32). Toy edit has 16 image steps: step 2 is the paper's 8 of 64, step 4
# its "late" 16 of 64.
def pairwise_hamming(t: torch.Tensor) -> float:
    """Diversity of the samples of each group: t (G, N, L) token ids -> the mean over groups and
    over pairs i != j of the share of the L positions where samples i and j differ (0 = N copies)."""
    G, N, _ = t.shape
    if N < 2:
        return 0.0
    diff = (t[:, :, None, :] != t[:, None, :, :]).float().mean(-1)               # (G, N, N), 0 on the diagonal
    return (diff.sum() / (G * N * (N - 1))).item()


def round_stats(g: RO.Groups) -> dict:
    """Tree search's rounds of one task's groups (rollout.Groups, rounds of N slots each): per round
    the mean over prompts of the round's mean reward ("round_mean") and best reward ("round_max"),
    the mean over prompts of the best reward so far ("best_so_far"), and the pairwise Hamming
    diversity of the round's samples ("round_hamming": of the pictures when the task draws one,
    since every child of a branch shares its parent's plan text, else of the text)."""
    G, k, P, lay = len(g.examples), g.rounds, g.base.P, g.layout
    r = g.rewards[:, :g.n_on].view(G, k, -1)                                      # (G, rounds, N)
    t = g.tokens[:, :g.n_on].view(G, k, -1, g.tokens.shape[-1])                   # (G, rounds, N, T)
    span = slice(P + lay.R_text, P + lay.R) if lay.n_img else slice(P, P + lay.R_text)
    return {"round_mean": r.mean((0, 2)).tolist(), "round_max": r.amax(2).mean(0).tolist(),
            "best_so_far": r.amax(2).cummax(1).values.mean(0).tolist(),
            "round_hamming": [pairwise_hamming(t[:, i, :, span]) for i in range(k)]}


TREE = {"iid x16": ("0", 16), "[0,2] early": ("0,2", 8), "[0,4] late": ("0,4", 8),
        # uncertainty branching (rollout.branch_step): at the step of the best sample's highest-entropy
        # slot, over all its slots / its plan text / its image
        "[0,H] uncertain": ("0,H", 8), "[0,Ht] uncertain plan": ("0,Ht", 8), "[0,Hi] uncertain image": ("0,Hi", 8),
        "iid x32": ("0", 32), "[0,2,4,8] rounds": ("0,2,4,8", 8), "[0,H,H,H] rounds": ("0,H,H,H", 8)}


def tree(argv: list[str]):
    """Mean and max reward per group and the pictures' diversity for each schedule of TREE on
    --n_prompts validation edit prompts, on the shared start and on an early SFT checkpoint
    (--early_steps) where edit has headroom."""
    opts = study_options("tree", argv)
    tag = world_tag()
    root = START_ROOT + tag
    seeds, t0 = [int(x) for x in opts["seeds"].split(",")], time.time()
    torch.set_num_threads(1)
    ckpts = {"start": shared_start(root, start_steps(opts), opts["start"])[0]}
    if opts["early_steps"]:      # a weaker checkpoint of the same recipe (its own cosine schedule): edit has headroom
        ckpts[f"early ({opts['early_steps']} SFT steps)"] = sft_checkpoint(os.path.join(root, f"early{opts['early_steps']}"),
                                                                          opts["early_steps"])
    rows, lines = {}, ["| checkpoint | schedule | samples / prompt | group mean reward | group max reward | "
                       "group max, constraint edits (L3+) | diversity, round 0 | diversity, branched rounds |",
                       "|---|---|---|---|---|---|---|---|"]
    out_dir = os.path.join("runs", "tree" + tag)
    for label, ckpt in ckpts.items():
        cfg, bundle, model, vq, _ = data.load_run(ckpt, out_dir, "study.py tree")
        idx = list(range(min(opts["n_prompts"], len(bundle.sets["edit"]["val"]))))
        hard = torch.tensor([bundle.sets["edit"]["val"].examples[i].level >= 3 for i in idx])     # (G,)
        rows[label] = {}
        for name, (sched, n) in TREE.items():
            rs = rows[label][name] = []
            for sd in seeds:
                c = replace(cfg, rl=replace(cfg.rl, tree_schedule=sched, group_size=n, tree_tasks="edit", af_prob=0.0))
                t1 = time.time()
                ro = RO.RolloutContext(model, bundle.tok, bundle.sets, data.picture_judge(c, vq), c, "cpu", nullcontext(),
                                       torch.Generator().manual_seed(sd))
                grp = RO.sample_groups(ro, "edit", idx, split="val")
                r = grp.rewards                                                      # (G, samples)
                rs.append({"samples": r.shape[1], "mean": r.mean().item(), "max": r.amax(1).mean().item(),
                           "max_L3+": r.amax(1)[hard].mean().item() if hard.any() else None, "n_L3+": int(hard.sum()),
                           **round_stats(grp), "seconds": time.time() - t1})
                print(f"tree {label} {name} seed {sd}: mean {rs[-1]['mean']:.3f} max {rs[-1]['max']:.3f} "
                      f"diversity {[round(h, 3) for h in rs[-1]['round_hamming']]} ({time.time() - t1:.0f}s)",
                      flush=True)
            branched = [float(np.mean(r["round_hamming"][1:])) for r in rs] if len(rs[0]["round_hamming"]) > 1 else []
            lines.append(f"| {label} | {name} | {rs[0]['samples']} | {mean_sd([r['mean'] for r in rs])} | "
                         f"{mean_sd([r['max'] for r in rs])} | {mean_sd([r['max_L3+'] for r in rs])} | "
                         f"{mean_sd([r['round_hamming'][0] for r in rs])} | {mean_sd(branched)} |")
    note = ("Diversity: the mean pairwise Hamming distance between the pictures (VQ codes) drawn in one round for "
            f"one prompt. {opts['n_prompts']} validation edit prompts ({int(hard.sum())} of them constraint edits, "
            f"level 3 or 4, where any of many pictures is right), temperature {cfg.rl.temperature}; a branched round "
            "continues the best picture so far from the given image step, or from the step of its most uncertain "
            "slot (H: any slot, Ht: plan text, Hi: image).")
    res = {**meta("tree", argv, seeds, t0, ckpts=ckpts, n_prompts=opts["n_prompts"], schedules=TREE),
           "rows": rows}
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(ckpts), figsize=(5 * len(ckpts), 3.6), squeeze=False)
        for ax, (label, by) in zip(axes[0], rows.items()):
            for i, (name, rs) in enumerate(by.items()):
                m = np.mean([r["best_so_far"] for r in rs], 0)
                ax.plot(np.arange(1, len(m) + 1) * rs[0]["samples"] // len(m), m, marker="o", color=f"C{i}", label=name)
            ax.set(xlabel="samples per prompt", ylabel="best reward so far\n(mean over prompts)", title=f"edit, {label}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, "tree" + tag, out_dir)
    publish("tree" + tag, res, "\n".join(lines) + f"\n\n![tree{tag}](results/tree{tag}.png)", note, run_dir=out_dir)


# ------------------------------------------------------------------------------------------------
# the estimator study of estimators.py, one run per seed

def estimator_variance(argv: list[str]):
    opts = study_options("estimator_variance", argv)
    opts["root"] = opts["root"] or os.path.join("runs", "estimators")
    seeds, t0 = [int(x) for x in opts["seeds"].split(",")], time.time()
    start, _ = shared_start(START_ROOT, start_steps(opts))
    os.makedirs(opts["root"], exist_ok=True)
    outs, cmds, ran = [], [], False
    for sd in seeds:
        out = os.path.join(opts["root"], f"seed{sd}.json")
        cmd = [sys.executable, os.path.join("studies", "estimators.py"), f"--ckpt={start}", f"--seed={sd}", f"--out={out}"]
        cmds.append(" ".join(cmd[1:]))
        if not os.path.exists(out):
            run(cmd, out.replace(".json", ".log"))
            ran = True
        outs.append(json.load(open(out)))
    e2, m2, one = "elbo_mc n=2", "mc_unweighted n=2", "one_step"
    rows = [("var(value): elbo_mc n=2 / complementary", lambda d: d["value_var_ratio"][e2]),
            ("var(value): mc_unweighted n=2 / complementary", lambda d: d["value_var_ratio"][m2]),
            ("var(gradient): elbo_mc n=2 / complementary", lambda d: d["grad_var_ratio"][e2]),
            ("var(gradient): mc_unweighted n=2 / complementary", lambda d: d["grad_var_ratio"][m2])]
    for k in ("complementary", e2, one):
        rows.append((f"bias vs exact any-order log-lik, {k} (nats)", lambda d, k=k: d["bias"][k]["minus_any_order"]))
    for k in ("complementary", e2, one):
        rows.append((f"Spearman of one draw with exact any-order, {k}", lambda d, k=k: d["spearman"][k]["any_order"]))
    rows.append(("share of the response tokens scored per draw, complementary", lambda d: d["coverage"]["complementary"]))
    rows.append(("share of the response tokens scored per draw, elbo_mc n=1", lambda d: d["coverage"]["elbo_mc n=1"]))
    rows.append(("estimators.py wall time (s)", lambda d: d["wall_s"]))
    lines = ["| quantity | mean ± sd over seeds | per seed |", "|---|---|---|"]
    for label, f in rows:
        vals = [f(d) for d in outs]
        lines.append(f"| {label} | {mean_sd(vals)} | {' / '.join(f'{v:.3g}' for v in vals)} |")
    plt = pyplot()
    if plt is not None:          # the variance ratios of every seed: value and policy gradient
        fig, ax = plt.subplots(figsize=(6, 3.4))
        labels = [r[0].replace(" / complementary", "").replace("var(", "").replace("): ", "\n") for r in rows[:4]]
        for i, d in enumerate(outs):
            ax.bar(np.arange(4) + 0.25 * (i - 1), [f(d) for _, f in rows[:4]], width=0.25, label=f"seed {seeds[i]}")
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xticks(range(4), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set(ylabel="variance / complementary's\n(2 forward passes each)", title="estimators on the study checkpoint")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, "estimator_variance", opts["root"])
    res = {**meta("estimator_variance", argv, seeds, t0 if ran else None, opts["commit"], ckpt=start), "commands": cmds,
           "per_seed": [{k: d[k] for k in ("value_var_ratio", "grad_var_ratio", "bias", "spearman", "coverage",
                                           "wall_s")} for d in outs]}
    publish("estimator_variance", res, "\n".join(lines) + "\n\n![estimator_variance](results/estimator_variance.png)",
            "Each seed draws other masks and other (x, y) pairs; estimators.py explains every quantity.",
            run_dir=opts["root"])


STUDIES = {"rl_vs_sft": rl_vs_sft, "tree": tree, "estimator_variance": estimator_variance,
           "ablations": lambda argv: ablation(list(ABLATIONS), argv)}


def main(argv: list[str]):
    """python studies/study.py NAME [--key=value ...]; NAME may list several ablations (af_ratio,gamma):
    they are trained together, so a run they share (the default variant) is trained once per seed."""
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: python studies/study.py NAME [--option=value ...]  (NAME -h: its options)\n\n{__doc__.strip()}")
        raise SystemExit(0)
    names = argv[0].split(",") if argv else []
    if names and all(n in ABLATIONS for n in names):
        return ablation(names, argv[1:])
    if len(names) != 1 or names[0] not in STUDIES:
        raise SystemExit(f"usage: python studies/study.py NAME [--key=value ...]; studies: "
                         f"{', '.join([*STUDIES, *ABLATIONS])} (several ablations comma-separated: {','.join(ABLATIONS)})")
    STUDIES[names[0]](argv[1:])


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
