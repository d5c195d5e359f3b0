"""
The gate numbers of studies/gates.py against hand-computed cases.

    python -m pytest tests/test_gates.py -q
"""
import pytest

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
