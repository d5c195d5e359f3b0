"""
The data the stages train and evaluate on: the shape world (world.py, with the options of
world_extras.py) and users' JSONL rows (user_data.py) -> the tokenizer -> the VQ codes of every
picture -> fixed-width token tensors per task and split (tokens.py), computed ONCE per (data, vq)
config and cached in data.cache_dir, so that no picture is tokenized inside a training loop.

  get_bundle       the cached Bundle: the tokenizer, the prompt width, the layouts, the TaskSets
  TaskSampler      (task, index) items of one split by the task-mix weights, one stream per rank
  load_latest, load_run
                   a finished run's model with the data it was trained on (eval.py, sample.py)

Exercise it: python -m pytest tests/test_user_data.py tests/test_faults.py -q
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import config as C
import tokens as T
import user_data
import vq as VQ
import world
import world_extras
from rewards import PictureJudge
from common import Ctx, atomic_save, check_vq, latest_checkpoint, load_checkpoint, model_from_checkpoint

@dataclass
class Bundle:
    tok: T.Tokenizer
    P: int
    layouts: dict
    sets: dict          # sets[task][split] -> tokens.TaskSet


def jsonl_files(path: str) -> list[str]:
    """The JSONL file and the existing picture files its rows name ([] without a file): what the
    token cache of a run with --data.jsonl depends on. Unreadable rows are passed over here (the
    loader reports them)."""
    if not path or not os.path.exists(path):
        return []
    base, out = os.path.dirname(os.path.abspath(path)), [path]
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:             # not JSON, or not UTF-8
                continue
            for k in ("image", "target_image"):
                p = os.path.join(base, row[k]) if isinstance(row, dict) and isinstance(row.get(k), str) else ""
                if p and os.path.isfile(p):
                    out.append(p)
    return out


def _bundle_key(cfg, vq_file: str) -> str:
    # the key covers everything the tokens depend on: the data and VQ configs, the VQ weights' contents,
    # the source of the world and the tokens (edit a task generator and the stale cache is not reused),
    # and the contents of --data.jsonl and of the pictures it names, not just its file name
    blob = json.dumps(C.to_dict(cfg)["data"], sort_keys=True) + json.dumps(C.to_dict(cfg)["vq"], sort_keys=True)
    if os.path.exists(vq_file):               # its contents, so that a copied cache/ is still found
        with open(vq_file, "rb") as f:
            blob += hashlib.sha1(f.read()).hexdigest()
    for path in [m.__file__ for m in (T, world, world_extras, user_data)] + jsonl_files(cfg.data.jsonl):
        with open(path, "rb") as f:
            blob += hashlib.sha1(f.read()).hexdigest()
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def load_user_rows(cfg, ctx: Ctx) -> list:
    """The rows of --data.jsonl (user_data.load_jsonl): malformed rows are counted and skipped; a missing
    file, or one that yields no usable row at all, is a one-line error with the first problem."""
    path = cfg.data.jsonl
    try:
        user, skipped = user_data.load_jsonl(path, cfg.data, strict=False)
        if not user:
            user_data.load_jsonl(path, cfg.data, strict=True)          # raises on the first bad row
            raise user_data.JSONLError(f"{path}: the file holds no rows")
    except user_data.JSONLError as e:
        raise SystemExit(f"data error: --data.jsonl={path} gives no usable row: {e}") from None
    ctx.log(f"jsonl: {len(user)} rows from {path} ({len(skipped)} skipped: malformed, or held-out rows that repeat a training row)")
    for why in skipped[:3]:                     # the first few reasons, with their line numbers
        ctx.log(f"  skipped {why}")
    if len(skipped) > 3:
        ctx.log(f"  ... and {len(skipped) - 3} more (python -c \"import user_data, config; user_data.load_jsonl('{path}', "
                f"config.Config().data)\" stops at the first)")
    return user


def check_fits(pools, tok: T.Tokenizer, lay: dict, P: int, n_img: int, max_len: int, jsonl: str):
    """Every family's prompt + response (P + R positions) must fit the model's max_len. When one
    does not, the JSONL row that widened it is named (file:line) at load time, not left to a shape
    error in the first training step."""
    over = [t for t, L in lay.items() if P + L.R > max_len]
    if not over:
        return
    own = {t: {s: [e for e in v if not e.key.startswith("user|")] for s, v in sp.items()} for t, sp in pools.items()}
    users = [e for sp in pools.values() for v in sp.values() for e in v if e.key.startswith("user|")]
    for task in over:                       # the widths without the user's rows tell which row widened it
        L = lay[task]
        P0, R0 = T.prompt_width(own, tok, n_img), T.layouts_for(own, tok, n_img)[task].R
        if P > P0:            # a user prompt is the widest
            row, part = max(users, key=lambda e: len(e.prompt.split())), "prompt"
        elif L.R > R0:        # a user response is the widest of this family
            row = max((e for e in users if e.task == task),
                      key=lambda e: T.layouts_for({task: {"one": [e]}}, tok, n_img)[task].R)
            part = "response"
        else:
            raise SystemExit(f"config error: {task} needs {P} + {L.R} = {P + L.R} positions but "
                             f"--model.max_len={max_len}; raise --model.max_len")
        raise SystemExit(f"data error: {jsonl}:{row.key.split('|')[1]}: its {part} makes {task} need {P} + {L.R} = "
                         f"{P + L.R} positions but --model.max_len={max_len}; shorten or drop the row, "
                         f"or raise --model.max_len")


def get_bundle(cfg, vq, ctx: Ctx) -> Bundle:
    """All tokenized sets. VQ codes are computed once per (data, vq) config and cached on disk."""
    w = world_extras.world_for(cfg.data)
    pools = world.build_pools(cfg.data, w)
    if cfg.data.jsonl:
        for ex in load_user_rows(cfg, ctx):     # by "split", else traced rows -> sft, answer-only -> rl
            pools[ex.task][user_data.split_of(ex)].append(ex)
    path = os.path.join(cfg.data.cache_dir, f"tokens_{_bundle_key(cfg, VQ.vq_path(cfg))}.pt")
    if os.path.exists(path):
        blob = torch.load(path, map_location="cpu", weights_only=False)
        tok = T.Tokenizer.from_state(blob["tok"])
        lay = {k: T.Layout(**v) for k, v in blob["layouts"].items()}
        check_fits(pools, tok, lay, blob["P"], (cfg.data.image_size // cfg.vq.downsample) ** 2, cfg.model.max_len,
                   cfg.data.jsonl)
        sets = {t: {s: T.TaskSet(t, pools[t][s], *blob["sets"][t][s], lay[t]) for s in pools[t]} for t in pools}
        return Bundle(tok, blob["P"], lay, sets)
    t0 = time.time()
    side = cfg.data.image_size // cfg.vq.downsample                 # token grid side
    tok = T.Tokenizer.fit(T.all_texts(pools), cfg.vq.codebook_size, max_number=cfg.data.image_size,
                          extra_words=world.cell_names(side))
    n_img = side * side
    lay, P = T.layouts_for(pools, tok, n_img), T.prompt_width(pools, tok, n_img)
    check_fits(pools, tok, lay, P, n_img, cfg.model.max_len, cfg.data.jsonl)
    sets = {}
    for task in pools:
        sets[task] = {}
        for split, exs in pools[task].items():
            world.ensure_images(exs, cfg.data, w)
            codes = vq.encode(np.stack([e.image for e in exs])) \
                if task != "t2i" and exs else None
            tcodes = vq.encode(np.stack([e.target_image for e in exs])) \
                if task in ("edit", "t2i") and exs else None
            sets[task][split] = T.tokenize_split(task, exs, tok, lay[task], P, codes, tcodes)
            for e in exs:      # pictures are cheap to re-render; keep memory flat
                if e.scene is not None:
                    e.image = e.target_image = None
    if tok.n_unknown:
        ctx.log(f"tokenizer: {tok.n_unknown} unknown words mapped to [UNK]")
    if ctx.master:
        os.makedirs(cfg.data.cache_dir, exist_ok=True)
        blob = {"tok": tok.state(), "P": P, "layouts": {k: vars(v) for k, v in lay.items()},
                "sets": {t: {s: (ts.prompt, ts.response) for s, ts in v.items()} for t, v in sets.items()}}
        atomic_save(blob, path)
    ctx.log(f"tokenized {sum(len(s) for v in sets.values() for s in v.values())} examples in "
            f"{time.time() - t0:.1f}s (vocab {tok.vocab_size}, prompt width {P}, response widths "
            + ", ".join(f"{k} {v.R}" for k, v in lay.items()) + f") -> {path}")
    return Bundle(tok, P, lay, sets)


class TaskSampler:
    """Draws (task, index) training items of one split by the task-mix weights ({task: weight}).
    Each rank has its own stream (seed), saved in checkpoints (state / load_state)."""

    def __init__(self, sets: dict, split: str, mix: dict, seed: int):
        self.sets, self.split = sets, split
        self.tasks = [t for t in mix if len(sets[t][split]) > 0 and mix[t] > 0]
        if not self.tasks:
            raise SystemExit(f"data error: no examples in split {split!r} for tasks {list(mix)}")
        self.w = torch.tensor([mix[t] for t in self.tasks])
        self.g = torch.Generator().manual_seed(seed)

    def draw(self, n: int) -> list[tuple[str, int]]:
        ti = torch.multinomial(self.w, n, replacement=True, generator=self.g)
        return [(self.tasks[i], int(torch.randint(len(self.sets[self.tasks[i]][self.split]), (1,),
                                                    generator=self.g))) for i in ti]

    def state(self):
        return self.g.get_state()

    def load_state(self, st):
        self.g.set_state(st)


def load_latest(cfg, ctx: Ctx):
    """(model, bundle, vq) of a finished run with the command line's config: latest_checkpoint."""
    vq = VQ.get_vq(cfg, ctx.device, ctx.out_dir)
    bundle = get_bundle(cfg, vq, ctx)
    path = latest_checkpoint(cfg.train.out_dir)
    blob = load_checkpoint(path, bundle.tok.vocab_size)
    ctx.log(f"loaded {path} (step {blob['step']})")
    return model_from_checkpoint(blob, ctx.device), bundle, vq


def load_run(path: str, out_dir: str, who: str, device: str = "cpu"):
    """(cfg, bundle, model, vq, blob) of the checkpoint at `path` with the data it was trained on:
    its own config decides the data and the model (logs go to out_dir). The VQ tokenizer it was
    trained with must still be in the cache: a new one would give other image codes than the model
    saw. `who` names the calling script in the one-line errors."""
    blob = load_checkpoint(path)
    try:
        cfg = C.from_dict(blob["config"], path)
    except C.ConfigError as e:
        raise SystemExit(f"{who}: {e}") from None
    cfg.train.device, cfg.train.out_dir = device, out_dir
    if not os.path.exists(VQ.vq_path(cfg)):
        raise SystemExit(f"{who}: the VQ tokenizer {VQ.vq_path(cfg)} of {path} is missing; re-run "
                         f"`python train.py --preset={cfg.preset}` (or restore {cfg.data.cache_dir}/)")
    os.makedirs(out_dir, exist_ok=True)
    ctx = Ctx(device, torch.float32, "fp32", False, 0, 1, out_dir)
    vq = VQ.get_vq(cfg, device, out_dir)
    bundle = get_bundle(cfg, vq, ctx)
    if blob.get("vocab_size") != bundle.tok.vocab_size:
        raise SystemExit(f"{who}: {path} has vocabulary {blob.get('vocab_size')} but its data now gives "
                         f"{bundle.tok.vocab_size} (the data or the world's code changed since); retrain it")
    check_vq(blob, cfg, path)
    if blob.get("tok") is not None and blob["tok"] != bundle.tok.state():
        raise SystemExit(f"{who}: the word tokenizer rebuilt from {path}'s data differs from the one it was "
                         f"trained with (the data or the world's code changed since); retrain, or check out that version")
    return cfg, bundle, model_from_checkpoint(blob, device).eval(), vq, blob



def picture_judge(cfg, vq) -> PictureJudge:
    """What the rewards need to score generated pictures in this config's world (rewards.score_rows):
    the VQ decoder (vq None: no decoder, for scoring scenes alone), the scene reader (world.read_scene)
    and the world's graders (world_extras.world_for)."""
    w = world_extras.world_for(cfg.data)
    return PictureJudge(None if vq is None else vq.decode, world.read_scene, cfg.data.grid, w.graders)
