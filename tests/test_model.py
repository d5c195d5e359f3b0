"""
Tests of model.py: shapes, bidirectionality, PAD and prefix-DLM masking, the prefix KV cache, a
hand-written reference forward pass, the init scales and parameter counts. CPU, tiny configs, seconds.

    python -m pytest tests/test_model.py -q
"""
import math

import pytest
import torch

from config import ModelConfig  # noqa: E402
from model import Transformer, mlp_hidden  # noqa: E402

V = 37  # odd vocab size: catches any accidental V == d_model coincidence


def tiny(**kw):
    base = dict(n_layer=2, n_head=2, d_model=32, mlp_hidden=0, prefix_dlm=False, max_len=64, dropout=0.0,
                abs_pos=False)
    base.update(kw)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**base), V)
    # bigger weights than the init's: makes every interaction visible far above float noise. The
    # residual stream then has RMS ~9 and there is no final norm, so the head is scaled by 1/50 to
    # keep the logits of size ~1 (std ~0.3): the absolute float tolerances below assume that
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
        m.head.weight.mul_(1 / 50)
    return m.eval()


def rand_ids(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def test_shape_and_finite():
    m = tiny()
    x = rand_ids(3, 10)
    out = m(x)
    assert out.shape == (3, 10, V)
    assert torch.isfinite(out).all()
    # with a mask that leaves PAD rows with only themselves: still finite (no all--inf rows)
    valid = torch.zeros(3, 10, dtype=torch.bool)
    valid[:, :4] = True
    assert torch.isfinite(m(x, valid)).all()


def test_bidirectional():
    m = tiny()
    x = rand_ids(2, 9)
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % V
    with torch.no_grad():
        d = (m(x)[:, 0] - m(y)[:, 0]).abs().max()
    assert d > 1e-3, "position 0 must see the last token (non-causal attention)"


@pytest.mark.parametrize("prefix", [False, True])
def test_pad_invariance(prefix):
    m = tiny(prefix_dlm=prefix)
    B, T, extra = 2, 8, 5
    x = rand_ids(B, T)
    is_prompt = torch.zeros(B, T, dtype=torch.bool)
    is_prompt[:, :3] = True
    with torch.no_grad():
        ref = m(x, torch.ones(B, T, dtype=torch.bool), is_prompt)
        # right-pad with arbitrary ids marked invalid: the real positions must not notice
        xp = torch.cat([x, rand_ids(B, extra, seed=7)], 1)
        vp = torch.cat([torch.ones(B, T), torch.zeros(B, extra)], 1).bool()
        ip = torch.cat([is_prompt, torch.zeros(B, extra, dtype=torch.bool)], 1)
        out = m(xp, vp, ip)
        assert torch.allclose(out[:, :T], ref, atol=1e-5)
        # left-pad too: RoPE scores depend only on position differences, so shifting every real
        # token by `extra` positions leaves them unchanged up to float error
        xl = torch.cat([rand_ids(B, extra, seed=8), x], 1)
        vl = torch.cat([torch.zeros(B, extra), torch.ones(B, T)], 1).bool()
        il = torch.cat([torch.ones(B, extra, dtype=torch.bool), is_prompt], 1)
        out = m(xl, vl, il)
        assert torch.allclose(out[:, extra:], ref, atol=1e-4)


def test_prefix_dlm_prompt_blind_to_response():
    P, T = 4, 10
    x = rand_ids(2, T)
    y = x.clone()
    y[:, P:] = (y[:, P:] + 3) % V
    is_prompt = torch.zeros(2, T, dtype=torch.bool)
    is_prompt[:, :P] = True
    with torch.no_grad():
        m = tiny(prefix_dlm=True)
        a, b = m(x, None, is_prompt), m(y, None, is_prompt)
        assert torch.allclose(a[:, :P], b[:, :P], atol=1e-6)        # prompt: blind to response
        assert (a[:, P:] - b[:, P:]).abs().max() > 1e-3             # response: obviously changed
        m = tiny(prefix_dlm=False)                                  # same weights, full attention
        a, b = m(x, None, is_prompt), m(y, None, is_prompt)        # is_prompt ignored
        assert (a[:, :P] - b[:, :P]).abs().max() > 1e-3


def test_cache_equivalence():
    m = tiny(prefix_dlm=True)
    B, P, R = 3, 6, 7
    prompt, resp = rand_ids(B, P, seed=2), rand_ids(B, R, seed=3)
    vp = torch.ones(B, P, dtype=torch.bool)
    vp[0, :2] = False        # left-padded prompt
    vp[1, 3] = False         # a hole inside the prompt
    vr = torch.ones(B, R, dtype=torch.bool)
    vr[2, -2:] = False       # right-padded response
    full = torch.cat([prompt, resp], 1)
    valid = torch.cat([vp, vr], 1)
    is_prompt = torch.cat([torch.ones(B, P), torch.zeros(B, R)], 1).bool()
    with torch.no_grad():
        ref = m(full, valid, is_prompt)[:, P:]
        cache = m.encode_prefix(prompt, vp)
        out = m.forward_cached(resp, cache, vr)
        assert out.shape == (B, R, V)
        assert torch.allclose(out, ref, atol=1e-5)
        # the cache is reusable: a second, different response against the same cache
        resp2 = rand_ids(B, R, seed=4)
        ref2 = m(torch.cat([prompt, resp2], 1), valid, is_prompt)[:, P:]
        assert torch.allclose(m.forward_cached(resp2, cache, vr), ref2, atol=1e-5)
    # without prefix-DLM the cache is meaningless: a clear error
    with pytest.raises(RuntimeError, match="prefix_dlm"):
        tiny(prefix_dlm=False).encode_prefix(prompt)


def reference_forward(m, idx, valid, is_prompt):
    """A 1-layer forward written from scratch with the model's weights: loops for the mask, complex
    numbers for RoPE, explicit softmax with -inf. Independent of model.py's code paths."""
    cfg = m.cfg
    B, T = idx.shape
    C, nh = cfg.d_model, cfg.n_head
    hs = C // nh
    blk = m.blocks[0]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w

    def rope(t):  # t: (B, nh, T, hs); pair dim i with dim i + hs/2, rotate by pos * base^(-2i/hs)
        z = torch.complex(t[..., :hs // 2], t[..., hs // 2:])
        freq = cfg.rope_base ** (-torch.arange(hs // 2, dtype=torch.float64) * 2 / hs)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None, :]
        z = z * torch.polar(torch.ones_like(ang), ang).to(z.dtype)
        return torch.cat([z.real, z.imag], -1)

    x = m.tok_emb.weight[idx]                                       # (B, T, C)
    h = rms(x, blk.norm1.weight)
    Wq, Wk, Wv = blk.attn.qkv.weight.split(C, 0)
    q = (h @ Wq.T).view(B, T, nh, hs).transpose(1, 2)               # (B, nh, T, hs)
    k = (h @ Wk.T).view(B, T, nh, hs).transpose(1, 2)
    v = (h @ Wv.T).view(B, T, nh, hs).transpose(1, 2)
    q, k = rope(q), rope(k)
    bias = torch.full((B, T, T), float("-inf"))
    for b in range(B):
        for i in range(T):
            for j in range(T):
                ok = bool(valid[b, j])
                if cfg.prefix_dlm and is_prompt[b, i] and not is_prompt[b, j]:
                    ok = False
                if ok or i == j:
                    bias[b, i, j] = 0.0
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hs) + bias[:, None], -1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C) @ blk.attn.proj.weight.T
    x = x + y
    h = rms(x, blk.norm2.weight)
    g = h @ blk.mlp.gate.weight.T
    x = x + (g * torch.sigmoid(g) * (h @ blk.mlp.up.weight.T)) @ blk.mlp.down.weight.T
    return x @ m.head.weight.T                                      # no final norm, untied head


@pytest.mark.parametrize("prefix", [False, True])
def test_matches_reference(prefix):
    m = tiny(n_layer=1, prefix_dlm=prefix)
    B, T = 2, 7
    idx = rand_ids(B, T, seed=5)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, 1] = False
    valid[1, -2:] = False
    is_prompt = torch.zeros(B, T, dtype=torch.bool)
    is_prompt[0, :3] = True
    is_prompt[1, :4] = True
    with torch.no_grad():
        out = m(idx, valid, is_prompt)
        ref = reference_forward(m, idx, valid, is_prompt)
    # compare everywhere, PAD rows included (they attend to themselves only, in both)
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


def test_param_count():
    m = tiny()
    assert m.head.weight is not m.tok_emb.weight                    # untied head
    # hand count for d=32, L=2, hidden = ceil(8*32/3)=86 -> 96 (next multiple of 32)
    d, L, h = 32, 2, 96
    assert mlp_hidden(m.cfg) == h
    body = L * (3 * d * d + d * d + 3 * d * h + 2 * d)             # qkv, proj, swiglu, 2 norms; no final norm
    assert m.num_params() == body > 0
    assert m.num_params(non_embedding=False) == body + 2 * V * d    # + embedding + head
    T = 16
    assert m.flops_per_token(T) == 6 * (body + V * d) + 12 * L * d * T
    assert tiny(mlp_hidden=40).num_params() == L * (4 * d * d + 3 * d * 40 + 2 * d)


def test_init_scales():
    """The fan-in rule, checked against the numbers it promises (model.init_weights): wide enough
    matrices that the sample std is within a few percent of the target."""
    d, L = 256, 3
    torch.manual_seed(0)
    m = Transformer(ModelConfig(n_layer=L, n_head=4, d_model=d, abs_pos=True, max_len=300), 300)
    h = mlp_hidden(m.cfg)
    want = {"tok_emb.weight": 1.0, "pos_emb.weight": 1.0, "head.weight": d ** -0.5,
            "blocks.0.attn.qkv.weight": d ** -0.5, "blocks.0.mlp.gate.weight": d ** -0.5,
            "blocks.0.attn.proj.weight": d ** -0.5 / math.sqrt(2 * L),
            "blocks.0.mlp.down.weight": h ** -0.5 / math.sqrt(2 * L)}
    got = dict(m.named_parameters())
    for name, std in want.items():
        assert abs(got[name].std().item() / std - 1) < 0.05, (name, got[name].std().item(), std)
    assert torch.equal(got["blocks.0.norm1.weight"], torch.ones(d))


def test_max_len_error():
    m = tiny(max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        m(rand_ids(1, 9))


def test_abs_pos_table():
    """Learned absolute positions: the cached path still equals the full forward (the response is
    embedded at positions P..P+R-1), right-padding still changes nothing, the table is excluded
    from the non-embedding count, and (unlike RoPE alone) shifting a sequence changes its logits."""
    m = tiny(abs_pos=True, prefix_dlm=True)
    B, P, R = 2, 5, 4
    idx = rand_ids(B, P + R)
    valid = torch.ones(B, P + R, dtype=torch.bool)
    is_prompt = torch.zeros(B, P + R, dtype=torch.bool)
    is_prompt[:, :P] = True
    full = m(idx, valid, is_prompt)[:, P:]
    cached = m.forward_cached(idx[:, P:], m.encode_prefix(idx[:, :P], valid[:, :P]))
    assert torch.allclose(full, cached, atol=1e-5)
    padded = torch.cat([idx, torch.zeros(B, 3, dtype=torch.long)], 1)
    pvalid = torch.cat([valid, torch.zeros(B, 3, dtype=torch.bool)], 1)
    pprompt = torch.cat([is_prompt, torch.zeros(B, 3, dtype=torch.bool)], 1)
    assert torch.allclose(m(padded, pvalid, pprompt)[:, :P + R], m(idx, valid, is_prompt), atol=1e-5)
    body = sum(p.numel() for n, p in m.named_parameters() if n.startswith("blocks"))
    assert m.num_params(True) == body
    left = torch.cat([torch.zeros(B, 2, dtype=torch.long), idx], 1)
    lvalid = torch.cat([torch.zeros(B, 2, dtype=torch.bool), valid], 1)
    assert not torch.allclose(m(left, lvalid)[:, 2:], m(idx, valid), atol=1e-3)
