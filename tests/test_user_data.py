"""
Your own data: grounding boxes in JSONL rows are checked and rescaled with their picture, a file
with no usable row is an error, and the README's walk-through (export example data, train on it,
evaluate on it, sample from it) runs end to end at tiny size.

    python -m pytest tests/test_user_data.py -q
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

import common
import data
import eval as eval_script
import rewards as RW
import sample as sample_script
import train
import user_data as U
import world as W
import world_extras as WX
from config import make_config

SCENE = (None, W.Shape("circle", "red", "large"), None, None,
         None, None, W.Shape("square", "blue", "small"), None,
         None, None, None, None, None, W.Shape("triangle", "green", "large"), None, None)


def write_rows(folder, rows, picture_px: int = 64) -> str:
    """A picture of SCENE at picture_px and a JSONL file of `rows` (dicts) that name it."""
    Image.fromarray(W.render(SCENE, 4, picture_px)).save(os.path.join(folder, "pic.png"))
    path = os.path.join(folder, "rows.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_box_is_rescaled_with_its_picture(tmp_path):
    """A 64 px picture with a box drawn exactly around a shape, resized to the toy's 32 px: the box
    must follow, so that it still frames the shape (it used to be kept as is and score IoU 0)."""
    dcfg = make_config("toy").data                                   # image_size 32, grid 4
    rows = [{"task": "ground", "image": "pic.png", "prompt": "where is the blue square ?",
             "box": list(W.shape_box(i, SCENE[i], 4, 64))} for i in (1, 6, 13)]
    exs, skipped = U.load_jsonl(write_rows(tmp_path, rows), dcfg, strict=True)
    assert skipped == []
    for ex, i in zip(exs, (1, 6, 13)):
        want = W.shape_box(i, SCENE[i], 4, 32)                    # the same shape's box, drawn at 32 px
        assert RW.iou(ex.answer, want) > 0.8, (ex.answer, want)
        x0, y0, x1, y1 = W.shape_box(i, SCENE[i], 4, 64)
        assert ex.answer == (round(x0 / 2), round(y0 / 2), round(x1 / 2), round(y1 / 2))


@pytest.mark.parametrize("box,why", [([40, 10, 20, 30], "inverted"), ([10, 10, 10, 30], "zero width"),
                                     ([10, 30, 20, 30], "zero height"), ([-1, 0, 10, 10], "left of the picture"),
                                     ([0, 0, 65, 10], "right of a 64 px picture"), ([0, 0, 10, 99], "below it")])
def test_bad_boxes_are_rejected(tmp_path, box, why):
    dcfg = make_config("toy").data
    path = write_rows(tmp_path, [{"task": "ground", "image": "pic.png", "prompt": "where ?", "box": box}])
    with pytest.raises(U.JSONLError, match="'box'"):
        U.load_jsonl(path, dcfg, strict=True)
    exs, problems = U.load_jsonl(path, dcfg, strict=False)       # lenient: skipped, its message kept
    assert exs == [] and len(problems) == 1 and problems[0].startswith(f"{path}:1: ") and "'box'" in problems[0], why


def test_a_file_with_no_usable_row_is_an_error(tmp_path, capsys):
    cfg = make_config("toy", {"data.jsonl": write_rows(tmp_path, [{"task": "ocr", "prompt": "x"}])})
    ctx = common.Ctx("cpu", None, "fp32", False, 0, 1, str(tmp_path))
    with pytest.raises(SystemExit, match=r"no usable row: .*rows.jsonl:1: task 'ocr' unknown"):
        data.load_user_rows(cfg, ctx)
    cfg.data.jsonl = str(tmp_path / "missing.jsonl")
    with pytest.raises(SystemExit, match="no such file"):
        data.load_user_rows(cfg, ctx)


def test_example_data_walkthrough(tmp_path, capsys):
    """The README's walk-through at tiny size: export, train only on the exported rows, evaluate on
    their held-out rows, sample from a picture of theirs."""
    exported = tmp_path / "example_data"
    cfg = make_config("toy", {"data.n_sft": 6, "data.n_rl": 4, "data.n_eval": 3, "data.n_val": 3})
    path = U.export_examples(W.build_pools(cfg.data, WX.world_for(cfg.data)), str(exported), 3, cfg.data)
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 4 * 4 * 3 and {r["task"] for r in rows} == {"vqa", "ground", "edit", "t2i"}
    assert all(os.path.exists(exported / r[k]) for r in rows for k in ("image", "target_image") if k in r)
    run = str(tmp_path / "run")
    flags = [f"--out_dir={run}", f"--data.jsonl={path}", f"--data.cache_dir={tmp_path / 'cache'}",
             "--data.n_sft=0", "--data.n_rl=0", "--data.n_eval=0", "--data.n_val=0",
             "--vq.steps=20", "--vq.n_images=64", "--model.n_layer=1", "--model.d_model=32", "--model.n_head=2",
             "--train.max_steps=3", "--train.batch_size=4", "--train.micro_batch=4", "--train.eval_interval=0",
             "--rl.max_steps=1", "--rl.prompts_per_step=1", "--rl.group_size=2", "--rl.sft_rows=2",
             "--eval.n_per_task=3", "--eval.grid_rows=1"]
    train.main(flags)
    m = json.load(open(os.path.join(run, "metrics.json")))
    assert {"vqa_acc", "ground_miou", "edit_score", "t2i_cell_acc"} <= set(m)
    eval_script.main([f"--out_dir={run}", "--eval.n_per_task=3", "--eval.grid_rows=1"])
    assert json.load(open(os.path.join(run, "metrics_eval.json")))["vqa_acc"] == m["vqa_acc"]   # same rows, same seed
    vqa_eval = next(r for r in rows if r["task"] == "vqa" and r.get("split") == "eval")
    sample_script.main(["answer", f"--out_dir={run}", f"--image={exported / vqa_eval['image']}",
                        f"--prompt={vqa_eval['prompt']}", "--show_steps"])
    for name in ("answer.png", "answer_steps.png", "answer_steps.gif"):
        assert os.path.exists(os.path.join(run, "sample", name)), name
    assert np.asarray(Image.open(os.path.join(run, "sample", "answer.png"))).std() > 0
    # several pictures of one held-out description, side by side with their rewards
    sample_script.main(["draw", f"--out_dir={run}", "--example=0", "--n=3"])
    assert "3 pictures, rewards [" in capsys.readouterr().out
    assert os.path.exists(os.path.join(run, "sample", "draw_variety.png"))
    with pytest.raises(SystemExit, match="answers in text"):
        sample_script.main(["answer", f"--out_dir={run}", "--example=0", "--n=2"])


def test_token_cache_follows_the_jsonl_contents(tmp_path):
    """The token cache is keyed on what the JSONL file and its pictures hold, not on the file name:
    appending rows, editing a prompt without changing the row count, or redrawing a picture each give
    a new key (a stale cache used to crash with an IndexError or train on the old tokens silently)."""
    rows = [{"task": "vqa", "image": "pic.png", "prompt": "how many red shapes are there ?", "answer": "1"}]
    path = write_rows(tmp_path, rows)
    cfg = make_config("toy", {"data.jsonl": path})
    key = lambda: data._bundle_key(cfg, str(tmp_path / "no_vq.pt"))
    keys = [key()]
    with open(path, "a") as f:                                   # 1. rows appended
        f.write(json.dumps(rows[0]) + "\n")
    keys.append(key())
    write_rows(tmp_path, [dict(rows[0], prompt="how many blue shapes are there ?")] * 2)   # 2. same count, new text
    keys.append(key())
    Image.fromarray(W.render(SCENE[::-1], 4, 64)).save(tmp_path / "pic.png")            # 3. a new picture
    keys.append(key())
    assert len(set(keys)) == 4, keys
    assert key() == keys[-1]                                     # and nothing else moves it


def test_loader_edge_cases(tmp_path):
    """A grounding response keeps only its reasoning (the box comes from "box"); a row sent to the
    SFT split without a response is a row error; a box at the picture's edge stays inside the
    resized picture; a line that is not UTF-8 neither crashes the loader nor the cache key."""
    dcfg = make_config("toy").data
    path = write_rows(tmp_path, [
        {"task": "ground", "image": "pic.png", "prompt": "where ?", "box": [40, 0, 64, 12],
         "response": "<think> blue square : r0c2 </think> <answer> 40 0 64 12 </answer>"},
        {"task": "vqa", "image": "pic.png", "prompt": "how many ?", "answer": "1", "split": "sft"},
        {"task": "ground", "image": "pic.png", "prompt": "where ?", "box": [63, 63, 64, 64]}])
    with open(path, "ab") as f:
        f.write(b'{"task": "vqa", "prompt": "\xff\xfe"}\n')
    exs, skipped = U.load_jsonl(path, dcfg, strict=False)
    assert len(skipped) == 2 and len(exs) == 2                  # the untraced sft row and the bytes line
    assert "needs a 'response'" in skipped[0] and "not UTF-8" in skipped[1] and skipped[1].startswith(f"{path}:4:")
    assert exs[0].trace == "blue square : r0c2" and exs[0].answer == (20, 0, 32, 6)
    assert exs[1].answer == (31, 31, 32, 32)                   # 1 px, inside the 32 px picture
    with pytest.raises(U.JSONLError, match="needs a 'response'"):
        U.load_jsonl(path, dcfg, strict=True)
    cfg = make_config("toy", {"data.jsonl": path})
    assert len(data._bundle_key(cfg, "no_vq.pt")) == 12
