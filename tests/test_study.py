"""
Tests of study.py's plumbing: every ablation variant is a valid config that sets what its name
says, and publish() keeps exactly one block per study in RESULTS.md.

    python -m pytest tests/test_study.py -q
"""
import json
import os

import pytest

import config as C
import study


@pytest.mark.parametrize("name", list(study.ABLATIONS))
def test_every_ablation_variant_is_a_valid_config(name):
    for variant, flags in study.ABLATIONS[name].items():
        cfg = C.get_config([*study.WORLD, "--stage=rl", *study.ABLATION_FLAGS, *flags])
        if name == "af_ratio":
            assert cfg.rl.af_prob == float(variant.split("=")[1])
        if name == "gamma":
            assert cfg.rl.gamma == float(variant.split("=")[1])
        if name == "estimator":
            assert cfg.rl.likelihood == variant
        if name == "objective":
            assert (cfg.rl.sft_rows == 0) == variant.startswith("grpo")
            assert (cfg.rl.kl_coef > 0) == (variant == "grpo+kl")


def test_publish_replaces_its_own_block_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RESULTS.md").write_text("# Results\n\nintro\n\n<!-- study:other -->\nkeep me\n<!-- /study:other -->\n")
    res = {"commit": "abc", "hardware": "cpu", "seeds": [0, 1], "study_wall_s": 1.0, "command": "python studies/study.py x"}
    study.publish("x", res, "| a |\n|---|\n| 1 |")
    study.publish("x", res, "| a |\n|---|\n| 2 |")
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("<!-- study:x -->") == 1 and "| 2 |" in text and "| 1 |" not in text
    assert "keep me" in text and text.startswith("# Results\n\nintro")
    assert json.load(open("results/x.json"))["commit"] == "abc" and os.path.exists("results/x.md")


def test_publish_links_only_the_plots_that_were_drawn(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RESULTS.md").write_text("# Results\n")
    res = {"commit": "abc", "hardware": "cpu", "seeds": [0], "study_wall_s": 1.0, "command": "python studies/study.py x"}
    study.publish("x", res, "| a |\n\n![x](results/x.png)")                 # no matplotlib: no plot drawn
    assert "results/x.png" not in (tmp_path / "RESULTS.md").read_text()
    (tmp_path / "results" / "x.png").write_bytes(b"png")
    study.publish("x", res, "| a |\n\n![x](results/x.png)")
    assert "![x](results/x.png)" in (tmp_path / "RESULTS.md").read_text()


def test_mean_sd_skips_missing_values():
    assert study.mean_sd([1.0, 3.0]) == "2.000 ± 1.000"
    assert study.mean_sd([None, 2.0, float("nan")]) == "2.000"
    assert study.mean_sd([None]) == "-"


def test_every_rl_vs_sft_arm_is_a_valid_config():
    for arm, flags in study.ARMS.items():
        cfg = C.get_config([*study.WORLD, *flags])
        assert (cfg.rl.advantage == "rft") == arm.startswith("rft")
        if arm.startswith("rl_af"):          # the answer-forcing screen: mu = 2 as rl, only p differs
            assert cfg.rl.af_prob == float(arm[5:]) and cfg.rl.ppo_epochs == 2
    assert study.ARMS["rl"][-len(study.RL_FLAGS):] == study.RL_FLAGS
    assert set(study.DEFAULT_ARMS) <= set(study.ARMS)


def test_the_shared_default_variant_is_one_run_and_the_others_differ():
    key = lambda name, v: study.run_key(["--stage=rl", "--rl.eval_interval=15", *study.ABLATION_FLAGS,
                                         *study.ABLATIONS[name][v]], 240.0, 6000)
    defaults = {key("af_ratio", "p=0.1"), key("objective", "unified"), key("gamma", "gamma=0.5"),
                key("estimator", "complementary")}
    assert len(defaults) == 1
    others = [key(n, v) for n, vs in study.ABLATIONS.items() for v in vs]
    assert len(set(others)) == 1 + sum(len(vs) - 1 for vs in study.ABLATIONS.values())
    assert key("gamma", "gamma=0") != study.run_key(["--stage=rl", "--rl.eval_interval=15", *study.ABLATION_FLAGS,
                                                     "--rl.gamma=0"], 120.0, 6000)      # the budget counts
    assert key("gamma", "gamma=0") != study.run_key(["--stage=rl", "--rl.eval_interval=15", *study.ABLATION_FLAGS,
                                                     "--rl.gamma=0"], 240.0, 8000)      # and so does the start


def test_a_start_of_another_length_is_refused_not_reused(tmp_path):
    """A finished 3800-step start must not stand in for the 8000 steps asked for (every arm under
    its root would silently mix two starts); the same length is reused without training."""
    out = tmp_path / "start"
    out.mkdir()
    (out / "sft_curve.json").write_text("[]")
    (out / "config.json").write_text(json.dumps({"train": {"max_steps": 3800}}))
    with pytest.raises(SystemExit, match="holds a 3800-step SFT start, not the 8000 steps"):
        study.sft_checkpoint(str(out), 8000)
    assert study.sft_checkpoint(str(out), 3800) == str(out / "ckpt_sft.pt")


def test_publish_appends_when_the_page_has_no_block_and_keeps_similar_names_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RESULTS.md").write_text("# R\n\n<!-- study:estimator_variance -->\nold ev\n<!-- /study:estimator_variance -->\n\ntail\n")
    res = {"commit": "abc", "hardware": "cpu", "seeds": [0], "study_wall_s": None, "command": "c"}
    study.publish("estimator", res, "EST TABLE")
    study.publish("estimator_variance", res, "EV TABLE")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "old ev" not in text and text.count("EV TABLE") == 1 and text.count("EST TABLE") == 1
    assert text.index("EV TABLE") < text.index("tail") < text.index("EST TABLE")     # appended at the end
    assert "rebuilt from finished runs" in text


def test_differences_are_paired_by_seed_by_hand():
    """rl - sft per seed: seed 0 0.5 - 0.2 = 0.3, seed 1 0.6 - 0.25 = 0.35 (seed 2 has no rl run and is
    left out): mean 0.325, population sd 0.025, |mean| > 2 sd. rft at seed 1 only: one seed never holds."""
    res = {"start": [{"a": 0.1}], "rl": [{"seed": 0, "a": 0.5}, {"seed": 1, "a": 0.6}],
           "sft": [{"seed": 1, "a": 0.25}, {"seed": 0, "a": 0.2}, {"seed": 2, "a": 0.9}],
           "rft": [{"seed": 1, "a": 0.7}]}
    out, lines = study.differences(res, ("a",))
    assert out["rl-sft"]["seeds"] == [1, 0]
    assert out["rl-sft"]["a"]["mean"] == pytest.approx(0.325) and out["rl-sft"]["a"]["sd"] == pytest.approx(0.025)
    assert out["rl-sft"]["a"]["holds"] is True
    assert out["rl-rft"]["a"]["mean"] == pytest.approx(-0.1) and out["rl-rft"]["a"]["holds"] is False
    assert "| rl-sft | 1,0 | +32.5 ± 2.5 * |" in lines and "| rl-rft | 1 | -10.0 ± 0.0 |" in lines
    assert study.differences({"sft": res["sft"]}, ("a",)) == ({}, [])


def test_ablation_table_shows_the_buckets_on_the_levels_world():
    """A run whose held-out file has per-bucket numbers gets bucket columns (mean +- sd over seeds,
    worked by hand here); a run without them (the flat world) keeps the old columns."""
    def run(vqa_edge, with_buckets=True):
        held = {"vqa_acc": 0.5, "ground_miou": 0.8, "edit_score": 0.9}
        if with_buckets:
            held.update(vqa_acc_in=0.6, vqa_acc_edge=vqa_edge, ground_miou_in=0.8, ground_miou_edge=0.4)
        return {"heldout": held, "reward_last_third": {"vqa": 0.2, "ground": 0.4}, "steps": 50,
                "grpo_signal": {"vqa": 0.5, "ground": 0.5}}
    table = study.ablation_table("gamma", {"gamma=0": [run(0.1), run(0.3)]})
    header, _, row = table.splitlines()
    cols = [c.strip() for c in header.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert "vqa far" not in cols and "mIoU far" not in cols            # no run has that bucket
    assert cells[cols.index("vqa edge")] == "0.200 ± 0.100"             # mean of 0.1, 0.3; population sd 0.1
    assert cells[cols.index("mIoU edge")] == "0.400 ± 0.000"
    flat = study.ablation_table("gamma", {"gamma=0": [run(0.1, with_buckets=False)]})
    assert "edge" not in flat.splitlines()[0]


def test_an_adopted_start_must_come_from_the_world_and_length_asked_for(tmp_path):
    """--start adopts a checkpoint trained elsewhere only when its data / VQ / model config is the
    world's and its SFT length the one asked for; the folder then remembers it, and a folder that
    already holds another start refuses it."""
    import torch
    try:
        study.set_world("looks")
        ours = C.to_dict(C.get_config(list(study.WORLD)))
        ckpt = tmp_path / "ckpt_sft.pt"
        torch.save({"config": {**ours, "train": {**ours["train"], "max_steps": 3800}}}, ckpt)
        out = tmp_path / "root" / "start"
        assert study.adopt_start(str(ckpt), str(out), 3800) == str(ckpt.resolve())
        assert study.start_path(str(tmp_path / "root")) == str(ckpt.resolve())
        with pytest.raises(SystemExit, match="is a 3800-step SFT start, not 8000"):
            study.adopt_start(str(ckpt), str(out), 8000)
        other = tmp_path / "other.pt"
        torch.save({"config": {**ours, "train": {**ours["train"], "max_steps": 3800}}}, other)
        with pytest.raises(SystemExit, match="holds another start"):
            study.adopt_start(str(other), str(out), 3800)
        # without --start, the root keeps its adopted start (no second one trained beside it)
        (out / "heldout.json").write_text("{}")
        assert study.shared_start(str(tmp_path / "root"), 3800)[0] == str(ckpt.resolve())
        study.set_world("levels")         # 800 held-out examples, plain pictures
        with pytest.raises(SystemExit, match=r"was trained with --data\.n_eval=200, this world \(levels\) has 800"):
            study.adopt_start(str(ckpt), str(tmp_path / "r2" / "start"), 3800)
        with pytest.raises(SystemExit, match="no such file"):
            study.adopt_start(str(tmp_path / "nope.pt"), str(out), 3800)
    finally:
        study.set_world("flat")


def test_set_world_switches_and_names_the_world():
    try:
        assert study.set_world("levels") == "_levels" and study.WORLD == study.WORLDS["levels"]
        assert study.set_world("flat") == "" and study.WORLD == study.WORLDS["flat"]
        with pytest.raises(SystemExit, match="--world=nope"):
            study.set_world("nope")
    finally:
        study.set_world("flat")


def test_the_command_line_names_one_study_or_several_ablations(monkeypatch):
    """`af_ratio,gamma` trains both ablations in one call (their shared run once); a study that is not
    an ablation cannot be combined, and an unknown name is a one-line usage error."""
    calls = []
    monkeypatch.setattr(study, "ablation", lambda names, argv: calls.append((names, argv)))
    study.main(["af_ratio,gamma", "--seeds=0"])
    assert calls == [(["af_ratio", "gamma"], ["--seeds=0"])]
    for bad in (["rl_vs_sft,gamma"], ["nope"], []):
        with pytest.raises(SystemExit, match="usage: python studies/study.py NAME"):
            study.main(bad)


# ------------------------------------------------------------------------------------------------
# every option of the study scripts changes what the study runs or is a one-line error. The studies
# run with a runner that records each command instead of running it (no training): a study's record
# with an option must differ from its record without it where the table in study.py's docstring
# says the option is used, and the option's value must show up where it should.

class _Stop(Exception):
    """Raised by a fake where the recording has seen enough (a study that would go on to sample)."""


FAKE_ESTIMATES = {"value_var_ratio": {"elbo_mc n=2": 2.0, "mc_unweighted n=2": 1.5},
                  "grad_var_ratio": {"elbo_mc n=2": 2.0, "mc_unweighted n=2": 1.5},
                  "bias": {k: {"minus_any_order": 0.1} for k in ("complementary", "elbo_mc n=2", "one_step")},
                  "spearman": {k: {"any_order": 0.9} for k in ("complementary", "elbo_mc n=2", "one_step")},
                  "coverage": {"complementary": 1.0, "elbo_mc n=1": 0.5}, "wall_s": 1.0}


def record(argv, tmp_path, monkeypatch):
    """Run study.main(argv) in tmp_path with every side effect recorded: the commands it would run
    (study.run), the workers of its pools, its publish / report calls, and for tree the checkpoints it
    loads and the first sampling call (then _Stop). Returns the record, commands sorted (the pools
    run them in any order)."""
    import threading
    tmp_path.mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    rec = {"cmds": [], "workers": [], "published": {}, "report": None, "loaded": [], "sampled": None}
    lock = threading.Lock()

    def fake_run(cmd, log):
        with lock:
            rec["cmds"].append(" ".join(cmd[1:]))
        out = next((a.split("=", 1)[1] for a in cmd if a.startswith("--out=")), None)
        if out and cmd[1] == "eval.py" and os.path.basename(os.path.dirname(out)) == "start":
            open(out, "w").write("{}")                     # the start's held-out metrics
        if out and cmd[1].endswith("estimators.py"):
            open(out, "w").write(json.dumps(FAKE_ESTIMATES))
        return 0.0

    class Pool(study.ThreadPoolExecutor):
        def __init__(self, max_workers):
            rec["workers"].append(max_workers)
            super().__init__(max_workers=max_workers)

    def fake_load(ckpt, out_dir, who):
        import types
        rec["loaded"].append(ckpt)
        ex = types.SimpleNamespace(level=1)
        sets = {"edit": {"val": type("S", (), {"examples": [ex] * 100, "__len__": lambda self: 100})()}}
        return C.get_config(list(study.WORLD)), types.SimpleNamespace(sets=sets, tok=None), None, None, None

    def fake_sample(ro, task, idx, split):
        rec["sampled"] = {"n_prompts": len(idx), "seed": ro[-1].initial_seed(), "schedule": ro[4].rl.tree_schedule}
        raise _Stop

    monkeypatch.setattr(study, "run", fake_run)
    monkeypatch.setattr(study, "ThreadPoolExecutor", Pool)
    monkeypatch.setattr(study, "pyplot", lambda: None)
    monkeypatch.setattr(study, "publish", lambda name, res, *a, **k: rec["published"].__setitem__(name, res))
    monkeypatch.setattr(study, "report", lambda root, jobs, start_eval, meta: rec.__setitem__(
        "report", {"root": root, "jobs": sorted((j["arm"], j["seed"], j["command"]) for j in jobs), "meta": meta}))
    monkeypatch.setattr(study.data, "load_run", fake_load)
    monkeypatch.setattr(study.RO, "RolloutContext", lambda *a: a)
    monkeypatch.setattr(study.RO, "sample_groups", fake_sample)
    try:
        study.main(argv)
    except _Stop:
        pass
    finally:
        study.set_world("flat")
    rec["cmds"].sort()
    return rec


def adoptable_start(tmp_path, world="flat", steps=None):
    """A file --start accepts: the config of `world` with its start's SFT steps (adopt_start reads
    only the config)."""
    import torch
    try:
        study.set_world(world)
        ours = C.to_dict(C.get_config(list(study.WORLD)))
    finally:
        study.set_world("flat")
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / f"given_{world}.pt"
    torch.save({"config": {**ours, "train": {**ours["train"], "max_steps": steps or study.START_STEPS[world]}}}, path)
    return str(path)


def cmds_with(rec, *parts):
    return [c for c in rec["cmds"] if all(p in c for p in parts)]


# (study, option, what the record shows): each used option of the docstring's table. `given` is a
# placeholder for the adoptable start file.
USED = [
    ("rl_vs_sft", "--seeds=4", lambda r: {s for _, s, _ in r["report"]["jobs"]} == {4}
     and cmds_with(r, "train.py", "--seed=4", "seed4/rl")),
    ("rl_vs_sft", "--arm_s=77", lambda r: len(cmds_with(r, "--rl.time_budget_s=77.0")) == 4 * 3
     and len(cmds_with(r, "--train.time_budget_s=77.0")) == 3),
    ("rl_vs_sft", "--start_steps=123", lambda r: cmds_with(r, "--stage=sft", "--train.max_steps=123", "start")),
    ("rl_vs_sft", "--start=given", lambda r: not cmds_with(r, "rl_vs_sft/start", "--stage=sft")
     and len(cmds_with(r, "--train.init_from=" + os.path.abspath("given_flat.pt"))) == 15),
    ("rl_vs_sft", "--world=levels", lambda r: cmds_with(r, "--data.rl_levels=1,2,3", "rl_vs_sft_levels/seed0/sft")
     and cmds_with(r, "--train.max_steps=8000", "rl_vs_sft_levels/start")),
    ("rl_vs_sft", "--root=elsewhere", lambda r: r["report"]["root"] == "elsewhere" and cmds_with(r, "elsewhere/seed0/rft")
     and cmds_with(r, "elsewhere/start")),
    ("rl_vs_sft", "--commit=abc1234", lambda r: r["report"]["meta"]["commit"] == "abc1234"),
    ("rl_vs_sft", "--arms=sft", lambda r: {a for a, _, _ in r["report"]["jobs"]} == {"sft"}
     and not cmds_with(r, "--stage=rl")),
    ("rl_vs_sft", "--report", lambda r: r["cmds"] == [] and r["report"]["meta"]["study_wall_s"] is None),
    ("af_ratio", "--seeds=4", lambda r: set(r["published"]["af_ratio"]["commands"]) == {f"{v}_seed4" for v in study.ABLATIONS["af_ratio"]}
     and len(cmds_with(r, "train.py", "--seed=4")) == 4),
    ("af_ratio", "--arm_s=77", lambda r: len(cmds_with(r, "--rl.time_budget_s=77.0")) == 12),
    ("af_ratio", "--start_steps=123", lambda r: cmds_with(r, "--stage=sft", "--train.max_steps=123")),
    ("af_ratio", "--start=given", lambda r: not cmds_with(r, "--stage=sft")
     and len(cmds_with(r, "--train.init_from=" + os.path.abspath("given_flat.pt"))) == 12),
    ("af_ratio", "--world=levels", lambda r: "af_ratio_levels" in r["published"]
     and len(cmds_with(r, "train.py", "--data.rl_levels=1,2,3", "ablations_levels/seed")) == 12),
    ("af_ratio", "--root=elsewhere", lambda r: len(cmds_with(r, "--out_dir=elsewhere/seed")) == 2 * 12),   # train + eval
    ("af_ratio", "--workers=5", lambda r: r["workers"] == [5]),
    ("af_ratio", "--commit=abc1234", lambda r: r["published"]["af_ratio"]["commit"] == "abc1234"),
    ("af_ratio", "--report", lambda r: r["cmds"] == [] and r["published"]["af_ratio"]["not_run"]),
    ("ablations", "--seeds=4", lambda r: set(r["published"]) == set(study.ABLATIONS)
     and all(k.endswith("_seed4") for res in r["published"].values() for k in res["commands"])),
    ("tree", "--seeds=4", lambda r: r["sampled"]["seed"] == 4),
    ("tree", "--n_prompts=5", lambda r: r["sampled"]["n_prompts"] == 5),
    ("tree", "--start_steps=123", lambda r: cmds_with(r, "--stage=sft", "--train.max_steps=123", "rl_vs_sft/start")),
    ("tree", "--start=given", lambda r: r["loaded"][0] == os.path.abspath("given_flat.pt")),
    ("tree", "--early_steps=77", lambda r: cmds_with(r, "--train.max_steps=77", "rl_vs_sft/early77")),
    ("tree", "--early_steps=0", lambda r: not cmds_with(r, "early")),
    ("tree", "--world=levels", lambda r: cmds_with(r, "--data.rl_levels=1,2,3", "rl_vs_sft_levels/start")),
    ("estimator_variance", "--seeds=4", lambda r: r["published"]["estimator_variance"]["commands"] ==
     ["studies/estimators.py --ckpt=runs/rl_vs_sft/start/ckpt_sft.pt --seed=4 --out=runs/estimators/seed4.json"]),
    ("estimator_variance", "--start_steps=123", lambda r: cmds_with(r, "--stage=sft", "--train.max_steps=123")),
    ("estimator_variance", "--root=elsewhere", lambda r: len(cmds_with(r, "estimators.py", "--out=elsewhere/seed")) == 3),
    ("estimator_variance", "--commit=abc1234", lambda r: r["published"]["estimator_variance"]["commit"] == "abc1234"),
]


@pytest.mark.parametrize("name,option,shows", USED, ids=[f"{n} {o}" for n, o, _ in USED])
def test_every_option_a_study_takes_changes_what_it_runs(name, option, shows, tmp_path, monkeypatch):
    """The record with the option differs from the record without it, in the way the option says."""
    base = record([name], tmp_path / "base", monkeypatch)
    opt = tmp_path / "opt"
    if option == "--start=given":
        option = "--start=" + adoptable_start(opt)
    if option == "--report":            # the runs to read: a start that finished (the table needs its metrics)
        (opt / "runs" / "rl_vs_sft" / "start").mkdir(parents=True)
        (opt / "runs" / "rl_vs_sft" / "start" / "heldout.json").write_text("{}")
    got = record([name, option], opt, monkeypatch)
    strip = lambda r: {**r, "published": {k: {**v, "command": None, "study_wall_s": None} for k, v in r["published"].items()},
                       "report": r["report"] and {**r["report"], "meta": {**r["report"]["meta"], "command": None,
                                                                           "study_wall_s": None}}}
    assert strip(got) != strip(base)
    assert shows(got), got


# (the command line, the option its one-line error must name): every "-" of the docstring's table,
# an option --report would ignore, a config key, a value out of range
REFUSED = [
    (["rl_vs_sft", "--workers=3"], "--workers=3"), (["rl_vs_sft", "--n_prompts=5"], "--n_prompts=5"),
    (["rl_vs_sft", "--early_steps=5"], "--early_steps=5"), (["rl_vs_sft", "--rl.af_prob=0.3"], "--rl.af_prob=0.3"),
    (["rl_vs_sft", "--preset=small"], "--preset=small"), (["rl_vs_sft", "--seed=3"], "--seed=3"),
    (["rl_vs_sft", "--report", "--start_steps=100"], "--start_steps=100"),
    (["rl_vs_sft", "--report", "--start=x.pt"], "--start=x.pt"), (["rl_vs_sft", "--arms=rl,nope"], "--arms=rl,nope"),
    (["rl_vs_sft", "--report"], "--report"),            # no finished start to read
    (["af_ratio", "--arms=rl"], "--arms=rl"), (["af_ratio", "--early_steps=0"], "--early_steps=0"),
    (["af_ratio,gamma", "--n_prompts=4"], "--n_prompts=4"), (["ablations", "--report", "--workers=1"], "--workers=1"),
    (["objective", "--report", "--start=x.pt"], "--start=x.pt"), (["gamma", "--workers=0"], "--workers=0"),
    (["estimator", "--arm_s=0"], "--arm_s=0"), (["af_ratio", "--rl.gamma=1"], "--rl.gamma=1"),
    (["tree", "--arm_s=60"], "--arm_s=60"), (["tree", "--root=x"], "--root=x"), (["tree", "--report"], "--report"),
    (["tree", "--commit=abc"], "--commit=abc"), (["tree", "--workers=2"], "--workers=2"), (["tree", "--arms=rl"], "--arms=rl"),
    (["tree", "--n_prompts=0"], "--n_prompts=0"), (["tree", "--world=nope"], "--world=nope"),
    (["tree", "--seeds=1,1"], "--seeds=1,1"), (["tree", "--seeds=a"], "--seeds=a"),
    (["estimator_variance", "--world=levels"], "--world=levels"), (["estimator_variance", "--start=x.pt"], "--start=x.pt"),
    (["estimator_variance", "--arm_s=60"], "--arm_s=60"), (["estimator_variance", "--report"], "--report"),
    (["estimator_variance", "--early_steps=0"], "--early_steps=0"), (["estimator_variance", "--start_steps=-1"], "--start_steps=-1"),
    (["estimator_variance", "extra"], "extra"),
]


@pytest.mark.parametrize("argv,named", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_an_option_a_study_would_ignore_is_a_one_line_error(argv, named, tmp_path, monkeypatch):
    """Refused before any work (the runner is never called), in one line that names the option, with
    exit code 2 through common.run_main (the entry point)."""
    import common
    rec = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study, "run", lambda cmd, log: rec.append(cmd))
    try:
        with pytest.raises(SystemExit) as e:
            study.main(argv)
        msg = str(e.value.code)
        assert named in msg and "\n" not in msg and not rec, msg
        with pytest.raises(SystemExit) as e:
            common.run_main(study.main, argv)
        assert e.value.code == 2
    finally:
        study.set_world("flat")


@pytest.mark.parametrize("argv", [["-h"], ["--help"], ["rl_vs_sft", "-h"], ["af_ratio,gamma", "--help"], ["tree", "-h"],
                                  ["estimator_variance", "--seeds=0", "-h"]])
def test_help_prints_the_usage_and_exits_0(argv, capsys):
    import common
    with pytest.raises(SystemExit) as e:
        common.run_main(study.main, argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage" in out.lower() or "python studies/study.py" in out
    if len(argv) > 1 and "," not in argv[0]:      # a study's own list: exactly its options
        assert {line.split("=")[0].strip() for line in out.splitlines() if line.startswith("  --")} == \
            {"--" + k for k in study.OPTIONS[argv[0]]}


def test_study_py_answers_help_with_exit_0_and_a_refused_option_with_2_as_a_script():
    """The script itself, as a user runs it (-h exited 1 once: it was read as a study name)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, os.path.join("studies", "study.py"), "-h"], cwd=root, capture_output=True, text=True)
    assert p.returncode == 0 and "usage" in p.stdout.lower() and not p.stderr, (p.returncode, p.stderr[-300:])
    p = subprocess.run([sys.executable, os.path.join("studies", "study.py"), "tree", "--arms=rl"], cwd=root,
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [p.stderr.strip()] and "--arms=rl" in p.stderr


def test_rl_vs_sft_keeps_the_world_when_the_root_is_given(tmp_path, monkeypatch):
    """--root moves the runs; --world still picks the world of every command (it was dropped once)."""
    rec = record(["rl_vs_sft", "--root=elsewhere", "--world=levels", "--seeds=0", "--arms=sft"], tmp_path, monkeypatch)
    train = [c for c in rec["cmds"] if c.startswith("train.py")]
    assert len(train) == 2 and all("--data.rl_levels=1,2,3" in c for c in train)
    assert any("--train.max_steps=8000" in c and "elsewhere/start" in c for c in train)


@pytest.mark.slow
def test_every_script_in_studies_answers_help_with_exit_0():
    """Every script as a user runs it, -h with no checkpoint and no other argument (~8 s each)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script, args in (("study.py", ["tree", "-h"]), ("gates.py", ["--help"]), ("estimators.py", ["-h"]),
                         ("reading_path.py", ["-h"]), ("bench.py", ["-h"]), ("bench.py", ["rl", "-h"])):
        p = subprocess.run([sys.executable, os.path.join("studies", script), *args], cwd=root, capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.strip(), (script, p.returncode, p.stderr[-300:])


def test_the_options_table_in_the_docstring_matches_what_each_study_takes():
    """The docstring's table (x / r = taken) lists exactly OPTIONS per study, and r exactly the options
    --report keeps (not in RUN_ONLY)."""
    table = study.__doc__[study.__doc__.index("    option "):].split("\n\n")[0].splitlines()[2:]
    cols = ["rl_vs_sft", "ablations", "tree", "estimator_variance"]
    for line in table:
        opt, *marks = line.split()
        marks = [m for m in marks if m in ("x", "r", "-")]
        for study_name, m in zip(cols, marks):
            assert (m != "-") == (opt[2:] in study.OPTIONS[study_name]), (opt, study_name)
            if m != "-" and "report" in study.OPTIONS[study_name]:
                assert (m == "r") == (opt[2:] not in study.RUN_ONLY[study_name]), (opt, study_name)
    assert {line.split()[0][2:] for line in table} == set().union(*map(set, study.OPTIONS.values()))


# ------------------------------------------------------------------------------------------------
# the other scripts of studies/: estimators.py, reading_path.py, bench.py

def test_estimators_options_pick_the_checkpoint_the_seed_and_the_output(tmp_path, monkeypatch):
    """--ckpt / --out_dir choose the checkpoint, --seed seeds the draws, --out names the file."""
    import estimators as E
    seen = {}
    monkeypatch.setattr(E, "load", lambda cfg, ckpt: seen.update(path=ckpt or cfg.train.out_dir) or (None, None, "src"))

    def study_(model, bundle, g):
        seen["seed"] = g.initial_seed()
        return {"secs": {"value": 0, "gradient": 0, "exact": 0}, "per_pair": [], "per_grad_pair": [],
                "bias_windows": [], "by_family": {}}
    monkeypatch.setattr(E, "run_study", study_)
    for f in ("print_variance", "print_exact", "print_families"):
        monkeypatch.setattr(E, f, lambda *a: None)
    monkeypatch.setattr(E, "claims", lambda s: [])
    monkeypatch.setattr(E, "to_json", lambda s, head: dict(head))
    monkeypatch.setattr(E.common, "write_json", lambda path, obj: seen.update(out=path, written=obj))
    E.main(["--ckpt=a.pt", "--seed=5", f"--out={tmp_path}/x.json"])
    assert (seen["path"], seen["seed"], seen["out"], seen["written"]["seed"]) == ("a.pt", 5, f"{tmp_path}/x.json", 5)
    E.main(["--out_dir=elsewhere"])
    assert (seen["path"], seen["seed"], seen["out"]) == ("elsewhere", 0, os.path.join("runs", "estimators.json"))


@pytest.mark.parametrize("argv,named", [
    (["--data.n_eval=50"], "--data.n_eval=50"), (["--rl.af_prob=1"], "--rl.af_prob=1"), (["--ckpt=a.pt", "--out_dir=b"], "--train.out_dir"),
    (["--ckpt=a.pt", "--preset=small"], "--preset"), (["--report"], "--report"),
])
def test_an_estimators_option_the_checkpoint_overrides_is_a_one_line_error(argv, named, capsys, monkeypatch):
    import common
    import estimators as E
    monkeypatch.setattr(E, "load", lambda *a: pytest.fail("loaded a checkpoint"))
    with pytest.raises(SystemExit) as e:
        common.run_main(E.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and named in err and "\n" not in err, err


def test_reading_path_options_reach_the_mode_they_belong_to(monkeypatch, capsys):
    """--static and --open_all choose the sealed files of the static reach; --steps the RL steps
    traced; --ckpt the model loaded by setup."""
    import types
    import reading_path as RP
    seen = {"sealed": [], "steps": 0, "setup": []}
    monkeypatch.setattr(RP, "static_reach", lambda sealed: seen["sealed"].append(set(sealed)) or [])
    monkeypatch.setattr(RP, "setup", lambda opts: seen["setup"].append(opts["ckpt"]) or (None,) * 6)
    monkeypatch.setattr(RP.rl, "rl_step", lambda *a: seen.update(steps=seen["steps"] + 1) or types.SimpleNamespace(groups=[]))
    RP.main(["--static"])
    RP.main(["--static", "--open_all"])
    assert seen["sealed"] == [set(RP.SEALED), set()] and RP.SEALED
    RP.main(["--steps=3", "--ckpt=m.pt"])
    assert seen["steps"] == 3 and seen["setup"] == ["m.pt"]
    RP.main([])
    assert seen["steps"] == 3 + RP.OPTIONS["steps"] and seen["setup"] == ["m.pt", ""]


@pytest.mark.parametrize("argv,named", [
    (["--static", "--steps=3"], "--steps=3"), (["--static", "--ckpt=m.pt"], "--ckpt=m.pt"), (["--open_all"], "--open_all"),
    (["--steps=0"], "--steps=0"), (["--rl.af_prob=1"], "--rl.af_prob=1"), (["--preset=small"], "--preset=small"),
])
def test_a_reading_path_option_its_mode_ignores_is_a_one_line_error(argv, named, capsys, monkeypatch):
    import common
    import reading_path as RP
    monkeypatch.setattr(RP, "setup", lambda opts: pytest.fail("set up a run"))
    monkeypatch.setattr(RP, "static_reach", lambda sealed: pytest.fail("ran the static reach"))
    with pytest.raises(SystemExit) as e:
        common.run_main(RP.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and named in err and "\n" not in err, err


def test_bench_config_keys_reach_the_benchmark_and_sit_on_top_of_a_checkpoint(tmp_path, monkeypatch):
    """Without a checkpoint the preset's config takes the keys; with one, speed_world sets the keys
    on top of the checkpoint's config (rl.*, diffusion.*) and refuses its data / model keys."""
    import bench
    got = {}
    monkeypatch.setitem(bench.BENCHMARKS, "rl", (lambda cfg, opts: got.update(cfg=cfg, opts=opts), *bench.BENCHMARKS["rl"][1:]))
    bench.main(["rl", "--rl.group_size=3", "--mu=1,2", "--steps=2"])
    assert got["cfg"].rl.group_size == 3 and got["opts"]["mu"] == "1,2" and got["opts"]["steps"] == 2
    assert got["opts"]["keys"] == ["rl.group_size"]
    ckpt = tmp_path / "ck.pt"
    ckpt.write_bytes(b"")
    theirs = C.make_config("toy")
    theirs.rl.group_size, theirs.rl.temperature, theirs.model.n_layer = 6, 0.3, 1
    monkeypatch.setattr(bench.data, "load_run", lambda path, out, who: (theirs, None, None, None, {"step": 9}))
    monkeypatch.chdir(tmp_path)
    cli = C.get_config(["--rl.group_size=3"])
    cfg = bench.speed_world(cli, str(ckpt), ["rl.group_size"])[0]
    assert (cfg.rl.group_size, cfg.rl.temperature, cfg.model.n_layer) == (3, 0.3, 1)   # the key, else the checkpoint's
    with pytest.raises(SystemExit, match="--model.n_layer: the checkpoint"):
        bench.speed_world(C.get_config(["--model.n_layer=2"]), str(ckpt), ["model.n_layer"])


@pytest.mark.parametrize("argv,named", [
    (["rl", "--rl.ppo_epochs=2"], "--rl.ppo_epochs=2"), (["rl", "--model.prefix_dlm=false"], "--model.prefix_dlm=false"),
    (["rl", "--ckpt=a.pt", "--ckpts=after=b.pt"], "--ckpt=a.pt"), (["rl", "--ckpts=nope=b.pt"], "--ckpts=nope=b.pt"),
    (["rl", "--arms=after,middle"], "--arms=after,middle"), (["rl", "--mu=0"], "--mu=0"), (["rl", "--eval.seed=3"], "--eval.seed=3"),
    (["sampler", "--rl.temperature=0.5"], "--rl.temperature=0.5"), (["sampler", "--diffusion.temperature=1"], "--diffusion.temperature=1"),
    (["sampler", "--n=3"], "--n=3"), (["sampler", "--prompts=0"], "--prompts=0"),
    (["rollout", "--n=3", "--rl.group_size=4"], "--rl.group_size"), (["rollout", "--prompts=2", "--rl.prompts_per_step=2"], "--prompts"),
    (["train", "--batch=4", "--train.micro_batch=4"], "--batch"), (["train", "--train.compile=true"], "--train.compile=true"),
    (["train", "--rl.lr=1"], "--rl.lr=1"), (["train", "--steps=0"], "--steps=0"), (["rollout", "--reps=0"], "--reps=0"),
])
def test_a_bench_option_that_would_change_nothing_is_a_one_line_error(argv, named, capsys, monkeypatch):
    import bench
    import common
    monkeypatch.setattr(bench, "speed_world", lambda *a: pytest.fail("built a world"))
    with pytest.raises(SystemExit) as e:
        common.run_main(bench.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and named in err and "\n" not in err, err


@pytest.mark.parametrize("script,argv", [("estimators", ["-h"]), ("reading_path", ["--help"]), ("bench", ["-h"]),
                                         ("bench", ["train", "-h"]), ("gates", ["-h"])])
def test_every_other_script_answers_help_with_exit_0(script, argv, capsys):
    import importlib
    import common
    with pytest.raises(SystemExit) as e:
        common.run_main(importlib.import_module(script).main, argv)
    assert e.value.code == 0 and "python studies/" in capsys.readouterr().out
