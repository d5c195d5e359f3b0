"""
Masked diffusion over the response: the forward (masking) process and the SFT loss (METHOD.md §2),
and the sampler (METHOD.md §3).

Paper mapping. LaViDa-R1 (arXiv 2602.14147) post-trains LaViDa-O (arXiv 2509.19244), a masked
diffusion model in the line of MDLM ("Simple and Effective Masked Diffusion Language Models",
arXiv 2406.07524) and LLaDA ("Large Language Diffusion Models", arXiv 2502.09992):
  forward process   y_t: each response token independently becomes [M] with probability t,
                    t ~ U(eps, 1). The prompt (question text, input-image codes) is never masked.
                    Text slots get [MASK], image slots [IMASK] (LaViDa-O keeps a separate VQ mask id).
  SFT loss          cross-entropy on the masked response positions only, weighted either
                      "mean": plain mean over masked tokens (LaViDa / LaViDa-O; the default), or
                      "elbo": (1/t) * sum CE / R per sequence (LLaDA / MDLM: the negative ELBO).
                    With `complementary` each example is also trained with the complementary mask
                    (every response token supervised exactly once per pair: LaViDa, arXiv 2505.16839).
                    With `prompt_drop` the text prompt of image-producing examples is replaced by
                    [MASK] so the model also learns the unconditional branch that CFG needs.
                    With `full_mask_frac` (ours, not the paper's) that share of rows is trained at
                    t = 1, the sampler's start state: the toy's reading comes on sooner (RESULTS.md).
  sampler           start from an all-mask response and reveal it over a fixed number of steps:
                      text  -- semi-autoregressive blocks of `block_len`, `tokens_per_step` per step,
                               equal counts per step (LLaDA's reference `generate`);
                      image -- one block, cosine count schedule over `image_steps` (MaskGIT,
                               arXiv 2202.04200);
                    which masked tokens are revealed: highest confidence (p of the sampled token
                    under the noise-free softmax, LLaDA's "low_confidence") or random. Tokens are
                    sampled by Gumbel-max at a temperature (noise in float64, as LLaDA does);
                    classifier-free guidance on image slots: (1+g) cond - g uncond
                    ("Classifier-Free Diffusion Guidance", arXiv 2207.12598, in Muse's form for
                    masked image tokens, arXiv 2301.00704).
                    It keeps fixed tokens untouched (answer-forcing's inpainting, METHOD.md §5),
                    can start from a partially revealed state (tree search, METHOD.md §6), never
                    re-masks a revealed token, and returns for every position the step at which
                    it was revealed (the order), from which `rebuild_state` recovers any earlier
                    state. An `on_reveal` hook sees what each step revealed and the logits it was
                    sampled from (tree search's uncertainty branching records entropies with it).

Simplified (METHOD.md §9): no timestep shifting, no stratified image-token order (LaViDa-O), no
EOS-confidence hacks, no dynamic/threshold decoding. Every reading is a field of `DiffusionConfig`.

The file reads top-down: sft_loss and the forward process it uses, then sample and its parts.

Exercise: python -m pytest tests/test_diffusion.py -q
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat

from tokens import Batch, Tokenizer

# ----------------------------------------------------------------------------------------------
# the SFT loss (METHOD.md §2) and the forward process it draws


def sft_loss(model, batch: Batch, dcfg, tok: Tokenizer, generator: torch.Generator | None = None,
             t: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """One SFT loss evaluation on a clean batch (targets = batch.tokens).

    With dcfg.complementary the batch is doubled: rows with mask M1 at rate t and rows with the
    complement M2 = resp \\ M1 (expected rate 1 - t), so every response token is supervised once.
    t: (B,) masking rates to use instead of drawing them (tests). Returns (loss, a scalar tensor with
    grad, in nats as masked_ce defines it; stats: floats "loss", "masked_acc" (share of masked tokens
    predicted exactly by argmax), "mask_frac" (masked share of the response positions) and "n" (the
    count the loss is a mean over: masked tokens, or examples under "elbo")).
    """
    B, dev = batch.tokens.shape[0], batch.tokens.device
    if t is None:
        t = sample_t(B, dcfg.eps, dev, generator)
        if dcfg.full_mask_frac > 0:
            # some rows fully masked (t = 1): the sampler's start state, where no visible answer
            # token gives the trace away (and vice versa), so reading the picture is the only way
            full = torch.rand(B, generator=generator, device=dev) < dcfg.full_mask_frac
            t = torch.where(full, torch.ones_like(t), t)
    m1 = draw_mask(batch, t, generator)
    masks, ts = [m1], [t]
    if dcfg.complementary:
        masks.append(batch.is_resp & ~m1)
        ts.append((1 - t).clamp(min=dcfg.eps))      # the complement's rate, for the 1/t weight
    mask, t_row = torch.cat(masks), torch.cat(ts)                              # (kB, T), (kB,)
    rows = repeat(torch.arange(B, device=dev), "b -> (k b)", k=len(masks))      # (kB,) each row's example
    # a t = 1 row has no complement (nothing is left to mask): drop that empty row, and under "elbo"
    # let the full-mask row carry its example's whole weight, so that every example weighs alike (with
    # the empty row kept, a full-mask example would weigh half). Any other row stays even when its draw
    # came out empty: a legitimate draw of the estimator, worth 0. Under "mean" an empty row adds 0 to
    # both sums of the plain mean: every one is left out of the forward (same loss, fewer rows).
    if dcfg.loss_weight == "mean":
        keep = mask.any(1)                                                      # (kB,)
    else:
        full = t >= 1                                                           # (B,) its complement is empty
        keep = torch.cat([torch.ones_like(full), ~full]) if dcfg.complementary else torch.ones_like(full)
    rows, mask, t_row = rows[keep], mask[keep], t_row[keep]
    # under "elbo", each row's share of its example: 1 / (its example's kept rows), summing to B
    row_weight = 1.0 / torch.bincount(rows, minlength=B).float()[rows] if dcfg.loss_weight == "elbo" else None
    big = batch.rows(rows)
    inp = apply_mask(big.tokens, mask, big.is_image, tok)                       # y_t, (kB, T)
    if dcfg.prompt_drop > 0:
        # CFG training: drop the text prompt of image-producing rows with probability prompt_drop
        gen_rows = torch.tensor([x in ("t2i", "edit") for x in big.tasks], device=dev)
        drop = (torch.rand(mask.shape[0], generator=generator, device=dev) < dcfg.prompt_drop) & gen_rows
        inp = drop_prompt_text(big.with_tokens(inp), drop, tok)
    logits = model(inp, big.valid, big.is_prompt)                                # (kB, T, V)
    loss = masked_ce(logits, big.tokens, mask, t_row, dcfg.loss_weight, big.is_resp.sum(1), row_weight)
    with torch.no_grad():
        acc = ((logits.argmax(-1) == big.tokens) & mask).sum() / mask.sum().clamp(min=1)
    # n: what the loss is a mean over (masked tokens; examples under "elbo"), so that callers can
    # weight micro-batches by it and get the mean over all of them (train.sft_step)
    n = mask.sum() if dcfg.loss_weight == "mean" else B
    return loss, {"loss": loss.item(), "masked_acc": acc.item(), "mask_frac": (mask.sum() / big.is_resp.sum()).item(),
                  "n": float(n)}


def sample_t(B: int, eps: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """t ~ U(eps, 1), shape (B,): eps > 0 keeps the 1/t weight finite and the mask non-empty in
    expectation."""
    return eps + (1 - eps) * torch.rand(B, generator=generator, device=device)


def draw_mask(batch: Batch, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """M(y_t): each response position masked independently with probability t (one t per row).
    t: (B,) -> mask (B, T) bool, never True outside the response."""
    u = torch.rand(batch.tokens.shape, generator=generator, device=batch.tokens.device)
    return (u < t[:, None]) & batch.is_resp


def apply_mask(tokens: torch.Tensor, mask: torch.Tensor, is_image: torch.Tensor, tok: Tokenizer) -> torch.Tensor:
    """Replace tokens where `mask` is True by [IMASK] (image slots) or [MASK] (text slots).
    tokens (..., T) long; mask, is_image bool, broadcastable to it (e.g. (n, B, T) masks over one
    (B, T) batch). Returns a new tensor of the broadcast shape."""
    filler = torch.where(is_image, torch.full_like(tokens, tok.IMASK), torch.full_like(tokens, tok.MASK))
    return torch.where(mask, filler, tokens)


def drop_prompt_text(batch: Batch, rows: torch.Tensor, tok: Tokenizer) -> torch.Tensor:
    """The unconditional input for CFG: prompt *words* of the selected rows (rows: (B,) bool)
    become [MASK]; returns tokens (B, T). The task tag and the input picture's codes stay (edit
    keeps its source image)."""
    t = batch.tokens
    words = batch.is_prompt & (t >= tok.n_special) & (t < tok.img_offset)
    return torch.where(words & rows[:, None], torch.full_like(t, tok.MASK), t)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, t_row: torch.Tensor,
              weighting: str, n_resp: torch.Tensor, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The SFT objective from logits. Only positions with mask=True contribute, so the logits at
    every other position can be anything (tests check exactly that).

      mean:  L = sum_{b,k in M} CE_bk / |M|                           (LaViDa-O: plain mean, no 1/t)
      elbo:  L = sum_b w_b (1/t_b) sum_{k in M_b} CE_bk / R_b / sum_b w_b   (LLaDA SFT: 1/t, per-answer
             length; w_b = row_weight, a row's share of its example: 1/2 for a complementary pair,
             1 for a full-mask row; None = 1 each, the plain mean over rows)
    logits (B, T, V); targets, mask (B, T); t_row, n_resp, row_weight (B,). Returns a scalar in nats
    per token ("mean") or per response position ("elbo").
    """
    ce = F.cross_entropy(rearrange(logits.float(), "b t v -> b v t"), targets, reduction="none")   # (B, T)
    ce = torch.where(mask, ce, torch.zeros_like(ce))     # where, not *: junk logits elsewhere stay out
    if weighting == "mean":
        return ce.sum() / mask.sum().clamp(min=1)
    per_row = ce.sum(1) / t_row / n_resp.clamp(min=1)                                          # (B,)
    w = torch.ones_like(per_row) if row_weight is None else row_weight
    return (w * per_row).sum() / w.sum()


# ----------------------------------------------------------------------------------------------
# the sampler (METHOD.md §3)

@torch.no_grad()
def sample(model, batch: Batch, tok: Tokenizer, dcfg, *, temperature: float | None = None,
           image_temperature: float | None = None, cfg_scale: float | None = None,
           generator: torch.Generator | None = None, order: torch.Tensor | None = None,
           start_step: int = 0, use_cache: bool = True, forbid: torch.Tensor | None = None,
           on_step=None, on_reveal=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill every [MASK]/[IMASK] in the response of `batch` and return (tokens (B, T), order (B, R)).

    batch.tokens holds the canvas: masked slots are filled, every other response token is FIXED and
    never changed (answer-forcing writes '<answer> z </answer>' this way). All rows must share one
    response layout (one task family; AssertionError otherwise). order[b, k] = the global step that
    revealed slot k, or -1 for tokens that were given. To continue a partial state (tree search),
    pass the state's tokens, its `order` (-1 for still-masked and given slots) and `start_step`;
    `rebuild_state` makes both. temperature / image_temperature / cfg_scale: None = dcfg's.
    forbid: (B, V) bool, ids that row b's masked slots may not take (answer-forcing bans the answer
    tags from the inpainted reasoning). Hooks: on_step(g, tokens) before every step g (tests record
    the trajectory); on_reveal(block, reveal, logits, temperature) after each step's reveal (block: the
    response slice, reveal (B, b) bool, logits (B, b, V) as sampled from).
    """
    temperature = dcfg.temperature if temperature is None else temperature
    image_temperature = dcfg.image_temperature if image_temperature is None else image_temperature
    P = batch.P
    resp = batch.tokens[:, P:].clone()                                      # (B, R)
    masked = (resp == tok.MASK) | (resp == tok.IMASK)
    order = torch.full_like(resp, -1) if order is None else order.masked_fill(masked, -1)
    allowed = allowed_ids(batch, tok, forbid)                               # (B, R, V)
    denoiser = Denoiser(model, batch, tok, dcfg, dcfg.cfg_scale if cfg_scale is None else cfg_scale, use_cache)
    plan = make_plan(denoiser.R_text, denoiser.n_img, dcfg)
    for g in range(start_step, len(plan)):
        st = plan[g]
        if on_step is not None:
            on_step(g, torch.cat([batch.tokens[:, :P], resp], 1))
        blk = slice(st.lo, st.hi)        # only the active block's slots can be revealed: all work below is on them
        cand = masked[:, blk]                                               # (B, b) candidates
        filled = (order[:, blk] >= 0).sum(1)                                # revealed by the sampler so far
        k = (st.cum_target(cand.sum(1) + filled) - filled).clamp(min=0)    # (B,) to reveal now
        if not bool((k > 0).any()):
            continue
        logits = denoiser.logits(resp, blk, st.cosine).masked_fill(~allowed[:, blk], float("-inf"))   # (B, b, V)
        temp = image_temperature if st.cosine else temperature  # each step is one block of one modality
        x0 = gumbel_argmax(logits, temp, generator)                         # (B, b) x0 ~ p(. | y_t)
        if dcfg.remask == "random":
            conf = torch.rand(cand.shape, generator=generator, device=resp.device)
        else:  # confidence = p(x0) under the noise-free softmax, not the Gumbel-perturbed one (as LLaDA)
            conf = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
        # reveal the k most confident candidates of each row: rank the block's slots by confidence
        rank = conf.masked_fill(~cand, -1.0).argsort(1, descending=True).argsort(1)   # (B, b), 0 = most
        reveal = (rank < k[:, None]) & cand                                 # (B, b)
        resp[:, blk] = torch.where(reveal, x0, resp[:, blk])
        order[:, blk] = torch.where(reveal, torch.full_like(cand, g, dtype=torch.long), order[:, blk])
        masked[:, blk] = cand & ~reveal
        if on_reveal is not None:
            on_reveal(blk, reveal, logits, temp)
    return torch.cat([batch.tokens[:, :P], resp], 1), order


def allowed_ids(batch: Batch, tok: Tokenizer, forbid: torch.Tensor | None = None) -> torch.Tensor:
    """(B, R, V) bool: the ids each response slot may take (image codes in image slots, words and
    tags in text slots, less row b's `forbid` (B, V))."""
    text_ok, img_ok = vocab_masks(tok, batch.tokens.device)
    allowed = torch.where(batch.is_image[:, batch.P:, None], img_ok, text_ok)          # (B, R, V)
    return allowed if forbid is None else allowed & ~forbid[:, None, :]


def vocab_masks(tok: Tokenizer, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ids a text slot and an image slot may take: (V,) bool each."""
    V = tok.vocab_size
    img = torch.zeros(V, dtype=torch.bool, device=device)
    img[tok.img_offset:] = True
    text = ~img
    for bad in (tok.PAD, tok.MASK, tok.IMASK, tok.UNK, tok.BOI, tok.EOI, *tok.TASK.values()):
        text[bad] = False
    return text, img


class Denoiser:
    """The model as the sampler calls it: the logits of a block of the response given the current
    canvas (B, R). With a prefix-DLM the prompt is encoded once for every step (model.encode_prefix);
    with cfg_scale > 0 on a response with image slots the image steps also run the prompt-dropped
    canvas and mix the two (classifier-free guidance on image slots only)."""

    def __init__(self, model, batch: Batch, tok: Tokenizer, dcfg, cfg_scale: float, use_cache: bool = True):
        P, dev = batch.P, batch.tokens.device
        is_img = batch.is_image[:, P:]                                              # (B, R)
        assert bool((batch.is_resp[:, P:] == batch.is_resp[0:1, P:]).all()), "sample(): one layout per call"
        self.R_text, self.n_img = int((batch.is_resp[0, P:] & ~is_img[0]).sum()), int(is_img[0].sum())
        self.model, self.batch, self.is_img, self.dedupe, self.cfg_scale = model, batch, is_img, dcfg.dedupe, cfg_scale
        # prefix-DLM: the prompt never attends to the response, so encode it once for all steps
        use_cache = use_cache and uses_prefix_cache(model)
        self.guided = cfg_scale > 0 and self.n_img > 0
        self.uncond = batch.with_tokens(drop_prompt_text(batch, torch.ones(len(batch.tokens), dtype=torch.bool, device=dev), tok)) \
            if self.guided else None
        self.cache = encode_prompts(model, batch.tokens[:, :P], batch.valid[:, :P]) if use_cache else None
        self.ucache = encode_prompts(model, self.uncond.tokens[:, :P], self.uncond.valid[:, :P]) \
            if (use_cache and self.guided) else None

    def logits(self, resp: torch.Tensor, blk: slice, image_step: bool) -> torch.Tensor:
        """(B, b, V) float logits of the block `blk` of the response `resp` (B, R)."""
        logits = _response_logits(self.model, self.batch, resp, self.cache, self.dedupe)[:, blk].float()
        if self.guided and image_step:   # guidance only matters on image steps; skip the extra pass on text
            ul = _response_logits(self.model, self.uncond, resp, self.ucache, self.dedupe)[:, blk].float()
            # CFG on image slots only: (1+g) cond - g uncond (Muse's form, METHOD.md §3)
            g = self.cfg_scale
            logits = torch.where(self.is_img[:, blk, None], (1 + g) * logits - g * ul, logits)
        return logits


def uses_prefix_cache(model) -> bool:
    """Whether `model` is a prefix-DLM whose prompt can be encoded once (model.encode_prefix /
    forward_cached, METHOD.md §3). A model without `cfg` (a test stub) has none. A wrapper (DDP's
    .module, a compiled model's ._orig_mod) that hides a prefix-DLM's methods is a ValueError, not a
    silent fall-back to the slow full pass: pass common.unwrap(model) instead."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if getattr(getattr(inner, "cfg", None), "prefix_dlm", False):
            raise ValueError(f"{type(model).__name__} wraps a prefix-DLM model but hides its prefix cache "
                             f"(encode_prefix); pass the unwrapped model (common.unwrap)")
        return False
    return bool(cfg.prefix_dlm) and hasattr(model, "encode_prefix")


def encode_prompts(model, prompt: torch.Tensor, valid: torch.Tensor):
    """model.encode_prefix (B, P) with each DISTINCT prompt row encoded once and its keys/values
    indexed back to every row that holds it: a group's N rollouts, and the rollout rows of one prompt
    in the update, share one encoding. Same values as encoding every row (up to float rounding)."""
    P = prompt.shape[1]
    uniq, inv = torch.unique(torch.cat([prompt, valid.long()], 1), dim=0, return_inverse=True)
    if len(uniq) == len(prompt):
        return model.encode_prefix(prompt, valid)
    cache = model.encode_prefix(uniq[:, :P], uniq[:, P:].bool())                  # (U, ...) -> (B, ...)
    return cache.rows(inv)


def _response_logits(model, batch: Batch, resp: torch.Tensor, cache, dedupe: bool = True) -> torch.Tensor:
    """Logits at the response positions (B, R, V); with a prefix cache only the response runs.
    Rows whose whole canvas (prompt and response) is identical get identical logits, so each
    distinct canvas runs once: the N samples of a group start from one all-[M] canvas, a tree
    branch's N children from one rebuilt state, and a confident policy's samples stay equal for many
    steps. What is sampled does not change (the noise is drawn per row afterwards). dedupe=False
    (--diffusion.dedupe=false) runs every row."""
    P = batch.P
    uniq, inv = torch.unique(torch.cat([batch.tokens[:, :P], resp], 1), dim=0, return_inverse=True) \
        if dedupe else (resp, None)
    if len(uniq) < len(resp):
        first = torch.full((len(uniq),), len(resp), dtype=torch.long, device=resp.device)
        first = first.scatter_reduce(0, inv, torch.arange(len(resp), device=resp.device), "amin")   # (U,)
        sub = None if cache is None else cache.rows(first)
        return _response_logits(model, batch.rows(first), resp[first], sub)[inv]                   # (U,...) -> (B,...)
    if cache is not None:
        return model.forward_cached(resp, cache, batch.valid[:, P:])
    tokens = torch.cat([batch.tokens[:, :P], resp], 1)
    return model(tokens, batch.valid, batch.is_prompt)[:, P:]


def make_plan(R_text: int, n_img: int, dcfg) -> list[PlanStep]:
    """The whole schedule for a response of R_text text slots then n_img image slots: text blocks
    first (the reasoning / plan), then the image block. One PlanStep per denoising step, in order."""
    plan = []
    for lo in range(0, R_text, dcfg.block_len):
        hi = min(lo + dcfg.block_len, R_text)
        S = math.ceil((hi - lo) / dcfg.tokens_per_step)
        plan += [PlanStep(lo, hi, j, S, False) for j in range(S)]
    if n_img:
        S = min(dcfg.image_steps, n_img)
        plan += [PlanStep(R_text, R_text + n_img, j, S, True) for j in range(S)]
    return plan


@dataclass
class PlanStep:
    """One denoising step of the plan: the active block [lo, hi) of the response, the step's index
    j within the block and the block's step count S, and the count schedule."""
    lo: int
    hi: int
    j: int
    S: int
    cosine: bool

    def cum_target(self, m: torch.Tensor) -> torch.Tensor:
        """How many of the block's m sampler-filled tokens are revealed after this step, per row.
        linear (LLaDA): equal shares, the remainder to the earliest steps;
        cosine (MaskGIT): a fraction cos(pi/2 * (j+1)/S) of them is still masked, at least one token
        revealed per step and at least one kept masked until the last (MaskGIT's clamp)."""
        if self.cosine:
            # MaskGIT's rule on top of the cosine: every step reveals at least one token and one
            # stays masked until the last step, so no step of the schedule is wasted (at 16 tokens
            # in 16 steps the bare cosine would leave three steps with nothing to reveal)
            still = m.clone()
            for i in range(self.j + 1):
                if i + 1 == self.S:
                    return m
                cos = torch.floor(m.double() * math.cos(math.pi / 2 * (i + 1) / self.S)).long()
                still = torch.maximum(torch.minimum(torch.ones_like(m), m), torch.minimum(still - 1, cos))
            return m - still
        return (m // self.S) * (self.j + 1) + torch.minimum(m % self.S, torch.full_like(m, self.j + 1))


def gumbel_argmax(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """x0 ~ softmax(logits / T) via argmax(logits/T + Gumbel): logits (..., V) -> ids (...); T <= 0
    is greedy argmax. Float64 noise: low-precision Gumbel noise measurably hurts masked-diffusion
    sampling ("Masked Diffusion Models are Secretly Time-Agnostic Masked Models and Exploit
    Inaccurate Categorical Sampling", arXiv 2409.02908; LLaDA samples the same way)."""
    if temperature <= 0:
        return logits.argmax(-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    g = -torch.log(-torch.log(u.clamp_min(1e-20)))
    return (logits.double() / temperature + g).argmax(-1)


# ----------------------------------------------------------------------------------------------
# tree search's state (METHOD.md §6)


def rebuild_state(tokens: torch.Tensor, order: torch.Tensor, step, batch: Batch,
                  tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler's state just before global step `step` (an int, or (B,) long: one step per row),
    from the final tokens and the order alone (LaViDa-R1's cheap tree-search state, METHOD.md §6: no
    intermediate tensors are stored): slots revealed at a step < `step` (and given slots, order -1)
    keep their token, the rest are masked again. Returns (tokens (B, T), order (B, R)) ready for
    sample(..., start_step=step), or start_step=min(step) when the rows' steps differ."""
    P = batch.P
    step = torch.as_tensor(step, device=order.device).reshape(-1, 1)          # (1, 1) or (B, 1)
    again = order >= step                                                      # (B, R)
    remask = torch.zeros_like(tokens, dtype=torch.bool)
    remask[:, P:] = again
    state = apply_mask(tokens, remask, batch.is_image, tok)
    return state, torch.where(again, torch.full_like(order, -1), order)


def image_step_offset(batch: Batch, dcfg) -> int:
    """Global index of the first image step (tree search branches at offset + s)."""
    P = batch.P
    is_img = batch.is_image[0, P:]
    return len(make_plan(int((batch.is_resp[0, P:] & ~is_img).sum()), 0, dcfg))
