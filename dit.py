"""DiT on ViTok latents (§3.3, §4.3) and the Gaussian diffusion it is trained and sampled with.

    x [B,L,c] latent tokens -> Linear(c -> D) -> adaLN-Zero blocks (timestep + class)
        -> [B,L,2c] (epsilon, v)

The DiT of Peebles & Xie (2023) with the tokenizer's Llama-style parts, as the paper does: one DiT
token per latent token (no patchify), attention with 3D RoPE and SwiGLU from vitok.py. It predicts
epsilon and the variance interpolation v ("learned sigma"), is trained with L_hybrid = L_simple +
L_vb (Nichol & Dhariwal 2021, "IDDPM") and sampled with DDIM (Song et al. 2021) and classifier-free
guidance (Ho & Salimans 2022).
"""
import math
from functools import lru_cache, partial
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import runtime
from vitok import Attention, SwiGLU, rope_table


# ---- The model ----
def modulate(x, shift, scale):
    """adaLN: x [B,L,D] with per-sample shift and scale [B,D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """t [B] (integer or float) -> sinusoidal frequencies (256, as DiT) -> MLP -> [B,D]."""

    def __init__(self, dim, freq_dim=256, max_period=10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period)
                          * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs  # [B, half]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
                        .to(self.mlp[0].weight.dtype))


class DiTBlock(nn.Module):
    """x += gate1 * Attn(adaLN(x)); x += gate2 * MLP(adaLN(x)): shift, scale and gate regressed
    from the conditioning and zero-initialised, so that the block starts as the identity
    (adaLN-Zero, DiT §3.2)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)  # affine from adaLN
        self.attn = Attention(dim, heads)  # bias-free qkv (DiT's timm block has a qkv bias)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(dim, int(2.67 * dim))  # the paper's SwiGLU and ratio, not GELU 4x
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, cos, sin):
        """x [B,L,D], c [B,D] the conditioning, (cos, sin) the RoPE table -> [B,L,D]."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # 6 x [B,D]
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Class-conditional DiT on a (t,h,w) grid of latent tokens with c channels; label num_classes
    is the null class. Class dropout is drop_labels, outside the model, not DiT's LabelEmbedder."""

    def __init__(self, channels=16, grid=(1, 16, 16), num_classes=1000, width=1024, depth=24,
                 heads=16, grad_ckpt=False):
        super().__init__()
        self.channels, self.grid, self.num_classes = channels, tuple(grid), num_classes
        self.width, self.heads, self.grad_ckpt = width, heads, grad_ckpt
        self.x_embed = nn.Linear(channels, width)  # no patchify (§3.3)
        self.t_embed = TimestepEmbedder(width)
        self.y_embed = nn.Embedding(num_classes + 1, width)  # + 1: the null class
        self.blocks = nn.ModuleList([DiTBlock(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, 2 * channels)  # epsilon and v (learned sigma)
        # DiT's init (adaLN-Zero: zero modulation and output layers).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for layer in [block.adaLN[-1] for block in self.blocks] + [self.final_adaLN[-1], self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def save_pretrained(self, folder, **extra):
        """As ViTok's; `extra` names the tokenizer (ae_model, ae_ckpt), latent_scale, ..."""
        size = dict(width=self.width, depth=len(self.blocks), heads=self.heads)
        name = next(k for k, f in DiT_models.items() if f.keywords == size)
        runtime.save_folder(folder, self.state_dict(), dict(
            kind="dit", model=name, channels=self.channels, grid=list(self.grid),
            num_classes=self.num_classes, **extra))

    def forward(self, x, t, y):
        """x [B,L,c] noisy latents (L = t*h*w in raster order), t [B] timesteps, y [B] labels
        -> [B,L,2c]."""
        cos, sin = rope_table(self.grid, self.width // self.heads, x.device)
        h = self.x_embed(x)  # [B,L,D]; no absolute positions: 3D RoPE carries them
        c = self.t_embed(t) + self.y_embed(y)  # [B,D]
        for block in self.blocks:
            if self.grad_ckpt and torch.is_grad_enabled():
                h = checkpoint(block, h, c, cos, sin, use_reentrant=False)
            else:
                h = block(h, c, cos, sin)
        shift, scale = self.final_adaLN(c).chunk(2, dim=-1)  # 2 x [B,D]
        return self.out(modulate(self.norm(h), shift, scale))  # [B,L,2c]


# DiT Table 1 sizes: L has 458.0M parameters at c=16 (the paper's "400M"), XL 675.1M; tiny is ours.
DiT_models = {
    "DiT-B": partial(DiT, width=768, depth=12, heads=12),
    "DiT-L": partial(DiT, width=1024, depth=24, heads=16),
    "DiT-XL": partial(DiT, width=1152, depth=28, heads=16),
    "DiT-tiny": partial(DiT, width=128, depth=4, heads=2),
}

def drop_labels(y, num_classes, u, prob=0.1):
    """Class dropout for classifier-free guidance (DiT's 0.1): label y_i [B] becomes the null class
    num_classes where its uniform draw u_i < prob (u from train_dit.py's per-step generator);
    unlabelled samples (y < 0) always do."""
    return torch.where((u < prob) | (y < 0), torch.full_like(y, num_classes), y)


def forward_with_cfg(model, x, t, y, cfg_scale):
    """The model's output [B,L,2c] for x [B,L,c], t [B], labels y [B] under classifier-free
    guidance: eps = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022, Eq. 6 with s = 1 + w), v from
    the conditional half (as DiT). A function, not DiT's method, so that it also runs a
    torch.compile'd model. DiT guides only the first 3 channels "for exact reproducibility"; we
    guide all c, the standard form (README, Differences)."""
    if cfg_scale == 1.0:
        return model(x, t, y).float()
    null = torch.full_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float()  # [2B,L,2c]
    eps, v = out.chunk(2, dim=-1)  # [2B,L,c] each
    cond, uncond = eps.chunk(2)  # [B,L,c] each
    return torch.cat([uncond + cfg_scale * (cond - uncond), v.chunk(2)[0]], dim=-1)


# ---- Gaussian diffusion: linear betas (DDPM), epsilon prediction, learned variance (IDDPM) ----
NUM_TIMESTEPS = 1000


@lru_cache(maxsize=None)
def schedule(device="cpu"):
    """The float64 tables [1000], built once per device (an upload per step would stall the GPU).
    abar_t = prod_{s<=t} (1 - beta_s); post_logvar is log beta~_t (IDDPM Eq. 12) with t=0
    (beta~_0 = 0) clipped to log beta~_1, as IDDPM."""
    betas = torch.linspace(1e-4, 0.02, NUM_TIMESTEPS, dtype=torch.float64, device=device)
    abar = torch.cumprod(1.0 - betas, dim=0)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    return SimpleNamespace(betas=betas, abar=abar, abar_prev=abar_prev, post_logvar=post_logvar)


def _coef(value, x):
    """A per-sample float64 coefficient [B] as [B,1,1] in x's dtype (fp32), to scale x [B,L,c]."""
    return value.to(x.dtype)[:, None, None]


def q_sample(x0, t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, a draw from q(x_t | x0) (IDDPM Eq. 8-9)."""
    abar = schedule(x0.device).abar[t]  # [B] float64
    return _coef(abar.sqrt(), x0) * x0 + _coef((1.0 - abar).sqrt(), x0) * noise


def q_posterior(x0, xt, t):
    """Mean and (clipped) log-variance of q(x_{t-1} | x_t, x0) (IDDPM Eq. 10-12)."""
    s = schedule(xt.device)
    beta, abar, abar_prev = s.betas[t], s.abar[t], s.abar_prev[t]
    mean = (_coef(beta * abar_prev.sqrt() / (1.0 - abar), xt) * x0
            + _coef((1.0 - beta).sqrt() * (1.0 - abar_prev) / (1.0 - abar), xt) * xt)  # Eq. 11
    return mean, _coef(s.post_logvar[t], xt)


def p_mean_logvar(eps, v, xt, t):
    """The model's p(x_{t-1} | x_t): the posterior mean (Eq. 11) at
    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), Eq. 9 solved for x0 (the same mean as IDDPM
    Eq. 13), and log sigma^2 = frac log beta_t + (1 - frac) log beta~_t (IDDPM Eq. 15) with
    frac = (v + 1) / 2, v in about [-1, 1]: IDDPM's "learned range"."""
    s = schedule(xt.device)
    abar = s.abar[t]
    x0 = _coef(abar.rsqrt(), xt) * xt - _coef((1.0 / abar - 1.0).sqrt(), xt) * eps
    frac = (v + 1) / 2
    logvar = frac * _coef(s.betas[t].log(), xt) + (1 - frac) * _coef(s.post_logvar[t], xt)
    return q_posterior(x0, xt, t)[0], logvar


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log of the mass a Gaussian (mean, std e^log_scale) puts on x's 8-bit bin of [-1,1] (DDPM
    §3.3, the decoder L_0), elementwise; the edge bins extend to -inf and +inf. Latents are not
    8-bit pixels, but DiT applies this term at t=0 regardless, and so do we (README, Differences).
    Unlike IDDPM (a tanh approximation of the normal CDF, differences of CDFs near 1) every mass is
    taken in the lower tail, by the bins' symmetry about the mean, with erfc: fp32 keeps its digits
    there. Floored at 1e-12 as IDDPM."""
    cdf = lambda u: 0.5 * torch.erfc(-u / math.sqrt(2.0))  # noqa: E731, Phi(u), accurate for u << 0
    inv_std, d = torch.exp(-log_scale), x - mean
    log_bottom = torch.log(cdf(inv_std * (d + 1 / 255)).clamp(min=1e-12))  # (-inf, x + 1/255]
    log_top = torch.log(cdf(-inv_std * (d - 1 / 255)).clamp(min=1e-12))  # [x - 1/255, inf)
    # [x - 1/255, x + 1/255] has the mass of [-|d| - 1/255, -|d| + 1/255] about the mean
    near = -d.abs()
    log_bin = torch.log((cdf(inv_std * (near + 1 / 255))
                         - cdf(inv_std * (near - 1 / 255))).clamp(min=1e-12))
    return torch.where(x < -0.999, log_bottom, torch.where(x > 0.999, log_top, log_bin))


def training_losses(model, x0, y, t=None, noise=None):
    """L_hybrid = L_simple + L_vb (IDDPM §3.1, Eq. 16) for latents x0 [B,L,c] with labels y [B]
    (class dropout already applied) at timesteps t [B] (default: uniform in [0, 1000)) with noise
    [B,L,c] (default: N(0, I)). L_simple is the MSE on epsilon. L_vb, in bits per dimension, is
    KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and the decoder NLL -log p(x0|x1) at t = 0,
    with the predicted mean stopped so that L_vb only trains the variance (IDDPM §3.1). Its weight
    is 1, as DiT's: IDDPM's lambda = 0.001 weighs L_vb summed over the 1000 terms, and one
    uniformly drawn term estimates that sum / 1000. Returns batch means {"loss", "mse", "vb"}."""
    x0 = x0.float()
    t = torch.randint(0, NUM_TIMESTEPS, (x0.shape[0],), device=x0.device) if t is None else t
    noise = torch.randn_like(x0) if noise is None else noise.float()
    xt = q_sample(x0, t, noise)
    eps, v = model(xt, t, y).float().chunk(2, dim=-1)  # [B,L,c] each
    mse = (noise - eps).pow(2).mean(dim=(1, 2))  # [B]
    true_mean, true_logvar = q_posterior(x0, xt, t)
    mean, logvar = p_mean_logvar(eps.detach(), v, xt, t)
    kl = normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=(1, 2)) / math.log(2.0)
    nll = (-discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=(1, 2))
           / math.log(2.0))
    vb = torch.where(t == 0, nll, kl)  # [B]
    return {"loss": (mse + vb).mean(), "mse": mse.mean(), "vb": vb.mean()}


# ---- Sampling: DDIM over respaced timesteps with classifier-free guidance ----
def respaced_timesteps(steps, num_timesteps=NUM_TIMESTEPS):
    """floor(i * 1000 / steps) for i < steps: {0, 4, ..., 996} for 250 steps, IDDPM's "ddim250"
    (DiT's plain "250" rounds i * 999 / 249 and ends at 999). Equal to "ddimN" when steps divides
    1000; otherwise "ddimN" may have no solution, and this stays evenly spaced."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must lie in [1, {num_timesteps}], got {steps}")
    return [i * num_timesteps // steps for i in range(steps)]


@torch.no_grad()
def sample(model, z, y, steps=250, cfg_scale=1.5, eta=1.0, noise=torch.randn_like, progress=False):
    """DDIM (Song et al. 2021, Eq. 12): noise z [B,L,c], labels y [B] -> latents [B,L,c] (fp32).

    Over the respaced chain tau = respaced_timesteps(steps), with abar_{tau_{-1}} = 1 so that the
    last step returns the predicted x0, and
    sigma_i = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev) (DDIM Eq. 16);
    eta = 0 is deterministic; 1 by default, as the official code (guided-diffusion's is 0); noise(x)
    draws the N(0, I) term. The model sees the original timestep indices (as under DiT's
    respacing wrapper). Epsilon only: the learned variance serves ancestral (DDPM) sampling, which
    the paper does not use. No x0 clipping: latents are unbounded."""
    timesteps = respaced_timesteps(steps)
    # float64 Python floats: no device syncs in the loop
    abar = schedule("cpu").abar[timesteps].tolist()
    x = z.float()
    for i in tqdm(reversed(range(steps)), total=steps, disable=not progress, desc="DDIM"):
        t = torch.full((x.shape[0],), timesteps[i], dtype=torch.long, device=x.device)
        a, a_prev = abar[i], abar[i - 1] if i > 0 else 1.0
        eps = forward_with_cfg(model, x, t, y, cfg_scale)[..., :x.shape[-1]]  # [B,L,c]
        # the predicted x0 (DDIM Eq. 12, first term)
        x0 = (x - math.sqrt(1.0 - a) * eps) / math.sqrt(a)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev))
        # the second term is DDIM's "direction pointing to x_t"
        x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev - sigma ** 2) * eps
        if sigma > 0:
            x = x + sigma * noise(x)
    return x


def from_checkpoint(ckpt, name=None):
    """A DiT written by train_dit.py, from its path or read dict: EMA weights when present, eval
    mode, on CPU."""
    name = name or str(ckpt)
    if not isinstance(ckpt, dict):
        ckpt = runtime.read_checkpoint(ckpt, kind="dit")
    config = ckpt["config"]
    model = DiT_models[config["model"]](channels=config["channels"], grid=config["grid"],
                                        num_classes=config["num_classes"])
    return runtime.load_weights(model, ckpt, name)


def from_pretrained(path):
    """A save_pretrained folder, or a Hub id "owner/name" (needs huggingface_hub)."""
    return from_checkpoint(runtime.hub_folder(path))
