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
