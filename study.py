"""
Studies: one named experiment, several seeds, one table, one plot, one results file.

    python study.py rl_vs_sft                          # the whole protocol below (about 85 min on 2 cores)
    python study.py rl_vs_sft --seeds=0 --arm_s=120    # a quick look
    python study.py rl_vs_sft --report                 # rebuild the table and plot from finished runs
                                                       # (--commit=HASH: the commit the runs were made at)

`rl_vs_sft` asks the question LaViDa-R1 (arXiv 2602.14147) exists to answer: after SFT has taken
all it can from the traced data, does the unified RL stage (METHOD.md §4-§6) still improve the
model, and by more than the simple alternatives? The toy mirrors the paper's situation: traces
are scarce (--data.n_sft, a few hundred to a thousand traced examples per family), answers are cheap
(5000 answer-only RL prompts per family, rewards need no trace).

  start  one SFT checkpoint trained on the traced pool until its validation curve is flat
         (--start_steps; shared by every arm and seed; its curve is in start/sft_curve.json)
  arms   from that checkpoint, the same wall-clock budget each (--arm_s seconds of training, quick
         evals not counted), one CPU thread each, two arms side by side:
           rl   the unified objective, Eq. (U), with the flags in RL_FLAGS
           sft  continued SFT on the same traced pool (lr 3e-4, the RL stage's)
           rft  rejection-sampling fine-tuning: the RL loop with A = 1 on the samples the reward
                accepts and 0 elsewhere (rl.advantage=rft), the strongest simple baseline for RL
                with verifiable rewards; same SFT rows, prompts and sampler as rl
  select every arm keeps its best checkpoint by the quick evals on the validation split (disjoint
         from the held-out split), so an arm that degrades is not judged by its last step
  report held-out metrics (eval split, eval.n_per_task per task) of each arm's best checkpoint,
         mean and spread over seeds: results/rl_vs_sft.json, a markdown table, and
         results/rl_vs_sft.png (validation score against training seconds; needs matplotlib,
         skipped with a note without it)

Every run is a plain `train.py` / `eval.py` command (printed and stored), so any arm can be
re-run or inspected by hand. Runs that finished are reused: delete a run folder to redo it.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

import common
import config as C

# the world of the protocol: scarce traces, a large answer-only pool, 200 held-out and 200
# validation examples per family
WORLD = ["--preset=toy", "--data.n_sft=1000", "--data.n_rl=5000", "--data.n_eval=200", "--data.n_val=200"]
RL_FLAGS = ["--rl.ppo_epochs=2", "--rl.af_prob=0.1"]
ARMS = {
    "rl": ["--stage=rl", "--rl.eval_interval=15"] + RL_FLAGS,
    "sft": ["--stage=sft", "--train.lr=3e-4", "--train.warmup=0", "--train.eval_interval=400"],
    "rft": ["--stage=rl", "--rl.eval_interval=15", "--rl.advantage=rft", "--rl.af_prob=0"],
}
METRICS = ("vqa_acc", "ground_miou", "edit_score")


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


def start_checkpoint(root: str, steps: int) -> str:
    """The shared start: SFT on the traced pool for `steps` steps (quick evals every 1000)."""
    out = os.path.join(root, "start")
    ckpt = os.path.join(out, "ckpt_sft.pt")
    if not os.path.exists(os.path.join(out, "sft_curve.json")):      # written when the run ends
        os.makedirs(out, exist_ok=True)
        run([sys.executable, "train.py", *WORLD, "--stage=sft", f"--out_dir={out}", f"--train.max_steps={steps}",
             "--train.eval_interval=1000", "--seed=0"], os.path.join(out, "run.log"))
    return ckpt


def arm_commands(root: str, start: str, arm: str, seed: int, arm_s: float) -> tuple[list[str], list[str], str]:
    """(the train.py command of one arm and seed, its eval.py command on the best checkpoint, its folder)."""
    out = os.path.join(root, f"seed{seed}", arm)
    budget = ("--rl.time_budget_s" if arm != "sft" else "--train.time_budget_s") + f"={arm_s}"
    steps = "--rl.max_steps=100000" if arm != "sft" else "--train.max_steps=1000000"
    train_cmd = [sys.executable, "train.py", *WORLD, *ARMS[arm], f"--out_dir={out}", f"--train.init_from={start}",
                 budget, steps, f"--seed={seed}"]
    best = os.path.join(out, f"ckpt_{'rl' if arm != 'sft' else 'sft'}_best.pt")
    eval_cmd = [sys.executable, "eval.py", f"--out_dir={out}", f"--ckpt={best}",
                f"--out={os.path.join(out, 'heldout.json')}"]
    return train_cmd, eval_cmd, out


def arm_job(root: str, start: str, arm: str, seed: int, arm_s: float) -> dict:
    """Train one arm for one seed, then evaluate its best checkpoint on the held-out split."""
    train_cmd, eval_cmd, out = arm_commands(root, start, arm, seed, arm_s)
    os.makedirs(out, exist_ok=True)
    wall = 0.0
    if not os.path.exists(os.path.join(out, "rl_log.json" if arm != "sft" else "sft_curve.json")):   # at the end
        wall = run(train_cmd, os.path.join(out, "train.log"))
    if not os.path.exists(os.path.join(out, "heldout.json")):
        run(eval_cmd, os.path.join(out, "eval.log"))
    return {"arm": arm, "seed": seed, "dir": out, "wall_s": round(wall, 1),
            "command": " ".join(train_cmd[1:]), "eval_command": " ".join(eval_cmd[1:])}


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
    """results/rl_vs_sft.json, the markdown table (printed and saved) and the plot."""
    res = {"start": [{k: start_eval[k] for k in METRICS}]}
    for arm in ARMS:
        res[arm] = [{k: json.load(open(os.path.join(j["dir"], "heldout.json")))[k] for k in METRICS}
                    for j in sorted(jobs, key=lambda j: j["seed"]) if j["arm"] == arm]
    res["diagnostics"] = {f"{j['arm']}_seed{j['seed']}": diagnostics(j) for j in jobs}
    res.update(meta, wall_s={f"{j['arm']}_seed{j['seed']}": j["wall_s"] for j in jobs},
               commands={f"{j['arm']}_seed{j['seed']}": [j["command"], j["eval_command"]] for j in jobs})
    os.makedirs("results", exist_ok=True)
    common.write_json(os.path.join("results", "rl_vs_sft.json"), res)
    lines = ["| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for arm in ["start", *ARMS]:
        cells = []
        for k in METRICS:
            v = np.array([r[k] for r in res[arm]])
            each = "/".join(f"{x:.3f}" for x in v)
            cells.append(f"{v.mean():.3f} ± {v.std():.3f} ({each})" if len(v) > 1 else f"{v.mean():.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    plot(root, jobs)
    return res


def plot(root: str, jobs: list[dict]):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("study: matplotlib is not installed, no plot (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 3.6))
    colours = {"rl": "tab:red", "sft": "tab:blue", "rft": "tab:green"}
    for j in jobs:
        xs, ys = curve(j["dir"], "sft" if j["arm"] == "sft" else "rl")
        ax.plot(xs, ys, color=colours[j["arm"]], alpha=0.8, marker=".",
                label=j["arm"] if j["seed"] == min(x["seed"] for x in jobs) else None)
    ax.set_xlabel("training seconds (1 CPU thread)")
    ax.set_ylabel("validation score\n(mean of vqa acc, mIoU, edit)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join("results", "rl_vs_sft.png"), dpi=120)
    print("wrote results/rl_vs_sft.png")


def rl_vs_sft(argv: list[str]):
    _, opts = C.get_config(argv, extra={"seeds": "0,1,2", "arm_s": 600.0, "start_steps": 6000,
                                        "root": os.path.join("runs", "rl_vs_sft"), "report": False,
                                        "commit": ""})
    root, seeds = opts["root"], [int(s) for s in opts["seeds"].split(",")]
    t0 = time.time()
    specs = [(arm, s) for s in seeds for arm in ARMS]
    start = os.path.join(root, "start", "ckpt_sft.pt")
    held = os.path.join(root, "start", "heldout.json")
    if opts["report"]:                      # only read what the runs wrote
        jobs = [{"arm": a, "seed": s, "dir": os.path.join(root, f"seed{s}", a), "wall_s": None,
                 "command": " ".join(arm_commands(root, start, a, s, opts["arm_s"])[0][1:]), "eval_command": ""}
                for a, s in specs]
    else:
        start_checkpoint(root, opts["start_steps"])
        if not os.path.exists(held):
            run([sys.executable, "eval.py", *WORLD, f"--out_dir={os.path.dirname(start)}", f"--ckpt={start}",
                 f"--out={held}"], os.path.join(root, "start", "eval.log"))
        with ThreadPoolExecutor(max_workers=2) as pool:        # two arms side by side, one thread each
            jobs = list(pool.map(lambda a_s: arm_job(root, start, a_s[0], a_s[1], opts["arm_s"]), specs))
    run_args = [a for a in argv if not a.startswith(("--report", "--commit", "--root"))]
    meta = {"command": "python study.py rl_vs_sft " + " ".join(run_args),
            "commit": opts["commit"] or common.git_commit(),      # --commit: the one the runs were made at
            "hardware": hardware(), "arm_s": opts["arm_s"], "seeds": seeds, "world": WORLD,
            "rl_flags": RL_FLAGS, "study_wall_s": None if opts["report"] else round(time.time() - t0, 1)}
    report(root, jobs, json.load(open(held)), meta)


STUDIES = {"rl_vs_sft": rl_vs_sft}


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in STUDIES:
        raise SystemExit(f"usage: python study.py NAME [--key=value ...]; studies: {', '.join(STUDIES)}")
    STUDIES[sys.argv[1]](sys.argv[2:])
