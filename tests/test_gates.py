"""
The gate numbers of studies/gates.py against hand-computed cases, and its command line: each option
and design flag reaches the screen (a recorded fake of the sampling, no model), the others are
one-line errors.

    python -m pytest tests/test_gates.py -q
"""
import json
import os
import types

import pytest

import common
import gates
import world as D
from config import make_config


def test_gate_numbers_by_hand():
    # 16 samples per prompt; prompts with 0, 16 and 1 right samples
    g = gates.gate_numbers([0, 16, 1], 16)
    assert g["pass@1"] == pytest.approx((0 + 1 + 1 / 16) / 3)
    assert g["pass@16"] == pytest.approx(2 / 3)                      # any of all 16: the last two prompts
    # a group of 8 of the 16 misses the single right sample with probability C(15, 8) / C(16, 8) = 1/2
    assert g["all_fail@8"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert g["headroom"] == pytest.approx(g["pass@16"] - g["pass@1"])


def test_passes_at_the_target_boundaries():
    ok = {"headroom": 0.20, "all_fail@8": 0.20, "forced_consistent": 0.50}
    assert all(gates.passes(ok).values())
    assert gates.passes({**ok, "all_fail@8": 0.61}) == {"headroom": True, "all_fail@8": False, "forced_consistent": True}
    assert not gates.passes({**ok, "headroom": 0.19})["headroom"]


def test_forced_consistency_reads_the_reasoning_not_the_answer():
    cfg = make_config("toy")                                           # 32 px, grid 4: 8 px cells
    ex = D.Example("vqa", "add3", "q", None, "3")
    assert gates.consistent("vqa", "red shapes : r0c0 . count 1 . circles : none . count 0 . squares : r1c1 r2c2 . "
                                   "count 2 . 1 + 0 + 2 = 3 <answer> 3 </answer>", ex, cfg)
    assert not gates.consistent("vqa", "red shapes : r0c0 . count 1 . circles : none . count 0 . squares : r1c1 . "
                                       "count 1 . 1 + 0 + 1 = 3 <answer> 3 </answer>", ex, cfg)
    box = D.shape_box(6, D.Shape("circle", "red", "small"), 4, 32)    # cell 6 = r1c2
    ex = D.Example("ground", "two_hop", "q", None, box)
    assert gates.consistent("ground", "green square : r2c2 . above : r1c2 . small : r1c2", ex, cfg)
    assert not gates.consistent("ground", "green square : r2c2 . above : r0c2 . small : r0c2", ex, cfg)


def test_an_image_blind_grounding_guess_is_one_shape_of_the_scene():
    cfg = make_config("toy")
    s = D.Shape("circle", "red", "small")
    scene = (s, None, s, None, s, None, None, s) + (None,) * 8           # 4 shapes
    ex = D.Example("ground", "two_hop", "q", scene, D.shape_box(2, s, 4, 32))
    assert gates.blind(None, "ground", [ex], cfg) == pytest.approx(0.25)


def screened(argv, tmp_path, monkeypatch):
    """gates.main(argv) with the checkpoint and every sampling call faked and recorded: returns
    (the calls, the designs published)."""
    tmp_path.mkdir(exist_ok=True)
    monkeypatch.chdir(tmp_path)
    calls, published = [], {}
    ex = types.SimpleNamespace(level=3)
    edge = type("Edge", (), {"examples": [ex] * 200, "__len__": lambda self: 200})()
    ckpt_cfg = make_config("toy")
    monkeypatch.setattr(gates.data, "load_run", lambda path, out, who: (
        calls.append(("load", path)) or ckpt_cfg, types.SimpleNamespace(sets={"vqa": {}, "ground": {}}), None, None, {"step": 7}))
    monkeypatch.setattr(gates, "edge_split", lambda bundle, cfg, task: edge)

    def scores(model, bundle, vq, cfg, dev, autocast, task, split, idx, n, temperature, seed):
        calls.append(("sample", task, len(idx), n, temperature, cfg.diffusion.remask))
        return [[1.0] * n for _ in idx]
    monkeypatch.setattr(gates.metrics, "sample_scores", scores)
    monkeypatch.setattr(gates, "forced_consistency", lambda *a: 0.5)
    monkeypatch.setattr(gates, "blind", lambda *a: 0.1)
    monkeypatch.setattr(gates, "picture_gates", lambda model, bundle, vq, cfg, n, samples, dev, autocast: calls.append(
        ("pictures", n, samples)) or {"t2i_image_nll": 2.0, "edit_mean": 0.5, f"edit_best{samples}": 0.9, "edit_gap": 0.4,
                                      "passes": {}})

    def publish(name, res, *a, **k):                  # what publish keeps for the next call: results/gates.json
        published.update(res)
        os.makedirs("results", exist_ok=True)
        json.dump(res, open(gates.RESULTS, "w"))
    monkeypatch.setattr(gates, "publish", publish)
    gates.main(argv)
    return calls, published


@pytest.mark.parametrize("option,shows", [
    ("--n=7", lambda c, p: ("sample", "vqa", 7, 16, 1.0, "low_confidence") in c and ("pictures", 7, 16) in c),
    ("--samples=4", lambda c, p: ("sample", "ground", 100, 4, 1.0, "low_confidence") in c),
    ("--parts=pictures", lambda c, p: not any(x[0] == "sample" for x in c) and "vqa" not in p["designs"][0]),
    ("--parts=reasoning", lambda c, p: not any(x[0] == "pictures" for x in c)),
    ("--design=hot", lambda c, p: [d["design"] for d in p["designs"]] == ["hot"]),
    ("--rl.temperature=0.7", lambda c, p: ("sample", "vqa", 100, 16, 0.7, "low_confidence") in c
     and p["designs"][0]["flags"] == ["--rl.temperature=0.7"]),
    ("--diffusion.remask=random", lambda c, p: ("sample", "vqa", 100, 16, 1.0, "random") in c),
])
def test_every_gates_option_reaches_the_screen(option, shows, tmp_path, monkeypatch):
    base = screened(["--ckpt=a.pt"], tmp_path / "a", monkeypatch)
    got = screened(["--ckpt=b.pt", option], tmp_path / "b", monkeypatch)
    assert ("load", "b.pt") in got[0] and ("load", "a.pt") in base[0]          # --ckpt
    assert got[0][1:] != base[0][1:] or got[1]["designs"][0]["design"] != "base"
    assert shows(*got), got


def test_gates_report_rebuilds_from_the_results_file_only(tmp_path, monkeypatch):
    """--report screens nothing: the designs published are the file's."""
    screened(["--ckpt=a.pt", "--design=one"], tmp_path, monkeypatch)
    calls, pub = screened(["--report"], tmp_path, monkeypatch)
    assert calls == [] and [d["design"] for d in pub["designs"]] == ["one"]


@pytest.mark.parametrize("argv,named", [
    (["--report", "--n=5"], "--n"), (["--report", "--ckpt=a.pt"], "--ckpt"),
    (["--report", "--rl.temperature=0.5"], "--rl.temperature"),
    (["--ckpt=a.pt", "--eval.seed=3"], "--eval.seed=3"), (["--ckpt=a.pt", "--rl.lr=0.1"], "--rl.lr=0.1"),
    (["--ckpt=a.pt", "--seed=3"], "--seed=3"), (["--ckpt=a.pt", "--diffusion.temperature=0.5"], "--diffusion.temperature=0.5"),
    (["--ckpt=a.pt", "--diffusion.cfg_scale=2"], "--diffusion.cfg_scale=2"), (["--ckpt=a.pt", "--n=0"], "--n=0"),
    (["--ckpt=a.pt", "--parts=reasoning,nope"], "--parts=reasoning,nope"), (["--ckpt=a.pt", "--design"], "--design"),
    (["--n=5"], "--ckpt"),
])
def test_a_gates_option_that_would_change_nothing_is_a_one_line_error(argv, named, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gates.data, "load_run", lambda *a: pytest.fail("loaded a checkpoint"))
    with pytest.raises(SystemExit) as e:
        common.run_main(gates.main, argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and named in err and "\n" not in err, err


def test_gates_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        common.run_main(gates.main, ["-h"])
    assert e.value.code == 0 and "python studies/gates.py" in capsys.readouterr().out
