"""
sample.py's verbs on a tiny finished run, checked for WHAT they write, against references built here:

  answer --force   the printed response ends in the forced answer block, once; the printed step count
                   is that of the text plan (blocks of block_len, tokens_per_step per step: worked out
                   here from the layout); the steps strip and the GIF are written (the GIF with at
                   least that many frames)
  ground --force   the output picture is the input picture, resized, with the forced box's outline in
                   magenta at exactly the pixels the box names (drawn here with numpy)
  edit, draw       the input picture as given; the film of the picture starts all grey (every cell
                   masked) and ends on the output picture; one panel per step of the plan
  --n              that many sample panels beside the input, with a reward each for a held-out example
  assets           the README's pictures: the run's sample grid copied pixel for pixel, the VQ
                   reconstruction grid of 16 scenes (its size from save_grid's layout), the two strips

    python -m pytest tests/test_sample.py -q
"""
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

import data
import sample
import train
import world as W

SCALE = 6                                       # sample.py's pixels per picture pixel


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny main job (SFT with a quick eval per step, no RL), its bundle, and input pictures."""
    tmp = tmp_path_factory.mktemp("sample")
    out = tmp / "run"
    train.main([f"--out_dir={out}", f"--data.cache_dir={tmp / 'cache'}", "--data.n_sft=8", "--data.n_rl=4",
                "--data.n_eval=4", "--data.n_val=2", "--model.n_layer=1", "--model.n_head=2", "--model.d_model=32",
                "--vq.steps=10", "--vq.n_images=32", "--train.max_steps=2", "--train.batch_size=4",
                "--train.micro_batch=2", "--train.eval_interval=1", "--train.time_budget_s=0", "--rl.max_steps=0",
                "--eval.n_per_task=4", "--eval.batch_size=2", "--eval.grid_rows=1", "--eval.curve_n=2"])
    cfg, bundle, _, _, _ = data.load_run(str(out / "ckpt_sft.pt"), str(tmp / "load"), "test")
    # the input: a rendered scene at twice the size, each pixel a 2x2 block, so that sample.py's box
    # resize back to 32 px gives exactly the scene's picture
    scene = [None] * 16
    scene[5], scene[10] = W.Shape("circle", "red", "large"), W.Shape("square", "blue", "small")
    base = W.render(tuple(scene), 4, 32)
    Image.fromarray(np.kron(base, np.ones((2, 2, 1), dtype=np.uint8))).save(tmp / "pic.png")
    return tmp, out, cfg, bundle, base


def sample_main(capsys, *argv) -> str:
    sample.main(list(argv))
    return capsys.readouterr().out


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def upscaled(pic: np.ndarray, k: int = SCALE) -> np.ndarray:
    return np.kron(pic, np.ones((k, k, 1), dtype=pic.dtype))


def text_steps(R_text: int, dcfg) -> int:
    """The text plan's step count: blocks of block_len slots, tokens_per_step revealed per step."""
    return sum(math.ceil((min(lo + dcfg.block_len, R_text) - lo) / dcfg.tokens_per_step)
               for lo in range(0, R_text, dcfg.block_len))


def gif_frames(path) -> int:
    return Image.open(path).n_frames


def test_answer_force_writes_the_forced_answer_and_one_frame_per_step(run, capsys):
    tmp, out, cfg, bundle, _ = run
    dst = tmp / "answer"
    text = sample_main(capsys, "answer", f"--out_dir={out}", "--example=3", "--force=2", "--show_steps", f"--out={dst}")
    response = re.search(r"^-> (.*)$", text, re.M).group(1)
    assert response.endswith("<answer> 2 </answer>") and response.count("<answer>") == 1, response
    assert "(forced answer: 2)" in text
    n = text_steps(bundle.layouts["vqa"].R_text, cfg.diffusion)
    assert f"({n} steps)" in text
    for name in ("answer.png", "answer_steps.png", "answer_steps.gif"):
        assert (dst / name).stat().st_size > 0
    assert not (dst / "answer_steps_film.png").exists()                 # a text answer has no picture film
    assert gif_frames(dst / "answer_steps.gif") >= n + 1                   # every state, then the final one held


def test_ground_force_draws_the_forced_box_on_the_input_picture(run, capsys):
    """--force='1 2 9 10' (x0 y0 x1 y1, x1/y1 exclusive): a one-pixel magenta outline on columns 1..8
    and rows 2..9 of the resized input; every other pixel is the input's."""
    tmp, out, _, _, base = run
    dst = tmp / "ground"
    text = sample_main(capsys, "ground", f"--out_dir={out}", f"--image={tmp / 'pic.png'}",
                       "--prompt=where is the red circle ?", "--force=1 2 9 10", f"--out={dst}")
    assert re.search(r"^-> .*<answer> 1 2 9 10 </answer>$", text, re.M), text
    want = base.copy()
    magenta = (255, 0, 255)
    want[2, 1:9] = want[9, 1:9] = magenta
    want[2:10, 1] = want[2:10, 8] = magenta
    img, S = png(dst / "ground.png"), 32 * SCALE
    # rows of render_row: picture at y + 2; a short prompt's row is S + 4 high
    assert np.array_equal(img[2:2 + S, :S], upscaled(base))               # the input, as given
    assert np.array_equal(img[S + 6:S + 6 + S, :S], upscaled(want))        # the output with the box


def film_panels(path, side: int = 32) -> list[np.ndarray]:
    """The pictures of a *_steps_film.png (panel g at x = g * (3 side + 4), y = 12, scaled x3), at 1x."""
    f = png(path)
    w = 3 * side + 4
    assert f.shape[1] % w == 0
    return [f[12:12 + 3 * side:3, g * w:g * w + 3 * side:3] for g in range(f.shape[1] // w)]


def test_edit_keeps_the_input_and_films_every_step_from_grey_to_the_output(run, capsys):
    tmp, out, cfg, bundle, base = run
    dst = tmp / "edit"
    text = sample_main(capsys, "edit", f"--out_dir={out}", f"--image={tmp / 'pic.png'}",
                       "--prompt=remove the red circle", "--show_steps", f"--out={dst}")
    lay, S = bundle.layouts["edit"], 32 * SCALE
    n = text_steps(lay.R_text, cfg.diffusion) + min(cfg.diffusion.image_steps, lay.n_img)
    assert f"({n} steps)" in text
    img = png(dst / "edit.png")
    assert np.array_equal(img[2:2 + S, :S], upscaled(base))
    panels = film_panels(dst / "edit_steps_film.png")
    assert len(panels) == n + 1
    assert (panels[0] == 160).all()                                      # all masked: grey
    assert np.array_equal(upscaled(panels[-1]), img[S + 6:S + 6 + S, :S])  # the end is the output picture
    assert gif_frames(dst / "edit_steps.gif") >= n + 1


def test_draw_films_its_image_steps_and_notes_unknown_words(run, capsys):
    tmp, out, cfg, bundle, _ = run
    dst = tmp / "draw"
    text = sample_main(capsys, "draw", f"--out_dir={out}", "--prompt=large red circle r1c1 , zebra",
                       "--show_steps", f"--out={dst}")
    assert "note: not in the vocabulary, read as [UNK]: zebra" in text
    n = min(cfg.diffusion.image_steps, bundle.layouts["t2i"].n_img)       # no text slots: image steps only
    panels = film_panels(dst / "draw_steps_film.png")
    assert len(panels) == n + 1 and (panels[0] == 160).all()
    img, S = png(dst / "draw.png"), 32 * SCALE
    top = 12 * 2 + 8 + 4                  # the prompt row: no picture, two text lines (header, prompt)
    assert np.array_equal(upscaled(panels[-1]), img[top + 2:top + 2 + S, :S])
    assert not (panels[-1] == 160).all()


@pytest.mark.parametrize("verb", ["edit", "draw"])
def test_n_pictures_side_by_side_with_a_reward_each(run, capsys, verb):
    """--n=3 on held-out example 1: the input (edit) and 3 panels in one row, 3 rewards in [0, 1]."""
    tmp, out, _, _, _ = run
    dst = tmp / f"n_{verb}"
    text = sample_main(capsys, verb, f"--out_dir={out}", "--example=1", "--n=3", f"--out={dst}")
    rewards = [float(x) for x in re.search(r"rewards \[([^\]]*)\]", text).group(1).split(",")]
    assert len(rewards) == 3 and all(0 <= r <= 1 for r in rewards)
    S = 32 * SCALE
    img = png(dst / f"{verb}_variety.png")
    assert img.shape[1] == 8 + 4 * (S + 8)                                # input slot + 3 samples
    row = img[-(S + 40):]                                                # the picture row is the last S + 40 px
    for i in range(1, 4):                                                # each sample panel holds a picture
        x = 8 + i * (S + 8)
        assert not (row[24:24 + S, x:x + S] == 255).all()


def test_assets_copies_the_grid_and_writes_the_readme_pictures(run, capsys):
    tmp, out, _, _, _ = run
    dst = tmp / "assets"
    text = sample_main(capsys, "assets", f"--out_dir={out}", f"--out={dst}")
    assert np.array_equal(png(dst / "samples.png"), png(out / "samples.png"))
    assert (dst / "report.md").read_text() == (out / "report.md").read_text()     # the report card beside it
    # 16 scenes over their reconstructions, 32 px each with 2 px gaps, x4
    assert png(dst / "vq_recon.png").shape[:2] == ((2 + 2 * 34) * 4, (2 + 16 * 34) * 4)
    for name in ("answer.png", "answer_steps.png", "answer_steps.gif", "draw.png", "draw_steps.png",
                 "draw_steps.gif", "draw_steps_film.png"):
        assert (dst / name).stat().st_size > 0, name
    # the default world has one look per cell and single-operation edits: no variety picture, said so
    assert not (dst / "variety.png").exists() and "no variety.png" in text
    try:
        import matplotlib  # noqa: F401
        assert (dst / "sft_curve.png").exists()
    except ImportError:
        assert "no matplotlib, no curves" in text and not (dst / "sft_curve.png").exists()
