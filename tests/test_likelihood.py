"""
Tests of likelihood.py: the complementary estimator's masks and gradients, the Monte Carlo
estimators against their exact expectations, `exact` itself against a brute-force reference written
here (the ELBO from its integral over t and from the average over unmasking orders; the any-order
likelihood from all L! orders; a normalisation check over every possible response), the prefix-DLM
shared prompt encoding, and the `norm` / `shared_t` readings (METHOD.md §7, §9).

Every reference is independent of likelihood.py: masked inputs are built by hand, log-probs come from
calling the model directly, weights come from integrals done by hand (binomial expansion) or from
enumerating orders. Statistical checks use 4 measured standard errors (two-sided p ~ 6e-5; the seeds
are fixed, so a run is deterministic). Float checks use tolerances derived from float32 rounding.
CPU, tiny models, well under 20 s.

    python -m pytest tests/test_likelihood.py -q
"""
import contextlib
import itertools
import math

import pytest
import torch
import torch.nn as nn

import likelihood as LK  # noqa: E402
from config import ModelConfig  # noqa: E402
from tokens import Layout, Tokenizer, make_batch  # noqa: E402
from model import Transformer  # noqa: E402


from tiny_vocab import EOS, IMASK, MASK, TOK, V, WA, WB, WC, WD, code, mixed_batch  # noqa: E402
N_SIGMA = 4.0                              # statistical tolerance: |mean - truth| < 4 standard errors
EPS32 = torch.finfo(torch.float32).eps     # unit roundoff of the float32 forward pass (~1.2e-7)
# cached vs full forward: two float32 computation orders through 2 layers, logits of size ~5:
# differences of a few EPS32 * |logit| per layer (measured 1.2e-6 on the test's model, <= 3.6e-6 over
# ten model seeds); 1e-5 leaves ~3x margin at worst
PREFIX_ATOL = 1e-5


def per_token(terms: LK.Terms) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, R), scored (B, R) bool): each slot's weighted terms summed over the draws (so that
    values.sum(1) = terms.seq()), and which slots any draw scored."""
    return (terms.weight * terms.logp).sum(0), terms.scored.any(0)


def tiny_model(seed: int = 0, prefix_dlm: bool = False, tok: Tokenizer = TOK, n_layer: int = 1) -> Transformer:
    """1 layer, 2 heads, d=32, weights ~ N(0, 0.3): logits far from flat, so every masked context
    changes the conditionals well above float noise. The head is then scaled by 1/6: with these
    weights the residual stream has RMS ~6 and the model has no final norm, so this keeps the logits
    of size ~5 (std ~2, max ~10), which the tolerances below assume."""
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(n_layer=n_layer, n_head=2, d_model=32, prefix_dlm=prefix_dlm, max_len=64),
                    tok.vocab_size)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
        m.head.weight.mul_(1 / 6)
    return m.eval()


class Recorder(nn.Module):
    """Wraps a model (full-forward path: cfg=None), records every input row it is called on, and adds
    a learnable per-(row, position, vocab) bias, zero at start: its gradient says exactly which
    (pass, position) logits the estimate used, and with what weight."""

    def __init__(self, net: nn.Module, rows: int, T: int):
        super().__init__()
        self.net, self.cfg, self.calls = net, None, []
        self.bias = nn.Parameter(torch.zeros(rows, T, V))

    def forward(self, idx, valid=None, is_prompt=None):
        self.calls.append(idx.clone())
        out = self.net(idx, valid, is_prompt)
        return out + self.bias[:out.shape[0]]


def pair_batch(text, codes, tok: Tokenizer = TOK):
    """One (x, y) pair: prompt [<edit> a b PAD], response = text ids then image codes."""
    a, b = tok.stoi["a"], tok.stoi.get("b", tok.stoi["a"])
    prompt = torch.tensor([[tok.TASK["edit"], a, b, tok.PAD]])
    resp = torch.tensor([list(text) + [tok.img_offset + c for c in codes]])
    return make_batch(prompt, resp, [Layout(len(text), len(codes), 0)], ["edit"], tok)


def mask_by_hand(tokens, masked_cols, is_image, tok: Tokenizer = TOK):
    """tokens (T,) with the given columns replaced by [IMASK] (image slot) or [MASK] (text slot)."""
    out = tokens.clone()
    for c in masked_cols:
        out[c] = tok.IMASK if is_image[c] else tok.MASK
    return out


# ----------------------------------------------------------------------------------------------
# complementary: masks partition the response, and each token is scored once with weight 1


def test_complementary_masks_partition_the_response_and_never_touch_prompt_or_pad():
    batch = mixed_batch()
    B, T = batch.tokens.shape
    P = batch.P
    rec = Recorder(tiny_model(), 2 * B, T)
    g = torch.Generator().manual_seed(0)
    n_both = 0
    for shared_t in (False, True):
        for _ in range(25):
            rec.calls.clear()
            with torch.no_grad():
                logp, scored = per_token(LK.complementary(rec, batch, TOK, generator=g, shared_t=shared_t))
            assert len(rec.calls) == 1 and rec.calls[0].shape == (2 * B, T), "one batched call, 2B rows"
            inp1, inp2 = rec.calls[0][:B], rec.calls[0][B:]
            m1, m2 = inp1 != batch.tokens, inp2 != batch.tokens           # what each pass masked
            assert torch.equal(m1 | m2, batch.is_resp), "M1 | M2 must be the whole response"
            assert not (m1 & m2).any(), "M1 & M2 must be empty"
            assert not ((m1 | m2) & ~batch.is_resp).any(), "a prompt or PAD position was masked"
            assert torch.equal(inp1[:, :P], batch.tokens[:, :P]) and torch.equal(inp2[:, :P], batch.tokens[:, :P])
            for inp, m in ((inp1, m1), (inp2, m2)):
                assert (inp[m & batch.is_image] == IMASK).all() and (inp[m & ~batch.is_image] == MASK).all()
            assert torch.equal(scored, batch.is_resp[:, P:]), "every response token is scored"
            assert torch.equal(logp != 0, batch.is_resp[:, P:]), "log-probs only at response slots"
            n_both += int(((m1.sum(1) > 0) & (m2.sum(1) > 0)).sum())
    assert n_both > 0, "no draw split a response into two non-empty halves: the check was vacuous"


def test_complementary_gradient_touches_each_response_token_exactly_once_with_weight_one():
    batch = mixed_batch()
    B, T = batch.tokens.shape
    P = batch.P
    net = tiny_model(1)
    y = batch.tokens
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        rec = Recorder(net, 2 * B, T)
        logp, scored = per_token(LK.complementary(rec, batch, TOK, generator=g))
        logp.sum().backward()
        inp = rec.calls[0]
        m1, m2 = inp[:B] != y, inp[B:] != y
        grad = rec.bias.grad                                               # (2B, T, V)
        touched = grad.abs().sum(-1) > 0                                   # (2B, T)
        t1, t2 = touched[:B], touched[B:]
        assert torch.equal(t1, m1) and torch.equal(t2, m2), "a pass's gradient must sit on its masked set"
        assert torch.equal(t1 ^ t2, batch.is_resp) and not (t1 & t2).any(), \
            "each response position gets gradient from exactly one pass"
        assert not touched[:, :P].any(), "no gradient to prompt positions"
        # weight 1: d/dlogits log softmax(logits)[y] = onehot(y) - softmax(logits), by hand
        with torch.no_grad():
            ref_logits = net(inp, batch.valid.repeat(2, 1), batch.is_prompt.repeat(2, 1)).double()
        expect = -ref_logits.softmax(-1)
        expect.scatter_add_(-1, y.repeat(2, 1)[..., None], torch.ones(2 * B, T, 1, dtype=torch.float64))
        expect = expect * torch.cat([m1, m2])[..., None]                  # only the masked slots
        # float32 softmax entries are in [0, 1]: rounding error a few EPS32 (16x margin)
        assert (grad.double() - expect).abs().max() < 16 * EPS32
        # the value is one conditional log-prob per response token: from pass 1 on M1, pass 2 on M2
        lsm = ref_logits.log_softmax(-1).gather(-1, y.repeat(2, 1)[..., None])[..., 0]   # (2B, T)
        by_hand = (lsm[:B] * m1).sum(1) + (lsm[B:] * m2).sum(1)
        # up to T float32 terms, each rounded at ~EPS32 * |row sum| at most
        assert torch.allclose(logp.sum(1).double(), by_hand, rtol=0, atol=T * 16 * EPS32 * by_hand.abs().max().item())


# ----------------------------------------------------------------------------------------------
# Monte Carlo means against the exact expectations (L = 5)


# the model of the Monte Carlo check: its exact expectations of the three estimators are well apart
# (closest pair elbo-complementary: 1.5 nats apart, the power check needs ~0.4)
MC_MODEL_SEED = 10


def _draws(fn, batch, n_draws, seed, **kw):
    """n_draws independent draws of a sequence estimate for ONE pair: the pair repeated n_draws
    times as rows of one batch (each row draws its own t / masks)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        logp, _ = per_token(fn(tiny_model(MC_MODEL_SEED), batch.repeat(n_draws), TOK, generator=g, **kw))
    return logp.sum(1).double()                                            # (n_draws,)


def test_monte_carlo_means_converge_to_exact_expectations():
    batch = pair_batch([WB, WD, EOS], [3, 6])                              # L = 5: 3 text + 2 image slots
    ex = LK.exact(tiny_model(MC_MODEL_SEED), batch, TOK)
    assert ex["L"] == 5
    n = 4000
    cases = {"elbo": (LK.elbo_mc, dict(n=2)), "complementary": (LK.complementary, {}),
             "mc_unweighted": (LK.mc_unweighted, dict(n=2))}
    ses = {}
    for i, (key, (fn, kw)) in enumerate(cases.items()):
        v = _draws(fn, batch, n, seed=10 + i, **kw)
        se = v.std().item() / math.sqrt(n)
        ses[key] = se
        assert se > 0
        assert abs(v.mean().item() - ex[key]) < N_SIGMA * se, \
            f"{key}: mean {v.mean().item():.4f} vs exact {ex[key]:.4f} (SE {se:.4f})"
    # power: the three expectations differ by more than the tolerance, so a swapped weight (1/t vs 1,
    # or the wrong count scaling) would have failed above
    for a, b in itertools.combinations(cases, 2):
        assert abs(ex[a] - ex[b]) > N_SIGMA * (ses[a] + ses[b]), f"{a} vs {b}: test has no power"
    # one_step with p_prompt = 0 is deterministic and equals the all-masked row of the table
    o1, _ = per_token(LK.one_step(tiny_model(MC_MODEL_SEED), batch, TOK))
    o2, _ = per_token(LK.one_step(tiny_model(MC_MODEL_SEED), batch, TOK))
    assert torch.equal(o1, o2)
    # the same L float32 terms from two batchings: rounding ~ EPS32 * |term| each, random in sign
    assert abs(o1.sum().item() - ex["one_step"]) < N_SIGMA * EPS32 * abs(ex["one_step"]) * math.sqrt(ex["L"])


# ----------------------------------------------------------------------------------------------
# exact() itself, against a brute force written here


def _beta_by_expansion(a: int, b: int) -> float:
    """int_0^1 t^a (1 - t)^b dt by expanding (1 - t)^b binomially (no factorial/Beta formula)."""
    return sum(math.comb(b, j) * (-1) ** j / (a + j + 1) for j in range(b + 1))


class BruteForce:
    """log p(y_i | y with the set S of response slots masked, x), by calling the model on inputs
    masked by hand, log-softmax in float64, memoised per S."""

    def __init__(self, model, batch, tok: Tokenizer = TOK):
        self.model, self.batch, self.tok = model, batch, tok
        self.pos = batch.is_resp[0].nonzero().squeeze(1).tolist()
        self.L = len(self.pos)
        self.memo = {}

    def cond(self, S, i) -> float:
        S = frozenset(S)
        if S not in self.memo:
            b = self.batch
            idx = mask_by_hand(b.tokens[0], [self.pos[j] for j in S], b.is_image[0], self.tok)
            with torch.no_grad():
                logits = self.model(idx[None], b.valid, b.is_prompt)[0].double()
            self.memo[S] = logits.log_softmax(-1)
        return self.memo[S][self.pos[i], self.batch.tokens[0, self.pos[i]]].item()

    def elbo_integral(self) -> float:
        """LLaDA's ELBO, E_t[(1/t) sum_{i masked} log p]: mask S has probability t^k (1-t)^(L-k),
        so each S gets weight int t^(k-1) (1-t)^(L-k) dt."""
        L = self.L
        return sum(_beta_by_expansion(len(S) - 1, L - len(S)) * sum(self.cond(S, i) for i in S)
                   for k in range(1, L + 1) for S in itertools.combinations(range(L), k))

    def orders(self):
        """For each of the L! unmasking orders: the list of (1/choices, p(y_next | state)) steps."""
        L = self.L
        for order in itertools.permutations(range(L)):
            steps = []
            for j, i in enumerate(order):
                masked = order[j:]                              # still masked before revealing i
                steps.append((1.0 / (L - j), math.exp(self.cond(masked, i))))
            yield steps

    def elbo_orders(self) -> float:
        """The same ELBO as the average over uniform orders of sum_j log p(y_next | state)."""
        logs = [sum(math.log(p) for _, p in steps) for steps in self.orders()]
        return sum(logs) / len(logs)

    def any_order(self) -> float:
        """log p(y) of the sampler that reveals one uniformly chosen masked slot per step:
        sum over all L! orders of prod_j (1 / #remaining) * p(y_next | state)."""
        return math.log(sum(math.prod(c * p for c, p in steps) for steps in self.orders()))

    def complementary(self) -> float:
        """E of Eq. C with t1 ~ U[0,1]: M1 = S with probability int t^k (1-t)^(L-k) dt (S may be
        empty), pass 1 scores S, pass 2 scores the complement with the complement masked."""
        L, total = self.L, 0.0
        for k in range(L + 1):
            for S in itertools.combinations(range(L), k):
                Sc = tuple(i for i in range(L) if i not in S)
                total += _beta_by_expansion(k, L - k) * (sum(self.cond(S, i) for i in S)
                                                         + sum(self.cond(Sc, i) for i in Sc))
        return total

    def mc_unweighted(self) -> float:
        """E of mc_unweighted with n = 2: two draws of (k ~ U{1..L}, S uniform of size k), w = 1,
        summed and scaled by 2/n = 1 -> 2 * E_single."""
        L = self.L
        single = sum((1 / L) * (1 / math.comb(L, k)) * sum(self.cond(S, i) for i in S)
                     for k in range(1, L + 1) for S in itertools.combinations(range(L), k))
        return 2 * single


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_matches_brute_force_enumeration(seed):
    model = tiny_model(seed)
    batch = pair_batch([WC, WA], [5])                                     # L = 3: 2 text + 1 image slot
    ex = LK.exact(model, batch, TOK)
    bf = BruteForce(model, batch)
    assert bf.L == ex["L"] == 3
    elbo_i, elbo_o = bf.elbo_integral(), bf.elbo_orders()          # fills bf.memo with every S
    # exact()'s table terms are float32 cross-entropies (the reference is float64): each is off by
    # ~EPS32 * |term|, random in sign; every quantity weighs at most 2L terms (the complementary
    # pair), so its error is ~EPS32 * max|term| * sqrt(2L). Allow N_SIGMA of those.
    used = [abs(bf.cond(S, i)) for k in range(1, bf.L + 1) for S in itertools.combinations(range(bf.L), k) for i in S]
    tol = N_SIGMA * EPS32 * max(used) * math.sqrt(2 * bf.L)
    # both are float64 sums of the same conditionals (different weights/orders): agree to ~1e-15 relative
    assert abs(elbo_i - elbo_o) < 1e-12 * max(1.0, abs(elbo_i)), "the two brute-force ELBOs disagree"
    assert abs(ex["elbo"] - elbo_i) < tol
    assert abs(ex["any_order"] - bf.any_order()) < tol
    assert abs(ex["complementary"] - bf.complementary()) < tol
    assert abs(ex["mc_unweighted"] - bf.mc_unweighted()) < tol
    assert abs(ex["one_step"] - sum(bf.cond(range(3), i) for i in range(3))) < tol
    # the check has teeth: the quantities it compares really differ on this model
    assert min(abs(ex["elbo"] - ex["any_order"]), abs(ex["elbo"] - ex["complementary"])) > 1000 * tol


def test_exact_any_order_is_a_distribution_over_all_responses():
    """sum over every y in V^L of the any-order likelihood is 1 (each order is a chain rule over the
    full vocabulary). L = 2 (one text + one image slot) on a small vocabulary: V^2 calls of exact()."""
    tok = Tokenizer(["a"], n_codes=2)
    model = tiny_model(4, tok=tok)
    Vs = tok.vocab_size
    total, worst = 0.0, 0.0
    for u, w in itertools.product(range(Vs), range(Vs)):
        b = pair_batch([u], [], tok)
        b = make_batch(b.tokens[:, :b.P], torch.tensor([[u, w]]), [Layout(1, 1, 0)], ["edit"], tok)
        lp = LK.exact(model, b, tok)["any_order"]
        total, worst = total + math.exp(lp), max(worst, abs(lp))
    # each log p(y) is a logsumexp of L float32 terms: abs error <= 8 L EPS32 |log p|, which becomes a
    # relative error of each probability, hence of their sum
    assert abs(total - 1.0) < 8 * 2 * EPS32 * worst, total


@pytest.mark.parametrize("seed", range(4))
def test_elbo_is_a_lower_bound_of_the_any_order_likelihood(seed):
    model = tiny_model(10 + seed)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(TOK.stoi["a"], TOK.img_offset, (2,), generator=g).tolist()
    codes = torch.randint(0, TOK.n_codes, (2,), generator=g).tolist()
    ex = LK.exact(model, pair_batch(text, codes), TOK)                    # L = 4
    # Jensen: E_order log prod <= log E_order prod; float32 table terms: tolerance ~ L * EPS32 * |elbo|
    assert ex["elbo"] <= ex["any_order"] + 16 * ex["L"] * EPS32 * abs(ex["elbo"])


# ----------------------------------------------------------------------------------------------
# prefix-DLM: one shared prompt encoding equals the full prefix-attention forward


def _full_forward_logp(model, batch, inputs):
    """log p(y_k | input) at every position from the model's plain forward (prefix attention mask
    built from is_prompt), float64 log-softmax. inputs (B, T) -> (B, T)."""
    with torch.no_grad():
        logits = model(inputs, batch.valid, batch.is_prompt).double()
    return logits.log_softmax(-1).gather(-1, batch.tokens[..., None])[..., 0]


def test_prefix_dlm_shared_prompt_encoding_equals_full_forward(monkeypatch):
    # 2 layers: with one layer the prompt's keys are plain projections of its embeddings, so the
    # response logits would not depend on whether the prompt may look at the response at all
    model = tiny_model(5, prefix_dlm=True, n_layer=2)
    batch = mixed_batch()
    B, T = batch.tokens.shape
    P = batch.P
    n = 3
    g = torch.Generator().manual_seed(7)
    masks = (torch.rand(n, B, T, generator=g) < 0.5) & batch.is_resp        # (n, B, T)
    enc_calls = []
    real_encode = model.encode_prefix
    monkeypatch.setattr(model, "encode_prefix", lambda *a, **k: enc_calls.append(a[0].clone()) or real_encode(*a, **k))
    with torch.no_grad():
        got = LK.masked_logprobs(model, batch, masks, TOK).double()        # (n, B, R)
    assert len(enc_calls) == 1 and enc_calls[0].shape == (B, P), "the prompt must be encoded once for all n masks"
    resp = batch.is_resp[:, P:]
    for j in range(n):
        inputs = torch.stack([mask_by_hand(batch.tokens[b], masks[j, b].nonzero().squeeze(1).tolist(),
                                           batch.is_image[b]) for b in range(B)])
        ref = _full_forward_logp(model, batch, inputs)[:, P:]
        assert (got[j] - ref)[resp].abs().max() < PREFIX_ATOL
        # teeth: plain bidirectional attention (no prefix mask) gives different numbers
        with torch.no_grad():
            bidir = model(inputs, batch.valid).double().log_softmax(-1).gather(-1, batch.tokens[..., None])[..., 0]
        assert (bidir[:, P:] - ref)[resp].abs().max() > 100 * PREFIX_ATOL

    # one_step with a randomly masked prompt (d1's p_prompt) goes through the same cache: the cached
    # prompt is the masked one, and the result equals the full forward on [masked prompt ; all-mask]
    enc_calls.clear()
    with torch.no_grad():
        o, _ = per_token(LK.one_step(model, batch, TOK, generator=torch.Generator().manual_seed(1), p_prompt=0.5))
    pr = enc_calls[0]
    changed = pr != batch.tokens[:, :P]
    assert changed.any() and not (changed & ~batch.is_prompt[:, :P]).any(), "only real prompt tokens masked"
    prompt_img = batch.tokens[:, :P] >= TOK.img_offset
    assert (pr[changed & prompt_img] == IMASK).all() and (pr[changed & ~prompt_img] == MASK).all()
    full_in = torch.stack([mask_by_hand(batch.tokens[b], batch.is_resp[b].nonzero().squeeze(1).tolist(),
                                        batch.is_image[b]) for b in range(B)])
    full_in[:, :P] = pr
    ref = _full_forward_logp(model, batch, full_in)[:, P:]
    assert (o.double() - ref * resp).abs().max() < PREFIX_ATOL


# ----------------------------------------------------------------------------------------------
# the two readings of the paper's unknowns (METHOD.md §9): norm and shared_t


@pytest.mark.parametrize("name", ["complementary", "elbo_mc", "mc_unweighted", "one_step"])
def test_norm_mean_divides_by_the_response_length(name):
    batch = mixed_batch()                                                  # L = 8, 4, 8
    L = batch.is_resp.sum(1).double()
    model = tiny_model(6)
    out = {}
    for norm in ("sum", "mean"):
        with torch.no_grad():     # same seed -> same t and masks under both readings
            out[norm] = per_token(LK.estimate(name, model, batch, TOK, n=2, generator=torch.Generator().manual_seed(0),
                                              norm=norm))
    (ls, ss), (lm, sm) = out["sum"], out["mean"]
    assert torch.equal(ss, sm)
    per_row_sum, per_row_mean = ls.sum(1).double(), lm.sum(1).double()
    assert torch.allclose(per_row_mean, per_row_sum / L, atol=8 * EPS32 * per_row_sum.abs().max().item())
    assert (per_row_sum != 0).all()


def test_shared_t_gives_one_masking_rate_per_batch(monkeypatch):
    """With one t1 per batch the rows' M1 fractions f_b are i.i.d. Binomial(L, t)/L given t, so the
    within-batch variance s^2 has E[s^2] = E[t(1-t)]/L = 1/(6L); with one t1 per row the rows are
    independent and E[s^2] = Var(t) + E[t(1-t)]/L = 1/12 + 1/(6L). Checked to 4 measured SEs."""
    L, B, trials = 48, 8, 300
    prompts = torch.tensor([[TOK.TASK["t2i"], WA]] * B)
    resp = torch.tensor([[code(i % 8) for i in range(L)]] * B)
    batch = make_batch(prompts, resp, [Layout(0, L, 0)] * B, ["t2i"] * B, TOK)
    seen = []

    def fake(model, b, masks, tok, prompt_tokens=None):      # record the masks, skip the model
        seen.append(masks.clone())
        return torch.zeros(masks.shape[0], masks.shape[1], masks.shape[2] - b.P)
    monkeypatch.setattr(LK, "masked_logprobs", fake)
    g = torch.Generator().manual_seed(0)
    for shared, expect in ((True, 1 / (6 * L)), (False, 1 / 12 + 1 / (6 * L))):
        s2 = []
        for _ in range(trials):
            seen.clear()
            LK.estimate("complementary", None, batch, TOK, generator=g, shared_t=shared)
            f = seen[0][0].sum(1).double() / L                              # (B,) M1 fractions
            assert torch.equal(seen[0][1].sum(1), L - seen[0][0].sum(1))  # M2 = complement
            s2.append(f.var().item())
        s2 = torch.tensor(s2, dtype=torch.float64)
        se = s2.std().item() / math.sqrt(trials)
        assert abs(s2.mean().item() - expect) < N_SIGMA * se, (shared, s2.mean().item(), expect, se)
    # the two hypotheses are many SEs apart, so each check above rejects the other reading
    assert 1 / 12 > 2 * N_SIGMA * se
    # the MC estimators get their pass budget n through estimate()
    seen.clear()
    LK.estimate("elbo_mc", None, batch, TOK, n=3, generator=g)
    assert seen[0].shape[0] == 3


def test_bf16_autocast_on_cpu_agrees_with_fp32():
    """--train.dtype=bfloat16 on the CPU (common.Ctx.autocast) runs the GPU presets' number format:
    the likelihood estimates and the sampler's choices must agree with fp32. Stated tolerances:
    log pi per row within 2 % + 0.1 nats (bf16 keeps 8 bits of mantissa in the matmuls; the
    log-softmax itself runs in fp32), and at least 90 % of the greedy tokens identical (a token can
    flip where two candidates were within bf16 rounding)."""
    import common
    import diffusion as DF
    from config import DiffusionConfig
    ctx = common.Ctx("cpu", torch.bfloat16, "bf16", False, 0, 1, ".")
    model, batch = tiny_model(seed=3, n_layer=2).eval(), mixed_batch()
    est = {}
    for name, amp in (("fp32", contextlib.nullcontext()), ("bf16", ctx.autocast)):
        with torch.no_grad(), amp:
            lp, scored = per_token(LK.complementary(model, batch, TOK, generator=torch.Generator().manual_seed(5)))
            est[name] = (lp * scored).sum(1)
            edit = batch.rows(torch.tensor([0, 2]))                  # the sampler takes one layout per call
            canvas = edit.with_tokens(torch.where(edit.is_resp, torch.where(edit.is_image, IMASK, MASK), edit.tokens))
            est[name + "_tok"] = DF.sample(model, canvas, TOK, DiffusionConfig(), temperature=0.0,
                                           image_temperature=0.0)[0]
    assert est["bf16"].dtype == torch.float32                       # the log-softmax ran in fp32
    assert torch.allclose(est["bf16"], est["fp32"], rtol=0.02, atol=0.1), (est["bf16"], est["fp32"])
    same = (est["bf16_tok"] == est["fp32_tok"])[batch.rows(torch.tensor([0, 2])).is_resp].float().mean().item()
    assert same >= 0.9, same


def test_rows_that_share_a_prompt_share_one_encoding(monkeypatch):
    """A group's rollouts repeat their prompt: diffusion.encode_prompts encodes each distinct prompt
    once (rows 3 x 3 -> 3 encodings) and gives every row the values of encoding it alone."""
    model = tiny_model(5, prefix_dlm=True, n_layer=2)
    batch = mixed_batch()
    big = batch.repeat(3)                                                   # 9 rows, 3 distinct prompts
    masks = (torch.rand(2, 9, big.tokens.shape[1], generator=torch.Generator().manual_seed(3)) < 0.5) & big.is_resp
    seen, real = [], model.encode_prefix
    monkeypatch.setattr(model, "encode_prefix", lambda idx, valid=None: seen.append(idx.shape[0]) or real(idx, valid))
    with torch.no_grad():
        got = LK.masked_logprobs(model, big, masks, TOK)
        assert seen == [3]
        for b in range(9):                                                  # each row on its own
            one = LK.masked_logprobs(model, big.rows(torch.tensor([b])), masks[:, b:b + 1], TOK)
            assert (got[:, b] - one[:, 0]).abs().max() < PREFIX_ATOL


def test_a_wrapper_that_hides_the_prefix_cache_is_an_error_not_a_slow_fallback():
    """DDP's .module or torch.compile's ._orig_mod around a prefix-DLM model without its
    encode_prefix: the sampler and the likelihood say so instead of silently running the full pass."""
    import diffusion as DF

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

        def forward(self, *a, **k):
            return self.module(*a, **k)
    inner = tiny_model(5, prefix_dlm=True, n_layer=1)
    batch = mixed_batch()
    with pytest.raises(ValueError, match=r"Wrapper wraps a prefix-DLM model .* \(common.unwrap\)"):
        LK.masked_logprobs(Wrapper(inner), batch, batch.is_resp[None], TOK)
    with pytest.raises(ValueError, match="hides its prefix cache"):
        DF.uses_prefix_cache(Wrapper(inner))
    assert DF.uses_prefix_cache(inner) and not DF.uses_prefix_cache(Wrapper(tiny_model(5, n_layer=1)))


def test_one_step_prompt_masking_is_reachable_from_the_config():
    """Eq. (O)'s prompt masking: rl.p_prompt reaches likelihood.one_step through estimate (the
    config field rl.p_prompt), and a reading that does not apply is a ValueError there too."""
    model = tiny_model(5)
    batch = mixed_batch()
    with torch.no_grad():
        via = LK.estimate("one_step", model, batch, TOK, generator=torch.Generator().manual_seed(1), p_prompt=0.5)
        direct = LK.one_step(model, batch, TOK, generator=torch.Generator().manual_seed(1), p_prompt=0.5)
        clean = LK.estimate("one_step", model, batch, TOK, generator=torch.Generator().manual_seed(1))
    assert torch.equal(via.seq(), direct.seq()) and not torch.equal(via.seq(), clean.seq())
    with pytest.raises(ValueError, match="p_prompt applies to the one_step"):
        LK.estimate("complementary", model, batch, TOK, p_prompt=0.5)
    with pytest.raises(ValueError, match="shared_t applies to the complementary"):
        LK.estimate("elbo_mc", model, batch, TOK, shared_t=True)
