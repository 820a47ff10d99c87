"""ViTok: Vision Transformer tokenizer (Hansen-Estruch et al., ICML 2025, arXiv 2501.09755, §3.1).

    x [B,3,T,H,W] -> tubelets -> ViT encoder -> KL bottleneck z [B,L,c]
                  -> ViT decoder -> tubelets -> x_hat

Names follow the paper: "S-B/16" is an S encoder, a B decoder and 16x16 patches; "S-B/4x8" the
video model with 4x8x8 tubelets. An image is a one-frame video: one code path serves both.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import runtime

# Transformer sizes (paper Table 1). S is not ViT-S: the paper widens it to 768 and halves the
# depth; L is 1152 wide so that its 72-dim heads split evenly over the three RoPE axes. T (tiny,
# for CPU demos/tests) and M (Findings 3-4 in miniature) are ours.
VIT_SIZES = {
    "T": dict(width=128, depth=4, heads=2),
    "M": dict(width=192, depth=6, heads=3),
    "S": dict(width=768, depth=6, heads=12),
    "B": dict(width=768, depth=12, heads=12),
    "L": dict(width=1152, depth=24, heads=16),
}
ALIASES = {"tiny": "T-T/16"}  # the model of train_ae.py --preset tiny


# ---- 3D axial rotary position embedding (§3.1, "3D RoPE") ----
def rope_split(head_dim):
    """Rotation pairs per axis (t, h, w): equal thirds when head_dim/2 divides by 3 (L: 12/12/12);
    otherwise 1/4 for time and 3/8 for each spatial axis (64-dim heads: 8/12/12 pairs, i.e.
    16/24/24 channels), as images (t=0) use only the spatial pairs."""
    pairs = head_dim // 2
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    if pairs % 3 == 0:
        return pairs // 3, pairs // 3, pairs // 3
    hw = 3 * pairs // 8
    return pairs - 2 * hw, hw, hw


_ROPE_CACHE = {}


def rope_table(grid, head_dim, device, theta=10000.0):
    """cos and sin [L, head_dim/2] for a (t,h,w) token grid in raster order; fp32, built once per
    grid and device. Pair j of a head rotates channels (j, j + head_dim/2) by angle
    pos_axis(j) * theta^(-2k/n_axis), the first pairs for t, then h, then w, so that scores q.k
    depend only on per-axis offsets."""
    key = (tuple(grid), head_dim, theta, str(device))
    if torch.compiler.is_compiling() or key not in _ROPE_CACHE:  # this order: no guard on the dict
        # Under torch.compile the table is built in the graph (a guard on this dict would
        # recompile once it is filled), so on `device`: a CPU table would cost a blocking
        # host-to-device copy every forward. Angles in fp64 (MPS has none: fp32).
        device = torch.device(device)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        angles = []
        for size, n in zip(grid, rope_split(head_dim)):
            freqs = theta ** (-torch.arange(0, n, dtype=dtype, device=device) / n)  # [n]
            pos = torch.arange(size, dtype=dtype, device=device)
            angles.append(pos[:, None] * freqs)  # [size, n]
        t, h, w = grid
        angle = torch.cat([
            angles[0][:, None, None, :].expand(t, h, w, -1),
            angles[1][None, :, None, :].expand(t, h, w, -1),
            angles[2][None, None, :, :].expand(t, h, w, -1),
        ], dim=-1).reshape(t * h * w, head_dim // 2)  # [L, head_dim/2]
        table = (angle.cos().float(), angle.sin().float())
        if torch.compiler.is_compiling():
            return table
        _ROPE_CACHE[key] = table
    return _ROPE_CACHE[key]


def apply_rope(x, cos, sin):
    """Rotate x [B,heads,L,head_dim] by (cos, sin) [L, head_dim/2], in fp32 (bf16-safe)."""
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


# ---- Transformer (§3.1: "Llama-style" pre-norm, SwiGLU, RoPE; LayerNorm as in the paper) ----
class Attention(nn.Module):
    """Multi-head self-attention: a fused bias-free qkv, RoPE on q and k, SDPA (flash on GPU)."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} does not split into {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        """x [B,L,D] -> [B,L,D]."""
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B,heads,L,Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = F.scaled_dot_product_attention(q, k, v)  # [B,heads,L,Dh]
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x) with w1, w2 fused. The paper says SwiGLU; the official code silently
    uses a GELU gate. hidden = int(2.67 * width) keeps the paper's parameter counts (a 4x MLP's)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm block: x += Attn(LN(x)); x += MLP(LN(x)); no dropout, drop-path or layer scale."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim, int(2.67 * dim))

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Blocks and a final LayerNorm; `grad_ckpt` recomputes blocks in backward to save memory."""

    def __init__(self, width, depth, heads, grad_ckpt=False):
        super().__init__()
        self.heads, self.grad_ckpt = heads, grad_ckpt
        self.blocks = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)

    def forward(self, x, grid):
        """x [B,L,D] tokens of a (t,h,w) grid -> [B,L,D]."""
        cos, sin = rope_table(grid, x.shape[-1] // self.heads, x.device)
        for block in self.blocks:
            if self.grad_ckpt and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return self.norm(x)


# ---- KL bottleneck (§3.1, Eq. 1: L_AE = MSE + beta KL + eta LPIPS + lambda GAN) ----
class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) per token and channel; mean, logvar [B,L,c]."""

    def __init__(self, moments):
        self.mean, logvar = moments.float().chunk(2, dim=-1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM: keeps exp() finite early in training

    @property
    def std(self):
        return torch.exp(0.5 * self.logvar)

    def sample(self, noise=None):
        """z = mean + std * noise [B,L,c], given or drawn (train_ae.py draws it per global batch,
        so that a run is independent of the rank count)."""
        noise = torch.randn_like(self.mean) if noise is None else noise.to(self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0,I)) averaged over tokens and channels -> [B]. A mean, not LDM's sum (README,
        Differences): the paper's beta = 1e-3 only makes sense per element."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).mean(dim=(1, 2))


# ---- The tokenizer ----
class ViTok(nn.Module):
    """Tubelet embedding -> encoder -> KL bottleneck -> decoder -> per-token linear head
    (§3.1, Fig. 2). Encoder and decoder keep their own widths: the official code gives both the
    decoder's, but the paper's parameter counts (Tables 3-5) only come out with separate widths."""

    def __init__(self, encoder="S", decoder="B", channels=16, patch_size=16, tubelet_size=1,
                 grad_ckpt=False):
        super().__init__()
        enc, dec = VIT_SIZES[encoder], VIT_SIZES[decoder]
        self.channels, self.patch_size, self.tubelet_size = channels, patch_size, tubelet_size
        self.name = f"{encoder}-{decoder}/{f'{tubelet_size}x' * (tubelet_size > 1)}{patch_size}"
        tubelet_dim = 3 * tubelet_size * patch_size * patch_size
        # Tubelet embedding: kernel = stride = q x p x p, a linear map of each flattened tubelet.
        self.embed = nn.Linear(tubelet_dim, enc["width"])
        self.encoder = Transformer(enc["width"], enc["depth"], enc["heads"], grad_ckpt)
        self.to_moments = nn.Linear(enc["width"], 2 * channels)  # mean and log-variance
        self.from_latent = nn.Linear(channels, dec["width"])
        self.decoder = Transformer(dec["width"], dec["depth"], dec["heads"], grad_ckpt)
        self.head = nn.Linear(dec["width"], tubelet_dim)  # no output activation
        # Xavier-uniform weights and zero biases, as the official code (LayerNorm: torch's (1, 0))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def save_pretrained(self, folder, image_size=256, num_frames=1, **extra):
        """config.json (name, sizes, the input size it was trained at; `extra`, e.g. latent_stats)
        + model.safetensors."""
        config = dict(kind="ae", model=self.name, channels=self.channels,
                      patch_size=self.patch_size, tubelet_size=self.tubelet_size,
                      image_size=image_size, num_frames=num_frames, **extra)
        runtime.save_folder(folder, self.state_dict(), config)

    def grid(self, size):
        """Token grid (t,h,w) of an input of size (T,H,W) or (H,W) that the tubelet divides."""
        size = (1, *size) if len(size) == 2 else tuple(size)
        tubelet = (self.tubelet_size, self.patch_size, self.patch_size)
        if any(s % k or s == 0 for s, k in zip(size, tubelet)):
            raise runtime.UserError(f"input size {'x'.join(map(str, size))} (TxHxW) is not "
                                    f"divisible by the tubelet {'x'.join(map(str, tubelet))}; "
                                    "crop or resize it to a multiple")
        return tuple(s // k for s, k in zip(size, tubelet))

    def patchify(self, x):
        """x [B,3,T,H,W] -> tubelets [B,L,3*q*p*p], in (t,h,w) raster order, flattened as
        (channel, q, p, p)."""
        B, C, T, H, W = x.shape
        q, p = self.tubelet_size, self.patch_size
        x = x.reshape(B, C, T // q, q, H // p, p, W // p, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, T/q, H/p, W/p, C, q, p, p]
        return x.reshape(B, (T // q) * (H // p) * (W // p), C * q * p * p)

    def unpatchify(self, x, grid):
        """tubelets [B,L,3*q*p*p] -> [B,3,T,H,W], the inverse of patchify."""
        (t, h, w), q, p = grid, self.tubelet_size, self.patch_size
        x = x.reshape(x.shape[0], t, h, w, 3, q, p, p)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, 3, t, q, h, p, w, p]
        return x.reshape(x.shape[0], 3, t * q, h * p, w * p)

    def encode(self, x):
        """x [B,3,H,W] or [B,3,T,H,W] in [-1,1] -> posterior with mean, logvar [B,L,c]."""
        if x.dim() not in (4, 5) or x.shape[1] != 3:
            raise ValueError("expected images [B,3,H,W] or videos [B,3,T,H,W], "
                             f"got shape {tuple(x.shape)}")
        x = x.unsqueeze(2) if x.dim() == 4 else x  # an image is a one-frame video
        grid = self.grid(x.shape[2:])
        tokens = self.encoder(self.embed(self.patchify(x)), grid)  # [B,L,D_enc]
        return DiagonalGaussian(self.to_moments(tokens))

    def decode(self, z, size):
        """z [B,L,c] -> x_hat [B,3,H,W] when size = (H,W), or [B,3,T,H,W] when size = (T,H,W)."""
        grid = self.grid(size)
        if z.shape[1] != grid[0] * grid[1] * grid[2]:
            raise ValueError(f"{z.shape[1]} latent tokens do not form the {grid} grid "
                             f"of an output of size {size}")
        x = self.decoder(self.from_latent(z.to(self.from_latent.weight.dtype)), grid)  # [B,L,D_dec]
        x = self.unpatchify(self.head(x), grid)  # [B,3,T,H,W]
        return x.squeeze(2) if len(size) == 2 else x

    def forward(self, x, noise=None):
        """x [B,3,(T,)H,W] -> (x_hat with x's shape, posterior); z is sampled (with `noise` when
        given) in training, the mean in eval."""
        posterior = self.encode(x)
        z = posterior.sample(noise) if self.training else posterior.mode()
        return self.decode(z, x.shape[2:]), posterior


def frames_to_batch(x):
    """Video [B,3,T,H,W] -> frames [B*T,3,H,W], clip-major; images pass unchanged. Per-frame
    losses and metrics (LPIPS, discriminator, PSNR/SSIM, Inception) fold frames this way."""
    return x.transpose(1, 2).flatten(0, 1) if x.dim() == 5 else x


def from_name(name, channels=16, **overrides):
    """A tokenizer from its paper name: "S-B/16", "S-L/16", "S-B/4x8", ... or "tiny" ("T-T/16");
    overrides go to ViTok (e.g. grad_ckpt=True)."""
    match = re.fullmatch(r"([TMSBL])-([TMSBL])/(?:(\d+)x)?(\d+)", ALIASES.get(name, name))
    if match is None:
        raise runtime.UserError(f"unknown tokenizer name {name!r}: expected <Enc>-<Dec>/<p> or "
                                f"<Enc>-<Dec>/<q>x<p> with sizes from {sorted(VIT_SIZES)} "
                                f"(e.g. 'S-B/16', 'S-B/4x8'), or one of {sorted(ALIASES)}")
    enc, dec, q, p = match.groups()
    kwargs = dict(encoder=enc, decoder=dec, channels=channels, patch_size=int(p),
                  tubelet_size=int(q or 1))
    return ViTok(**{**kwargs, **overrides})


def from_checkpoint(ckpt, name=None):
    """A tokenizer written by train_ae.py, from its path or its already-read dict (read once by a
    caller that needs the config): EMA weights when present, eval mode, on CPU."""
    name = name or str(ckpt)
    if not isinstance(ckpt, dict):
        ckpt = runtime.read_checkpoint(ckpt, kind="ae")
    model = from_name(ckpt["config"]["model"], channels=ckpt["config"]["channels"])
    return runtime.load_weights(model, ckpt, name)


def from_pretrained(path):
    """A save_pretrained folder, or a Hub id "owner/name" (needs huggingface_hub)."""
    return from_checkpoint(runtime.hub_folder(path))
