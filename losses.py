"""The tokenizer's losses (§3.2, Eq. 1):

    L_AE = MSE(x_hat, x) + beta KL + eta LPIPS(x_hat, x) + lambda GAN

The KL term is the posterior's own (`vitok.DiagonalGaussian.kl`). Here: MSE, LPIPS (VGG, through
the `lpips` package), the StyleGAN2-style residual discriminator that tokenizer work uses, and its
hinge losses.
"""
import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import runtime
from vitok import frames_to_batch

VGG_FILE = "vgg16-397923af.pth"
VGG_URL = f"https://download.pytorch.org/models/{VGG_FILE}"


def mse_loss(x_hat, x):
    """MSE in fp32. (The official code overwrites this term with L1, a bug; the paper says MSE.)"""
    return F.mse_loss(x_hat.float(), x.float())


class LPIPS(nn.Module):
    """LPIPS with a VGG16 backbone (Zhang et al. 2018), frozen. Its linear heads ship with the
    `lpips` wheel; the backbone is torchvision's VGG_FILE in $TORCH_HOME/hub/checkpoints.
    pretrained=False gives a random backbone (tests, CPU demos): a differentiable distance, never
    reported as LPIPS."""

    def __init__(self, pretrained=True, precision="fp32"):
        super().__init__()
        import lpips
        if pretrained:
            folder = os.path.join(torch.hub.get_dir(), "checkpoints")
            if not os.path.exists(os.path.join(folder, VGG_FILE)):
                try:
                    os.makedirs(folder, exist_ok=True)
                    runtime.download(VGG_URL, os.path.join(folder, VGG_FILE))
                except Exception as err:
                    raise runtime.UserError(
                        f"LPIPS needs torchvision's VGG16 weights {VGG_FILE}: put the file in "
                        f"{folder} (it could not be downloaded from {VGG_URL}: {err}); "
                        "train_ae.py --lpips-weight 0 trains without LPIPS"
                    ) from None
        # lpips passes torchvision the deprecated `pretrained=` flag
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", pnet_rand=not pretrained, verbose=False)
        # channels_last: the layout fast GPU convolutions want
        self.net.net.to(memory_format=torch.channels_last)
        self.precision = precision
        self.eval().requires_grad_(False)

    def train(self, mode=True):  # always eval: the backbone has dropout in its heads
        return super().train(False)

    def forward(self, x_hat, x, reduce=True):
        """Images or videos in [-1,1] -> mean distance (scalar), or per sample [B] (frames averaged)
        with reduce=False. LPIPS (Zhang et al. 2018, Eq. 1): sum over VGG layers l of the spatial
        mean of w_l . (f_l(x_hat) - f_l(x))^2, with f_l unit-normalised over channels.

        The VGG trunk in bf16 when precision is "bf16" (about 40% of a stage-1 step's FLOPs at
        256^2); normalisation, differences and heads in fp32, for the unit-normalised features'
        precision."""
        a, b = frames_to_batch(x_hat).float(), frames_to_batch(x).float()  # [N,3,H,W]
        both = self.net.scaling_layer(torch.cat([a, b])).contiguous(
            memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            feats = self.net.net(both)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of [2N,...]
        d = 0.0
        with torch.autocast(x.device.type, enabled=False):
            for f, lin in zip(feats, self.net.lins):
                f = f.float()
                f = f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10)
                d = d + lin((f[:len(a)] - f[len(a):]).square()).mean((2, 3))  # [N,1]
        d = d.flatten().view(x.shape[0], -1).mean(1)  # [B], frames averaged
        return d.mean() if reduce else d


# ---- StyleGAN2 residual discriminator (Karras et al. 2020, Fig. 7b) ----
# As tokenizer work uses it: no minibatch-stddev, no equalised lr; each block halves the
# resolution after a [1,3,3,1] blur on both paths.
class Blur(nn.Module):
    """Depthwise [1,3,3,1] x [1,3,3,1] / 64 low-pass filter, zero padded by `pad` on each side."""

    def __init__(self, channels, pad):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = torch.outer(k, k) / k.sum() ** 2  # normalised: a constant image stays constant
        self.register_buffer("kernel", k.expand(channels, 1, 4, 4).contiguous(), persistent=False)
        self.pad = pad

    def forward(self, x):
        return F.conv2d(F.pad(x, [self.pad] * 4), self.kernel.to(x.dtype), groups=x.shape[1])


class ResBlock(nn.Module):
    """main: conv3x3 -> lrelu -> blur -> conv3x3/2 -> lrelu; skip: blur -> conv1x1/2 (no bias);
    out = (main+skip)/sqrt 2. Blur pads 2 before the 3x3 and 1 before the 1x1, so that both paths
    exactly halve H and W."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv0 = nn.Conv2d(cin, cin, 3, padding=1)
        self.blur = Blur(cin, pad=2)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2)
        self.skip_blur = Blur(cin, pad=1)
        self.skip = nn.Conv2d(cin, cout, 1, stride=2, bias=False)

    def forward(self, x):
        main = F.leaky_relu(self.conv0(x), 0.2)
        main = F.leaky_relu(self.conv1(self.blur(main)), 0.2)
        return (main + self.skip(self.skip_blur(x))) / math.sqrt(2)


def disc_channels(image_size, max_channels=512):
    """The discriminator's width at full resolution, as the official ViTok code:
    16384 / size (StyleGAN2's formula with half its channel base), at most 512 (32 at 512^2, 64 at
    256^2, 128 at 128^2)."""
    return min(16384 // image_size, max_channels)


class Discriminator(nn.Module):
    """x [B,3,H,W] (or video [B,3,T,H,W], frames folded) -> logits [N]. The width doubles with each
    halving, from base_channels at full resolution up to 512, down to 4x4 (six blocks at 256^2,
    five at 128^2), then conv3x3, flatten, Linear, Linear. Xavier-uniform init, as the official
    code; channels_last, as LPIPS."""

    def __init__(self, image_size=256, base_channels=None, max_channels=512):
        super().__init__()
        if image_size < 8 or image_size & (image_size - 1):
            raise ValueError("the discriminator needs a power-of-two image size >= 8, "
                             f"got {image_size}")
        base_channels = base_channels or disc_channels(image_size, max_channels)
        self.image_size = image_size
        n_blocks = int(math.log2(image_size)) - 2  # halve down to 4x4
        ch = [min(base_channels * 2 ** i, max_channels) for i in range(n_blocks + 1)]
        self.from_rgb = nn.Conv2d(3, ch[0], 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(ch[i], ch[i + 1]) for i in range(n_blocks)])
        self.conv = nn.Conv2d(ch[-1], ch[-1], 3, padding=1)
        self.fc = nn.Linear(ch[-1] * 4 * 4, ch[-1])
        self.out = nn.Linear(ch[-1], 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.to(memory_format=torch.channels_last)

    def forward(self, x):
        x = frames_to_batch(x)  # [N,3,H,W]
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"discriminator built for {self.image_size}^2 got "
                             f"{tuple(x.shape[-2:])} frames")
        x = x.contiguous(memory_format=torch.channels_last)
        x = self.blocks(F.leaky_relu(self.from_rgb(x), 0.2))  # [N,C,4,4]
        x = F.leaky_relu(self.conv(x), 0.2).flatten(1)  # [N,C*16]
        return self.out(F.leaky_relu(self.fc(x), 0.2)).squeeze(1)  # [N]


def d_hinge_loss(logits_real, logits_fake):
    """Hinge loss of the discriminator (Lim & Ye 2017): E[relu(1 - D(x))] + E[relu(1 + D(x_hat))].
    Unlike taming-transformers, not halved: under Adam a constant factor barely changes updates."""
    return F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean()


def g_adv_loss(logits_fake):
    """The generator's (decoder's) adversarial loss: -E[D(x_hat)]."""
    return -logits_fake.float().mean()


def adv_weight(step, ramp_steps=25_000):
    """Linear ramp of the adversarial weight from 0 to 1 over stage 2's first ramp_steps (§3.2)."""
    return 1.0 if ramp_steps <= 0 else min(1.0, step / ramp_steps)
