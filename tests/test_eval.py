"""
Tests of eval.py's teacher-error metrics (the issue-6 protocol): hand-made examples and responses,
expected values counted by hand.

    cd /work/main && python -m pytest tests/test_eval.py -q
"""
import math
from types import SimpleNamespace

import eval as E
from data import Example

FAKE_TOK = SimpleNamespace(decode=lambda text: text)     # responses are given as text already
WIDE = SimpleNamespace(R_text=10 ** 6)


def vqa(answer, teacher):
    return Example("vqa", "count", "q", None, answer, teacher_answer=teacher)


def test_vqa_copies_of_the_teachers_error_counted_by_hand():
    exs = [vqa("2", "3"), vqa("1", "2"), vqa("4", "5"), vqa("0", "0"), vqa("yes", None)]
    resp = ["<answer> 3 </answer>",      # the teacher's wrong answer (copied)
            "<answer> 1 </answer>",      # right
            "garbage",                   # unparsable: neither right nor a copy
            "<answer> 0 </answer>",      # the teacher was right here: not counted
            "<answer> no </answer>"]     # no teacher answer stored: not counted
    rewards = [0.0, 1.0, 0.0, 1.0, 0.0]
    m = E.teacher_error_metrics("vqa", exs, resp, WIDE, FAKE_TOK, rewards)
    assert m == {"vqa_teacher_wrong_n": 3, "vqa_acc_teacher_wrong": 1 / 3, "vqa_copies_teacher": 1 / 3}
    # an unbiased world (no teacher answers) adds no vqa keys
    assert E.teacher_error_metrics("vqa", [vqa("2", None)], ["<answer> 2 </answer>"], WIDE, FAKE_TOK, [1.0]) == {}


def test_ground_box_pad_is_the_mean_outward_edge_offset():
    exs = [Example("ground", "unique", "q", None, (10, 10, 14, 14)),
           Example("ground", "unique", "q", None, (2, 2, 8, 8)),
           Example("ground", "unique", "q", None, (0, 0, 4, 4))]
    resp = ["<answer> 9 9 15 15 </answer>",     # 1 px too big on every side: +1
            "<answer> 3 2 8 7 </answer>",       # left and bottom edges 1 px inside: (-1 + 0 + 0 - 1) / 4
            "<answer> 1 2 </answer>"]           # unparsable: skipped
    m = E.teacher_error_metrics("ground", exs, resp, WIDE, FAKE_TOK, [0.0, 0.0, 0.0])
    assert math.isclose(m["ground_box_pad_px"], (1.0 - 0.5) / 2)
