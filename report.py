"""
The run's report card: <out_dir>/report.md, written at the end of the main job (train.final_eval), and
report_eval.md beside it from eval.py's metrics_eval.json; rebuilt from the files the run left in its
folder, so it can also be written again later:

    python report.py --out_dir=runs/toy          # from metrics.json (--metrics=metrics_eval.json: report_eval.md)

What it holds: the command and every setting that differs from its preset; the wall time of each stage;
the held-out table SFT -> RL per bucket (in, edge, far) with the baselines beside it; the RL stage's
training reward per task and the SFT stage's quick-eval curve (as small tables; also as a picture,
report_curves.png, when matplotlib is installed); links to the sample grids. Numbers are copied from
metrics.json with three decimals, nothing is recomputed here (tests/test_stages.py checks the table
against metrics.json). Plumbing beside the method: no part of METHOD.md lives here.
"""
from __future__ import annotations

import json
import os
import sys

from config import ConfigError, from_dict, make_config, to_dict

METRICS = (("vqa_acc", "vqa accuracy", "vqa_prior_acc", "image-blind prior"),
           ("ground_miou", "grounding mIoU", "ground_random_miou", "random shape's box"),
           ("edit_score", "edit score", "edit_copy_score", "copy the input"),
           ("t2i_cell_acc", "text-to-image cell accuracy", "t2i_empty_cell_acc", "empty canvas"))
BUCKETS = ("in", "edge", "far")


def _load(path: str):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def config_diff(cfg: dict) -> list[str]:
    """'section.key: preset value -> run value' for every setting of the run's config.json that differs
    from its preset (out_dir and device aside: they say where, not what)."""
    base = to_dict(make_config(cfg.get("preset", "toy")))
    run = to_dict(from_dict(cfg))
    out = []
    for section, keys in run.items():
        if not isinstance(keys, dict):
            continue
        for k, v in keys.items():
            if (section, k) in (("train", "out_dir"), ("train", "device")):
                continue
            if base.get(section, {}).get(k) != v:
                out.append(f"{section}.{k}: {base[section][k]!r} -> {v!r}")
    return out


def heldout_table(m: dict) -> list[str]:
    """Markdown rows: per metric, each bucket it has and all, SFT checkpoint -> this checkpoint, and
    the baseline beside it."""
    sft = m.get("sft_checkpoint", {})
    rows = ["| held-out metric | bucket | SFT checkpoint | this checkpoint | baseline |", "|---|---|---|---|---|"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"
    for key, name, base_key, base_name in METRICS:
        if key not in m:
            continue
        n = m.get(f"{key}_n", {})
        for b in BUCKETS:
            if f"{key}_{b}" in m:
                rows.append(f"| {name} | {b} ({n.get(b, '?')}) | {fmt(sft.get(f'{key}_{b}'))} | {fmt(m[f'{key}_{b}'])} | |")
        base = f"{fmt(m.get(base_key))} ({base_name})" if base_key in m else ""
        rows.append(f"| {name} | all | {fmt(sft.get(key))} | {fmt(m[key])} | {base} |")
    return rows


def stage_times(out_dir: str, m: dict, rl_log, sft_curve) -> list[str]:
    """Seconds per stage, from what each stage wrote: the VQ's vq_metrics.json, the SFT curve's last
    quick eval (when it is the last step), the RL log's last step, the final evaluation of this
    checkpoint; the rest of the command's time (building the data, loading, the SFT checkpoint's
    evaluation) is its own row, so the rows add up to the whole."""
    vq = _load(os.path.join(out_dir, "vq_metrics.json"))
    rows, parts = ["| stage | seconds |", "|---|---|"], []
    if vq and "wall_s" in vq:
        parts.append(("VQ tokenizer", vq["wall_s"]))
    if sft_curve:
        parts.append((f"SFT (to step {sft_curve[-1]['step']}, its last quick eval)", sft_curve[-1]["seconds"]))
    if rl_log:
        parts.append((f"RL ({rl_log[-1]['step']} steps)", rl_log[-1]["seconds"]))
    if "eval_seconds" in m:
        parts.append(("held-out evaluation of this checkpoint", m["eval_seconds"]))
    rows += [f"| {name} | {s:.0f} |" for name, s in parts]
    if "total_seconds" in m:
        rest = m["total_seconds"] - sum(s for _, s in parts)
        if rest >= 0.5:
            rows.append(f"| the rest (data, loading, the SFT checkpoint's evaluation) | {rest:.0f} |")
        rows.append(f"| the whole command | {m['total_seconds']:.0f} |")
    return rows


def reward_windows(rl_log, max_rows: int = 8) -> list[tuple[int, int, dict]]:
    """The RL log cut into at most max_rows consecutive windows of (nearly) equal length:
    (first step, last step, {task: mean reward over the window's steps}). One step's reward is the
    mean over a few prompts' groups, too noisy to read alone; a window's mean shows the trend."""
    tasks = [t for t in ("vqa", "ground", "edit") if isinstance(rl_log[0].get(t), dict)] if rl_log else []
    k = min(max_rows, len(rl_log))
    cuts = [round(i * len(rl_log) / k) for i in range(k + 1)] if k else []
    return [(rl_log[a]["step"], rl_log[b - 1]["step"],
             {t: sum(r[t]["reward"] for r in rl_log[a:b]) / (b - a) for t in tasks}) for a, b in zip(cuts, cuts[1:])]


def curves(rl_log, sft_curve, max_rows: int = 12) -> list[str]:
    """The RL reward per task (window means, reward_windows) and the SFT quick-eval scores (at most
    max_rows rows, evenly spaced, the last always kept), as small tables."""
    pick = lambda xs: [xs[i] for i in sorted({round(j * (len(xs) - 1) / max(max_rows - 1, 1)) for j in range(max_rows)})] \
        if len(xs) > max_rows else xs
    out = []
    if rl_log:
        windows = reward_windows(rl_log)
        tasks = list(windows[0][2])
        out += ["**RL training reward** (mean over the window's steps of each step's group members, per task)", "",
                "| steps | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        out += [f"| {a if a == b else f'{a}-{b}'} | " + " | ".join(f"{means[t]:.3f}" for t in tasks) + " |"
                for a, b, means in windows]
        out.append("")
    if sft_curve:
        keys = [k for k, *_ in METRICS if k in sft_curve[0]]
        out += ["**SFT quick evals** (validation split)", "", "| step | " + " | ".join(keys) + " |",
                "|---" * (len(keys) + 1) + "|"]
        out += [f"| {r['step']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |" for r in pick(sft_curve)]
        out.append("")
    return out


def plot_curves(out_dir: str, rl_log, sft_curve) -> str | None:
    """report_curves.png (RL reward and SFT quick evals) when matplotlib is installed, else None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for t in ("vqa", "ground", "edit"):
        if rl_log and isinstance(rl_log[0].get(t), dict):
            axes[0].plot([r["step"] for r in rl_log], [r[t]["reward"] for r in rl_log], label=t)
    axes[0].set(title="RL training reward", xlabel="RL step")
    for k, name, *_ in METRICS:
        if sft_curve and k in sft_curve[0]:
            axes[1].plot([r["step"] for r in sft_curve], [r[k] for r in sft_curve], marker="o", label=name)
    axes[1].set(title="SFT quick evals (validation)", xlabel="SFT step")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "report_curves.png"), dpi=100)
    plt.close(fig)
    return "report_curves.png"


def build(out_dir: str, metrics_file: str = "metrics.json") -> str:
    """The report's markdown text, from the files in out_dir. FileNotFoundError when metrics_file or
    config.json is missing (nothing to report)."""
    m = _load(os.path.join(out_dir, metrics_file))
    cfg = _load(os.path.join(out_dir, "config.json"))
    if m is None or cfg is None:
        raise FileNotFoundError(f"{out_dir}: needs {metrics_file} and config.json (run train.py or eval.py there first)")
    rl_log, sft_curve = _load(os.path.join(out_dir, "rl_log.json")), _load(os.path.join(out_dir, "sft_curve.json"))
    diff = config_diff(cfg)
    lines = [f"# Report: {out_dir}", "", "    python " + " ".join(cfg.get("argv", ["?"])), "",
             f"Settings that differ from the preset `{cfg.get('preset', 'toy')}`: " + ("none." if not diff else ""), ""]
    lines += [f"- `{d}`" for d in diff] + ([""] if diff else [])
    lines += ["## Held-out results", "", f"From `{metrics_file}`; the SFT column is the SFT checkpoint on the same "
              "examples (the final eval of the main job; empty when RL did not run).", ""]
    lines += heldout_table(m) + [""]
    lines += ["## Wall time", ""] + stage_times(out_dir, m, rl_log, sft_curve) + [""]
    if rl_log or sft_curve:
        lines += ["## Curves", ""]
        png = plot_curves(out_dir, rl_log, sft_curve)
        lines += [f"![curves]({png})", ""] if png else []
        lines += curves(rl_log, sft_curve)
    grids = [g for g in ("samples.png", "samples_eval.png") if os.path.exists(os.path.join(out_dir, g))]
    if grids:
        lines += ["## Samples", ""] + [f"![{g}]({g})" for g in grids] + [""]
    return "\n".join(lines)


def report_name(metrics_file: str) -> str:
    """The report of a metrics file: metrics.json -> report.md (the run's), metrics_eval.json ->
    report_eval.md (eval.py's), so an evaluation never overwrites the run's own report card."""
    stem = os.path.splitext(os.path.basename(metrics_file))[0]
    return "report" + stem[len("metrics"):] + ".md" if stem.startswith("metrics") else f"report_{stem}.md"


def write(out_dir: str, metrics_file: str = "metrics.json") -> str:
    """Write out_dir/report.md, or the report named after another metrics file (report_name; see
    build); returns its path."""
    path = os.path.join(out_dir, report_name(metrics_file))
    text = build(out_dir, metrics_file)
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


USAGE = "usage: python report.py --out_dir=RUN_FOLDER [--metrics=metrics.json]"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + __doc__.strip())
        return
    if any("=" not in a for a in argv):
        raise SystemExit(f"report error: {' '.join(a for a in argv if '=' not in a)}: expected --key=value; {USAGE}")
    args = dict(a.lstrip("-").split("=", 1) for a in argv)
    unknown = set(args) - {"out_dir", "metrics"}
    if unknown or not args.get("out_dir"):
        raise SystemExit(f"report error: {', '.join(sorted(unknown)) or 'no --out_dir'}; {USAGE}")
    try:
        print(f"wrote {write(args['out_dir'], args.get('metrics', 'metrics.json'))}")
    except (FileNotFoundError, ConfigError) as e:
        raise SystemExit(f"report error: {e}") from None


if __name__ == "__main__":
    from common import run_main
    run_main(main)
