"""
Tests of diffusion.py: the forward (masking) process, the SFT loss, and the sampler (count schedule,
fixed tokens, no re-masking, semi-AR blocks, vocabulary constraints, the reveal order and tree-search
state rebuilding, known-logit picks and sampling frequencies, classifier-free guidance, and the
prefix KV cache). Every expectation is computed independently: by hand with `math`, by brute force
counting, or from mock models whose logits are chosen by the test. CPU, tiny sizes, a few seconds.

    python -m pytest tests/test_diffusion.py -q
"""
import math

import pytest
import torch
import torch.nn as nn

import diffusion as D  # noqa: E402
from bench import n_steps  # noqa: E402   (studies/bench.py: the plan's length)
from config import DiffusionConfig, ModelConfig  # noqa: E402
from tokens import Layout, make_batch  # noqa: E402
from model import Transformer  # noqa: E402


from tiny_vocab import EOS, IMASK, MASK, PAD, TOK, V, WA, WB, WC, WD, code, mixed_batch  # noqa: E402
# ids a text slot must never take, written out by hand (not via diffusion.vocab_masks)
TEXT_FORBIDDEN = {PAD, MASK, IMASK, TOK.UNK, TOK.BOI, TOK.EOI, *TOK.TASK.values()}
N_SIGMA = 4.0   # binomial tolerance: a 4-sigma deviation has two-sided probability ~6e-5


def ce_by_hand(logits_row, target: int) -> float:
    """-log softmax(logits_row)[target] with plain math (log-sum-exp)."""
    xs = [float(x) for x in logits_row]
    mx = max(xs)
    return mx + math.log(sum(math.exp(x - mx) for x in xs)) - xs[target]


def binom_tol(n: int, p: float) -> float:
    """N_SIGMA standard errors of a Binomial(n, p) count."""
    return N_SIGMA * math.sqrt(n * p * (1 - p))


# ----------------------------------------------------------------------------------------------
# mock models: forward(idx, valid, is_prompt) -> logits (B, T, V)

class FixedLogits(nn.Module):
    """Returns logits chosen by the test, (T, V) for every row or (B, T, V) per row, whatever the
    input; records every input it sees."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.L, self.cfg, self.calls = logits, None, []

    def forward(self, idx, valid=None, is_prompt=None):
        self.calls.append(idx.clone())
        L = self.L if self.L.dim() == 3 else self.L.expand(idx.shape[0], -1, -1)
        return L.clone()


class Adversarial(nn.Module):
    """A deterministic, context-dependent model (a tiny random Transformer) plus a large bonus on every
    id the slot must NOT take (specials/codes at text columns, words/specials at image columns), so
    any leak of the sampler's vocabulary constraint shows up as a forbidden token."""

    def __init__(self, T: int, text_cols, img_cols, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=32, max_len=64), V).eval()
        with torch.no_grad():
            for p in self.net.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.3)
        bias = torch.zeros(T, V)
        for c in text_cols:
            for i in TEXT_FORBIDDEN | set(range(TOK.img_offset, V)):
                bias[c, i] = 8.0
        for c in img_cols:
            bias[c, :TOK.img_offset] = 8.0
        self.bias, self.cfg = bias, None

    def forward(self, idx, valid=None, is_prompt=None):
        return self.net(idx, valid, is_prompt) + self.bias


# ----------------------------------------------------------------------------------------------
# batches

# sampler canvas: edit layout, 12 text + 7 image slots; row 0 has a fixed answer block at the end of
# its text region (answer-forcing) and one fixed image code; row 1 is all-mask
R_TEXT, N_IMG = 12, 7
SAMPLER_CFG = dict(block_len=5, tokens_per_step=2, image_steps=4, temperature=0.0, image_temperature=0.0,
                   cfg_scale=0.0)


def canvas_batch():
    prompts = torch.tensor([[TOK.TASK["edit"], TOK.BOI, code(3), code(5), TOK.EOI, WA, WB],
                            [TOK.TASK["edit"], TOK.BOI, code(1), code(2), TOK.EOI, WC, PAD]])
    row0 = [MASK] * 9 + [TOK.ANS, WD, TOK.EANS] + [IMASK] * 3 + [code(4)] + [IMASK] * 3
    row1 = [MASK] * 12 + [IMASK] * 7
    lay = Layout(R_TEXT, N_IMG, 3)
    return make_batch(prompts, torch.tensor([row0, row1]), [lay, lay], ["edit", "edit"], TOK)


def linear_shares(m: int, S: int) -> list[int]:
    """LLaDA: m tokens over S steps, equal shares, the remainder one each to the earliest steps."""
    return [m // S + (1 if i < m % S else 0) for i in range(S)]


def cosine_shares(m: int, S: int) -> list[int]:
    """MaskGIT's schedule as its reference code writes it: before the last step, the number still
    masked is floor(m cos(pi/2 (j+1)/S)), clamped to keep at least one masked and to reveal at least
    one (max(1, min(unknown - 1, that))); none after the last step."""
    unknown, out = m, []
    for j in range(S):
        if j == S - 1:
            keep = 0
        else:
            keep = max(min(1, m), min(unknown - 1, math.floor(m * math.cos(math.pi / 2 * (j + 1) / S))))
        out.append(unknown - keep)
        unknown = keep
    return out


def test_every_image_step_reveals_something():
    """16 tokens in 16 steps (the toy), 64 in 32 and 256 in 64: no step of the image schedule is
    empty, and the counts add up (the bare cosine left e.g. [1, 0, 0, 1, ...] at 16 / 16)."""
    for m, S in ((16, 16), (64, 32), (256, 64)):
        shares = cosine_shares(m, S)
        assert sum(shares) == m and min(shares) >= 1, (m, S, shares)
        steps = [D.PlanStep(0, m, j, S, True) for j in range(S)]
        cum = [int(s.cum_target(torch.tensor([m]))) for s in steps]
        assert [b - a for a, b in zip([0] + cum, cum)] == shares


def expected_counts(resp_row: list[int], R_text: int, n_img: int, block_len: int, tps: int,
                    image_steps: int) -> list[int]:
    """Per global step, how many slots of this row the sampler must reveal."""
    out = []
    for lo in range(0, R_text, block_len):
        hi = min(lo + block_len, R_text)
        m = sum(1 for k in range(lo, hi) if resp_row[k] == MASK)
        out += linear_shares(m, math.ceil((hi - lo) / tps))
    if n_img:
        m = sum(1 for k in range(R_text, R_text + n_img) if resp_row[k] == IMASK)
        out += cosine_shares(m, min(image_steps, n_img))
    return out


def run_recorded(model, batch, dcfg, **kw):
    states = {}
    final, order = D.sample(model, batch, TOK, dcfg, on_step=lambda g, x: states.__setitem__(g, x.clone()),
                            **kw)
    return final, order, states


# ----------------------------------------------------------------------------------------------
# 1. forward process

def test_draw_mask_rate_is_t_and_never_touches_prompt_or_pad():
    batch = mixed_batch()
    N = 4000
    big = batch.repeat(N)                       # rows 0..N-1 copies of row 0, then row 1, then row 2
    t = torch.tensor([0.1, 0.5, 0.9])
    g = torch.Generator().manual_seed(0)
    mask = D.draw_mask(big, t.repeat_interleave(N), g)
    assert not (mask & ~big.is_resp).any(), "masked a prompt or PAD position"
    assert not (mask & (big.tokens == PAD)).any()
    assert not (mask & big.is_prompt).any()
    per_row = mask.view(3, N, -1)
    n_resp = batch.is_resp.sum(1)               # 8, 4, 8 response slots
    assert n_resp.tolist() == [8, 4, 8]
    for b in range(3):
        p = float(t[b])
        n = N * int(n_resp[b])
        k = int(per_row[b].sum())
        assert abs(k - n * p) <= binom_tol(n, p), (b, k, n * p)
        # every response position individually, too (no position is skipped or favoured)
        cols = batch.is_resp[b].nonzero().flatten()
        for c in cols.tolist():
            kc = int(per_row[b, :, c].sum())
            assert abs(kc - N * p) <= binom_tol(N, p), (b, c, kc, N * p)
    # the two ends of the rate: t = 0 masks nothing, t = 1 masks exactly the response
    assert not D.draw_mask(batch, torch.zeros(3), g).any()
    assert torch.equal(D.draw_mask(batch, torch.ones(3), g), batch.is_resp)


def test_sample_t_is_uniform_on_eps_1():
    eps, n = 0.05, 20000
    t = D.sample_t(n, eps, "cpu", torch.Generator().manual_seed(1))
    assert float(t.min()) >= eps and float(t.max()) < 1.0
    mean, sd = (1 + eps) / 2, (1 - eps) / math.sqrt(12)      # U(eps, 1)
    assert abs(float(t.mean()) - mean) <= N_SIGMA * sd / math.sqrt(n)
    frac_low = float((t < (1 + eps) / 4 + eps / 2).float().mean())   # P(t < eps + (1-eps)/4) = 1/4
    assert abs(frac_low - 0.25) <= N_SIGMA * math.sqrt(0.25 * 0.75 / n)


def test_apply_mask_uses_imask_on_image_slots_and_mask_on_text_slots():
    batch = mixed_batch()
    P = batch.P
    full = D.apply_mask(batch.tokens, batch.is_resp, batch.is_image, TOK)
    expected = torch.tensor([
        [TOK.TASK["edit"], WA, WB, PAD] + [MASK] * 5 + [IMASK] * 3,
        [TOK.TASK["vqa"], WC, PAD, PAD] + [MASK] * 4 + [PAD] * 4,
        [TOK.TASK["edit"], WD, WA, WB] + [MASK] * 5 + [IMASK] * 3])
    assert torch.equal(full, expected)
    # a partial mask touches only its own positions
    part = torch.zeros_like(batch.is_resp)
    part[0, P + 1] = part[0, P + 6] = part[2, P + 4] = True
    out = D.apply_mask(batch.tokens, part, batch.is_image, TOK)
    exp = batch.tokens.clone()
    exp[0, P + 1], exp[0, P + 6], exp[2, P + 4] = MASK, IMASK, MASK
    assert torch.equal(out, exp)


# ----------------------------------------------------------------------------------------------
# 2. the loss ignores unmasked positions

@pytest.mark.parametrize("weighting", ["mean", "elbo"])
def test_masked_ce_ignores_unmasked_logits(weighting):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, V, generator=g)
    targets = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.tensor([[True, False, True, False, False], [False, True, False, False, True]])
    t_row, n_resp = torch.tensor([0.3, 0.7]), torch.tensor([4, 5])
    base = D.masked_ce(logits, targets, mask, t_row, weighting, n_resp)
    wild = logits.clone()
    wild[~mask] = 1e3 * torch.randn(int((~mask).sum()), V, generator=g)   # arbitrary, huge
    assert D.masked_ce(wild, targets, mask, t_row, weighting, n_resp).item() == base.item()
    # a masked position's logits do matter: lowering its target logit raises the loss
    worse = logits.clone()
    worse[1, 4, targets[1, 4]] -= 5.0
    assert D.masked_ce(worse, targets, mask, t_row, weighting, n_resp).item() > base.item() + 1e-3
    # and no gradient flows to unmasked positions
    lg = logits.clone().requires_grad_(True)
    D.masked_ce(lg, targets, mask, t_row, weighting, n_resp).backward()
    assert torch.count_nonzero(lg.grad[~mask]) == 0
    assert (lg.grad[mask].abs().sum(-1) > 0).all()


# ----------------------------------------------------------------------------------------------
# 3. the loss value by hand, and the complementary masks

def test_masked_ce_matches_hand_computation():
    L = [[[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [1.0, 3.0, 0.0]],
         [[0.0, 0.0, 0.0], [-1.0, 2.0, 0.5], [4.0, 4.0, 4.0]]]
    targets = [[0, 2, 1], [1, 0, 2]]
    mask = [[True, False, True], [False, True, False]]
    t, n_resp = [0.5, 0.25], [3, 2]
    ce00 = math.log(math.exp(2) + 1 + math.exp(-1)) - 2          # row 0, position 0, target 0
    ce02 = math.log(math.e + math.exp(3) + 1) - 3                # row 0, position 2, target 1
    ce11 = math.log(math.exp(-1) + math.exp(2) + math.exp(0.5)) + 1   # row 1, position 1, target 0
    elbo = ((ce00 + ce02) / 0.5 / 3 + ce11 / 0.25 / 2) / 2
    mean = (ce00 + ce02 + ce11) / 3
    args = (torch.tensor(L), torch.tensor(targets), torch.tensor(mask), torch.tensor(t))
    assert math.isclose(D.masked_ce(*args, "elbo", torch.tensor(n_resp)).item(), elbo, rel_tol=1e-6)
    assert math.isclose(D.masked_ce(*args, "mean", torch.tensor(n_resp)).item(), mean, rel_tol=1e-6)


def _sft_setup():
    batch = mixed_batch()
    L = torch.randn(batch.tokens.shape[1], V, generator=torch.Generator().manual_seed(3))
    return batch, L


def test_sft_loss_complementary_masks_partition_the_response_and_elbo_by_hand():
    batch, L = _sft_setup()
    B, P = batch.tokens.shape[0], batch.P
    t = torch.tensor([0.3, 0.6, 0.8])
    mock = FixedLogits(L)
    dcfg = DiffusionConfig(loss_weight="elbo", complementary=True, prompt_drop=0.0)
    loss, stats = D.sft_loss(mock, batch, dcfg, TOK, generator=torch.Generator().manual_seed(4), t=t)
    assert len(mock.calls) == 1
    inp = mock.calls[0]
    assert inp.shape == (2 * B, batch.tokens.shape[1])
    is_m = (inp == MASK) | (inp == IMASK)
    m1, m2 = is_m[:B], is_m[B:]
    assert torch.equal(m1 | m2, batch.is_resp), "a response slot is masked in neither copy"
    assert not (m1 & m2).any(), "a response slot is masked in both copies"
    assert m1.any() and m2.any()
    for half in (inp[:B], inp[B:]):
        assert torch.equal(half[:, :P], batch.tokens[:, :P]), "prompt touched"
        unm = ~((half == MASK) | (half == IMASK))
        assert torch.equal(half[unm], batch.tokens[unm])
        assert (half[(half == MASK) | (half == IMASK)] ==
                torch.where(batch.is_image, IMASK, MASK)[(half == MASK) | (half == IMASK)]).all()
    # elbo by hand: mean over the 2B rows of (1/t_row) * sum_{masked} CE / R_b, t_row = t then 1-t
    rows = []
    for r in range(2 * B):
        b = r % B
        t_r = float(t[b]) if r < B else 1 - float(t[b])
        s = sum(ce_by_hand(L[k], int(batch.tokens[b, k])) for k in range(batch.tokens.shape[1]) if is_m[r, k])
        rows.append(s / t_r / int(batch.is_resp[b].sum()))
    assert math.isclose(loss.item(), sum(rows) / len(rows), rel_tol=1e-5)
    assert math.isclose(stats["mask_frac"], 0.5, rel_tol=1e-6)   # |M1|+|M2| = |resp| over 2|resp|


def _mean_ce_over_response(batch, L):
    """The mean hand-computed CE of a fixed-logit model over every response token of the batch."""
    T = batch.tokens.shape[1]
    cells = [(b, k) for b in range(batch.tokens.shape[0]) for k in range(T) if batch.is_resp[b, k]]
    return sum(ce_by_hand(L[k], int(batch.tokens[b, k])) for b, k in cells) / len(cells)


def test_sft_loss_complementary_mean_is_every_response_token_once():
    """With the complementary pair and the plain mean, each response token is scored exactly once,
    so for a fixed-logit model the loss is the mean CE over all response tokens, whatever the draw."""
    batch, L = _sft_setup()
    want = _mean_ce_over_response(batch, L)
    dcfg = DiffusionConfig(loss_weight="mean", complementary=True, prompt_drop=0.0)
    for seed in range(3):
        loss, _ = D.sft_loss(FixedLogits(L), batch, dcfg, TOK, generator=torch.Generator().manual_seed(seed))
        assert math.isclose(loss.item(), want, rel_tol=1e-5)


def test_sft_loss_full_mask_frac():
    """full_mask_frac=1: every row's whole response is masked and its complement is empty. The empty
    complements are not run under either weight. Under the ELBO weight each full-mask example weighs
    as much as any other: the loss is mean_b (1/t = 1) sum_k CE_bk / R_b by hand (keeping the empty
    complement as a zero row would halve it, which is what a test of exactly 0.5 x caught). Under the
    plain mean the loss is the mean CE over every response token. full_mask_frac=0.5 over many rows:
    about half the rows are fully masked (a binomial check)."""
    batch, L = _sft_setup()
    B, P = batch.tokens.shape[0], batch.P
    mock = FixedLogits(L)
    loss, _ = D.sft_loss(mock, batch, DiffusionConfig(loss_weight="elbo", complementary=True, prompt_drop=0.0,
                                                      full_mask_frac=1.0), TOK, generator=torch.Generator().manual_seed(6))
    is_m = (mock.calls[0] == MASK) | (mock.calls[0] == IMASK)
    assert torch.equal(is_m, batch.is_resp)                      # B rows, each fully masked
    T = batch.tokens.shape[1]
    per_example = [sum(ce_by_hand(L[k], int(batch.tokens[b, k])) for k in range(T) if batch.is_resp[b, k])
                   / int(batch.is_resp[b].sum()) for b in range(B)]
    assert math.isclose(loss.item(), sum(per_example) / B, rel_tol=1e-5)
    mock = FixedLogits(L)
    loss, _ = D.sft_loss(mock, batch, DiffusionConfig(loss_weight="mean", complementary=True, prompt_drop=0.0,
                                                      full_mask_frac=1.0), TOK, generator=torch.Generator().manual_seed(6))
    is_m = (mock.calls[0] == MASK) | (mock.calls[0] == IMASK)
    assert torch.equal(is_m, batch.is_resp)                      # B rows: the empty complements were dropped
    assert math.isclose(loss.item(), _mean_ce_over_response(batch, L), rel_tol=1e-5)
    big = D.Batch(*(x.repeat(200, 1) for x in (batch.tokens, batch.valid, batch.is_prompt, batch.is_resp,
                                                 batch.is_image)), P, batch.tasks * 200)
    mock = FixedLogits(L)
    D.sft_loss(mock, big, DiffusionConfig(loss_weight="elbo", complementary=False, prompt_drop=0.0,   # keeps
                                          full_mask_frac=0.5), TOK, generator=torch.Generator().manual_seed(7))  # every row
    is_m = (mock.calls[0] == MASK) | (mock.calls[0] == IMASK)
    full = (is_m == big.is_resp).all(1).float()
    # a U(eps,1) row of R slots is fully masked by chance too, with probability E[t^R] ~ 1/(R+1)
    R = big.is_resp.sum(1).float()
    p = 0.5 + 0.5 / (R + 1)                                                     # (rows,)
    sd = math.sqrt((p * (1 - p)).sum().item()) / full.numel()
    assert abs(full.mean().item() - p.mean().item()) < 4 * sd


def test_sft_loss_prompt_drop_masks_prompt_words_of_image_rows_only():
    batch, L = _sft_setup()
    mock = FixedLogits(L)
    dcfg = DiffusionConfig(complementary=False, prompt_drop=1.0)
    D.sft_loss(mock, batch, dcfg, TOK, generator=torch.Generator().manual_seed(5))
    inp = mock.calls[0]
    assert inp[0, :4].tolist() == [TOK.TASK["edit"], MASK, MASK, PAD]     # edit: words dropped
    assert inp[1, :4].tolist() == [TOK.TASK["vqa"], WC, PAD, PAD]         # vqa: untouched
    assert inp[2, :4].tolist() == [TOK.TASK["edit"], MASK, MASK, MASK]


# ----------------------------------------------------------------------------------------------
# 4. sampler invariants

def _adversary(batch):
    T, P = batch.tokens.shape[1], batch.P
    return Adversarial(T, range(P, P + R_TEXT), range(P + R_TEXT, P + R_TEXT + N_IMG))


def test_plan_lengths_by_hand():
    batch, dcfg = canvas_batch(), DiffusionConfig(**SAMPLER_CFG)
    # text blocks [0,5) [5,10) [10,12): ceil(5/2)=3, 3, ceil(2/2)=1 steps; image: min(4, 7) = 4 steps
    assert n_steps(batch, dcfg) == 3 + 3 + 1 + 4
    assert D.image_step_offset(batch, dcfg) == 7


@pytest.mark.parametrize("temps", [(0.0, 0.0), (1.0, 1.0)])
def test_sampler_invariants(temps):
    batch = canvas_batch()
    dcfg = DiffusionConfig(**SAMPLER_CFG)
    P, B = batch.P, batch.tokens.shape[0]
    model = _adversary(batch)
    final, order, states = run_recorded(model, batch, dcfg, temperature=temps[0], image_temperature=temps[1],
                                        generator=torch.Generator().manual_seed(6))
    n = 11
    assert sorted(states) == list(range(n))
    resp0 = batch.tokens[:, P:]
    given = ~((resp0 == MASK) | (resp0 == IMASK))
    resp = final[:, P:]

    # everything is filled; prompt and fixed tokens untouched; order -1 exactly at given slots
    assert not ((resp == MASK) | (resp == IMASK)).any()
    assert torch.equal(final[:, :P], batch.tokens[:, :P])
    assert torch.equal(resp[given], resp0[given])
    assert ((order == -1) == given).all()
    assert (order[~given] >= 0).all() and (order < n).all()

    # reveals per step = the schedule, computed independently
    for b in range(B):
        want = expected_counts(resp0[b].tolist(), R_TEXT, N_IMG, 5, 2, 4)
        got = [int((order[b] == g).sum()) for g in range(n)]
        assert got == want, (b, got, want)
    assert expected_counts(resp0[0].tolist(), R_TEXT, N_IMG, 5, 2, 4) == [2, 2, 1, 2, 1, 1, 0, 1, 1, 2, 2]
    assert expected_counts(resp0[1].tolist(), R_TEXT, N_IMG, 5, 2, 4) == [2, 2, 1, 2, 2, 1, 2, 1, 2, 2, 2]

    # the recorded states: fixed tokens kept, no re-masking, a revealed token never changes
    seq = [states[g] for g in range(n)] + [final]
    for g in range(n):
        before, after = seq[g][:, P:], seq[g + 1][:, P:]
        assert torch.equal(seq[g][:, :P], batch.tokens[:, :P])
        assert torch.equal(before[given], resp0[given])
        shown = ~((before == MASK) | (before == IMASK))
        assert torch.equal(after[shown], before[shown]), f"step {g} changed a revealed token"
        newly = shown.logical_not() & ~((after == MASK) | (after == IMASK))
        assert torch.equal(newly, order == g)

    # semi-AR: every slot of text block b is revealed before any slot of block b+1; images last
    blocks = [range(0, 5), range(5, 10), range(10, 12), range(12, 19)]
    for b in range(B):
        o = [[int(order[b, k]) for k in blk if order[b, k] >= 0] for blk in blocks]
        for lo, hi in zip(o, o[1:]):
            if lo and hi:
                assert max(lo) < min(hi), (b, lo, hi)

    # vocabulary: text slots never take codes / PAD / MASK / other forbidden specials; image slots codes
    text, img = resp[:, :R_TEXT], resp[:, R_TEXT:]
    assert (text < TOK.img_offset).all()
    assert not any(int(x) in TEXT_FORBIDDEN for x in text.flatten())
    assert (img >= TOK.img_offset).all() and (img < V).all()


# ----------------------------------------------------------------------------------------------
# 5. the order reproduces every intermediate state

def test_rebuild_state_reproduces_intermediate_states_and_continuation():
    batch = canvas_batch()
    dcfg = DiffusionConfig(**SAMPLER_CFG)
    model = _adversary(batch)
    final, order, states = run_recorded(model, batch, dcfg)
    n = n_steps(batch, dcfg)
    states[n] = final
    for s in range(n + 1):
        state, ord_s = D.rebuild_state(final, order, s, batch, TOK)
        assert torch.equal(state, states[s]), f"rebuild_state differs at step {s}"
        assert torch.equal(ord_s, torch.where(order < s, order, torch.full_like(order, -1)))
        cont, cont_order = D.sample(model, batch.with_tokens(state), TOK, dcfg, order=ord_s, start_step=s)
        assert torch.equal(cont, final), f"continuing from step {s} changed the result"
        assert torch.equal(cont_order, order)


# ----------------------------------------------------------------------------------------------
# 6. known logits -> known picks, order, and sampling frequencies

def test_known_logits_give_known_tokens_and_confidence_order():
    P = 3
    # two different prompts: per-row logits stand for two different inputs (the sampler runs each
    # distinct canvas once, so two identical rows would rightly get the same logits)
    prompts = torch.tensor([[TOK.TASK["edit"], WA, WB], [TOK.TASK["edit"], WB, WA]])
    lay = Layout(6, 4, 0)
    resp = torch.tensor([[MASK] * 6 + [IMASK] * 4] * 2)
    batch = make_batch(prompts, resp, [lay, lay], ["edit", "edit"], TOK)
    dcfg = DiffusionConfig(block_len=3, tokens_per_step=1, image_steps=4, temperature=0.0,
                           image_temperature=0.0, cfg_scale=0.0)
    target = [WA, WB, WC, WD, EOS, TOK.ANS, code(5), code(0), code(7), code(2)]
    height = [[1.0, 3.0, 2.0, 2.5, 0.5, 4.0, 0.7, 2.2, 1.5, 3.1],      # row 0
              [3.0, 1.0, 2.0, 0.5, 4.0, 2.5, 3.1, 0.7, 2.2, 1.5]]      # row 1
    L = torch.zeros(2, P + 10, V)
    for b in range(2):
        for k in range(10):
            if k < 6:   # forbidden ids get a huge logit: the sampler must ignore them
                for i in TEXT_FORBIDDEN | set(range(TOK.img_offset, V)):
                    L[b, P + k, i] = 50.0
            else:
                L[b, P + k, :TOK.img_offset] = 50.0
            L[b, P + k, target[k]] = height[b][k]
    final, order = D.sample(FixedLogits(L), batch, TOK, dcfg)
    assert final[:, P:].tolist() == [target, target]
    # one reveal per step, highest confidence first, within each block (text blocks 0-2, 3-5; image):
    # static logits, so confidence rank = rank of the target's logit within the block
    assert order.tolist() == [[2, 0, 1, 4, 5, 3, 9, 7, 8, 6],
                              [0, 2, 1, 5, 3, 4, 6, 9, 7, 8]]


def test_temperature_sampling_frequencies_match_softmax():
    N, P = 4000, 2
    prompts = torch.tensor([[TOK.TASK["edit"], WA]] * N)
    lay = Layout(1, 1, 0)
    batch = make_batch(prompts, torch.tensor([[MASK, IMASK]] * N), [lay] * N, ["edit"] * N, TOK)
    L = torch.full((P + 2, V), float("-inf"))
    L[P, WA], L[P, WB] = 1.0, 0.0                # text slot: two-way choice a / b
    L[P + 1, code(3)], L[P + 1, code(6)] = 0.0, 0.4   # image slot: two-way choice code 3 / code 6
    T_text, T_img = 2.0, 0.5
    dcfg = DiffusionConfig(block_len=4, tokens_per_step=1, image_steps=8, cfg_scale=0.0)
    final, _ = D.sample(FixedLogits(L), batch, TOK, dcfg, temperature=T_text, image_temperature=T_img,
                        generator=torch.Generator().manual_seed(7))
    text, img = final[:, P], final[:, P + 1]
    assert set(text.tolist()) <= {WA, WB} and set(img.tolist()) <= {code(3), code(6)}
    p_a = 1 / (1 + math.exp(-(1.0 - 0.0) / T_text))      # softmax([1, 0] / T) for a
    p_6 = 1 / (1 + math.exp(-(0.4 - 0.0) / T_img))
    assert abs(int((text == WA).sum()) - N * p_a) <= binom_tol(N, p_a)
    assert abs(int((img == code(6)).sum()) - N * p_6) <= binom_tol(N, p_6)


# ----------------------------------------------------------------------------------------------
# 7. classifier-free guidance

def test_drop_prompt_text_by_hand():
    prompts = torch.tensor([[TOK.TASK["edit"], TOK.BOI, code(1), TOK.EOI, WA, WB, PAD]] * 2)
    lay = Layout(1, 1, 0)
    batch = make_batch(prompts, torch.tensor([[MASK, IMASK]] * 2), [lay] * 2, ["edit"] * 2, TOK)
    out = D.drop_prompt_text(batch, torch.tensor([True, False]), TOK)
    assert out[0].tolist() == [TOK.TASK["edit"], TOK.BOI, code(1), TOK.EOI, MASK, MASK, PAD, MASK, IMASK]
    assert torch.equal(out[1], batch.tokens[1])


class CondMock(nn.Module):
    """Logits depend only on whether the prompt words (columns 4, 5) are [MASK]: cond or uncond."""

    def __init__(self, cond: torch.Tensor, uncond: torch.Tensor):
        super().__init__()
        self.C, self.U, self.cfg, self.seen = cond, uncond, None, []

    def forward(self, idx, valid=None, is_prompt=None):
        dropped = (idx[:, 4:6] == MASK).all(1)
        self.seen.append(idx[:, :7].clone())
        return torch.where(dropped[:, None, None], self.U, self.C).clone()


@pytest.mark.parametrize("g", [0.0, 0.1, 0.3, 1.0])
def test_cfg_guides_image_slots_only(g):
    P = 7
    prompts = torch.tensor([[TOK.TASK["edit"], TOK.BOI, code(1), TOK.EOI, WA, WB, PAD]])
    lay = Layout(1, 1, 0)
    batch = make_batch(prompts, torch.tensor([[MASK, IMASK]]), [lay], ["edit"], TOK)
    low = -20.0    # finite "impossible": (1+g)(-20) - g(-20) stays -20
    C, U = torch.full((1, P + 2, V), low), torch.full((1, P + 2, V), low)
    cond_txt, uncond_txt = {WA: 2.0, WB: 1.5}, {WA: 3.0, WB: 0.0}
    cond_img, uncond_img = [2.0, 1.5, 0.0], [3.0, 0.0, 0.0]          # codes 0, 1, 2
    for w in (WA, WB):
        C[0, P, w], U[0, P, w] = cond_txt[w], uncond_txt[w]
    for c in range(3):
        C[0, P + 1, code(c)], U[0, P + 1, code(c)] = cond_img[c], uncond_img[c]
    mock = CondMock(C, U)
    dcfg = DiffusionConfig(block_len=4, tokens_per_step=1, image_steps=4, temperature=0.0,
                           image_temperature=0.0, cfg_scale=g)
    final, _ = D.sample(mock, batch, TOK, dcfg)
    guided = [(1 + g) * c - g * u for c, u in zip(cond_img, uncond_img)]
    want_code = max(range(3), key=lambda c: guided[c])
    # hand values: guided[0] = 2 - g, guided[1] = 1.5 + 1.5 g -> code 1 wins for g > 0.2
    assert want_code == (1 if g > 0.2 else 0)
    assert int(final[0, P + 1]) == code(want_code)
    assert int(final[0, P]) == WA           # text slot: cond argmax, never guided (guided would be b)
    if g > 0:
        # the uncond branch saw the prompt words dropped, tag and input picture kept
        unc = [s for s in mock.seen if (s[:, 4:6] == MASK).all()]
        assert unc and unc[0][0].tolist() == [TOK.TASK["edit"], TOK.BOI, code(1), TOK.EOI, MASK, MASK, PAD]
    else:
        assert all(not (s[:, 4:6] == MASK).any() for s in mock.seen)


# ----------------------------------------------------------------------------------------------
# 8. prefix KV cache

def test_prefix_cache_gives_identical_samples():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=32, prefix_dlm=True, max_len=64), V).eval()
    with torch.no_grad():   # larger weights than the init's: confidences far apart vs float error
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    calls = {"forward": 0, "cached": 0}
    fwd, fc = model.forward, model.forward_cached

    def count_fwd(*a, **k):
        calls["forward"] += 1
        return fwd(*a, **k)

    def count_fc(*a, **k):
        calls["cached"] += 1
        return fc(*a, **k)

    model.forward, model.forward_cached = count_fwd, count_fc
    batch = canvas_batch()
    dcfg = DiffusionConfig(**{**SAMPLER_CFG, "cfg_scale": 1.0})     # also exercises the uncond cache
    out_c, ord_c = D.sample(model, batch, TOK, dcfg, use_cache=True)
    assert calls["cached"] > 0 and calls["forward"] == 0
    calls.update(forward=0, cached=0)
    out_f, ord_f = D.sample(model, batch, TOK, dcfg, use_cache=False)
    assert calls["forward"] > 0 and calls["cached"] == 0
    assert torch.equal(out_c, out_f)
    assert torch.equal(ord_c, ord_f)
    assert not ((out_c[:, batch.P:] == MASK) | (out_c[:, batch.P:] == IMASK)).any()


def test_identical_canvases_run_once_and_get_their_own_logits():
    """diffusion._response_logits runs each distinct canvas (prompt + response) once and hands every
    row the logits of running it alone: here 6 rows, 2 distinct canvases -> the model sees 2 rows,
    and each row's logits equal a pass over that row by itself. With dedupe=False every row runs."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=32, prefix_dlm=False, max_len=64), V).eval()
    batch = canvas_batch()
    big = batch.rows(torch.tensor([0, 1, 0, 0, 1, 1]))
    seen, real = [], model.forward
    model.forward = lambda idx, *a, **k: seen.append(idx.shape[0]) or real(idx, *a, **k)
    with torch.no_grad():
        got = D._response_logits(model, big, big.tokens[:, big.P:], None)
        assert seen == [2]
        for b in range(6):
            one = D._response_logits(model, big.rows(torch.tensor([b])), big.tokens[b:b + 1, big.P:], None)
            assert torch.allclose(got[b], one[0], atol=1e-5)
        seen.clear()
        D._response_logits(model, big, big.tokens[:, big.P:], None, dedupe=False)
        assert seen == [6]
