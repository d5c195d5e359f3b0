"""
Tests of config.py: `--section.key=value` overrides are typed by the default, presets, one-line
errors (exit code 2) for unknown keys/sections/presets and wrong types, `-h`, the dict round trip used
by checkpoints, config.json, and the task-mix parser (tokens.parse_mix). Pure Python, well under a second.

    python -m pytest tests/test_config.py -q
"""
import json

import pytest

import config  # noqa: E402
from config import ConfigError, from_dict, get_config, make_config, save_config, to_dict  # noqa: E402
from rollout import parse_tree_schedule  # noqa: E402
from tokens import parse_mix  # noqa: E402


def _fails(argv, capsys) -> str:
    """Run get_config on argv, expect SystemExit(2) and return the single stderr line."""
    with pytest.raises(SystemExit) as e:
        get_config(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected a one-line error, got {err!r}"
    return lines[0]


# ----------------------------------------------------------------------------------------------
# overrides

def test_defaults_are_the_toy_preset():
    cfg = get_config([])
    assert cfg.preset == "toy"
    assert cfg.model.n_layer == 4 and cfg.model.d_model == 128 and cfg.data.image_size == 32


def test_typed_overrides():
    cfg = get_config(["--model.n_layer=2", "--train.lr=3e-4", "--model.prefix_dlm=true",
                      "--rl.tree_schedule=0,2,4"])
    assert cfg.model.n_layer == 2 and type(cfg.model.n_layer) is int
    assert cfg.train.lr == pytest.approx(3e-4) and type(cfg.train.lr) is float
    assert cfg.model.prefix_dlm is True
    assert cfg.rl.tree_schedule == "0,2,4"
    # other keys keep their defaults
    assert cfg.model.n_head == config.ModelConfig().n_head and cfg.train.batch_size == config.TrainConfig().batch_size


@pytest.mark.parametrize("text,value", [("true", True), ("1", True), ("on", True), ("yes", True),
                                        ("False", False), ("0", False), ("off", False), ("no", False)])
def test_bool_spellings(text, value):
    assert get_config([f"--train.compile={text}"]).train.compile is value


def test_int_accepts_integral_float_and_float_accepts_int():
    cfg = get_config(["--train.max_steps=1e4", "--train.lr=1"])
    assert cfg.train.max_steps == 10000 and type(cfg.train.max_steps) is int
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float


def test_bracketed_int_list():
    cfg = get_config(["--rl.tree_schedule=[0,2,4]"])
    assert parse_tree_schedule(cfg.rl.tree_schedule) == [0, 2, 4]
    assert parse_tree_schedule("0,H,Ht,4") == [0, "H", "Ht", 4]


def test_presets_change_values():
    small = get_config(["--preset=small"])
    assert small.preset == "small"
    assert small.model.d_model == 512 and small.model.n_layer == 8 and small.data.image_size == 64
    base = get_config(["--preset=base"])
    assert base.model.d_model == 1024 and base.data.grid == config.PRESETS["base"]["data"]["grid"]
    # the command line wins over the preset, whatever the order
    assert get_config(["--model.d_model=256", "--preset=small"]).model.d_model == 256


def test_preset_float_fields_stay_float_and_accept_float_overrides():
    # the small preset writes time_budget_s=2400 (an int) into a float field; a float override must
    # still parse (regression: it used to fail with "expected int")
    cfg = get_config(["--preset=small", "--train.time_budget_s=99.5", "--vq.time_budget_s=1.5"])
    assert cfg.train.time_budget_s == 99.5 and cfg.vq.time_budget_s == 1.5
    cfg = get_config(["--preset=small"])
    assert type(cfg.rl.time_budget_s) is float and type(cfg.vq.time_budget_s) is float


def test_shortcuts_and_bare_resume():
    cfg = get_config(["--stage=sft", "--out_dir=/tmp/x", "--seed=7", "--resume"])
    assert cfg.train.stage == "sft" and cfg.train.out_dir == "/tmp/x" and cfg.train.seed == 7
    assert cfg.train.resume is True


def test_make_config_overrides():
    cfg = make_config("toy", {"data.n_sft": 40, "data.n_rl": 60, "train.lr": 0.5, "model.prefix_dlm": True})
    assert (cfg.data.n_sft, cfg.data.n_rl, cfg.train.lr, cfg.model.prefix_dlm) == (40, 60, 0.5, True)
    with pytest.raises(ConfigError):
        make_config("toy", {"data.n_sft": "many"})
    with pytest.raises(ConfigError):
        make_config("huge")


# ----------------------------------------------------------------------------------------------
# errors: exit code 2, one line on stderr that says what to fix

def test_unknown_key_names_valid_keys(capsys):
    line = _fails(["--model.n_layers=2"], capsys)
    assert "n_layers" in line and "n_layer" in line.replace("n_layers", "")
    for k in ("n_head", "d_model", "prefix_dlm"):
        assert k in line


def test_unknown_section(capsys):
    line = _fails(["--optim.lr=1"], capsys)
    assert "optim" in line
    for s in config.SECTIONS:
        assert s in line


@pytest.mark.parametrize("arg,kind", [("--model.n_layer=abc", "int"), ("--train.lr=fast", "float"),
                                      ("--model.prefix_dlm=maybe", "bool"), ("--model.n_layer=2.5", "int"),
                                      ("--train.lr=", "float"), ("--train.lr={[]:1}", "float"),
                                      ("--train.lr=True", "float")])
def test_wrong_type_names_expected_type(arg, kind, capsys):
    line = _fails([arg], capsys)
    assert f"expected {kind}" in line
    assert arg.split("=")[0] in line          # and says which key


def test_unknown_preset(capsys):
    line = _fails(["--preset=huge"], capsys)
    assert "huge" in line and "toy" in line and "small" in line and "base" in line


def test_bare_key_without_section(capsys):
    line = _fails(["--foo=1"], capsys)
    assert "--foo" in line and "section.key" in line


def test_unparseable_argument(capsys):
    line = _fails(["n_layer=2"], capsys)
    assert "n_layer=2" in line


@pytest.mark.parametrize("argv,words", [
    (["--model.d_model=130"], ["d_model", "n_head", "divisible"]),
    (["--data.image_size=36"], ["image_size", "divisible"]),
    (["--data.min_shapes=9", "--data.max_shapes=4"], ["min_shapes", "max_shapes"]),
    (["--train.batch_size=48", "--train.micro_batch=32"], ["batch_size", "micro_batch"]),
    (["--stage=pretrain"], ["stage", "pretrain"]),
    (["--rl.likelihood=exact"], ["likelihood", "complementary"]),
    (["--train.task_mix=vqa:1,ocr:2"], ["ocr", "task_mix"]),
    (["--rl.tree_schedule=0,x"], ["tree_schedule", "neither an image step", "H, Ht, Hi"]),
    (["--rl.tree_schedule=2,4"], ["tree_schedule", "first round is 0"]),
    (["--rl.tree_schedule=0,0"], ["tree_schedule", "only the first"]),
    (["--rl.tree_schedule=0,16"], ["tree_schedule", "branch step 16", "1..15"]),
    # readings that apply to one estimator only are errors elsewhere, never silently ignored
    (["--rl.likelihood=elbo_mc", "--rl.shared_t=true"], ["shared_t", "complementary", "elbo_mc"]),
    (["--rl.likelihood=one_step", "--rl.shared_t=true"], ["shared_t", "complementary", "one_step"]),
    (["--rl.p_prompt=0.15"], ["p_prompt", "one_step", "complementary"]),
    (["--rl.likelihood=one_step", "--rl.p_prompt=1"], ["p_prompt", "[0, 1)"]),
])
def test_cross_field_validation(argv, words, capsys):
    line = _fails(argv, capsys)
    for w in words:
        assert w in line


def test_help_prints_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        get_config(["-h"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    cfg = config.Config()
    for section in config.SECTIONS:
        for f in config.fields(getattr(cfg, section)):
            assert f"--{section}.{f.name}=" in out
    assert "--model.n_layer=4" in out and "--rl.gamma=0.5" in out and "--data.jsonl=''" in out


def test_help_shows_preset_values(capsys):
    with pytest.raises(SystemExit) as e:
        get_config(["--preset=small", "--help"])
    assert e.value.code == 0
    assert "--model.d_model=512" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# dicts, config.json, task mixes

def test_dict_round_trip():
    cfg = get_config(["--preset=small", "--model.n_layer=3", "--rl.gamma=0.25", "--rl.tree_schedule=0,4"])
    d = to_dict(cfg)
    json.loads(json.dumps(d))                 # JSON-serialisable, as checkpoints need
    back = from_dict(json.loads(json.dumps(d)))
    assert back == cfg
    assert back.model.n_layer == 3 and back.rl.gamma == 0.25 and back.preset == "small"


def test_from_dict_ignores_unknown_and_keeps_defaults_for_missing():
    d = {"preset": "toy", "model": {"n_layer": 2, "old_knob": 5}, "ghost_section": {"x": 1},
         "rl": {}}
    cfg = from_dict(d)
    assert cfg.model.n_layer == 2
    assert not hasattr(cfg.model, "old_knob") and not hasattr(cfg, "ghost_section")
    assert cfg.model.d_model == config.ModelConfig().d_model
    assert cfg.rl == config.RLConfig() and cfg.train == config.TrainConfig()


def test_from_dict_of_a_file_never_fills_missing_keys_silently(capsys):
    """A config read from a checkpoint (source given): a missing model key is an error naming it
    (today's default may be another architecture), any other missing key a warning naming it."""
    full = to_dict(make_config("toy", {}))
    old = {k: (dict(v) if isinstance(v, dict) else v) for k, v in full.items()}
    del old["rl"]["p_prompt"], old["train"]["compile"]
    cfg = from_dict(old, "runs/x/ckpt_sft.pt")
    assert cfg.rl.p_prompt == config.RLConfig().p_prompt
    err = capsys.readouterr().err
    assert "warning" in err and "runs/x/ckpt_sft.pt" in err and "rl.p_prompt" in err and "train.compile" in err
    assert err.count("\n") == 1
    del old["model"]["abs_pos"]
    with pytest.raises(ConfigError, match=r"runs/x/ckpt_sft.pt: its config has no model.abs_pos"):
        from_dict(old, "runs/x/ckpt_sft.pt")
    from_dict(full, "runs/x/ckpt_sft.pt")                      # a complete config: no word
    assert capsys.readouterr().err == ""


def test_save_config_writes_overrides(tmp_path):
    argv = ["--model.n_layer=2", "--train.lr=3e-4"]
    cfg = get_config(argv)
    out = tmp_path / "run"
    save_config(cfg, str(out), argv=argv)
    d = json.loads((out / "config.json").read_text())
    assert d["model"]["n_layer"] == 2 and d["train"]["lr"] == pytest.approx(3e-4)
    assert d["argv"] == argv
    assert from_dict(d) == cfg


def test_parse_mix():
    m = parse_mix("vqa:4,ground:3,edit:2,t2i:1")
    assert m == pytest.approx({"vqa": 0.4, "ground": 0.3, "edit": 0.2, "t2i": 0.1})
    assert sum(m.values()) == pytest.approx(1.0)
    assert parse_mix("vqa,edit") == pytest.approx({"vqa": 0.5, "edit": 0.5})      # weight defaults to 1
    assert parse_mix("vqa:1,ground:0") == {"vqa": 1.0}                           # zero weights dropped
    for bad in ("vqa:1,ocr:1", "vqa:x", "vqa:-1,edit:2", "vqa:0", ""):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_rl_mix_validation(capsys):
    # t2i has no verifiable reward on a generated answer: not an RL task
    assert "rl.task_mix" in _fails(["--rl.task_mix=vqa:1,t2i:1"], capsys)


def test_task_sampler_follows_the_mix():
    """Only tasks with a positive weight and a non-empty pool are drawn, at the mix's frequencies
    (4000 draws: each share within 4 binomial standard deviations), with indices inside each pool."""
    import data

    class Pool(list):
        pass
    sets = {t: {"sft": Pool(range(n))} for t, n in (("vqa", 5), ("ground", 3), ("edit", 7), ("t2i", 0))}
    s = data.TaskSampler(sets, "sft", parse_mix("vqa:3,ground:1,t2i:2"), seed=0)
    draws = s.draw(4000)
    assert {t for t, _ in draws} == {"vqa", "ground"}            # t2i's pool is empty, edit has no weight
    share = sum(t == "vqa" for t, _ in draws) / len(draws)
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / 4000) ** 0.5
    assert all(0 <= i < len(sets[t]["sft"]) for t, i in draws)


# ----------------------------------------------------------------------------------------------
# an entry script's own options: get_config(argv, extra={name: default}) -> (cfg, opts)

EXTRA = {"ckpt": "", "prompts": 8, "peak": 0.0, "compile": False}


def test_extra_options_are_typed_by_their_defaults():
    cfg, opts = get_config(["--ckpt=runs/x.pt", "--prompts=4", "--peak=989e12", "--compile", "--model.n_layer=2",
                            "--seed=3"], extra=EXTRA)
    assert opts == {"ckpt": "runs/x.pt", "prompts": 4, "peak": 989e12, "compile": True}
    assert type(opts["prompts"]) is int and type(opts["peak"]) is float
    assert cfg.model.n_layer == 2 and cfg.train.seed == 3            # config keys and shortcuts still work
    cfg, opts = get_config([], extra=EXTRA)
    assert opts == EXTRA and opts is not EXTRA and cfg == get_config([])
    assert get_config(["--compile=false", "--prompts=1e1"], extra=EXTRA)[1] == {**EXTRA, "prompts": 10}


def test_without_extra_get_config_returns_the_config_alone():
    assert isinstance(get_config([]), config.Config)


def _fails_extra(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        get_config(argv, extra=EXTRA)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize("arg,kind", [("--prompts=many", "int"), ("--prompts=2.5", "int"), ("--peak=fast", "float"),
                                      ("--compile=maybe", "bool")])
def test_extra_wrong_type_names_expected_type(arg, kind, capsys):
    line = _fails_extra([arg], capsys)
    assert f"expected {kind}" in line and arg.split("=")[0] in line


def test_extra_unknown_bare_key_names_the_options(capsys):
    line = _fails_extra(["--promts=4"], capsys)
    assert "--promts" in line and all(f"--{k}" in line for k in EXTRA) and "section.key" in line
    assert "needs a value" in _fails_extra(["--ckpt"], capsys)


def test_extra_must_not_shadow_config_names():
    for bad in ({"seed": 0}, {"preset": "toy"}, {"train.lr": 1.0}, {"peak": None}):
        with pytest.raises(ValueError):
            get_config([], extra=bad)


def test_help_lists_the_extra_options(capsys):
    with pytest.raises(SystemExit) as e:
        get_config(["-h"], extra=EXTRA)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--ckpt=''" in out and "--prompts=8  (int)" in out and "--compile=False  (bool)" in out
    assert "--model.n_layer=4" in out


def test_quick_eval_split_and_rl_arm_validation(capsys):
    """Settings that would only fail minutes into a run are one-line config errors up front."""
    assert "eval.curve_split" in _fails(["--eval.curve_split=valid"], capsys)
    assert "data.n_val" in _fails(["--data.n_val=0"], capsys)                 # quick evals are on by default
    assert get_config(["--data.n_val=0", "--train.eval_interval=0"]).data.n_val == 0
    assert "rl.advantage" in _fails(["--rl.advantage=ppo"], capsys)
    assert "no threshold" in _fails(["--rl.advantage=rft", "--rl.rft_accept=vqa:1"], capsys)
    assert get_config(["--rl.rft_accept=junk"]).rl.rft_accept == "junk"      # unused unless advantage=rft
    assert "rl.ppo_epochs" in _fails(["--rl.ppo_epochs=0"], capsys)
    assert "rl.clip_eps" in _fails(["--rl.clip_eps=1.5"], capsys)


BAD_VALUES = [   # (argument, the key the one-line message must name)
    ("--train.micro_batch=0", "train.micro_batch"), ("--model.n_head=0", "model.n_head"),
    ("--model.n_layer=0", "model.n_layer"), ("--diffusion.tokens_per_step=0", "diffusion.tokens_per_step"),
    ("--diffusion.block_len=0", "diffusion.block_len"), ("--train.lr=-1", "train.lr"),
    ("--rl.af_prob=1.5", "rl.af_prob"), ("--rl.af_prob=-0.1", "rl.af_prob"), ("--rl.gamma=5", "rl.gamma"),
    ("--diffusion.full_mask_frac=2", "diffusion.full_mask_frac"), ("--rl.group_size=0", "rl.group_size"),
    ("--data.n_sft=-3", "data.n_sft"), ("--vq.lr=0", "vq.lr"), ("--model.dropout=1.2", "model.dropout"),
    ("--train.grad_clip=-1", "train.grad_clip"), ("--rl.temperature=-1", "rl.temperature"),
    ("--eval.batch_size=0", "eval.batch_size"), ("--train.time_budget_s=-5", "train.time_budget_s"),
    ("--data.jsonl=no/such/file.jsonl", "data.jsonl"), ("--train.init_from=no/such.pt", "train.init_from"),
    ("--train.device=tpu", "train.device"),
]


@pytest.mark.parametrize("arg,key", BAD_VALUES)
def test_bad_values_are_one_line_errors_naming_the_key(arg, key, capsys):
    assert key in _fails([arg], capsys)


def test_every_number_of_the_config_has_a_range():
    """RANGES covers every int and float field (except seeds, which any integer may be), so a new
    knob cannot slip in without its check."""
    import dataclasses
    covered = {k for k, *_ in config.RANGES}
    for section in config.SECTIONS:
        for f in dataclasses.fields(getattr(config.Config(), section)):
            v = getattr(getattr(config.Config(), section), f.name)
            if type(v) in (int, float) and f.name != "seed" and f"{section}.{f.name}" not in covered:
                # fields with their own checks in validate()
                assert f"{section}.{f.name}" in ("data.min_shapes", "data.max_shapes", "vq.time_budget_s",
                                                 "train.time_budget_s", "rl.time_budget_s", "rl.ppo_epochs",
                                                 "rl.clip_eps"), f"{section}.{f.name} has no range"


def test_unusable_device_and_out_dir_are_one_line_errors(tmp_path, capsys):
    import common
    import torch
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="train.out_dir.*cannot be created"):
        common.setup(make_config("toy", {"train.out_dir": str(blocker / "run"), "train.device": "cpu"}))
    assert "is a file" in _fails([f"--out_dir={blocker}"], capsys)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            common.setup(make_config("toy", {"train.out_dir": str(tmp_path / "r"), "train.device": "cuda"}))


def test_a_checkpoint_that_set_a_removed_option_is_a_one_line_error():
    """An old checkpoint trained with the imperfect teacher on must not load silently without it; one
    with the removed options at their old defaults loads."""
    d = to_dict(make_config("toy"))
    d["data"]["teacher_bias"] = "red"
    with pytest.raises(ConfigError, match="teacher_bias='red'.*bfc48d4"):
        from_dict(d, "old.pt")
    d["data"].update(teacher_bias="", teacher_slip=0.0, teacher_box_pad=0)
    assert from_dict(d, "old.pt").data.n_sft == make_config("toy").data.n_sft
