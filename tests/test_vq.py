"""
Tests of vq.py: the tokenizer contract (shapes, dtypes, code ranges, unified-vocabulary offsets),
the quantiser's math (nearest code vs. a brute-force argmin, straight-through gradients, EMA and
dead-code restarts), checkpoint round trips and their one-line errors. CPU, tiny models, seconds;
test_toy_tokenizer_is_exact_on_every_look (slow tier) trains the toy VQ in full: 30-60 s.

    python -m pytest tests/test_vq.py -q
"""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokens as T  # noqa: E402
import vq  # noqa: E402
import world as W  # noqa: E402
import world_extras as WX  # noqa: E402
from config import VQConfig  # noqa: E402

S, GRID = 32, 4   # toy picture size and board: 16 tokens per image at downsample 8


def tiny_cfg(**kw):
    base = dict(codebook_size=16, code_dim=8, hidden=16, downsample=8, batch_size=16, lr=2e-3,
                steps=20, time_budget_s=0.0, beta=0.25, ema_decay=0.9, dead_threshold=0.5, n_images=64)
    base.update(kw)
    return VQConfig(**base)


def pictures(n, seed=0):
    scenes = [W.random_scene(np.random.default_rng([seed, i]), GRID, 3, 7) for i in range(n)]
    return scenes, np.stack([W.render(s, GRID, S) for s in scenes])     # (n, S, S, 3) uint8


def tiny_model(**kw):
    torch.manual_seed(0)
    return vq.VQVAE(tiny_cfg(**kw), S)


# ----------------------------------------------------------------------------------------------
# the tokenizer contract

def test_encode_shape_dtype_range():
    m = tiny_model()
    _, imgs = pictures(10)
    codes = m.encode(imgs, batch_size=4)                       # odd batching: 4 + 4 + 2
    assert m.tokens_per_image == (S // 8) ** 2 == 16
    assert codes.shape == (10, 16) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < m.quantizer.K
    # the same pictures as a float tensor in [0, 1] give the same codes
    same = m.encode(torch.as_tensor(imgs).float() / 255.0)
    assert torch.equal(codes, same)


def test_encode_rejects_channels_first():
    m = tiny_model()
    with pytest.raises(ValueError, match="expects images"):
        m.encode(np.zeros((2, 3, S, S), dtype=np.uint8))


def test_decode_every_code_shape_and_range():
    m = tiny_model()
    K = m.quantizer.K
    codes = torch.arange(K).repeat(2)[: 2 * 16].reshape(2, 16)   # every code id appears
    imgs = m.decode(codes)
    assert imgs.shape == (2, S, S, 3) and imgs.dtype == torch.float32
    assert imgs.min() >= 0 and imgs.max() <= 1
    with pytest.raises(ValueError, match=r"\[0, 16\)"):        # vocabulary ids, not codes
        m.decode(codes + 100)


def test_codes_fit_the_unified_vocabulary():
    m = tiny_model()
    tok = T.Tokenizer.fit(["a b"], n_codes=m.quantizer.K)
    _, imgs = pictures(8)
    ids = tok.img_offset + m.encode(imgs)
    assert (ids >= tok.img_offset).all() and (ids < tok.vocab_size).all()
    # and back: vocabulary ids minus the offset decode
    assert m.decode(ids - tok.img_offset).shape == (8, S, S, 3)


# ----------------------------------------------------------------------------------------------
# the quantiser's math

def test_nearest_matches_brute_force():
    torch.manual_seed(1)
    q = vq.Quantizer(K=16, D=8, decay=0.9, dead_threshold=0.5)
    z = torch.randn(200, 8)
    # brute force: every (vector, code) squared distance, explicitly
    d = ((z[:, None, :] - q.codebook[None, :, :]) ** 2).sum(-1)      # (200, 16)
    assert torch.equal(q.nearest(z), d.argmin(1))


def test_encode_uses_nearest_code_of_encoder_output():
    m = tiny_model()
    _, imgs = pictures(4)
    x = torch.as_tensor(imgs).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        z = m.encoder(x).permute(0, 2, 3, 1).reshape(-1, 8)         # (4*16, D), row-major cells
    d = ((z[:, None, :] - m.quantizer.codebook[None]) ** 2).sum(-1)
    assert torch.equal(m.encode(imgs).flatten(), d.argmin(1))


def test_straight_through_reaches_the_encoder():
    m = tiny_model()
    m.train()
    _, imgs = pictures(4)
    x = torch.as_tensor(imgs).permute(0, 3, 1, 2).float() / 255.0
    x_hat, codes, commit = m(x)
    F.mse_loss(x_hat, x).backward()                    # reconstruction only: no commitment term
    g = m.encoder[0].weight.grad
    assert g is not None and g.abs().sum() > 0
    # the codebook is a buffer (EMA-updated), never a parameter the optimizer could move
    assert not any(p is m.quantizer.codebook for p in m.parameters())


def test_ema_update_matches_the_formula():
    torch.manual_seed(2)
    K, D, decay, eps = 8, 4, 0.9, 1e-5
    q = vq.Quantizer(K=K, D=D, decay=decay, dead_threshold=0.0, eps=eps)
    q.train()
    q.initted.fill_(True)                                           # skip the data init
    q.cluster_size.fill_(2.0)
    q.embed_sum.copy_(q.codebook * 2.0)
    N0, m0 = q.cluster_size.clone(), q.embed_sum.clone()
    z = torch.randn(2, D, 4, 4)                                     # (N, D, h, w): 32 vectors
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    k = q.nearest(flat)                                             # assignments before the update
    _, codes, _ = q(z)
    assert torch.equal(codes.flatten(), k)
    n = torch.stack([(k == j).sum() for j in range(K)]).float()     # picks per code, by hand
    s = torch.stack([flat[k == j].sum(0) for j in range(K)])        # (K, D) sums, by hand
    N = decay * N0 + (1 - decay) * n
    m = decay * m0 + (1 - decay) * s
    Ns = (N + eps) / (N.sum() + K * eps) * N.sum()
    assert torch.allclose(q.codebook, m / Ns[:, None], atol=1e-6)


def test_data_init_and_dead_code_restart():
    torch.manual_seed(3)
    q = vq.Quantizer(K=8, D=4, decay=0.9, dead_threshold=0.5)
    z = torch.randn(2, 4, 4, 4)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    # exact distances (torch.cdist's matmul shortcut is only accurate to ~1e-3)
    on_data = lambda e: ((e[:, None] - flat[None]) ** 2).sum(-1).min(1).values < 1e-10  # noqa: E731
    q._init_from(flat)
    assert on_data(q.codebook).all()                                # every code starts on a z
    # kill code 3 (far away, EMA count 0): the next training step moves it onto a z of the batch
    q.train()
    q.codebook[3] = 100.0
    q.embed_sum[3] = 100.0
    q.cluster_size[3] = 0.0
    q(z)
    assert on_data(q.codebook[3:4]).all() and q.cluster_size[3] == 1.0
    # eval mode never touches the codebook
    q.eval()
    before = q.codebook.clone()
    q(torch.randn(2, 4, 4, 4))
    assert torch.equal(before, q.codebook)


# ----------------------------------------------------------------------------------------------
# training, evaluation, checkpoints

def test_brief_training_and_evaluation(tmp_path):
    torch.manual_seed(0)
    scenes, imgs = pictures(64)
    v = tiny_cfg(steps=15)
    model, stats = vq.train_vq(v, imgs, torch.device("cpu"), seed=0)
    assert stats["steps"] == 15 and 0 < stats["codes_used"] <= 16 and stats["recon_mse"] < 0.1
    ev = vq.evaluate_vq(model, imgs[:8], scenes[:8], GRID)
    for k in ("recon_mse", "codes_used", "perplexity", "cell_acc", "image_acc"):
        assert k in ev
    assert 0 <= ev["cell_acc"] <= 1 and 0 <= ev["image_acc"] <= 1
    path = tmp_path / "grid.png"
    vq.save_grid(imgs[:4], model.decode(model.encode(imgs[:4])), str(path))
    assert path.exists() and path.stat().st_size > 0


def test_save_load_round_trip_and_errors(tmp_path):
    m = tiny_model()
    m.train()
    _, imgs = pictures(8)
    m(torch.as_tensor(imgs).permute(0, 3, 1, 2).float() / 255.0)   # moves the EMA codebook
    path = str(tmp_path / "vq.pt")
    vq.save_vq(m, path, m.vcfg, S)
    assert not os.path.exists(path + ".tmp")                        # atomic write cleaned up
    m2 = vq.load_vq(path, tiny_cfg(), S, "cpu")
    assert torch.equal(m.encode(imgs), m2.encode(imgs))
    assert torch.equal(m.decode(m.encode(imgs)), m2.decode(m2.encode(imgs)))
    # a different config is a one-line error naming the field and the fix
    with pytest.raises(vq.VQCheckpointError, match="codebook_size=16.*--vq.codebook_size=16") as e:
        vq.load_vq(path, tiny_cfg(codebook_size=32), S, "cpu")
    assert "\n" not in str(e.value) and "delete" in str(e.value)
    with pytest.raises(vq.VQCheckpointError, match="image_size"):
        vq.load_vq(path, tiny_cfg(), 64, "cpu")
    with pytest.raises(vq.VQCheckpointError, match="no VQ checkpoint"):
        vq.load_vq(str(tmp_path / "missing.pt"), tiny_cfg(), S, "cpu")


# ----------------------------------------------------------------------------------------------
# the toy tokenizer on pictures with looks

def every_look_pictures():
    """Pictures holding every scored content in every look (shade x fill) and every empty floor, each
    in an inner and a corner cell, beside random neighbours: (pictures (n, 32, 32, 3), scenes,
    (cell, content, look) per picture)."""
    rng = np.random.default_rng(1)
    d = SimpleNamespace(shades=3, fills=4, floors=6)
    shapes = [W.Shape(k, c, z) for k in W.KINDS for c in W.COLOURS for z in W.SIZES]
    items = [(sh, s * WX.FILLS_MAX + f) for sh in shapes for s in range(3) for f in range(4)]
    items += [(None, f) for f in range(6)]
    pics, scenes, what = [], [], []
    for sh, lk in items:
        for cell in (5, 12):
            scene = list(W.random_scene(rng, GRID, 3, 7))
            scene[cell] = sh
            looks = list(WX.random_looks(rng, tuple(scene), d))
            looks[cell] = lk
            pics.append(WX.Looks().render(tuple(scene), GRID, S, tuple(looks)))
            scenes.append(tuple(scene))
            what.append((cell, sh, lk))
    return np.stack(pics), scenes, what


@pytest.mark.slow          # trains the toy VQ for its full step count: 30-60 s on one CPU thread
def test_toy_tokenizer_is_exact_on_every_look():
    """The toy VQ of the looks world (512 codes, trained as its main job trains it) reconstructs every
    scored attribute exactly under every look: read_scene of the decoded picture is the scene, for
    every content x shade x fill and every floor. And the looks are really encoded (the entropy of
    text-to-image is in the codes, not thrown away): nearly every (content, look) gets a code of its
    own. About 30-60 s on one CPU thread."""
    import config
    cfg = config.make_config("toy", {"data.shades": 3, "data.fills": 4, "data.floors": 6, "vq.codebook_size": 512})
    _, train = vq._render_fresh(cfg, 777, cfg.vq.n_images)
    model, _ = vq.train_vq(cfg.vq, train, torch.device("cpu"), seed=0)
    pics, scenes, what = every_look_pictures()
    codes = model.encode(pics)
    recon = model.decode(codes).numpy()
    for img, scene, (cell, sh, lk) in zip(recon, scenes, what):
        assert W.read_scene(img, GRID) == scene, (cell, sh, lk)
    own = {}
    for c, (cell, sh, lk) in zip(codes.tolist(), what):
        own.setdefault((sh, lk), set()).add(c[cell])
    assert all(len(v) == 1 for v in own.values())           # a cell's code depends on its own patch only
    distinct = len({next(iter(v)) for v in own.values()})
    assert distinct >= 0.97 * len(own), f"{distinct} codes for {len(own)} (content, look) pairs"
