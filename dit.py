"""DiT on ViTok latents (§3.3) and the Gaussian diffusion it is trained and sampled with (SPEC §4).

The DiT of Peebles & Xie (2023) with the tokenizer's Llama-style parts: each of the L latent tokens (c channels) is
one DiT token (no patchify), attention with 3D RoPE over the latent grid and SwiGLU come from vitok.py, and the
conditioning is adaLN-Zero on timestep + class. The model predicts epsilon and the variance interpolation v (2c
outputs, "learned sigma"), trained with L_simple + L_vb (Nichol & Dhariwal 2021, "IDDPM") and sampled with DDIM
(Song et al. 2021) and classifier-free guidance (Ho & Salimans 2022).
"""
import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from vitok import Attention, SwiGLU, rope_table


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------
def modulate(x, shift, scale):
    """adaLN: x [B,L,D] with per-sample shift and scale [B,D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features (256, as DiT) -> MLP -> [B,D]."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs  # [B, half]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """Pre-norm block whose LayerNorms are modulated by the conditioning, with zero-initialised gates (adaLN-Zero)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim, int(2.67 * dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # 6 x [B,D]
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """x [B,L,c] noisy latents, t [B] timesteps, y [B] labels (num_classes = the null class) -> [B,L,2c]."""

    def __init__(self, channels=16, grid=(1, 16, 16), num_classes=1000, width=1024, depth=24, heads=16,
                 grad_ckpt=False):
        super().__init__()
        self.channels, self.grid, self.num_classes, self.heads = channels, tuple(grid), num_classes, heads
        self.grad_ckpt = grad_ckpt
        self.x_embed = nn.Linear(channels, width)
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = nn.Embedding(num_classes + 1, width)  # + the null class for classifier-free guidance
        self.blocks = nn.ModuleList([DiTBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, 2 * channels)
        # Init as DiT: xavier linears, N(0, 0.02) embedders, and zero modulation and output (adaLN-Zero), so that
        # every block starts as the identity and the model's output as zero.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for layer in [b.adaLN[-1] for b in self.blocks] + [self.final_adaLN[-1], self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        """x [B,L,c], t [B], y [B] -> [B,L,2c] (epsilon, then the variance interpolation v)."""
        cos, sin = rope_table(self.grid, self.x_embed.out_features // self.heads, x.device)
        h = self.x_embed(x)  # [B,L,D]
        c = self.t_embed(t) + self.y_embed(y)  # [B,D]
        for block in self.blocks:
            if self.grad_ckpt and torch.is_grad_enabled():
                h = checkpoint(block, h, c, cos, sin, use_reentrant=False)
            else:
                h = block(h, c, cos, sin)
        shift, scale = self.final_adaLN(c).chunk(2, dim=-1)
        return self.out(modulate(self.norm(h), shift, scale))


# SPEC §4: B 768/12/12, L 1024/24/16 (~458M with c=16; the paper's "400M"), XL 1152/28/16 (~675M); tiny is ours.
DiT_models = {
    "DiT-B": partial(DiT, width=768, depth=12, heads=12),
    "DiT-L": partial(DiT, width=1024, depth=24, heads=16),
    "DiT-XL": partial(DiT, width=1152, depth=28, heads=16),
    "DiT-tiny": partial(DiT, width=128, depth=4, heads=2),
}


# --------------------------------------------------------------------------------------------------------------
# Gaussian diffusion: linear betas 1e-4 -> 0.02 over 1000 steps, epsilon prediction, learned variance (IDDPM)
# --------------------------------------------------------------------------------------------------------------
NUM_TIMESTEPS = 1000
BETAS = np.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=np.float64)
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)
ALPHAS_CUMPROD_PREV = np.append(1.0, ALPHAS_CUMPROD[:-1])
POSTERIOR_VARIANCE = BETAS * (1.0 - ALPHAS_CUMPROD_PREV) / (1.0 - ALPHAS_CUMPROD)  # beta~_t, IDDPM Eq. 10
POSTERIOR_LOG_VARIANCE = np.log(np.append(POSTERIOR_VARIANCE[1], POSTERIOR_VARIANCE[1:]))  # beta~_0 = 0: clipped
POSTERIOR_COEF_X0 = BETAS * np.sqrt(ALPHAS_CUMPROD_PREV) / (1.0 - ALPHAS_CUMPROD)  # IDDPM Eq. 11
POSTERIOR_COEF_XT = (1.0 - ALPHAS_CUMPROD_PREV) * np.sqrt(1.0 - BETAS) / (1.0 - ALPHAS_CUMPROD)


def _at(table, t, x):
    """table[t] (float64 numpy) as a [B,1,1] tensor in x's dtype and device."""
    return torch.as_tensor(table, device=x.device)[t].to(x.dtype)[:, None, None]


def q_sample(x0, t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (IDDPM Eq. 9)."""
    return _at(np.sqrt(ALPHAS_CUMPROD), t, x0) * x0 + _at(np.sqrt(1.0 - ALPHAS_CUMPROD), t, x0) * noise


def q_posterior(x0, xt, t):
    """Mean and log-variance of q(x_{t-1} | x_t, x_0) (IDDPM Eq. 10-12)."""
    mean = _at(POSTERIOR_COEF_X0, t, xt) * x0 + _at(POSTERIOR_COEF_XT, t, xt) * xt
    return mean, _at(POSTERIOR_LOG_VARIANCE, t, xt)


def p_mean_logvar(eps, v, xt, t):
    """The model's p(x_{t-1} | x_t): mean from epsilon (Eq. 11 with x0 from Eq. 9), log-variance interpolated
    between log beta_t and log beta~_t by v, which the network outputs in about [-1, 1] (IDDPM Eq. 15)."""
    frac = (v + 1) / 2
    logvar = frac * _at(np.log(BETAS), t, xt) + (1 - frac) * _at(POSTERIOR_LOG_VARIANCE, t, xt)
    x0 = _at(np.sqrt(1.0 / ALPHAS_CUMPROD), t, xt) * xt - _at(np.sqrt(1.0 / ALPHAS_CUMPROD - 1), t, xt) * eps
    return q_posterior(x0, xt, t)[0], logvar


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x) of a Gaussian integrated over the 8-bit bin of x in [-1,1] (DDPM's decoder L_0), elementwise.
    Our latents are continuous, not 8-bit; DiT uses this term at t=0 all the same and so do we (SPEC §4)."""
    cdf = lambda v: 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0)))  # noqa: E731
    inv_std = torch.exp(-log_scale)
    cdf_plus, cdf_minus = cdf(inv_std * (x - mean + 1 / 255)), cdf(inv_std * (x - mean - 1 / 255))
    log_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))
    return torch.where(x < -0.999, log_plus, torch.where(x > 0.999, log_one_minus, log_delta))


def training_losses(model, x0, y, t, noise):
    """L_hybrid = L_simple + L_vb (IDDPM §3.1, with lambda = 1 as DiT): MSE on epsilon, plus the variational bound
    for the learned variance with the mean stopped (so L_vb trains only v). x0, noise [B,L,c]; t, y [B].
    Returns per-batch means {"loss", "mse", "vb"}; L_vb in bits per dimension."""
    x0, noise = x0.float(), noise.float()
    xt = q_sample(x0, t, noise)
    eps, v = model(xt, t, y).float().chunk(2, dim=-1)  # [B,L,c] each
    mse = (noise - eps).pow(2).mean(dim=(1, 2))
    true_mean, true_logvar = q_posterior(x0, xt, t)
    mean, logvar = p_mean_logvar(eps.detach(), v, xt, t)
    kl = normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=(1, 2)) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=(1, 2)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return {"loss": (mse + vb).mean(), "mse": mse.mean(), "vb": vb.mean()}


# --------------------------------------------------------------------------------------------------------------
# Sampling: DDIM over respaced timesteps with classifier-free guidance
# --------------------------------------------------------------------------------------------------------------
def respaced_timesteps(steps, num_timesteps=NUM_TIMESTEPS):
    """Evenly spaced timesteps of the 1000-step chain: {0, 4, ..., 996} for 250 steps."""
    return [i * num_timesteps // steps for i in range(steps)]


def guided_eps(model, x, t, y, cfg_scale):
    """Epsilon with classifier-free guidance on all c epsilon channels: eps_u + s (eps_c - eps_u). The conditional
    and unconditional halves run as one doubled batch; scale 1 is the plain conditional prediction."""
    c = x.shape[-1]
    if cfg_scale == 1.0:
        return model(x, t, y)[..., :c].float()
    null = torch.full_like(y, model.num_classes)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))[..., :c].float()
    cond, uncond = eps.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def sample(model, z, y, steps=250, cfg_scale=1.5, eta=0.0, progress=False):
    """DDIM (Song et al. 2021, Eq. 12) from noise z [B,L,c] with labels y [B] -> latents [B,L,c]. eta = 0 is
    deterministic. The model sees the original timestep indices. No x0 clipping: latents are unbounded."""
    from tqdm import tqdm
    timesteps = respaced_timesteps(steps)
    x = z.float()
    for i in tqdm(reversed(range(steps)), total=steps, disable=not progress, desc="DDIM"):
        t = torch.full((x.shape[0],), timesteps[i], device=x.device, dtype=torch.long)
        abar = float(ALPHAS_CUMPROD[timesteps[i]])
        abar_prev = float(ALPHAS_CUMPROD[timesteps[i - 1]]) if i > 0 else 1.0
        eps = guided_eps(model, x, t, y, cfg_scale)
        x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
        sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        x = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * torch.randn_like(x)
    return x
