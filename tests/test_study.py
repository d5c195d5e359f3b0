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
    res = {"commit": "abc", "hardware": "cpu", "seeds": [0, 1], "study_wall_s": 1.0, "command": "python study.py x"}
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
    assert study.ARMS["rl"][-len(study.RL_FLAGS):] == study.RL_FLAGS
