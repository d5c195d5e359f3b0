"""
Configuration: one small dataclass per concern, three presets, and `--section.key=value` overrides.

Every knob of the project lives here, with a comment that says why it has its default. Scripts call
`get_config(argv)` and get back a fully resolved `Config`; nothing else in the repo reads argv.

    python train.py --preset=toy --stage=sft --train.lr=3e-4 --rl.tree_schedule=0,2,4
    python train.py -h            # every key, its type and its value under the chosen preset

Rules: a key that does not exist, or a value that does not parse as the default's type, is a
one-line error naming the valid keys or the expected type. The resolved config is printed by the
scripts and saved as `config.json` next to every run's outputs (`save_config`).

Sections and the parts of METHOD.md they configure:
  model      the transformer and its attention layout (§1)
  data       the synthetic tasks and their pools (§8)
  vq         the image tokenizer that turns pictures into vocabulary tokens (§1)
  diffusion  masking and the SFT loss (§2), the sampler (§3)
  train      the SFT stage and the run around it (§2)
  rl         the unified objective and its advantages (§4), answer-forcing (§5), tree search (§6),
             the log-likelihood estimator (§7)
  eval       the held-out evaluation (§8)

Presets: toy (a 2-core CPU, minutes: 32x32 images, 4x4 grid, 0.9M parameters), small (one GPU, bf16:
64x64 images, a bigger model), base (several GPUs under torchrun: the same code, bigger numbers).

Paper unknowns that became config fields are marked "unknown in the paper" below, with the reading
we took as the default; METHOD.md §9 lists them all. The paper is LaViDa-R1 (arXiv 2602.14147).
"""
from __future__ import annotations

import ast
import json
import os
import sys
from dataclasses import dataclass, field, fields, asdict

from rollout import parse_tree_schedule, parse_tree_tasks
from tokens import RL_TASKS, parse_mix, parse_task_values
from world_extras import check_split_levels


class ConfigError(ValueError):
    """A bad command line: the message is one line that says what to fix."""


# ----------------------------------------------------------------------------------------------
# the sections

@dataclass
class ModelConfig:
    # fixed, not switches (model.py): fan-in init, no final norm before the head, untied head
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp_hidden: int = 0              # SwiGLU hidden width; 0 -> 8/3 * d_model rounded to 32 (LLaMA)
    prefix_dlm: bool = True          # LaViDa prefix-DLM layout: prompt attends only to prompt, so the
                                     # sampler and the likelihood encode it once (RESULTS.md 5: no cost
                                     # in accuracy at toy size, ~2x faster rollouts)
    rope_base: float = 10000.0
    abs_pos: bool = True             # + learned absolute positions (toy: fast image-cell lookup; see model.py)
    max_len: int = 512               # longest prompt+response the rotary table covers
    dropout: float = 0.0             # toy runs are short; dropout only slows them down. SFT only: the
                                     # RL update scores the policy in eval mode, as it sampled


@dataclass
class DataConfig:
    image_size: int = 32             # pixels per side of the rendered scene
    grid: int = 4                    # the scene is a grid x grid board of cells, one shape per cell at most
    min_shapes: int = 3
    max_shapes: int = 7
    n_sft: int = 3000                # traced SFT examples per task family ("deliberately limited")
    n_rl: int = 5000                 # answer-only RL prompts per family (no traces: rewards need none)
    n_eval: int = 320                # held-out examples per family, disjoint from both pools (320: 110 vqa
                                     # and 103 grounding at the edge level; a score in [0, 1] has sd <= 0.5,
                                     # so a bucket's standard error is <= 5 points, below a 10-point change)
    n_val: int = 200                 # validation examples per family (quick evals, best checkpoints)
    hard_frac: float = 0.4           # share of level-2 vqa / grounding questions when a split's levels are 1,2
    # difficulty levels of the traced SFT, answer-only RL and held-out eval + val splits (world.draw_level;
    # vqa = composition, grounding = relation depth); eval by bucket: in, edge (one above), far (two or more)
    sft_levels: str = "1,2"          # traced: the in-bucket
    rl_levels: str = "1,2,3"         # answer-only prompts reach one level past the traces (the edge)
    eval_levels: str = "1,2,3"       # held out + val: the in and edge buckets (vqa's level 4, the far
                                     # bucket, widens vqa rows to 59 tokens, 47 at levels 1-3: SFT 1.27x
                                     # slower per step, RESULTS 2.0c; studies/study.py's levels world adds it)
    # the world's options (world_extras.py; off by default); the looks world of METHOD.md §8 turns them on:
    # --data.edit_max_level=4 --data.shades=3 --data.fills=4 --data.floors=6 --vq.codebook_size=512
    edit_max_level: int = 1          # the highest edit level drawn (world_extras: 1 one operation, 2 two,
                                     # 3 a colour constraint over rows or columns, 4 over both)
    # looks: per-cell nuisance that no prompt names and no reward scores (world_extras.py, "looks"), so a
    # picture is not fixed by its description; 1, 1, 1 = one look per cell content (no nuisance)
    shades: int = 1                  # brightness levels of a shape's colour (1-3)
    fills: int = 1                   # a shape's fill: solid + striped / checkered patterns (1-4)
    floors: int = 1                  # an empty cell's floor: black + dim grey patterns (1-6)
    seed: int = 0                    # the world seed: same seed -> same scenes, questions and splits
    jsonl: str = ""                  # optional user data (see user_data.load_jsonl); "" = synthetic only
    cache_dir: str = "cache"         # VQ checkpoint and tokenized datasets are cached here


@dataclass
class VQConfig:
    codebook_size: int = 64          # 4 colours x 3 kinds x 2 sizes + empty = 25 cell types, with room; the
                                     # looks world needs 512: 24 shapes x 12 looks + 6 floors = 294 cell pictures
    code_dim: int = 32
    hidden: int = 64                 # conv channels
    downsample: int = 8              # 32px / 8 = 4x4 tokens: one token per grid cell at toy size
    batch_size: int = 64
    lr: float = 2e-3
    steps: int = 1500
    time_budget_s: float = 0.0       # optional cap in seconds (0 = none, so the result depends on the steps alone)
    beta: float = 0.25               # commitment loss weight (VQ-VAE, arXiv 1711.00937)
    ema_decay: float = 0.9           # EMA codebook updates (the VQ-VAE paper's appendix)
    dead_threshold: float = 0.5      # restart codes used less than this many times per batch (EMA count)
    n_images: int = 6000             # training images (rendered scenes, all splits' scenes excluded)


@dataclass
class DiffusionConfig:
    eps: float = 1e-3                # t ~ U(eps, 1): never an empty mask (LLaDA p_mask = (1-eps)t + eps)
    loss_weight: str = "mean"        # "mean": plain mean CE over masked tokens (LaViDa-O); "elbo": 1/t
    complementary: bool = True       # SFT also trains on the complementary mask (LaViDa)
    full_mask_frac: float = 0.3      # share of SFT rows with t = 1 (whole response masked; see sft_loss):
                                     # the sampler's start state, where only the picture can be read.
                                     # Not in the paper (t ~ U(eps, 1) there); measured (RESULTS.md):
                                     # the toy's reading comes on sooner; 0 = the paper's
    prompt_drop: float = 0.1         # drop the text prompt (-> [MASK]) for classifier-free guidance
    tokens_per_step: int = 2         # text: reveal this many tokens per step (LLaDA: 1 = best, slowest)
    block_len: int = 16              # text: semi-autoregressive block length
    image_steps: int = 16            # image region: denoising steps (cosine); 16 tokens -> ~1 per step
    temperature: float = 0.0         # text sampling temperature (0 = greedy) for eval
    image_temperature: float = 1.0   # image token sampling temperature
    cfg_scale: float = 0.0           # image CFG: logits = (1+g) cond - g uncond; 0 = off. Evaluation
                                     # only: RL rollouts sample the unguided policy, the one log pi scores
    remask: str = "low_confidence"   # which masked tokens to reveal: "low_confidence" | "random"
    dedupe: bool = True              # run each distinct canvas once per step (a group's N samples start
                                     # from one canvas; a confident policy's stay equal for many steps);
                                     # the samples' distribution is the same; false = one pass per row


@dataclass
class TrainConfig:
    stage: str = "all"               # vq | sft | rl | all (vq if not cached -> sft -> rl -> eval)
    out_dir: str = "runs/toy"
    device: str = "auto"             # auto -> cuda > mps > cpu
    dtype: str = "auto"              # auto -> bfloat16 on CUDA with bf16 support, else float32
    compile: bool = False            # torch.compile; off on CPU (slow to compile, little gain)
    seed: int = 0
    batch_size: int = 16             # GLOBAL batch (sequences per optimizer step, all ranks together);
                                     # small on CPU: the image lookup "clicks" after ~1-2k steps, not samples
    micro_batch: int = 16            # per-rank micro batch; grad accumulation is derived from these
    lr: float = 2e-3
    min_lr_frac: float = 0.1         # cosine decay to lr * this
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_steps: int = 3800            # toy: SFT steps of the main job (the same steps on any machine; 3600
                                     # gave a start where RL added 6 points on grounding's edge, not 14, RESULTS 2.0)
    time_budget_s: float = 0.0       # optional cap on SFT training seconds (quick evals not counted); 0 = none
    log_interval: int = 50
    eval_interval: int = 1000        # quick eval on eval.curve_split during SFT (the learning curve and
                                     # ckpt_sft_best.pt; not counted in the time budget); 0 = off
    ckpt_interval: int = 500
    task_mix: str = "vqa:4,ground:3,edit:2,t2i:1"   # SFT sampling ratios over the four families
    resume: bool = False             # continue from the latest checkpoint in out_dir
    init_from: str = ""              # start from this checkpoint's weights (e.g. RL from the SFT ckpt)


@dataclass
class RLConfig:
    group_size: int = 8              # N rollouts per prompt (unknown in the paper; d1 uses 6, TRL 8)
    prompts_per_step: int = 4        # prompts per task per step
    sft_rows: int = 16               # SFT rows (A = 1) mixed into every step (ratio unknown in the paper)
    gamma: float = 0.5               # A = gamma * A_distill + (1 - gamma) * A_GRPO (paper: 0.5)
    adv_std: bool = True             # divide GRPO advantage by the group std (unknown; standard GRPO)
    tau: float = 0.5                 # a group "all failed" when every reward < tau (paper: 0.5)
    af_prob: float = 0.1             # answer-forcing probability (paper: "10%")
    af_mode: str = "failed_groups"   # "failed_groups": p applies to all-failed groups (reading 1, default)
                                     # "all_groups": p of all groups get the forced sample (reading 2)
    tree_schedule: str = "0,2"       # tree-search rounds: 0 = fresh round, s = branch at image step s
                                     # (the paper branches at step 8 of 64, 1/8; the toy has 16 image
                                     # steps -> 2); H = branch where the policy was most uncertain: at
                                     # the step that revealed the best sample's highest-entropy slot
                                     # (LATR, arXiv 2510.24302), Ht / Hi: among its plan-text / image slots
    tree_tasks: str = "edit"         # tasks that use tree search (real-valued rewards); vqa / ground
                                     # have no image: only H / Ht rounds (rollout.parse_tree_tasks)
    likelihood: str = "complementary"  # complementary | elbo_mc | mc_unweighted | one_step
    n_mc: int = 2                    # forward passes for the MC estimators (complementary uses 2)
    logp_norm: str = "sum"           # log pi = sum over response tokens (Eq. C as written) | "mean" (unknown)
    shared_t: bool = False           # one t1 for the whole step (every micro-batch and rank), not one
                                     # per sample (unknown); complementary only
    p_prompt: float = 0.0            # one_step only: mask each prompt token w.p. this (Eq. O; d1: 0.15)
    kl_coef: float = 0.0             # ablation only: KL to a frozen reference copy (paper: none)
    ppo_epochs: int = 1              # mu: optimizer steps per batch of rollouts; 1 = the paper's on-policy
                                     # update (no ratio); > 1: ratio on the same masks, clipped (d1)
    clip_eps: float = 0.2            # the ratio's clip band 1 +- eps when ppo_epochs > 1 (PPO's 0.2)
    advantage: str = "unified"       # unified: Eq. (A) | rft: rejection-sampling fine-tuning, the baseline
                                     # arm: A = 1 on the samples the reward accepts, 0 on the rest
    rft_accept: str = "vqa:1,ground:0.5,edit:0.9"   # rft: the reward a sample needs, per task (vqa:
                                     # right, ground: IoU >= 0.5 as P@0.5 counts it, edit: near exact)
    lr: float = 3e-4
    max_steps: int = 64              # toy: the main job's RL updates: enough to lift grounding's edge
                                     # beyond its standard error (RESULTS 2.0; 16 before 44cea31, 2.0c)
    time_budget_s: float = 0.0       # optional cap on RL training seconds (quick evals not counted); 0 = none
    eval_interval: int = 0           # quick eval on eval.curve_split every this many RL steps, and
                                     # ckpt_rl_best.pt (0 = off: the toy job's final eval follows)
    task_mix: str = "vqa:1,ground:1,edit:1"  # RL task mix (t2i is SFT-only, as in the paper)
    temperature: float = 1.0         # rollout sampling temperature (unknown in the paper)
    tokens_per_step: int = 0         # text tokens revealed per rollout step; 0 = diffusion.tokens_per_step
                                     # (unknown in the paper, METHOD.md §9)


@dataclass
class EvalConfig:
    n_per_task: int = 320            # held-out examples per family (capped by data.n_eval)
    batch_size: int = 100
    seed: int = 1234                 # fixed sampling seed: eval numbers are reproducible
    grid_rows: int = 4               # rows per task in the PNG sample grid
    curve_split: str = "val"         # the split of the quick evals during training (the learning curves and
                                     # the best checkpoint); the held-out "eval" split is for final numbers
    curve_n: int = 100               # examples per task in each quick eval


@dataclass
class Config:
    preset: str = "toy"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = [f.name for f in fields(Config) if f.name != "preset"]

# ----------------------------------------------------------------------------------------------
# presets: only the differences from the dataclass defaults (which are the toy preset)

PRESETS: dict[str, dict[str, dict]] = {
    "toy": {},
    "small": {
        "model": dict(n_layer=8, n_head=8, d_model=512, max_len=1024),
        "data": dict(image_size=64, grid=8, min_shapes=6, max_shapes=14, n_sft=8000, n_rl=20000, n_eval=500),
        "vq": dict(codebook_size=256, hidden=128, downsample=8, steps=4000, time_budget_s=900,
                   n_images=20000),
        "diffusion": dict(image_steps=32),
        "train": dict(out_dir="runs/small", batch_size=128, micro_batch=128, lr=5e-4,
                      max_steps=20000, time_budget_s=2400, eval_interval=2000, ckpt_interval=1000),
        "rl": dict(group_size=8, prompts_per_step=8, sft_rows=64, max_steps=2000, tree_schedule="0,4",
                   time_budget_s=1800, lr=1e-4, eval_interval=100),
        "eval": dict(n_per_task=500),
    },
    "base": {
        "model": dict(n_layer=16, n_head=16, d_model=1024, max_len=2048, abs_pos=False),
        "data": dict(image_size=128, grid=16, min_shapes=10, max_shapes=40, n_sft=50000, n_rl=200000,
                     n_eval=1000),
        "vq": dict(codebook_size=1024, hidden=192, downsample=8, steps=20000, time_budget_s=7200,
                   n_images=100000),
        "diffusion": dict(image_steps=64),
        "train": dict(out_dir="runs/base", batch_size=512, micro_batch=64, lr=3e-4,
                      max_steps=100000, time_budget_s=0.0, eval_interval=5000, ckpt_interval=2000),
        "rl": dict(group_size=8, prompts_per_step=32, sft_rows=256, max_steps=5000, tree_schedule="0,8",
                   time_budget_s=0.0, lr=5e-5, eval_interval=200),
        "eval": dict(n_per_task=1000),
    },
}

# ----------------------------------------------------------------------------------------------
# parsing

def _parse_value(text: str, default, where: str):
    """Parse `text` into the type of `default`, or raise a one-line ConfigError."""
    kind = type(default)
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            v = ast.literal_eval(text)
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():   # allow 1e4 for big step counts
                    return int(v)
                raise ValueError
            return v
        if kind is float:
            v = ast.literal_eval(text)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError
            return float(v)
        if kind is str:
            return text
    except (ValueError, SyntaxError, TypeError):   # TypeError: literal_eval("{[]: 1}") (unhashable)
        pass
    raise ConfigError(f"--{where}={text!r}: expected {kind.__name__} (default {default!r})")


def _apply(cfg: Config, section: str, key: str, text_or_value, from_cli: bool = True):
    if section not in SECTIONS:
        raise ConfigError(f"unknown section {section!r} in --{section}.{key}; "
                          f"sections are: {', '.join(SECTIONS)}")
    sec = getattr(cfg, section)
    names = [f.name for f in fields(sec)]
    if key not in names:
        raise ConfigError(f"unknown key --{section}.{key}; valid keys of [{section}]: {', '.join(names)}")
    default = getattr(sec, key)
    value = _parse_value(text_or_value, default, f"{section}.{key}") if from_cli else text_or_value
    if type(value) is int and isinstance(getattr(type(sec)(), key), float):
        value = float(value)     # a preset's 900 in a float field stays a float, so --x=1.5 still parses
    setattr(sec, key, value)


def make_config(preset: str = "toy", overrides: dict | None = None) -> Config:
    """Build a Config from a preset name plus {"section.key": value} overrides (used by tests/code)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets are: {', '.join(PRESETS)}")
    cfg = Config(preset=preset)
    for section, kv in PRESETS[preset].items():
        for k, v in kv.items():
            _apply(cfg, section, k, v, from_cli=False)
    for dotted, v in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        _apply(cfg, section, key, str(v) if not isinstance(v, str) else v)
    return cfg


def help_text(cfg: Config, extra: dict | None = None) -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv else ""
    prog = prog if prog.endswith(".py") and prog != "__main__.py" else "train.py"
    first = "[--option=value ...]" if extra else "[--stage=...]"
    lines = [f"usage: python {prog} {first} [--preset={'|'.join(PRESETS)}] [--section.key=value ...]"]
    if extra:
        lines.append(f"options of {prog} (a bool option may be bare: --name means --name=true):")
        lines += [f"  --{k}={v!r}  ({type(v).__name__})" for k, v in extra.items()]
    lines.append(f"keys and their values under preset {cfg.preset!r}:")
    for section in SECTIONS:
        sec = getattr(cfg, section)
        for f in fields(sec):
            v = getattr(sec, f.name)
            lines.append(f"  --{section}.{f.name}={v!r}  ({type(v).__name__})")
    lines.append("shortcuts: " + "; ".join(f"--{k}=X means --{v}=X" for k, v in SHORTCUTS.items()))
    return "\n".join(lines)


SHORTCUTS = {"stage": "train.stage", "out_dir": "train.out_dir", "seed": "train.seed",
             "device": "train.device", "resume": "train.resume"}


def _check_extra(extra: dict):
    """An entry script's own options ({name: default}) must not hide a config key or shortcut, and
    their defaults must give their type (a programming error, so a plain exception)."""
    for k, v in extra.items():
        if "." in k or k in SHORTCUTS or k == "preset" or type(v) not in (bool, int, float, str):
            raise ValueError(f"get_config: extra option {k!r}={v!r} must be a bare name that is not a "
                             f"shortcut or 'preset', with a bool, int, float or str default")


def get_config(argv: list[str] | None = None, extra: dict | None = None):
    """Parse argv (default sys.argv[1:]) into a Config. Exits with a one-line message on errors.

    An entry script may declare its own options with their defaults, `extra={"ckpt": "", "reps": 3}`:
    then `--ckpt=runs/x.pt --reps=5` are parsed by the same rule (typed by the default; a bool may be
    bare, `--compile`), listed by -h, and the call returns (cfg, {name: value}). Without `extra` it
    returns the Config alone."""
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = dict(extra or {})
    _check_extra(opts)
    try:
        preset, rest, want_help = "toy", [], False
        for arg in argv:
            name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
            if arg in ("-h", "--help"):
                want_help = True
            elif arg.startswith("--preset="):
                preset = value
            elif arg == "--resume":                         # bare flag is allowed for the common case
                rest.append(("train.resume", "true"))
            elif name in opts:
                if not eq and type(opts[name]) is not bool:
                    raise ConfigError(f"--{name} needs a value: --{name}=... (default {opts[name]!r})")
                opts[name] = _parse_value(value if eq else "true", opts[name], name)
            elif eq:
                key = SHORTCUTS.get(name, name)
                if "." not in key:
                    raise ConfigError(_bare_key_message(key, opts))
                rest.append((key, value))
            else:
                raise ConfigError(f"cannot parse argument {arg!r}: write --section.key=value (see -h)")
        cfg = make_config(preset)
        for key, value in rest:
            section, _, k = key.partition(".")
            _apply(cfg, section, k, value)
        validate(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if want_help:
        print(help_text(cfg, extra))
        raise SystemExit(0)
    return (cfg, opts) if extra is not None else cfg


def _bare_key_message(key: str, opts: dict) -> str:
    where = f"sections: {', '.join(SECTIONS)}; shortcuts: {', '.join(SHORTCUTS)}"
    if opts:
        return (f"unknown option --{key}; options of this script: {', '.join('--' + k for k in opts)} "
                f"(config keys are written --section.key=value; {where})")
    return f"--{key}: write overrides as --section.key=value ({where})"


# ----------------------------------------------------------------------------------------------
# the range of every number: (section.key, lowest, highest, what the value is), checked by validate()

INF = float("inf")
RANGES = [
    # sizes and counts that must be at least 1
    *((k, 1, INF, "a size") for k in ("model.n_layer", "model.n_head", "model.d_model", "model.max_len",
                                      "data.image_size", "data.grid", "vq.codebook_size", "vq.code_dim",
                                      "vq.hidden", "vq.downsample", "vq.batch_size", "vq.n_images",
                                      "diffusion.tokens_per_step", "diffusion.block_len", "diffusion.image_steps",
                                      "train.batch_size", "train.micro_batch", "train.log_interval",
                                      "train.ckpt_interval", "rl.group_size", "rl.prompts_per_step", "rl.n_mc",
                                      "eval.batch_size", "eval.n_per_task")),
    # counts that may be 0
    *((k, 0, INF, "a count") for k in ("model.mlp_hidden", "data.n_sft", "data.n_rl", "data.n_eval", "data.n_val",
                                       "vq.steps", "train.max_steps", "train.warmup",
                                       "train.eval_interval", "rl.sft_rows", "rl.max_steps", "rl.eval_interval",
                                       "rl.tokens_per_step", "eval.grid_rows", "eval.curve_n")),
    # probabilities and fractions
    *((k, 0.0, 1.0, "a probability") for k in ("model.dropout", "data.hard_frac",
                                               "vq.ema_decay", "diffusion.full_mask_frac", "diffusion.prompt_drop",
                                               "train.min_lr_frac", "rl.gamma", "rl.tau", "rl.af_prob", "rl.p_prompt")),
    # the world's own limits (world_extras.MAX_LOOKS, MAX_EDIT_LEVEL; tests/test_config.py checks they agree)
    ("data.shades", 1, 3, "shade levels"), ("data.fills", 1, 4, "fill patterns"), ("data.floors", 1, 6, "floor patterns"),
    ("data.edit_max_level", 1, 4, "an edit level"),
    ("diffusion.eps", 1e-9, 1.0, "the smallest noise level (> 0: the ELBO weighs by 1/t)"),
    # rates, weights and temperatures
    *((k, 1e-12, INF, "a learning rate") for k in ("vq.lr", "train.lr", "rl.lr")),
    *((k, 0.0, INF, "a weight (>= 0)") for k in ("model.rope_base", "vq.beta", "vq.dead_threshold",
                                                 "train.weight_decay", "train.grad_clip", "rl.kl_coef",
                                                 "diffusion.temperature", "diffusion.image_temperature",
                                                 "diffusion.cfg_scale", "rl.temperature")),
]


def writable(folder: str) -> bool:
    """Whether a run could create `folder` and write files in it, checked without creating anything:
    an existing folder must be writable, a missing one needs a writable existing ancestor, and a
    file on the path fails."""
    p = os.path.abspath(folder)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent
    return os.path.isdir(p) and os.access(p, os.W_OK | os.X_OK)


def check_ranges(cfg: Config):
    """Every number of RANGES within its bounds, else a one-line ConfigError naming the key and range."""
    for key, lo, hi, what in RANGES:
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if not lo <= v <= hi:
            span = f">= {lo:g}" if hi == INF else f"in [{lo:g}, {hi:g}]"
            raise ConfigError(f"--{key}={v!r}: {what}, must be {span}")


def validate(cfg: Config):
    """Ranges (RANGES) and the cross-field checks a type check cannot do, the device and the paths.
    Each failure is one line with the fix."""
    d, m, tc, rc = cfg.data, cfg.model, cfg.train, cfg.rl
    check_ranges(cfg)
    if d.jsonl and os.path.isdir(d.jsonl):
        raise ConfigError(f"--data.jsonl={d.jsonl!r} is a folder; pass the .jsonl file inside it "
                          f"(python user_data.py --export=DIR writes DIR/data.jsonl)")
    if d.jsonl and not os.path.isfile(d.jsonl):
        raise ConfigError(f"--data.jsonl={d.jsonl!r}: no such file (python user_data.py --export=DIR writes an example)")
    if tc.init_from and not os.path.isfile(tc.init_from):
        raise ConfigError(f"--train.init_from={tc.init_from!r}: no such checkpoint file")
    if os.path.exists(tc.out_dir) and not os.path.isdir(tc.out_dir):
        raise ConfigError(f"--train.out_dir={tc.out_dir!r} is a file, not a folder; pick another --out_dir")
    for key, folder in (("data.cache_dir", d.cache_dir), ("train.out_dir", tc.out_dir)):
        if not writable(folder):
            raise ConfigError(f"--{key}={folder!r}: cannot write there (read-only, a file, or no permission); "
                              f"pick another --{key}")
    if tc.device != "auto" and tc.device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--train.device={tc.device!r}: expected auto, cpu, cuda, cuda:N or mps")
    if cfg.train.stage not in ("vq", "sft", "rl", "eval", "all"):
        raise ConfigError(f"--train.stage={tc.stage!r}: expected one of vq, sft, rl, eval, all")
    for key in ("sft_levels", "rl_levels", "eval_levels"):
        v = getattr(d, key)
        parts = [p.strip() for p in v.split(",") if p.strip()]
        if not parts or not all(p.isdigit() and 1 <= int(p) <= 4 for p in parts):
            raise ConfigError(f"--data.{key}={v!r}: expected a comma list of levels 1..4 (vqa and edit have 1-4, "
                              f"grounding 1-3), e.g. 1,2")
    if d.image_size % cfg.vq.downsample:
        raise ConfigError(f"data.image_size={d.image_size} must be divisible by vq.downsample={cfg.vq.downsample}")
    if d.image_size % d.grid:
        raise ConfigError(f"data.image_size={d.image_size} must be divisible by data.grid={d.grid}")
    if m.d_model % m.n_head:
        raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.n_head={m.n_head}")
    if not (1 <= d.min_shapes <= d.max_shapes <= d.grid * d.grid):
        raise ConfigError(f"need 1 <= data.min_shapes <= data.max_shapes <= grid^2={d.grid ** 2}")
    if cfg.diffusion.loss_weight not in ("mean", "elbo"):
        raise ConfigError(f"--diffusion.loss_weight={cfg.diffusion.loss_weight!r}: expected mean or elbo")
    if cfg.diffusion.remask not in ("low_confidence", "random"):
        raise ConfigError(f"--diffusion.remask={cfg.diffusion.remask!r}: expected low_confidence or random")
    if rc.likelihood not in ("complementary", "elbo_mc", "mc_unweighted", "one_step"):
        raise ConfigError(f"--rl.likelihood={rc.likelihood!r}: expected complementary, elbo_mc, "
                          f"mc_unweighted or one_step")
    if rc.logp_norm not in ("sum", "mean"):
        raise ConfigError(f"--rl.logp_norm={rc.logp_norm!r}: expected sum or mean")
    if rc.shared_t and rc.likelihood != "complementary":
        raise ConfigError(f"--rl.shared_t=true applies to --rl.likelihood=complementary only (its t1), not "
                          f"{rc.likelihood}: drop --rl.shared_t")
    if not 0 <= rc.p_prompt < 1:
        raise ConfigError(f"--rl.p_prompt={rc.p_prompt!r}: a probability, must be in [0, 1)")
    if rc.p_prompt and rc.likelihood != "one_step":
        raise ConfigError(f"--rl.p_prompt={rc.p_prompt} masks the prompt of --rl.likelihood=one_step only, not "
                          f"{rc.likelihood}: set --rl.likelihood=one_step or drop --rl.p_prompt")
    for key, v in (("vq.time_budget_s", cfg.vq.time_budget_s), ("train.time_budget_s", tc.time_budget_s),
                   ("rl.time_budget_s", rc.time_budget_s)):
        if v < 0:
            raise ConfigError(f"--{key}={v}: a cap in seconds, >= 0 (0 = no cap)")
    if rc.ppo_epochs < 1 or not 0 < rc.clip_eps < 1:
        raise ConfigError(f"--rl.ppo_epochs={rc.ppo_epochs} / --rl.clip_eps={rc.clip_eps}: need ppo_epochs >= 1 "
                          f"and 0 < clip_eps < 1")
    if rc.advantage not in ("unified", "rft"):
        raise ConfigError(f"--rl.advantage={rc.advantage!r}: expected unified or rft")
    try:     # the parsers live beside what they parse (tokens: task lists, rollout: the tree schedule,
             # world_extras: the levels each family has)
        parse_mix(tc.task_mix, "train.task_mix")
        missing = set(parse_mix(rc.task_mix, "rl.task_mix", RL_TASKS))
        if rc.advantage == "rft":
            missing -= set(parse_task_values(rc.rft_accept, "rl.rft_accept", RL_TASKS))
        schedule = parse_tree_schedule(rc.tree_schedule)
        parse_tree_tasks(rc.tree_tasks, rc.tree_schedule)
        check_split_levels(d)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if rc.advantage == "rft" and missing:
        raise ConfigError(f"--rl.rft_accept={rc.rft_accept!r} has no threshold for {sorted(missing)} (in rl.task_mix)")
    splits = {"sft": d.n_sft, "rl": d.n_rl, "eval": d.n_eval, "val": d.n_val}
    if cfg.eval.curve_split not in splits:
        raise ConfigError(f"--eval.curve_split={cfg.eval.curve_split!r}: expected one of {', '.join(splits)} (val: "
                          f"the validation split; eval is the held-out split, keep it for final numbers)")
    if (tc.eval_interval or rc.eval_interval) and not (splits[cfg.eval.curve_split] and cfg.eval.curve_n > 0):
        raise ConfigError(f"quick evals are on (train/rl.eval_interval) but split {cfg.eval.curve_split!r} or "
                          f"eval.curve_n is empty: set --data.n_{cfg.eval.curve_split} / --eval.curve_n > 0 or "
                          f"--train.eval_interval=0 --rl.eval_interval=0")
    if rc.af_mode not in ("failed_groups", "all_groups"):
        raise ConfigError(f"--rl.af_mode={rc.af_mode!r}: expected failed_groups or all_groups")
    if tc.batch_size % tc.micro_batch:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be a multiple of train.micro_batch={tc.micro_batch}")
    n_img = (d.image_size // cfg.vq.downsample) ** 2
    img_steps = min(cfg.diffusion.image_steps, n_img)
    for s in schedule[1:]:
        if isinstance(s, int) and not 0 < s < img_steps:
            raise ConfigError(f"--rl.tree_schedule={rc.tree_schedule!r}: branch step {s} must lie in "
                              f"1..{img_steps - 1} (the image has {img_steps} denoising steps)")


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


REMOVED = {"data.teacher_slip": 0.0, "data.teacher_bias": "", "data.teacher_box_pad": 0}   # option -> its old default


def from_dict(d: dict, source: str = "") -> Config:
    """Rebuild a Config from to_dict() output. Unknown keys are ignored. For a config read from a
    file (`source`: its path, e.g. a checkpoint) a missing key is never filled in silently: a
    missing model.* key is a ConfigError (today's default may describe another architecture than
    the one the weights were trained as), any other missing key takes today's default with a
    warning on stderr that names the keys."""
    given = {k: d.get(k.split(".")[0], {}).get(k.split(".")[1], v) for k, v in REMOVED.items()}
    set_removed = [f"{k}={v!r}" for k, v in given.items() if v != REMOVED[k]]
    if set_removed:
        raise ConfigError(f"{source or 'the config'} sets {', '.join(set_removed)}: options removed since bfc48d4 "
                          f"(RESULTS.md, removed switches); check out bfc48d4 to use it")
    cfg = Config(preset=d.get("preset", "toy"))
    missing = []
    for section in SECTIONS:
        sec = getattr(cfg, section)
        given = d.get(section, {})
        for f in fields(sec):
            if f.name in given:
                setattr(sec, f.name, given[f.name])
            else:
                missing.append(f"{section}.{f.name}")
    if source and missing:
        arch = [k for k in missing if k.startswith("model.")]
        if arch:
            raise ConfigError(f"{source}: its config has no {', '.join(arch)} (written by an older version); "
                              f"today's default may be another architecture: retrain it, or check out that version")
        print(f"warning: {source}: its config has no {', '.join(missing)} (an older version); using today's "
              f"defaults for them", file=sys.stderr)
    return cfg


def save_config(cfg: Config, out_dir: str, argv: list[str] | None = None):
    os.makedirs(out_dir, exist_ok=True)
    payload = to_dict(cfg)
    payload["argv"] = list(sys.argv if argv is None else argv)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(payload, f, indent=2)
