"""
The backbone: one small bidirectional transformer that maps token ids to logits (METHOD.md §1).

Paper mapping. LaViDa-R1 (arXiv 2602.14147), like LaViDa-O (arXiv 2509.19244) under it, is a
masked-diffusion language model: a *bidirectional* transformer in the style of LLaDA ("Large
Language Diffusion Models", arXiv 2502.09992), trained to predict the original token at every
[MASK] position. The real model is a 10.4B Elastic-MoT with a SigLIP vision encoder. We replace all
of that with one small transformer over a single unified vocabulary: text tokens + VQ image codes
(+ special tokens), so "understanding" and "generation" are both just predicting tokens.

What this file does NOT know: anything about masking, noise schedules or sampling. It is a plain
function idx (B, T) -> logits (B, T, V). The diffusion loss and the sampler (diffusion.py,
METHOD.md §2-§3) just put [MASK] ids into idx.

Attention layout. Two choices, picked by cfg.prefix_dlm:
  * plain bidirectional: every token attends to every (non-PAD) token.
  * prefix-DLM (LaViDa, arXiv 2505.16839): prompt tokens attend only to prompt tokens, response
    tokens attend to everything. The prompt's keys/values then never depend on the response, so the
    sampler can encode the prompt once (`encode_prefix`) and reuse its KV cache on every denoising
    step (`forward_cached`), running only the response tokens through the network (METHOD.md §3).

Simplified (METHOD.md §9): one modality-agnostic stack (no MoT branches, no vision tower, no
per-modality widths); LLaMA-style parts (RMSNorm, RoPE, SwiGLU, no biases); positions 0..T-1 over
the concatenated sequence, optionally plus a learned absolute-position table (cfg.abs_pos), and no
2D image positions; no final norm before an untied output head.

Initialisation matters more than anything else here at toy size: with GPT-2's N(0, 0.02) the toy
model never learned to *read* its input image within the CPU budget; fan-in init does it in ~2000
steps (`init_weights`, RESULTS.md).

The file reads top-down: the Transformer, then its Block, attention (with RoPE), MLP and norm, and the
prefix cache. `cfg` is a config.ModelConfig (the dataclass; this file imports nothing of the project).

Exercise it:  python -m pytest tests/test_model.py -q
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class Transformer(nn.Module):
    """The whole network: token ids (B, T) -> logits (B, T, vocab_size), plus the prefix-cache pair
    encode_prefix / forward_cached. vocab_size is the unified vocabulary's (tokens.Tokenizer.vocab_size:
    special tokens, words, then VQ codes)."""

    def __init__(self, cfg, vocab_size: int):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        # optional learned absolute positions on top of RoPE. Why: the shared layout puts every image
        # code at a fixed position, so "which cell is this code in?" is a lookup by absolute position.
        # RoPE only sees distances, and a tiny model learns that lookup slowly; a GPT-2 style table
        # makes it one step. Off by default at scale (LLaDA / LaViDa use RoPE alone).
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model) if cfg.abs_pos else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        # no final norm before the head, and an untied head: the head reads the raw residual stream.
        # A final RMSNorm (standard in pre-norm LMs) was measured slower to learn the toy's image
        # lookup (RESULTS.md); untied costs only V x d parameters at this size.
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        # rotary tables are derived from cfg, not learned: non-persistent buffers (not in state_dict)
        cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.max_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)     # (max_len, hs/2)
        self.register_buffer("rope_sin", sin, persistent=False)     # (max_len, hs/2)
        self.init_weights()

    def init_weights(self):
        """Fan-in init: embedding tables N(0, 1), every matrix N(0, 1/fan_in), and the two
        projections that write into the residual stream a further 1/sqrt(2 n_layer) (GPT-2), so the
        stream's variance does not grow with depth.

        Why not GPT-2's N(0, 0.02) everywhere: 0.02 is ~1/sqrt(d) for d ~ 2500. At d = 128 it makes
        every weight ~4x smaller than fan-in and the embeddings 50x smaller than N(0, 1), so each Adam
        step (size ~lr, whatever the weight's scale) moves them by a large fraction of their size.
        Measured (RESULTS.md): on a bare "find the red circle among 16 image codes" probe the 0.02
        model did not learn the lookup in 1500 steps, while fan-in did it in a few hundred; in the toy
        SFT run the same change brought grounding from 0.09 to 0.80 mIoU at step 2000."""
        for name, mod in self.named_modules():                     # norm gains stay at 1
            if not isinstance(mod, (nn.Linear, nn.Embedding)):
                continue
            std = 1.0 if isinstance(mod, nn.Embedding) else mod.in_features ** -0.5
            if name.endswith(("attn.proj", "mlp.down")):                # writes into the residual stream
                std = std / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(mod.weight, mean=0.0, std=std)

    # -- internals ------------------------------------------------------------------------------

    def _run(self, idx, mask, pos_offset=0, past=None):
        """Embed idx (B, T) at positions pos_offset..pos_offset+T-1, run the blocks (each given its
        layer of `past` if any), return logits (B, T, V) and the per-layer new (k, v)."""
        B, T = idx.shape
        if pos_offset + T > self.cfg.max_len:
            raise ValueError(f"sequence of {pos_offset + T} tokens exceeds model.max_len="
                             f"{self.cfg.max_len}; raise --model.max_len")
        cos = self.rope_cos[pos_offset:pos_offset + T]              # (T, hs/2)
        sin = self.rope_sin[pos_offset:pos_offset + T]              # (T, hs/2)
        x = self.tok_emb(idx)                                       # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[pos_offset:pos_offset + T]  # (T, C) broadcast over B
        x = self.drop(x)
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, mask, None if past is None else past[i])
            kvs.append(kv)
        logits = self.head(x)                                       # (B, T, V)
        return logits, kvs

    @staticmethod
    def _mask(key_valid, q_len, q_prompt=None, k_prompt=None):
        """Boolean attention mask (B, 1, Tq, Tk), True = may attend. The queries are the LAST q_len
        of the Tk key positions (Tq == Tk for a full forward; Tq = R < Tk for the cached path).
          * a PAD key (key_valid False) is seen by nobody,
          * under prefix-DLM, a prompt query sees only prompt keys,
          * every query sees itself, so no softmax row is all -inf (SDPA would return NaN for
            fully-masked PAD rows); this never adds a PAD key to a real token's row."""
        B, Tk = key_valid.shape
        allow = key_valid[:, None, :].expand(B, q_len, Tk)          # (B, Tq, Tk)
        if q_prompt is not None:
            # response query (q_prompt False) -> anything; prompt query -> prompt keys only
            allow = allow & (~q_prompt[:, :, None] | k_prompt[:, None, :])  # (B, Tq, Tk)
        q_pos = torch.arange(Tk - q_len, Tk, device=key_valid.device)     # (Tq,) key index of query
        diag = q_pos[:, None] == torch.arange(Tk, device=key_valid.device)[None, :]  # (Tq, Tk)
        return (allow | diag)[:, None]                              # (B, 1, Tq, Tk)

    # -- public API -----------------------------------------------------------------------------

    def forward(self, idx, valid=None, is_prompt=None):
        """idx: (B, T) long. valid: (B, T) bool, False at PAD (None = all real). is_prompt: (B, T)
        bool, used only when cfg.prefix_dlm. Returns logits (B, T, V) float (unnormalised); rows at
        PAD positions are finite garbage. Positions are the absolute indices 0..T-1 of idx.
        Raises ValueError if T > cfg.max_len."""
        use_prefix = self.cfg.prefix_dlm and is_prompt is not None
        if valid is None and not use_prefix:
            mask = None  # plain full attention: lets SDPA pick its fastest (flash) kernel on GPU
        else:
            if valid is None:
                valid = torch.ones_like(idx, dtype=torch.bool)
            p = is_prompt.bool() if use_prefix else None
            mask = self._mask(valid.bool(), idx.shape[1], p, p)
        logits, _ = self._run(idx, mask)
        return logits

    def encode_prefix(self, idx_prompt, valid_prompt=None) -> PrefixCache:
        """Run the prompt (B, P) alone and keep every layer's (k, v). Under prefix-DLM the prompt
        never looks at the response, so these are exactly the prompt's k, v inside any full
        forward, whatever the response is: compute once, reuse on every denoising step.
        valid_prompt: (B, P) bool, False at PAD (None = all real). Raises RuntimeError unless
        cfg.prefix_dlm."""
        self._require_prefix_dlm()
        if valid_prompt is None:
            valid_prompt = torch.ones_like(idx_prompt, dtype=torch.bool)
        valid_prompt = valid_prompt.bool()
        # all queries here are prompt queries, and all keys prompt keys: the mask is just PAD + self
        _, kvs = self._run(idx_prompt, self._mask(valid_prompt, idx_prompt.shape[1]))
        return PrefixCache(kv=kvs, valid=valid_prompt)

    def forward_cached(self, idx_resp, cache: PrefixCache, valid_resp=None):
        """Run only the response (B, R) at positions P..P+R-1, attending to [cached prompt keys ;
        response keys]. Returns logits (B, R, V), equal to forward(cat(prompt, resp), valid,
        is_prompt)[:, P:] up to float rounding. valid_resp: (B, R) bool (None = all real). Raises
        RuntimeError unless cfg.prefix_dlm, ValueError if P + R > cfg.max_len."""
        self._require_prefix_dlm()
        if valid_resp is None:
            valid_resp = torch.ones_like(idx_resp, dtype=torch.bool)
        key_valid = torch.cat([cache.valid, valid_resp.bool()], dim=1)    # (B, P+R)
        # response queries see every valid key (prompt or response), so no prompt/response split
        mask = self._mask(key_valid, idx_resp.shape[1])             # (B, 1, R, P+R)
        logits, _ = self._run(idx_resp, mask, pos_offset=cache.length, past=cache.kv)
        return logits

    def _require_prefix_dlm(self):
        if not self.cfg.prefix_dlm:
            raise RuntimeError("the prefix KV cache needs --model.prefix_dlm=true: with full "
                               "bidirectional attention the prompt's k/v depend on the response")

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count. non_embedding=True counts only the transformer body (the blocks): it
        drops the token embedding, the absolute-position table and the output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.head.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, T: int) -> int:
        """Training (forward + backward) FLOPs per token at sequence length T (PaLM, arXiv
        2204.02311, appendix B):
            6 * N  +  12 * n_layer * d_model * T
        N = body params + head params (every weight a token is multiplied by: 2 FLOPs per weight
        forward, 4 backward -> 6; the embedding is a lookup and costs none). The second term is
        QK^T and attention @ V: 2 matmuls * 2 FLOPs * d_model * T per layer forward, x3 with
        backward. Used for MFU = flops_per_token * tokens_per_s / peak_flops."""
        n = self.num_params(non_embedding=True) + self.head.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.d_model * T


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). Pre-norm keeps the
    residual stream an identity path, which trains stably without warmup tricks."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model), SelfAttention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.d_model), SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, past_kv=None):
        a, kv = self.attn(self.norm1(x), cos, sin, mask, past_kv)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, kv


class SelfAttention(nn.Module):
    """Multi-head NON-causal attention. The mask, not the module, decides who sees whom."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)  # residual proj: scaled init
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask, past_kv=None):
        """x: (B, T, C). mask: (B, 1, T, T_keys) bool, True = may attend, or None = all.
        past_kv: optional (k, v) of a cached prefix, each (B, nh, P, hs), prepended to the keys.
        Returns the output (B, T, C) and this call's own (k, v) (after RoPE) for caching."""
        C = x.shape[-1]
        q, k, v = self.qkv(x).split(C, dim=2)                       # 3 x (B, T, C)
        # split the channels into heads: C = nh * hs, each head attends on its own hs channels
        q, k, v = (rearrange(z, "b t (h d) -> b h t d", h=self.n_head) for z in (q, k, v))  # (B, nh, T, hs)
        # rotate q and k by their absolute positions; v carries content only, so it is not rotated
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = (k, v)
        if past_kv is not None:
            # keys = [cached prompt ; this call's tokens]; the cached k already has its RoPE applied
            k = torch.cat([past_kv[0], k], dim=2)                   # (B, nh, P+T, hs)
            v = torch.cat([past_kv[1], v], dim=2)                   # (B, nh, P+T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=False,
            dropout_p=self.dropout if self.training else 0.0)       # (B, nh, T, hs)
        y = rearrange(y, "b h t d -> b t (h d)")                    # heads side by side again: (B, T, C)
        return self.resid_drop(self.proj(y)), new_kv


def rope_tables(head_dim: int, max_len: int, base: float):
    """cos/sin tables, each (max_len, head_dim/2) float32, for rotary position embeddings
    ("RoFormer", arXiv 2104.09864). Angles in radians: position * base^(-2i/head_dim)."""
    # frequency of pair i is base^(-2i/hs): low pairs rotate fast (local order), high pairs slowly
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (hs/2,)
    pos = torch.arange(max_len).float()                                             # (L,)
    angles = torch.outer(pos, inv_freq)                                             # (L, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[..., i], x[..., i + hs/2]) by angle pos * freq_i ("rotate-half" layout).
    x: (B, nh, T, hs); cos, sin: (T, hs/2). Because q and k are both rotated, q.k depends only on
    the *difference* of positions: attention is translation invariant, which is why left padding
    does not change the valid tokens' outputs (up to float error)."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()                 # (B, nh, T, hs/2) each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)  # (B, nh, T, hs)
    return out.type_as(x)


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) W_down ("GLU Variants Improve Transformer", arXiv 2002.05202): the
    LLaMA MLP. The gate makes it ~as good as a 4x GELU MLP with 2/3 the hidden width, hence the
    8/3 * d_model default. (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg):
        super().__init__()
        h = mlp_hidden(cfg)
        self.gate = nn.Linear(cfg.d_model, h, bias=False)
        self.up = nn.Linear(cfg.d_model, h, bias=False)
        self.down = nn.Linear(h, cfg.d_model, bias=False)            # residual proj: scaled init
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


def mlp_hidden(cfg) -> int:
    """cfg.mlp_hidden, or 8/3 * d_model rounded UP to a multiple of 32 (friendly matmul shapes)."""
    if cfg.mlp_hidden > 0:
        return cfg.mlp_hidden
    return 32 * math.ceil(math.ceil(8 * cfg.d_model / 3) / 32)


class RMSNorm(nn.Module):
    """LayerNorm without the mean subtraction and bias (LLaMA): cheaper, works as well."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalize in float32: under bf16 autocast the mean of squares loses too many bits
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


@dataclass
class PrefixCache:
    """What `encode_prefix` hands to `forward_cached`: per-layer (k, v), each (B, nh, P, hs) with
    RoPE already applied to k, plus which prompt positions are real keys. Plain tensors, so a caller
    may e.g. repeat_interleave them along dim 0 to share one prompt among several rollouts."""
    kv: list            # n_layer x (k, v)
    valid: torch.Tensor  # (B, P) bool, False = PAD key (ignored by every query)

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def rows(self, idx: torch.Tensor) -> "PrefixCache":
        """The cache of rows idx (B',) of this one, in that order; a row may appear several times."""
        return PrefixCache([(k[idx], v[idx]) for k, v in self.kv], self.valid[idx])
