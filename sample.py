"""
Watch a trained model work: answer, ground, edit or draw from one command, and see the denoising.

    python sample.py answer --image=pic.png --prompt="how many red shapes are there ?"
    python sample.py ground --image=pic.png --prompt="where is the red circle ?"
    python sample.py edit   --image=pic.png --prompt="remove the red circle"
    python sample.py draw   --prompt="large red circle r1c1 , small blue square r2c3"
    python sample.py answer --example=3 --show_steps          # held-out example 3 instead of a file
    python sample.py answer --example=3 --force="2" --show_steps   # answer-forcing: fix the answer,
                                                                   # inpaint the reasoning (METHOD.md §5)
    python sample.py draw --out_dir=runs/looks --example=0 --n=8   # 8 pictures of one prompt: what the
                                                  # prompt leaves open (the looks world), each with its reward
    python sample.py assets --out_dir=runs/toy     # the README's pictures (assets/) from the main job
    python sample.py assets --out_dir=runs/looks --out=assets/looks   # and from the looks world's run

Options: --ckpt=PATH (default: out_dir's ckpt_rl.pt, else ckpt_sft.pt; the data, model and sampler
settings are the checkpoint's own), --out=DIR (default <out_dir>/sample), --seed, --temperature
(text; default the eval's greedy 0), --show_steps, --n (draw / edit: that many pictures of one
prompt side by side, `<task>_variety.png`). Runs on the CPU.

What it writes into --out: `<task>.png` (the input picture, the prompt and response text, and the
output: the picture with the predicted box drawn for `ground`, the edited or drawn picture for
`edit` / `draw`), and with --show_steps `<task>_steps.png` (one row per denoising step: the response
canvas with [M] where a text token is still masked and grey cells where an image token is; the
unmasking order, the semi-autoregressive text blocks and a forced answer's fixed tokens can be seen
in it) plus the same as an animated `<task>_steps.gif`. The text is printed too.

The prompt is tokenized with the run's word tokenizer: use the task language of the shape world
(see world.py: make_vqa, make_ground, make_edit, describe); unknown words become [UNK] and are listed.
Pictures are resized to data.image_size and read as VQ codes, like the training data.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw

import common
import config as C
import rewards as RW
import tokens as T
import vq as VQ
import world
import world_extras
from data import load_run, picture_judge
from diffusion import sample
from rollout import force_answer

TASKS = {"answer": "vqa", "ground": "ground", "edit": "edit", "draw": "t2i"}
SCALE = 6                                   # pixels per picture pixel in the PNGs


def build_example(task: str, opts: dict, bundle, d) -> world.Example:
    """The example to run: a held-out one (--example) or the user's picture and prompt."""
    if opts["example"] >= 0:
        exs = bundle.sets[task]["eval"].examples
        if opts["example"] >= len(exs):
            raise SystemExit(f"sample: --example={opts['example']} but the held-out {task} set has {len(exs)}")
        ex = exs[opts["example"]]
        world.ensure_images([ex], d, world_extras.world_for(d))   # synthetic pictures are re-rendered on demand
        return ex
    if not opts["prompt"]:
        raise SystemExit("sample: pass --prompt='...' (or --example=N for a held-out example)")
    ex = world.Example(task, "user", opts["prompt"].strip(), None, None, None)
    if task != "t2i":
        if not opts["image"]:
            raise SystemExit(f"sample: {task} needs --image=PNG (or --example=N)")
        try:
            im = Image.open(opts["image"]).convert("RGB").resize((d.image_size, d.image_size), Image.BOX)
        except Exception as e:
            raise SystemExit(f"sample: cannot read --image={opts['image']!r} ({type(e).__name__})") from None
        ex.image = np.asarray(im, dtype=np.uint8)
    return ex


def canvas_batch(ex: world.Example, task: str, bundle, vq, force: str) -> tuple[T.Batch, torch.Tensor | None]:
    """The prompt of `ex` with an all-masked response canvas (or the forced answer in clear)."""
    tok, lay = bundle.tok, bundle.layouts[task]
    unknown = [w for w in ex.prompt.split() if w not in tok.stoi]
    if unknown:
        print(f"note: not in the vocabulary, read as [UNK]: {' '.join(unknown)}")
    codes = vq.encode(ex.image[None]) if ex.image is not None else None
    try:
        ts = T.tokenize_split(task, [world.Example(task, ex.qtype, ex.prompt, ex.scene, ex.answer, None)], tok, lay,
                              bundle.P, codes, None)
    except ValueError as e:
        raise SystemExit(f"sample: {e}") from None
    batch = T.collate({task: ts}, [(task, 0)], tok, responses=False)
    if force:
        if task not in ("vqa", "ground"):
            raise SystemExit("sample: --force works for answer and ground (the tasks with a text answer)")
        ans = tuple(int(v) for v in force.split()) if task == "ground" else force
        return force_answer(batch, [world.Example(task, "user", "", None, ans, None)], tok, lay)   # + the banned tags
    return batch, None


def pictures(codes: torch.Tensor, known: torch.Tensor, vq, side: int) -> np.ndarray:
    """Decode VQ codes (S, n_img) to pictures (S, H, W, 3) uint8, greying every cell whose token is
    still masked (known False). Masked codes are decoded as code 0 first, then covered."""
    img = (vq.decode(torch.where(known, codes, torch.zeros_like(codes))).numpy() * 255).astype(np.uint8)
    cell = img.shape[1] // side
    for s, k in enumerate(known.tolist()):
        for j, ok in enumerate(k):
            if not ok:
                r, c = divmod(j, side)
                img[s, r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = 160
    return img


def text_of(ids, tok) -> str:
    """A response's text region as words, [M] for a masked slot (tokenizer.decode, shortened)."""
    return tok.decode(ids, skip=("[PAD]", "[EOS]")).replace("[MASK]", "[M]")


def render_row(text: str, pic: np.ndarray | None, header: str, width: int = 100) -> Image.Image:
    lines = [header] + (textwrap.wrap(text, width) or [""])
    S = 0 if pic is None else pic.shape[0] * SCALE
    h = max(S, 12 * len(lines) + 8)
    row = Image.new("RGB", (S + 8 + 6 * width + 16, h + 4), (255, 255, 255))
    if pic is not None:
        row.paste(Image.fromarray(pic).resize((S, S), Image.NEAREST), (0, 2))
    ImageDraw.Draw(row).multiline_text((S + 8, 4), "\n".join(lines), fill=(0, 0, 0))
    return row


def stack(rows: list[Image.Image]) -> Image.Image:
    out = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    return out


def run(cfg, opts: dict, verb: str):
    task = TASKS[verb]
    path = opts["ckpt"] or common.latest_checkpoint(cfg.train.out_dir)
    out_dir = opts["out"] or os.path.join(cfg.train.out_dir, "sample")
    run_cfg, bundle, model, vq, blob = load_run(path, os.path.join(cfg.train.out_dir, "sample"), "sample")
    d, tok, lay = run_cfg.data, bundle.tok, bundle.layouts[task]
    ex = build_example(task, opts, bundle, d)
    batch, forbid = canvas_batch(ex, task, bundle, vq, opts["force"])
    states = []
    gen = torch.Generator().manual_seed(cfg.train.seed)
    with torch.no_grad():
        tokens, _ = sample(model, batch, tok, run_cfg.diffusion, temperature=opts["temperature"], generator=gen,
                           forbid=forbid, on_step=lambda g, t: states.append(t[0, batch.P:batch.P + lay.R].clone()))
    final = tokens[0, batch.P:batch.P + lay.R]
    states.append(final)
    text = text_of(final[:lay.R_text], tok)
    side = d.image_size // run_cfg.vq.downsample
    pic_in = ex.image
    pic_out = pics = None
    if lay.n_img:            # every step's picture, decoded once: the last is the output, all go to the strip
        codes = torch.stack([s[lay.R_text:] for s in states]) - tok.img_offset          # (S, n_img)
        pics = pictures(codes, torch.stack([s[lay.R_text:] != tok.IMASK for s in states]), vq, side)
        pic_out = pics[-1]
    elif task == "ground":
        box = RW.parse_box(text)[0]
        pic_out = np.array(pic_in)
        if box is not None:
            im = Image.fromarray(pic_out)
            ImageDraw.Draw(im).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(255, 0, 255))
            pic_out = np.asarray(im)
    print(f"[{verb}] {ex.prompt}\n-> {text or '(a picture: see the PNG)'}" + (f"\n   (forced answer: {opts['force']})" if opts["force"] else ""))
    os.makedirs(out_dir, exist_ok=True)
    top = [render_row(ex.prompt, pic_in, f"{verb} | {os.path.basename(path)} (step {blob['step']})")]
    top.append(render_row(text, pic_out, "response" + (" (answer forced)" if opts["force"] else "")))
    stack(top).save(os.path.join(out_dir, f"{verb}.png"))
    print(f"wrote {out_dir}/{verb}.png")
    if opts["show_steps"]:
        save_steps(states, pics, lay, tok, os.path.join(out_dir, f"{verb}_steps"))


def variety(cfg, opts: dict, verb: str) -> str:
    """--n pictures of one prompt (draw or edit) sampled at the image temperature with different noise,
    in one row under the input picture, each with its reward (t2i: cell accuracy; edit: rewards.edit_reward;
    the prompt's own example only, so a held-out --example): the looks a prompt does not fix, and for a
    constraint edit the different right (and wrong) edits. Returns the PNG's path."""
    task = TASKS[verb]
    path = opts["ckpt"] or common.latest_checkpoint(cfg.train.out_dir)
    out_dir = opts["out"] or os.path.join(cfg.train.out_dir, "sample")
    run_cfg, bundle, model, vq, _ = load_run(path, os.path.join(cfg.train.out_dir, "sample"), "sample")
    tok, lay, n = bundle.tok, bundle.layouts[task], opts["n"]
    if not lay.n_img:
        raise SystemExit(f"sample: --n draws several pictures; {verb} answers in text (use draw or edit)")
    ex = build_example(task, opts, bundle, run_cfg.data)
    batch, _ = canvas_batch(ex, task, bundle, vq, "")
    with torch.no_grad():
        tokens, _ = sample(model, batch.repeat(n), tok, run_cfg.diffusion, temperature=opts["temperature"],
                           generator=torch.Generator().manual_seed(cfg.train.seed))
    resp = tokens[:, batch.P:batch.P + lay.R]
    scores = None
    if ex.answer is not None:                       # a held-out example: score each picture
        scores, _, pics, _ = RW.score_rows(task, [ex] * n, resp, lay, tok, picture_judge(run_cfg, vq))
    else:
        pics = vq.decode(resp[:, lay.R_text:] - tok.img_offset)
    pics = (np.asarray(pics) * 255).round().astype(np.uint8)
    S = pics.shape[1] * SCALE
    row = Image.new("RGB", (8 + (n + 1) * (S + 8), S + 40), (255, 255, 255))
    draw = ImageDraw.Draw(row)
    if ex.image is not None:
        row.paste(Image.fromarray(ex.image).resize((S, S), Image.NEAREST), (8, 24))
        draw.text((8, 4), "input", fill=(0, 0, 0))
    for i, p in enumerate(pics):
        x = 8 + (i + 1) * (S + 8)
        row.paste(Image.fromarray(p).resize((S, S), Image.NEAREST), (x, 24))
        draw.text((x, 4), f"sample {i}" + ("" if scores is None else f": {scores[i]:.2f}"), fill=(0, 0, 0))
    head = render_row(ex.prompt, None, f"{verb} x {n} | {os.path.basename(path)}", width=(row.width - 24) // 6)
    os.makedirs(out_dir, exist_ok=True)
    dst = os.path.join(out_dir, f"{verb}_variety.png")
    stack([head, row]).save(dst)
    print(f"[{verb}] {ex.prompt}\n-> {n} pictures" + ("" if scores is None else f", rewards {[round(x, 2) for x in scores]}")
          + f"\nwrote {dst}")
    return dst


def save_steps(states: list[torch.Tensor], pics: np.ndarray | None, lay, tok, stem: str):
    """One row per denoising step (the canvas before it, and the final canvas last) as a PNG strip,
    and the same rows as an animated GIF. pics: (S, H, W, 3) the pictures of the states, or None."""
    rows = []
    for g, s in enumerate(states):
        label = f"step {g}" if g < len(states) - 1 else "final"
        masked = int((s == tok.MASK).sum() + (s == tok.IMASK).sum())
        rows.append(render_row(text_of(s[:lay.R_text], tok) if lay.R_text else "", None if pics is None else pics[g],
                               f"{label}: {masked} masked"))
    stack(rows).save(stem + ".png")
    if pics is not None:      # the picture alone, step by step, in one row: the order cells are decoded in
        film = Image.new("RGB", (len(pics) * (pics.shape[1] * 3 + 4), pics.shape[1] * 3 + 14), (255, 255, 255))
        for g, p in enumerate(pics):
            x = g * (pics.shape[1] * 3 + 4)
            film.paste(Image.fromarray(p).resize((pics.shape[1] * 3,) * 2, Image.NEAREST), (x, 12))
            ImageDraw.Draw(film).text((x, 0), str(g) if g < len(pics) - 1 else "end", fill=(0, 0, 0))
        film.save(stem + "_film.png")
    w, h = max(r.width for r in rows), max(r.height for r in rows)
    frames = [Image.new("RGB", (w, h), (255, 255, 255)) for _ in rows]
    for f, r in zip(frames, rows):
        f.paste(r, (0, 0))
    frames[0].save(stem + ".gif", save_all=True, append_images=frames[1:] + [frames[-1]] * 4, duration=250, loop=0)
    print(f"wrote {stem}.png, {stem}.gif" + (f", {stem}_film.png" if pics is not None else "") + f" ({len(states) - 1} steps)")


def assets(cfg, opts: dict):
    """The README's pictures from a finished main job (out_dir) into assets/: the sample grid and the
    run's report card (report.md, its curves when drawn), the VQ reconstructions, a denoising strip of each kind (text, picture), where the run's world has
    looks or constraint edits 8 pictures of one prompt (variety.png), and the learning curves (the
    curves need matplotlib; without it they are skipped with a note). --out=DIR writes elsewhere."""
    run_dir, dst = cfg.train.out_dir, opts["out"] or "assets"
    os.makedirs(dst, exist_ok=True)
    src = os.path.join(run_dir, "samples.png")
    if not os.path.exists(src):
        raise SystemExit(f"sample assets: {src} is missing; run `python train.py --preset={cfg.preset}` first")
    Image.open(src).save(os.path.join(dst, "samples.png"), optimize=True)
    # the run's report card beside its sample grid (its links are relative: they hold in dst too)
    for name in ("report.md", "report_curves.png"):
        if os.path.exists(os.path.join(run_dir, name)):
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(dst, name))
    # the VQ reconstructions of 16 fresh scenes (a run that found its VQ in the cache has no vq_recon.png)
    run_cfg, bundle, _, vq, _ = load_run(opts["ckpt"] or common.latest_checkpoint(run_dir),
                                                os.path.join(run_dir, "sample"), "sample assets")
    d, w = run_cfg.data, world_extras.world_for(run_cfg.data)
    rng = np.random.default_rng([d.seed, 778])
    scenes = [world.random_scene(rng, d.grid, d.min_shapes, d.max_shapes) for _ in range(16)]
    pics = np.stack([w.render(s, d.grid, d.image_size, world_extras.random_looks(rng, s, d)) for s in scenes])
    VQ.save_grid(pics, vq.decode(vq.encode(pics)), os.path.join(dst, "vq_recon.png"))
    for verb, example in (("answer", 3), ("draw", 1)):
        run(cfg, {**opts, "out": dst, "example": example, "show_steps": True}, verb)
    # what a prompt leaves open: one description drawn 8 times (greedy text: the pictures differ in
    # their looks), one constraint edit made 8 times with its plan text sampled at the rollout
    # temperature (the plans differ too; image codes at diffusion.image_temperature in both)
    edits = bundle.sets["edit"]["eval"].examples
    hard = next((i for i, e in enumerate(edits) if e.qtype in w.graders), None)
    if d.shades * d.fills * d.floors > 1 or hard is not None:
        rows = [Image.open(variety(cfg, {**opts, "out": dst, "example": ex, "n": 8, "temperature": temp}, verb))
                for verb, ex, temp in (("draw", 1, 0.0), ("edit", hard or 0, run_cfg.rl.temperature))]
        stack(rows).save(os.path.join(dst, "variety.png"), optimize=True)
        for verb in ("draw", "edit"):
            os.remove(os.path.join(dst, f"{verb}_variety.png"))
        print(f"wrote {dst}/variety.png")
    else:       # one look per cell content, one right picture per edit: 8 draws would be 8 copies
        print("sample assets: no variety.png: this run's pictures have no looks and its edits one right picture "
              "(the looks world has both: METHOD.md §8)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sample assets: no matplotlib, no curves (pip install matplotlib)")
        return
    hist = json.load(open(os.path.join(run_dir, "sft_curve.json")))
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for key, label in (("vqa_acc", "vqa accuracy"), ("ground_miou", "grounding mIoU"), ("edit_score", "edit score"),
                       ("t2i_shape_acc", "t2i shape accuracy")):
        ax.plot([h["step"] for h in hist], [h[key] for h in hist], marker=".", label=label)
    ax.set_xlabel("SFT step")
    ax.set_ylabel(f"quick eval ({cfg.eval.curve_split} split)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(dst, "sft_curve.png"), dpi=110)
    print(f"wrote {dst}/sft_curve.png")


def main(argv: list[str]):
    verb = argv[0] if argv else ""
    usage = (f"usage: python sample.py {{{'|'.join(TASKS)}|assets}} [--image=PNG] [--prompt=TEXT] "
             f"[--example=N] [--force=ANSWER] [--show_steps] [--ckpt=PATH] [--out=DIR] [--section.key=value ...]")
    if verb in ("-h", "--help"):
        print(usage + "\n" + (__doc__ or "").strip())
        raise SystemExit(0)
    if verb not in (*TASKS, "assets"):
        raise SystemExit(usage)
    cfg, opts = C.get_config(argv[1:], extra={"ckpt": "", "out": "", "image": "", "prompt": "", "example": -1,
                                              "force": "", "show_steps": False, "temperature": 0.0, "n": 1})
    torch.set_num_threads(1)
    if opts["n"] < 1:
        raise SystemExit(f"sample: --n={opts['n']}: the number of pictures to draw, >= 1")
    if verb == "assets":
        assets(cfg, opts)
    elif opts["n"] > 1:
        variety(cfg, opts, verb)
    else:
        run(cfg, opts, verb)


if __name__ == "__main__":
    common.run_main(main, sys.argv[1:])
