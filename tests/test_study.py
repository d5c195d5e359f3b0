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
                                         *study.ABLATIONS[name][v]], 240.0)
    defaults = {key("af_ratio", "p=0.1"), key("objective", "unified"), key("gamma", "gamma=0.5"),
                key("estimator", "complementary")}
    assert len(defaults) == 1
    others = [key(n, v) for n, vs in study.ABLATIONS.items() for v in vs]
    assert len(set(others)) == 1 + sum(len(vs) - 1 for vs in study.ABLATIONS.values())
    assert key("gamma", "gamma=0") != study.run_key(["--stage=rl", "--rl.eval_interval=15", *study.ABLATION_FLAGS,
                                                     "--rl.gamma=0"], 120.0)            # the budget counts


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
