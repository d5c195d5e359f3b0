"""
Evaluate a finished run on the held-out sets: one number per task, the baselines beside them, and
a PNG grid of prompts, inputs and outputs (metrics.py computes them all).

    python eval.py --preset=toy                  # runs/toy/ckpt_rl.pt if present, else ckpt_sft.pt
    python eval.py --preset=toy --out_dir=runs/x --eval.n_per_task=100
    python eval.py --preset=toy --ckpt=runs/toy/ckpt_sft_best.pt --pass_k=8   # + pass@1/4/8 from 8 samples

The checkpoint's own config decides the data and the model (its token cache and VQ tokenizer are
reused), so a run made with other --data.* flags needs none of them here; --eval.* settings come
from the command line. --pass_k=N (0 = off, else 1..64) adds pass@k for vqa and grounding and best-of-k for edit (k in 1, 4, 8 up to N), from N
samples per prompt at the rollout temperature (rl.temperature): how much RL could gain by
sharpening alone (metrics.pass_at_k_metrics). Writes metrics_eval.json and samples_eval.png into
out_dir (or --out=FILE for the json), and out_dir/report_eval.md from them (report.py; beside the
run's report.md, never over it) when the json is in out_dir and out_dir holds the run's config.json.
"""
import os

import common
import metrics
import report
from config import get_config
from data import load_run

MAX_PASS_K = 64       # samples per prompt: 64 x eval.n_per_task rollouts per task is already hours on a CPU


def main(argv=None):
    cfg, opts = get_config(argv, extra={"ckpt": "", "pass_k": 0, "out": ""})
    if not 0 <= opts["pass_k"] <= MAX_PASS_K:      # before any work: a typo must not cost an evaluation
        raise SystemExit(f"config error: --pass_k={opts['pass_k']}: expected 0 (off) or 1..{MAX_PASS_K} "
                         f"samples per prompt")
    ctx = common.setup(cfg)
    path = opts["ckpt"] or common.latest_checkpoint(cfg.train.out_dir)
    # the checkpoint's own config decides the data and the model; the command line the evaluation
    run_cfg, bundle, model, vq, blob = load_run(path, cfg.train.out_dir, "eval", ctx.device)
    print(f"eval: {path} (step {blob['step']})")
    run_cfg.eval, cfg = cfg.eval, run_cfg
    m = metrics.evaluate(model, bundle, vq, cfg, ctx.device, ctx.autocast,
                         grid_path=os.path.join(cfg.train.out_dir, "samples_eval.png"))
    m.update(metrics.baselines(bundle, cfg))
    if opts["pass_k"] > 0:
        m.update(metrics.pass_at_k_metrics(model, bundle, vq, cfg, ctx.device, ctx.autocast, opts["pass_k"],
                                           temperature=cfg.rl.temperature))
    out = opts["out"] or os.path.join(cfg.train.out_dir, "metrics_eval.json")
    common.write_json(out, m)
    print(metrics.headline(m) + "".join(f" | {k} {v:.3f}" for k, v in m.items() if "@" in k))
    print(f"wrote {cfg.train.out_dir}/samples_eval.png")
    if os.path.dirname(os.path.abspath(out)) == os.path.abspath(cfg.train.out_dir):
        try:                   # the report card of the folder, from this evaluation's numbers
            print(f"wrote {report.write(cfg.train.out_dir, os.path.basename(out))}")
        except FileNotFoundError:
            pass               # a folder without the run's config.json: nothing to report against
        except Exception as e:                                          # noqa: BLE001
            print(f"note: report_eval.md not written ({type(e).__name__}: {e})")


if __name__ == "__main__":
    common.run_main(main)
