"""
Evaluate a finished run on the held-out sets: one number per task, the baselines beside them, and
a PNG grid of prompts, inputs and outputs (metrics.py computes them all).

    python eval.py --preset=toy                  # runs/toy/ckpt_rl.pt if present, else ckpt_sft.pt
    python eval.py --preset=toy --out_dir=runs/x --eval.n_per_task=100

Writes metrics_eval.json and samples_eval.png into out_dir.
"""
import json
import os

import common
import metrics
from config import get_config


def main(argv=None):
    cfg = get_config(argv)
    ctx = common.setup(cfg)
    model, bundle, vq = common.load_latest(cfg, ctx)
    m = metrics.evaluate(model, bundle, vq, cfg, ctx.device, ctx.autocast,
                         grid_path=os.path.join(cfg.train.out_dir, "samples_eval.png"))
    m.update(metrics.baselines(bundle, cfg))
    with open(os.path.join(cfg.train.out_dir, "metrics_eval.json"), "w") as f:
        json.dump(m, f, indent=1)
    print(json.dumps(m, indent=1))
    print(f"wrote {cfg.train.out_dir}/metrics_eval.json and samples_eval.png")


if __name__ == "__main__":
    main()
