"""
Estimators of the sequence log-likelihood log pi(y | x) of a masked-diffusion model (METHOD.md §7).

log pi(y|x) is intractable for a dLLM, so RL (the objective J of METHOD.md §4) needs an estimate.
Every estimator below returns a Terms: the model's raw per-token log-probabilities logp (D, B, R), one
slice per masked draw d, and the estimator's weight of each term (D, B, R), 0 where unscored, so the
RL loss (rl.py) can form its PPO ratio on the raw log-probs. The sequence estimate is Terms.seq() =
sum over d and k of weight * logp, in nats.

  complementary  LaViDa-R1 (arXiv 2602.14147, its Eq. C; the default). t1 ~ U[0, 1], t2 = 1 - t1;
                 mask M1 at rate t1 over the response and M2 = its complement; two forward passes
                 batched as one; every response token is scored exactly once, with weight 1 (not 1/t):
                     log pi^ = sum_{k in M1} log p(y_k | y_t1, x) + sum_{k in M2} log p(y_k | y_t2, x)
  elbo_mc        the Monte Carlo ELBO of LLaDA ("Large Language Diffusion Models", arXiv
                 2502.09992): n masks, each with a masked COUNT k ~ U{1..L} at uniformly random
                 positions, weight L/k. Unbiased for the ELBO and of finite variance. (The "t ~ U(0,1),
                 weight 1/t" form of the same ELBO, as in MDLM, arXiv 2406.07524, has infinite
                 variance, so we compare against LLaDA's form: the fair baseline.)
  mc_unweighted  the same masks as elbo_mc with weight 1, summed over passes and scaled by 2/n so that
                 n = 2 covers about L tokens like the complementary pair: isolates the weight.
  one_step       d1 / diffu-GRPO ("d1: Scaling Reasoning in Diffusion Large Language Models via
                 Reinforcement Learning", arXiv 2504.12216): the whole response masked, one pass;
                 optionally each prompt token masked with probability p_prompt (d1 uses 0.15).
                 Lowest variance, biased.
  exact          for tiny L (<= 12; 2^L - 1 forward rows) and a small model: enumerate all masks to
                 get the exact ELBO, the exact expectation of the complementary and MC estimators,
                 and the exact likelihood of the random-order, one-token-per-step sampler (DP over
                 revealed sets).
                 The reference the tests check every estimator against (and the estimator study's),
                 never a training path.

Unknowns of the paper, and the readings taken (both are arguments / config fields; METHOD.md §9):
  * normalisation: `norm="sum"` (Eq. C as written: a sum over the response's tokens) is the default;
    `norm="mean"` divides by the number of response tokens (rl.logp_norm).
  * one (t1, mask) per sample (default) or one t1 shared by the whole batch (`shared_t=True`,
    rl.shared_t); the mask itself is always drawn per sample.

With a prefix-DLM model the prompt is encoded once and shared by every masked copy of the response
(its keys/values do not depend on the response), so the complementary pair costs one prompt pass.

Simplified: beyond the two readings above, Eq. C is taken as written; `exact` is a test oracle for
tiny responses, not a training path.

The file reads top-down: estimate (what rl.py calls), the complementary estimator and the batched
forward it shares with the others, the baselines, then the exact reference.

Exercise: python -m pytest tests/test_likelihood.py -q ; python studies/estimators.py (the estimator study)
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from diffusion import apply_mask, encode_prompts, uses_prefix_cache
from tokens import Batch, Tokenizer

# ----------------------------------------------------------------------------------------------
# the estimate rl.py asks for, and LaViDa-R1's estimator (Eq. C)


def estimate(name: str, model, batch: Batch, tok: Tokenizer, n: int = 2, generator=None,
             norm: str = "sum", shared_t: bool = False, p_prompt: float = 0.0, t1: float | None = None) -> Terms:
    """Dispatch by name (rl.likelihood: a key of ESTIMATORS). n is the pass budget of the MC
    estimators; shared_t applies to complementary only and p_prompt to one_step only (ValueError
    otherwise: config.validate makes both one-line config errors first). t1: with shared_t, the
    masking rate to share (rl.policy_update draws one per step), else one is drawn for this batch.
    Returns Terms."""
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; expected one of {', '.join(ESTIMATORS)}")
    if shared_t and name != "complementary":
        raise ValueError(f"shared_t applies to the complementary estimator only, not {name}")
    if p_prompt and name != "one_step":
        raise ValueError(f"p_prompt applies to the one_step estimator only, not {name}")
    if name == "complementary":
        rate = None if t1 is None or not shared_t else torch.full((len(batch.tokens),), t1, device=batch.tokens.device)
        return complementary(model, batch, tok, generator, norm, shared_t, rate)
    if name == "one_step":
        return one_step(model, batch, tok, generator, norm, p_prompt)
    return ESTIMATORS[name](model, batch, tok, n=n, generator=generator, norm=norm)


def complementary(model, batch: Batch, tok: Tokenizer, generator=None, norm: str = "sum",
                  shared_t: bool = False, t1: torch.Tensor | None = None) -> Terms:
    """LaViDa-R1's estimator (Eq. C): two complementary masks, each token scored exactly once, w = 1.
    t1: (B,) masking rates of M1 to use instead of drawing them (None: t1 ~ U[0, 1], one per row, or
    one for the batch with shared_t). Returns Terms with D = 1 (each token's term from its own pass)."""
    B, T = batch.tokens.shape
    dev = batch.tokens.device
    if t1 is None:
        t1 = torch.rand(1 if shared_t else B, generator=generator, device=dev).expand(B)
    resp = batch.is_resp
    m1 = (torch.rand(B, T, generator=generator, device=dev) < t1[:, None]) & resp    # M1 at rate t1
    m2 = resp & ~m1                                                                  # M2 = complement
    logp = masked_logprobs(model, batch, torch.stack([m1, m2]), tok)                # (2, B, R)
    P = batch.P
    per_tok = torch.where(m1[:, P:], logp[0], logp[1])                              # one term per token
    return _terms(per_tok[None], resp[None, :, P:].float(), batch, norm)


def masked_logprobs(model, batch: Batch, masks: torch.Tensor, tok: Tokenizer,
                    prompt_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """masks: (n, B, T) bool, True = masked (response positions only).
    Returns logp (n, B, R): log p_theta(y_k | y with mask applied, x) of the clean token y_k at each
    response position (all positions; callers pick the masked ones). One batched forward of n*B rows.
    prompt_tokens: (B, P) replacement prompt (one_step's randomly masked prompt), else batch's own.
    """
    n, B, T = masks.shape
    P = batch.P
    y = batch.tokens                                                            # (B, T) clean
    # the n masked copies of each row; flattened below as row c * B + b = copy c of row b
    inp = apply_mask(y.expand(n, B, T), masks, batch.is_image.expand(n, B, T), tok)  # (n, B, T)
    if prompt_tokens is not None:
        inp = torch.cat([prompt_tokens.expand(n, B, P), inp[..., P:]], -1)
    copies = lambda x: repeat(x, "b ... -> (n b) ...", n=n)                     # (B, ...) -> (nB, ...)
    if uses_prefix_cache(model):
        # prefix-DLM: one prompt encoding shared by all n masked copies (repeat keys/values, not work)
        cache = encode_prompts(model, inp[0, :, :P], batch.valid[:, :P])        # each distinct prompt once
        cache = cache.rows(torch.arange(B, device=y.device).repeat(n))           # row c * B + b = copy c of b
        resp_in = rearrange(inp[..., P:], "n b r -> (n b) r")                  # (nB, R)
        logits = model.forward_cached(resp_in, cache, copies(batch.valid[:, P:]))   # (nB, R, V)
    else:
        full = rearrange(inp, "n b t -> (n b) t")                               # (nB, T)
        logits = model(full, copies(batch.valid), copies(batch.is_prompt))[:, P:]
    logp = -F.cross_entropy(rearrange(logits.float(), "nb r v -> nb v r"), copies(y[:, P:]), reduction="none")
    return rearrange(logp, "(n b) r -> n b r", n=n)                             # (n, B, R)


@dataclass
class Terms:
    """An estimate of log pi(y|x) as weighted per-token terms, one slice per masked draw:

        log pi^(y|x) = sum_{d, k} weight[d, b, k] * logp[d, b, k]          (seq())

    logp (D, B, R): log p_theta(y_k | the response masked by draw d, x), the model's raw log-prob of the
    clean token, 0 where draw d does not score slot k; weight (D, B, R): the estimator's weight of that
    term (L/k for elbo_mc, 2/n for mc_unweighted, 1 otherwise, divided by the response length under
    norm="mean"), 0 where unscored. Keeping the two apart is what lets the PPO ratio (rl.py) be formed
    on the raw log-probs, the same clip band for every estimator and normalisation."""
    logp: torch.Tensor
    weight: torch.Tensor

    @property
    def scored(self) -> torch.Tensor:
        """(D, B, R) bool: the terms the estimate uses."""
        return self.weight != 0

    def seq(self) -> torch.Tensor:
        """(B,) the sequence estimate log pi^(y|x), in nats."""
        return (self.weight * self.logp).sum((0, 2))

    def detach(self) -> "Terms":
        return Terms(self.logp.detach(), self.weight.detach())


def _terms(logp: torch.Tensor, weight: torch.Tensor, batch: Batch, norm: str) -> Terms:
    """Terms with the sum/mean reading applied: 'mean' divides every weight by the response length.
    logp, weight: (D, B, R); logp is zeroed where the weight is 0."""
    if norm == "mean":
        weight = weight / batch.is_resp[:, batch.P:].sum(1).clamp(min=1)[None, :, None]
    return Terms(torch.where(weight != 0, logp, torch.zeros_like(logp)), weight)


# ----------------------------------------------------------------------------------------------
# the baselines: LLaDA's Monte Carlo ELBO, its unweighted twin, d1's one-step estimate


def elbo_mc(model, batch: Batch, tok: Tokenizer, n: int = 2, generator=None, norm: str = "sum") -> Terms:
    """Unbiased MC estimate of the ELBO: mean over n draws of (L/k) * sum_{masked} log p. D = n."""
    P = batch.P
    masks, k = _count_masks(batch, n, generator)
    logp = masked_logprobs(model, batch, masks, tok)                                # (n, B, R)
    L = batch.is_resp[:, P:].sum(1).float()                                         # (B,)
    w = (L / k.float())[..., None] / n                                              # (n, B, 1): L/k, mean over draws
    return _terms(logp, w * masks[..., P:], batch, norm)


def _count_masks(batch: Batch, n: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaDA's masks: per draw and row, a count k ~ U{1..L} and k positions uniformly at random.
    Returns masks (n, B, T) and k (n, B)."""
    B, T = batch.tokens.shape
    dev, P = batch.tokens.device, batch.P
    L = batch.is_resp[:, P:].sum(1)                                                 # (B,)
    k = (torch.rand(n, B, generator=generator, device=dev) * L).floor().long() + 1  # U{1..L}
    # rank the response positions by a random key; the k smallest ranks are masked
    key = torch.rand(n, B, T - P, generator=generator, device=dev).masked_fill(~batch.is_resp[:, P:], 2.0)
    rank = key.argsort(-1).argsort(-1)                                              # (n, B, R)
    masks = torch.zeros(n, B, T, dtype=torch.bool, device=dev)
    masks[..., P:] = (rank < k[..., None]) & batch.is_resp[:, P:]      # an empty response masks nothing
    return masks, k


def mc_unweighted(model, batch: Batch, tok: Tokenizer, n: int = 2, generator=None, norm: str = "sum") -> Terms:
    """The elbo_mc masks with weight 1; (2/n) * sum over draws so n = 2 covers ~L tokens. D = n."""
    P = batch.P
    masks, _ = _count_masks(batch, n, generator)
    logp = masked_logprobs(model, batch, masks, tok)
    return _terms(logp, (2.0 / n) * masks[..., P:].float(), batch, norm)


def one_step(model, batch: Batch, tok: Tokenizer, generator=None, norm: str = "sum", p_prompt: float = 0.0) -> Terms:
    """d1's estimator (Eq. O): response fully masked (t = 1), one pass, every token scored once, no
    weight. p_prompt > 0 also masks each prompt token with that probability (d1's regulariser). D = 1."""
    B, T = batch.tokens.shape
    P, dev = batch.P, batch.tokens.device
    prompt = batch.tokens[:, :P]
    if p_prompt > 0:
        drop = (torch.rand(B, P, generator=generator, device=dev) < p_prompt) & batch.is_prompt[:, :P]
        prompt = apply_mask(prompt, drop, prompt >= tok.img_offset, tok)
    logp = masked_logprobs(model, batch, batch.is_resp[None], tok, prompt_tokens=prompt)   # (1, B, R)
    return _terms(logp, batch.is_resp[None, :, P:].float(), batch, norm)


ESTIMATORS = {"complementary": complementary, "elbo_mc": elbo_mc, "mc_unweighted": mc_unweighted,
              "one_step": one_step}


# ----------------------------------------------------------------------------------------------
# the reference: exact values by enumeration (tiny L only; tests and the estimator study)


@torch.no_grad()
def exact(model, batch: Batch, tok: Tokenizer, chunk: int = 256) -> dict:
    """Exact quantities for ONE (x, y) pair (batch of size 1) with L <= 12 response tokens
    (AssertionError otherwise). Returns a dict of floats in nats, keys below, plus "L".

    Builds the table c[S][i] = log p(y_i | y with the set S masked, x) for every non-empty S and i in S
    (2^L - 1 forward rows), then:
      elbo           = sum_S (k-1)!(L-k)!/L!       * sum_{i in S} c[S][i]      (k = |S|)
      complementary  = 2 * sum_S k!(L-k)!/(L+1)!   * sum_{i in S} c[S][i]      (E of Eq. C, t1 ~ U[0,1])
      mc_unweighted  = 2 * sum_S 1 / (L * C(L,k))  * sum_{i in S} c[S][i]      (E with n = 2)
      one_step       = sum_i c[all][i]
      any_order      = log p(y) of the sampler that reveals one uniformly random masked position per
                       step: h(U) = sum_{i in U} h(U \\ i) * p(y_i | U \\ i revealed) / (L - |U| + 1),
                       over revealed sets U, log h(full).
    """
    assert batch.tokens.shape[0] == 1, "exact(): one (x, y) pair at a time"
    P = batch.P
    pos = batch.is_resp[0].nonzero().squeeze(1).tolist()                           # response positions
    L = len(pos)
    assert L <= 12, f"exact(): L={L} is too long to enumerate"
    subsets = [S for k in range(1, L + 1) for S in itertools.combinations(range(L), k)]
    masks = torch.zeros(len(subsets), 1, batch.tokens.shape[1], dtype=torch.bool, device=batch.tokens.device)
    for r, S in enumerate(subsets):
        masks[r, 0, [pos[i] for i in S]] = True
    rows = [masked_logprobs(model, batch, masks[i:i + chunk], tok) for i in range(0, len(subsets), chunk)]
    logp = torch.cat(rows)[:, 0].double()                                           # (|subsets|, R)
    c = {S: {i: logp[r, pos[i] - P].item() for i in S} for r, S in enumerate(subsets)}
    elbo = comp = mcu = 0.0
    for S, row in c.items():
        k, s = len(S), sum(row.values())
        elbo += math.factorial(k - 1) * math.factorial(L - k) / math.factorial(L) * s
        comp += 2 * math.factorial(k) * math.factorial(L - k) / math.factorial(L + 1) * s
        mcu += 2 / (L * math.comb(L, k)) * s
    full = tuple(range(L))
    # any-order likelihood by DP over revealed sets U (bitmask); masked set = complement of U
    h = {0: 0.0}                                                                     # log h(U)
    for size in range(1, L + 1):
        for U in itertools.combinations(range(L), size):
            terms = []
            for i in U:
                prev = tuple(j for j in U if j != i)
                masked_before = tuple(j for j in full if j not in prev)              # i is among them
                terms.append(h[_bits(prev)] + c[masked_before][i] - math.log(L - len(prev)))
            h[_bits(U)] = torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0).item()
    return {"elbo": elbo, "complementary": comp, "mc_unweighted": mcu,
            "one_step": sum(c[full].values()), "any_order": h[_bits(full)], "L": L}


def _bits(U) -> int:
    return sum(1 << i for i in U)
