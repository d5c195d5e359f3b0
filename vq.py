"""
The image tokenizer: a tiny VQ-VAE that turns a picture into a grid of discrete codes and back
(METHOD.md §1: images are VQ tokens of the unified vocabulary; §9: what is simplified).

Paper mapping. LaViDa-O (arXiv 2509.19244), the base model of LaViDa-R1 (arXiv 2602.14147), sees
and draws images as VQ tokens: it uses the VQ-VAE of Meissonic (arXiv 2410.08261; downsampling 16,
an 8192-entry codebook), so a 1024px picture is a 64x64 grid of code ids that sit in the same
vocabulary as the words, at an offset. Image understanding reads those codes in the prompt; editing
and text-to-image *generate* them by masked diffusion and the VQ decoder turns them back into
pixels. We keep exactly that contract and replace the tokenizer with a tiny VQ-VAE trained in under a
minute on our synthetic shape world:

    image (N, H, W, 3) --encoder--> z_e (N, D, h, w) --nearest code--> codes (N, h*w) in [0, K)
    codes --codebook lookup--> z_q (N, D, h, w) --decoder--> image (N, H, W, 3) in [0, 1]

At the toy size (32px images, a 4x4 board, downsample 8) that is 16 tokens per image, one per board
cell: a 64-entry codebook for 25 cell contents (4 colours x 3 kinds x 2 sizes + empty) by default,
and in the looks world a 512-entry one for 294 distinct cell pictures, the contents in their looks
(world_extras.py: 12 shades x fills per shape, 6 floors per empty cell). The looks are nuisance that no
reward reads, but the codes must keep them apart, or the conditional entropy of a picture (what a
prompt leaves open) would vanish in the tokenizer.

The VQ-VAE recipe is the original one ("Neural Discrete Representation Learning", van den Oord et
al. 2017, arXiv 1711.00937):
  * nearest-neighbour quantisation by L2 distance,
  * straight-through estimator: the decoder's gradient w.r.t. z_q is copied onto z_e,
  * commitment loss beta * ||z_e - sg(e)||^2 keeps the encoder close to the codes it picks,
  * the codebook itself is not trained by gradients but by exponential moving averages of the
    encoder outputs assigned to each code (their appendix; Laplace-smoothed counts, as in Sonnet),
  * plus dead-code restarts (as in Jukebox, arXiv 2005.00341): a code that stops being picked is
    moved onto a random encoder output from the current batch, so the whole codebook stays in use.

Simplified vs. Meissonic's tokenizer (METHOD.md §9): no perceptual (LPIPS) or adversarial (GAN)
loss, no attention blocks, no normalisation layers, no lookup-free/factorised codes; plain MSE on
pixels (the shape world is flat colours on black, so MSE is enough); and the encoder and decoder are
patch-local (one token sees only its own patch, see VQVAE), so a cell's code does not depend on its
neighbours.

Conventions: pictures are channels-last (N, H, W, 3), uint8 or float in [0, 1] (what world.render
makes); codes are (N, h*w) long, row-major over the token grid; both come back on the CPU.

Exercise it:
    python vq.py --preset=toy             # trains, prints a report, writes runs/toy/vq_recon.png
    python -m pytest tests/test_vq.py -q
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from tqdm import tqdm

import world
import world_extras
from config import VQConfig


# ----------------------------------------------------------------------------------------------
# building blocks

class Quantizer(nn.Module):
    """Nearest-code vector quantiser with an EMA codebook and dead-code restarts.

    The codebook lives in buffers, not parameters: the optimizer never touches it. In training mode
    every forward pass moves each code towards the mean of the encoder outputs assigned to it:
        N_k <- decay * N_k + (1 - decay) * n_k                  (how many vectors picked code k)
        m_k <- decay * m_k + (1 - decay) * sum_{i: k_i = k} z_i (their sum)
        e_k  = m_k / N~_k,  N~_k = (N_k + eps) / (sum N + K eps) * sum N   (Laplace smoothing:
                                                                       an unused code never /0)
    This is k-means run online, and it is far more stable than learning e by gradient descent.
    """

    def __init__(self, K: int, D: int, decay: float, dead_threshold: float, eps: float = 1e-5):
        super().__init__()
        self.K, self.D, self.decay, self.dead_threshold, self.eps = K, D, decay, dead_threshold, eps
        self.register_buffer("codebook", torch.randn(K, D))           # e: (K, D)
        self.register_buffer("cluster_size", torch.zeros(K))         # N: EMA of per-batch counts
        self.register_buffer("embed_sum", torch.randn(K, D))          # m: EMA of per-code sums
        self.register_buffer("initted", torch.tensor(False))         # data-initialised yet?
        self.restarts = True        # train_vq turns restarts off for the last part of training

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (M, D) -> index (M,) of the nearest code by L2 distance."""
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; the ||z||^2 term is the same for every code, so
        # drop it. One matmul instead of an (M, K, D) broadcast: cheap even for big batches.
        d = -2 * z @ self.codebook.t() + (self.codebook ** 2).sum(1)[None, :]   # (M, K)
        return d.argmin(1)

    @torch.no_grad()
    def _init_from(self, z: torch.Tensor):
        # Data-dependent init: put the codes on random encoder outputs of the first batch, so every
        # code starts where the data is (a randn codebook would be mostly unreachable).
        idx = torch.randint(0, z.shape[0], (self.K,), device=z.device)
        self.codebook.copy_(z[idx])
        self.embed_sum.copy_(z[idx])
        self.cluster_size.fill_(1.0)
        self.initted.fill_(True)

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor):
        onehot = F.one_hot(idx, self.K).type(z.dtype)                  # (M, K)
        n = onehot.sum(0)                                             # (K,) picks per code
        s = onehot.t() @ z                                            # (K, D) sum of picked z
        self.cluster_size.mul_(self.decay).add_(n, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(s, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.K * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.restarts:
            # dead codes: picked less than dead_threshold times per batch (EMA). Move each onto a
            # random encoder output of this batch and give it a count of 1 so it gets a few steps
            # to attract vectors before it can be declared dead again.
            dead = self.cluster_size < self.dead_threshold
            n_dead = int(dead.sum())
            if n_dead:
                pick = z[torch.randint(0, z.shape[0], (n_dead,), device=z.device)]
                self.codebook[dead] = pick
                self.embed_sum[dead] = pick
                self.cluster_size[dead] = 1.0

    def forward(self, z_e: torch.Tensor):
        """z_e (N, D, h, w) -> z_q with straight-through grads (N, D, h, w), codes (N, h, w),
        commitment loss ||z_e - sg(e)||^2 (unweighted; the caller multiplies by beta)."""
        N, D, h, w = z_e.shape
        z = rearrange(z_e, "n d h w -> (n h w) d")                    # (N*h*w, D), row-major cells
        if self.training and not bool(self.initted):
            self._init_from(z.detach())
        idx = self.nearest(z.detach())                                # (N*h*w,)
        z_q = self.codebook[idx]                                      # (N*h*w, D), no grad path
        commit = F.mse_loss(z, z_q)                                   # pulls z_e to its code only
        if self.training:
            self._ema_update(z.detach(), idx)
        # straight-through: forward value is z_q, backward treats quantisation as the identity, so
        # d loss / d z_e = d loss / d z_q. (z_q was looked up before the EMA update, as in the paper.)
        z_q = z + (z_q - z).detach()
        z_q = rearrange(z_q, "(n h w) d -> n d h w", n=N, h=h)        # (N, D, h, w)
        return z_q, rearrange(idx, "(n h w) -> n h w", n=N, h=h), commit


# ----------------------------------------------------------------------------------------------
# the VQ-VAE

class VQVAE(nn.Module):
    """Patch-local encoder (patchify + 1x1 convs) -> quantiser -> mirrored patch-local decoder."""

    def __init__(self, vcfg: VQConfig, image_size: int):
        super().__init__()
        ds = vcfg.downsample
        assert image_size % ds == 0, f"image_size={image_size} must be divisible by vq.downsample={ds}"
        self.vcfg, self.image_size, self.hw = vcfg, image_size, image_size // ds
        C, D, K = vcfg.hidden, vcfg.code_dim, vcfg.codebook_size

        # Patch-local encoder and decoder: the first conv has kernel = stride = downsample (a ViT-style
        # patchify) and everything after it is 1x1, so a token sees exactly its own patch and nothing
        # of its neighbours. Why: with overlapping 4x4/stride-2 convs we measured that 19% of codes
        # changed when a NEIGHBOURING cell was edited, i.e. the same shape got different tokens in
        # different contexts. That made "which shape is in this cell" a far harder mapping for the
        # transformer and made edit / text-to-image targets depend on the neighbours. In the shape
        # world a patch never needs its neighbours, so local is also exact. (Real VQGANs use
        # overlapping receptive fields; their codes are context-dependent.)
        self.encoder = nn.Sequential(
            nn.Conv2d(3, C, ds, stride=ds), nn.ReLU(),                 # (N, C, h, w): one vector per patch
            nn.Conv2d(C, C, 1), nn.ReLU(),
            nn.Conv2d(C, D, 1))                                        # (N, D, h, w)

        self.quantizer = Quantizer(K, D, vcfg.ema_decay, vcfg.dead_threshold)

        # The decoder mirrors it: 1x1 layers, then a transposed conv with kernel = stride = downsample
        # paints each patch from its own code alone. It outputs RGB directly and decode() clamps it
        # into [0, 1]. Why no sigmoid: most target pixels are exactly 0 (black background), which a
        # sigmoid only reaches at logit -inf; Adam rescales the vanishing gradient back to full-size
        # steps, the logits run off to -1000 and learning stops (we measured a collapse to all-black
        # pictures within 100 steps). A linear output reaches 0 exactly.
        self.decoder = nn.Sequential(
            nn.Conv2d(D, C, 1), nn.ReLU(),
            nn.Conv2d(C, C, 1), nn.ReLU(),
            nn.ConvTranspose2d(C, 3, ds, stride=ds))                   # (N, 3, H, W)

    @property
    def tokens_per_image(self) -> int:
        return self.hw * self.hw

    def forward(self, x: torch.Tensor):
        """x (N, 3, H, W) float in [0, 1] -> (x_hat (N, 3, H, W), codes (N, h, w), commit loss)."""
        z_e = self.encoder(x)                                         # (N, D, h, w)
        z_q, codes, commit = self.quantizer(z_e)
        x_hat = self.decoder(z_q)                                     # (N, 3, H, W), unclamped
        return x_hat, codes, commit

    # -- the public tokenizer API: channels-last pictures in, codes out, and back ---------------

    def _device(self):
        return next(self.parameters()).device

    def _as_input(self, images) -> torch.Tensor:
        """(N, H, W, 3) uint8 or float [0, 1], numpy or torch -> (N, 3, H, W) float on our device."""
        x = torch.as_tensor(np.array(images) if not torch.is_tensor(images) else images)   # copy: read-only arrays
        if x.dim() != 4 or x.shape[-1] != 3 or x.shape[1] != self.image_size:
            raise ValueError(f"VQVAE expects images (N, {self.image_size}, {self.image_size}, 3), "
                             f"got {tuple(x.shape)}")
        x = x.to(self._device())
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return rearrange(x, "n h w c -> n c h w").contiguous()        # (N, 3, H, W)

    @torch.no_grad()
    def encode(self, images, batch_size: int = 512) -> torch.Tensor:
        """images (N, H, W, 3) -> codes (N, h*w) long on the CPU, row-major over the token grid.
        ValueError if the images are not (N, image_size, image_size, 3)."""
        was_training = self.training
        self.eval()                           # eval mode: no EMA updates, no restarts
        out = []
        for i in range(0, len(images), batch_size):
            z_e = self.encoder(self._as_input(images[i:i + batch_size]))   # (B, D, h, w)
            z = rearrange(z_e, "b d h w -> (b h w) d")                     # (B*h*w, D)
            out.append(self.quantizer.nearest(z).reshape(z_e.shape[0], -1).cpu())  # (B, h*w)
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.tokens_per_image, dtype=torch.long)

    @torch.no_grad()
    def decode(self, codes, batch_size: int = 512) -> torch.Tensor:
        """codes (N, h*w) ints in [0, K) -> images (N, H, W, 3) float in [0, 1] on the CPU.
        ValueError on another shape or on codes outside [0, K) (e.g. vocabulary ids)."""
        codes = torch.as_tensor(codes).long()
        K, n = self.quantizer.K, self.tokens_per_image
        if codes.dim() != 2 or codes.shape[1] != n:
            raise ValueError(f"VQVAE.decode expects codes (N, {n}), got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= K):
            # the usual cause: passing vocabulary ids instead of ids - tokenizer.img_offset
            raise ValueError(f"VQ codes must lie in [0, {K}); got [{int(codes.min())}, {int(codes.max())}] "
                             f"(subtract tokenizer.img_offset from vocabulary ids first)")
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, len(codes), batch_size):
            c = codes[i:i + batch_size].to(self._device())                 # (B, h*w)
            z_q = self.quantizer.codebook[c]                               # (B, h*w, D)
            z_q = rearrange(z_q, "b (h w) d -> b d h w", h=self.hw)       # (B, D, h, w)
            x = self.decoder(z_q).clamp(0, 1)                              # (B, 3, H, W)
            out.append(rearrange(x, "b c h w -> b h w c").cpu())           # (B, H, W, 3)
        self.train(was_training)
        if not out:
            return torch.zeros(0, self.image_size, self.image_size, 3)
        return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# training

def _usage(counts: torch.Tensor) -> tuple[int, float]:
    """Histogram of code picks (K,) -> (codes used, perplexity = exp(entropy), K if uniform)."""
    p = counts.float() / counts.sum().clamp(min=1e-8)
    ppl = math.exp(-(p * (p + 1e-12).log()).sum().item())
    return int((counts > 0).sum()), ppl


def train_vq(vcfg: VQConfig, images_uint8: np.ndarray, device, seed: int = 0):
    """Train a VQVAE on (N, H, W, 3) uint8 pictures. Returns (model in eval mode, stats dict).

    Loss = MSE(x_hat, x) + beta * ||z_e - sg(e)||^2; the codebook follows by EMA. Runs vcfg.steps
    steps, or stops early when the next step would cross vcfg.time_budget_s (if > 0). The learning rate
    follows a cosine over *progress* = max(step / steps, elapsed / budget), so a run cut short by
    the time budget still ends with a decayed lr and a settled codebook.
    On the CPU it trains on one thread: the convolutions' results depend on the thread count in the
    last bits, the dead-code restarts amplify that, and two machines would get tokenizers that assign
    other codes (measured: 1 vs 2 threads gave different codebooks). With one thread the tokenizer,
    and so every run built on it, is the same on any CPU; it costs a few seconds.
    """
    if str(device).startswith("cpu"):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _train_vq(vcfg, images_uint8, device, seed)
        finally:
            torch.set_num_threads(threads)
    return _train_vq(vcfg, images_uint8, device, seed)


def _train_vq(vcfg: VQConfig, images_uint8: np.ndarray, device, seed: int):
    torch.manual_seed(seed)
    image_size = images_uint8.shape[1]
    model = VQVAE(vcfg, image_size).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=vcfg.lr, weight_decay=0.0)  # tiny convnet: no wd
    X = torch.as_tensor(images_uint8)                   # (N, H, W, 3) uint8, stays on the CPU
    gen = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(X), generator=gen), 0
    t0, step, recent = time.time(), 0, []
    bar = tqdm(total=vcfg.steps, desc="vq", dynamic_ncols=True, leave=False, mininterval=5)
    while step < vcfg.steps:
        elapsed = time.time() - t0
        # stop if one more step (at the average pace so far) would overrun the budget
        if step and vcfg.time_budget_s > 0 and elapsed + elapsed / step > vcfg.time_budget_s:
            break
        progress = max(step / vcfg.steps, elapsed / vcfg.time_budget_s if vcfg.time_budget_s > 0 else 0.0)
        # cosine from lr down to lr/10: the small late steps are what take MSE from 1e-3 to 1e-5
        lr = vcfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        # restarts keep the codebook in use while it is still moving; in the last 20% the codebook
        # must hold still so the decoder can fit the final codes (a restarted code would decode badly)
        model.quantizer.restarts = progress < 0.8

        if pos + vcfg.batch_size > len(X):              # new epoch: reshuffle
            perm, pos = torch.randperm(len(X), generator=gen), 0
        idx = perm[pos:pos + vcfg.batch_size]
        pos += vcfg.batch_size
        x = rearrange(X[idx].to(device), "b h w c -> b c h w").float() / 255.0   # (B, 3, H, W)

        x_hat, codes, commit = model(x)
        recon = F.mse_loss(x_hat, x)
        loss = recon + vcfg.beta * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        step += 1
        recent = (recent + [recon.item()])[-50:]
        if step % 10 == 0 or step == vcfg.steps:
            used = int((model.quantizer.cluster_size > vcfg.dead_threshold).sum())
            bar.set_postfix(mse=f"{np.mean(recent):.5f}", used=f"{used}/{vcfg.codebook_size}")
        bar.update(1)
    bar.close()
    model.eval()
    # stats from the EMA counts: the per-batch usage of each code over roughly the last 1/(1-decay)
    # steps. (evaluate_vq measures usage on held-out pictures instead.)
    cs = model.quantizer.cluster_size.cpu()
    used, ppl = _usage(torch.where(cs > vcfg.dead_threshold, cs, torch.zeros_like(cs)))
    stats = dict(recon_mse=float(np.mean(recent)) if recent else float("nan"), codes_used=used,
                 codebook_size=vcfg.codebook_size, usage_frac=used / vcfg.codebook_size,
                 perplexity=ppl, steps=step, seconds=time.time() - t0)
    return model, stats


# ----------------------------------------------------------------------------------------------
# evaluation and pictures

def evaluate_vq(model: VQVAE, images_uint8: np.ndarray, scenes, grid: int) -> dict:
    """Reconstruction MSE, codebook usage and attribute recovery on these pictures.

    Attribute recovery is the number that matters downstream: every edit and text-to-image answer
    is scored by reading the *decoded* picture with world.read_scene, so the decoder must draw each
    cell's kind, colour and size (or nothing) clearly enough to be re-read exactly.
    images_uint8 (N, H, W, 3); scenes: the N scenes drawn in them. Returns a dict: recon_mse (mean
    squared error per pixel channel, on the [0, 1] scale), codes_used / codebook_size / usage_frac /
    perplexity (codebook use), cell_acc / image_acc (share of cells / whole pictures re-read
    exactly), n_images.
    """
    codes = model.encode(images_uint8)                               # (N, h*w)
    recon = model.decode(codes)                                      # (N, H, W, 3) float
    x = torch.as_tensor(np.asarray(images_uint8)).float() / 255.0
    mse = F.mse_loss(recon, x).item()
    used, ppl = _usage(torch.bincount(codes.flatten(), minlength=model.quantizer.K))
    cells_ok = images_ok = 0
    n_cells = 0
    recon_np = recon.numpy()
    for img, scene in zip(recon_np, scenes):
        got = world.read_scene(img, grid)
        ok = [a == b for a, b in zip(got, scene)]                    # Shape is a frozen dataclass: ==
        cells_ok += sum(ok)
        n_cells += len(ok)
        images_ok += all(ok)
    return dict(recon_mse=mse, codes_used=used, codebook_size=model.quantizer.K,
                usage_frac=used / model.quantizer.K, perplexity=ppl,
                cell_acc=cells_ok / max(n_cells, 1), image_acc=images_ok / max(len(scenes), 1),
                n_images=len(scenes))


def save_grid(originals, recons, path: str, scale: int = 4, pad: int = 2):
    """PNG with the originals in the top row and their reconstructions below, upscaled x`scale`
    with nearest-neighbour (so single pixels stay visible), on a grey background."""
    def to_u8(a):
        a = a.numpy() if torch.is_tensor(a) else np.asarray(a)
        return a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    rows = [to_u8(originals), to_u8(recons)]                         # each (n, H, W, 3)
    n, H, W, _ = rows[0].shape
    canvas = np.full((pad + 2 * (H + pad), pad + n * (W + pad), 3), 128, dtype=np.uint8)
    for r, row in enumerate(rows):
        for i, img in enumerate(row):
            y, x = pad + r * (H + pad), pad + i * (W + pad)
            canvas[y:y + H, x:x + W] = img
    pic = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pic.save(path)


# ----------------------------------------------------------------------------------------------
# checkpoints

def save_vq(model: VQVAE, path: str, vcfg: VQConfig, image_size: int):
    """State dict + the VQ config + image size, written atomically (tmp file, then os.replace), so
    a run killed mid-save never leaves a truncated cache file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"           # this process's own: two runs never share one
    try:
        torch.save({"state_dict": model.state_dict(), "vq_config": asdict(vcfg), "image_size": image_size}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"save error: cannot write the VQ tokenizer {path} ({e}); free space or pick another "
                         f"--data.cache_dir") from None


class VQCheckpointError(ValueError):
    """A missing or mismatched VQ checkpoint; the message is one line that says what to do."""


def load_vq(path: str, vcfg: VQConfig, image_size: int, device) -> VQVAE:
    """Load a checkpoint written by save_vq; it must have been trained with exactly this config.

    Every VQConfig field is compared, the training ones (steps, lr, n_images, ...) too: they decide
    the weights, so a cache made with --vq.steps=500 must not be reused silently by a run that asks
    for 1500. The first differing field is named in a one-line VQCheckpointError.
    """
    if not os.path.exists(path):
        raise VQCheckpointError(f"no VQ checkpoint at {path}; train one with `python vq.py` "
                                f"(or --stage=vq) using the same --data.* and --vq.* flags")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    want = dict(asdict(vcfg), image_size=image_size)
    have = dict(ck["vq_config"], image_size=ck["image_size"])
    for k, v in want.items():
        if have.get(k) != v:
            flag = "--data.image_size" if k == "image_size" else f"--vq.{k}"
            raise VQCheckpointError(f"VQ checkpoint {path} has {k}={have.get(k)!r} but the config asks "
                                    f"for {v!r}; delete the file to retrain, or pass {flag}={have.get(k)}")
    model = VQVAE(vcfg, image_size)
    model.load_state_dict(ck["state_dict"])
    return model.to(device).eval()


def vq_path(cfg) -> str:
    """Where the tokenizer of this config is cached: data.cache_dir/vq_{px}px_{K}c_seed{seed}_{hash}.pt,
    the hash over every VQ field and the data fields its training pictures depend on. Two configs
    never share the file, so training one tokenizer can never overwrite another that a checkpoint
    was trained with (its codes would then mean other pictures)."""
    d = cfg.data
    key = [asdict(cfg.vq), d.image_size, d.grid, d.min_shapes, d.max_shapes, d.seed]
    if (d.shades, d.fills, d.floors) != (1, 1, 1):       # the world without looks keeps its old file name
        key.append([d.shades, d.fills, d.floors])
    key = json.dumps(key, sort_keys=True)
    return os.path.join(d.cache_dir, f"vq_{d.image_size}px_{cfg.vq.codebook_size}c_seed{d.seed}_"
                                     f"{hashlib.sha1(key.encode()).hexdigest()[:8]}.pt")


# ----------------------------------------------------------------------------------------------
# the --stage=vq job

def _render_fresh(cfg, stream: int, n: int):
    """n fresh scenes + pictures from their own seed stream [seed, stream, i]: never the scenes of
    the task pools (those use other streams), so the tokenizer is not fitted to the eval pictures."""
    d, w = cfg.data, world_extras.world_for(cfg.data)
    scenes = [world.random_scene(np.random.default_rng([d.seed, stream, i]), d.grid, d.min_shapes,
                                 d.max_shapes) for i in range(n)]
    # every picture with random looks (world_extras.random_looks, from a stream of their own), so the
    # codebook holds a code per (content, look); the world without looks draws none
    looks = [world_extras.random_looks(np.random.default_rng([d.seed, stream, i, 1]), s, d) for i, s in enumerate(scenes)]
    images = np.stack([w.render(s, d.grid, d.image_size, lk) for s, lk in zip(scenes, looks)])   # (n, H, W, 3)
    return scenes, images


def run_vq_stage(cfg, out_dir: str, device):
    """Render, train, evaluate, write vq_metrics.json + vq_recon.png, cache the checkpoint."""
    t0 = time.time()
    v, d = cfg.vq, cfg.data
    _, train_imgs = _render_fresh(cfg, 777, v.n_images)
    eval_scenes, eval_imgs = _render_fresh(cfg, 778, 500)
    print(f"vq: rendered {len(train_imgs)} training + {len(eval_imgs)} eval pictures "
          f"({d.image_size}px) in {time.time() - t0:.1f}s; training on {device}")
    model, stats = train_vq(v, train_imgs, device, seed=d.seed)
    ev = evaluate_vq(model, eval_imgs, eval_scenes, d.grid)
    metrics = {"train": stats, "eval": ev, "wall_s": time.time() - t0,
               "tokens_per_image": model.tokens_per_image}
    print(f"vq: {stats['steps']} steps in {stats['seconds']:.1f}s | train mse {stats['recon_mse']:.5f} | "
          f"eval mse {ev['recon_mse']:.5f} | codes used {ev['codes_used']}/{ev['codebook_size']} "
          f"(perplexity {ev['perplexity']:.1f}) | attribute recovery: cells {ev['cell_acc']:.4f}, "
          f"whole images {ev['image_acc']:.4f}")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vq_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    save_grid(eval_imgs[:16], model.decode(model.encode(eval_imgs[:16])),
              os.path.join(out_dir, "vq_recon.png"))
    path = vq_path(cfg)
    save_vq(model, path, v, d.image_size)
    print(f"vq: wrote {out_dir}/vq_metrics.json, {out_dir}/vq_recon.png and {path} "
          f"({time.time() - t0:.1f}s total)")
    return model, metrics


def get_vq(cfg, device, out_dir: str) -> VQVAE:
    """The cached tokenizer if vq_path(cfg) exists and matches the config, else train one now."""
    path = vq_path(cfg)
    if os.path.exists(path):
        try:
            model = load_vq(path, cfg.vq, cfg.data.image_size, device)
            print(f"vq: loaded cached tokenizer {path}")
            return model
        except VQCheckpointError as e:
            print(f"vq: {e} -- retraining it")
    model, _ = run_vq_stage(cfg, out_dir, device)
    return model


if __name__ == "__main__":
    from config import get_config
    cfg = get_config()
    dev = cfg.train.device
    if dev == "auto":   # cuda > mps > cpu, as everywhere in the repo
        dev = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    print(f"vq: device={dev} | {cfg.vq}")
    run_vq_stage(cfg, cfg.train.out_dir, torch.device(dev))
