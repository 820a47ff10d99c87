"""Evaluate tokenizers and generators as the paper does (§4); the protocol's choices are in the README's Differences.

    python evaluate.py --ckpt ae.pt --data /datasets/imagenet/val --json ae.json      # PSNR SSIM LPIPS rFID rIS
    torchrun --nproc_per_node=8 evaluate.py --ckpt vae.pt --data /datasets/ucf101 --split-file testlist01.txt  # + rFVD
    python evaluate.py --ckpt dit.pt --ref VIRTUAL_imagenet256_labeled.npz --num-samples 50000   # gFID gIS (+ gFVD)
    python evaluate.py --data /datasets/imagenet/train --save-ref imagenet_ref.npz    # reference statistics

Pretrained networks are the field's standard files (same names, URLs and keys as the standard tools); a metric
whose network is missing is skipped with a message saying what to download and where, never estimated.
Memory does not grow with the number of samples: metrics are running sums (of per-image values; count, sum x and
sum x x^T of features; IS per split) summed over ranks at the end; each rank writes its samples to a shard file.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.models import inception as tv_inception
from tqdm import tqdm

import data
import dit
import losses
import vitok
from data import autocast, cleanup_distributed, save_grid, setup_distributed
from vitok import frames_to_batch

FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_FILE}"
TV_INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
TV_INCEPTION_URL = f"https://download.pytorch.org/models/{TV_INCEPTION_FILE}"
I3D_FILE = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
IS_SPLITS = 10  # the improved-GAN code's 10 splits; ADM's 5,000-sample splits are the same at 50k samples


# --------------------------------------------------------------------------------------------------------------
# Pixel metrics on uint8-rounded images (values 0..255 as floats), one number per image
# --------------------------------------------------------------------------------------------------------------
def to_uint8(x):
    """[-1,1] -> rounded 0..255 (float), as if the images were saved and read back."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def psnr(x, y, data_range=255.0):
    """Per image [N] for x, y [N,3,H,W] in 0..255: 10 log10(range^2 / MSE). Per image, then averaged; the paper's
    code pools the MSE over a batch first (the README's Differences)."""
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-10))


def ssim(x, y, form="paper", data_range=255.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM (Wang et al. 2004) per image [N] of x, y [N,3,H,W] in 0..255: an 11x11 Gaussian window (sigma 1.5) on
    each RGB channel, the map averaged over pixels and channels. form "paper": both images reflect-padded by 5 pixels,
    so the map covers every pixel of the original (torchmetrics, which the paper's code calls); "valid": only the
    windows inside the image (Wang's reference code); the two differ most on small images."""
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    window = torch.outer(g, g).expand(3, 1, size, size).to(x.device)
    x, y = x.double(), y.double()
    if form == "paper":
        x, y = F.pad(x, [size // 2] * 4, mode="reflect"), F.pad(y, [size // 2] * 4, mode="reflect")
    blur = lambda v: F.conv2d(v, window, groups=3)  # noqa: E731  ('valid' on the possibly padded images)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------------------------
# The FID Inception: TensorFlow's 2015-12-05 graph in torchvision's Inception3 layout (as pytorch-fid ports it)
# --------------------------------------------------------------------------------------------------------------
class FIDPoolBranch:
    """The TF graph's pool branches: Mixed_5*, 6* and 7b average without counting the zero padding (torchvision's
    blocks count it), and Mixed_7c max-pools (a quirk of the graph). Mixed into torchvision's Inception blocks."""
    max_pool = False

    def _forward(self, x):
        out = super()._forward(x)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else \
            F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        out[-1] = self.branch_pool(pooled)
        return out


class FIDInceptionA(FIDPoolBranch, tv_inception.InceptionA):
    pass


class FIDInceptionC(FIDPoolBranch, tv_inception.InceptionC):
    pass


class FIDInceptionE(FIDPoolBranch, tv_inception.InceptionE):
    pass


def build_fid_inception():
    """torchvision's Inception3 with 1008 classes, no aux head and the FID blocks: its state-dict keys are those of
    pt_inception-2015-12-05-6726825d.pth, which loads with strict=True."""
    blocks = [tv_inception.BasicConv2d, FIDInceptionA, tv_inception.InceptionB, FIDInceptionC,
              tv_inception.InceptionD, FIDInceptionE, tv_inception.InceptionAux]
    net = tv_inception.Inception3(num_classes=1008, aux_logits=False, transform_input=False,
                                  inception_blocks=blocks, init_weights=False)
    net.Mixed_7c.max_pool = True
    return net.eval().requires_grad_(False)


def find_weights(path, file, url):
    """An explicit path, else the torch hub cache, else a download into it; None (and why) when all fail."""
    if path:
        return (path, None) if os.path.exists(path) else (None, f"{path} does not exist")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file)
    if not os.path.exists(cached):
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            torch.hub.download_url_to_file(url, cached, progress=False)
        except Exception as err:  # no network: say what is missing and where it goes, and go on without it
            if os.path.exists(cached):
                os.remove(cached)
            return None, (f"{file} is not in {os.path.dirname(cached)} and could not be downloaded ({err}); "
                          f"download {url} into that folder")
    return cached, None


class InceptionFeatures(torch.nn.Module):
    """x [N,3,H,W] in [-1,1] -> (2048-d pool features, logits for IS). kind "fid": the standard FID network
    (default: every published FID uses it); kind "torchvision": torchvision's ImageNet Inception (the official
    ViTok code's choice; its numbers are not comparable to published FIDs)."""

    def __init__(self, kind, weights):
        super().__init__()
        self.kind = kind
        if kind == "fid":
            self.net = build_fid_inception()
        else:
            self.net = tv_inception.Inception3(num_classes=1000, aux_logits=True, transform_input=True,
                                               init_weights=False).eval().requires_grad_(False)
        self.net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)

    @torch.no_grad()
    def forward(self, x):
        x = F.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        if self.kind == "torchvision":  # ImageNet normalisation; transform_input maps it back to [-1,1] per channel
            mean = torch.tensor([0.485, 0.456, 0.406], device=x.device)[:, None, None]
            std = torch.tensor([0.229, 0.224, 0.225], device=x.device)[:, None, None]
            x = ((x + 1) / 2 - mean) / std
            x = self.net._transform_input(x)
        net = self.net
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]:
            x = getattr(net, name)(x)
        pool = x.flatten(1)  # [N,2048]
        # IS logits are the pool features times the fc weight, without the bias: the improved-GAN code (Salimans et
        # al. 2016), ADM's evaluator (which DiT reports with) and torch-fidelity all drop it.
        return pool, pool @ net.fc.weight.T



def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017), with scipy's sqrtm as the standard
    tools; retried with eps I on both covariances when the product is singular; an error when the root is not real."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def i3d_features(i3d, clips):
    """StyleGAN-V's I3D (TorchScript): clips [B,3,T,H,W] in [-1,1], resized to 224^2 -> 400-d features."""
    B, C, T, H, W = clips.shape
    frames = F.interpolate(frames_to_batch(clips).float(), size=(224, 224), mode="bilinear",
                           align_corners=False)  # [B*T,3,224,224]
    clips = frames.view(B, T, C, 224, 224).transpose(1, 2)
    return i3d(clips, rescale=False, resize=False, return_features=True)


# --------------------------------------------------------------------------------------------------------------
# Running sums: constant memory in the number of samples, summed over ranks once
# --------------------------------------------------------------------------------------------------------------
class Sums:
    """Named float64 running sums on the device: per-image metrics, feature moments and the IS split sums. Their
    size is fixed by the feature widths, never by the number of samples; reduce() sums each over ranks (every rank
    has the same names: each sees at least one batch)."""

    def __init__(self, device):
        self.device, self.sums = device, {}

    def add(self, name, value):
        value = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        self.sums.setdefault(name, torch.zeros_like(value)).add_(value)  # in place: no second copy of a sum

    def add_moments(self, name, x):
        """x [B,G,D]: G groups (frame indices, or one) of D-dim features -> count, sum x [G,D], sum x x^T [G,D,D]."""
        x = x.to(self.device, torch.float64).transpose(0, 1)  # [G,B,D]
        self.add(f"{name}_n", x.shape[1])
        self.add(f"{name}_sum", x.sum(1))
        self.add(f"{name}_outer", x.mT @ x)

    def add_is(self, name, logits, split, splits):
        """Per IS split (split [N] gives each row's): count, sum of p(y|x), and sum of sum_y p log p."""
        logp = logits.to(self.device, torch.float64).log_softmax(1)  # [N,K]
        p, split = logp.exp(), split.to(self.device)
        zeros = lambda *shape: torch.zeros(splits, *shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.add(f"{name}_is_n", zeros().index_add_(0, split, torch.ones_like(logp[:, 0])))
        self.add(f"{name}_is_p", zeros(p.shape[1]).index_add_(0, split, p))
        self.add(f"{name}_is_plogp", zeros().index_add_(0, split, (p * logp).sum(1)))

    def reduce(self):
        """All ranks: the sums over ranks, as numpy arrays."""
        if dist.is_initialized():
            for name in sorted(self.sums):
                dist.all_reduce(self.sums[name])
        return {k: v.cpu().numpy() for k, v in self.sums.items()}


def gaussian(s, name):
    """Mean [G,D] and covariance [G,D,D] (ddof=1, as np.cov) of G feature groups from their count, sum x, sum x x^T."""
    n, mu = s[f"{name}_n"], s[f"{name}_sum"] / s[f"{name}_n"]
    return mu, (s[f"{name}_outer"] - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)


def fid(a, b):
    """Frechet distance of each group (frame index) of the (mu, sigma) pairs a and b, averaged over the groups."""
    return float(np.mean([frechet_distance(*ab) for ab in zip(*a, *b)]))


def inception_score(s, name):
    """exp E_x KL(p(y|x) || p(y)) in each split, averaged over splits (Salimans et al. 2016), exactly, from the sums:
    E_x KL = E_x sum_y p log p - sum_y p(y) log p(y), with p(y) the split's mean of p(y|x). Returns (mean, std)."""
    n = s[f"{name}_is_n"]
    marginal = s[f"{name}_is_p"] / n[:, None]
    kl = s[f"{name}_is_plogp"] / n - (marginal * np.log(np.maximum(marginal, 1e-300))).sum(1)
    return float(np.exp(kl).mean()), float(np.exp(kl).std())


def add_features(sums, nets, prefix, x, indices, n, video_fid="per-frame"):
    """Inception features of every frame and I3D features of each clip of a batch x in [-1,1] whose samples have
    global indices `indices` out of n. Video FID keeps one Gaussian per frame index (the paper's code), or pools all
    frames into one; IS takes every frame, a clip's frames in its split."""
    B = x.shape[0]
    if "inception" in nets:
        pool, logits = nets["inception"](frames_to_batch(x).to(sums.device))  # [B*T,2048], [B*T,1008]
        T = pool.shape[0] // B
        sums.add_moments(f"{prefix}_pool", pool.view(B, T, -1) if video_fid == "per-frame" else pool[:, None])
        splits = min(IS_SPLITS, n)
        split = ((torch.as_tensor(indices) + 1) * splits - 1) // n  # the improved-GAN code's [k n/s, (k+1) n/s)
        sums.add_is(prefix, logits, split.repeat_interleave(T), splits)
    if "i3d" in nets and x.dim() == 5:
        sums.add_moments(f"{prefix}_i3d", i3d_features(nets["i3d"], x.to(sums.device))[:, None])


def load_networks(args, video, rank, device):
    """The feature networks that are available, on the device, and (for the report) which files or why not."""
    nets, used = {}, {}
    file, url = (FID_FILE, FID_URL) if args.inception == "fid" else (TV_INCEPTION_FILE, TV_INCEPTION_URL)
    path, why = find_weights(args.inception_weights, file, url)
    if path:
        nets["inception"], used["inception"] = InceptionFeatures(args.inception, path).to(device), path
    elif rank == 0:
        print(f"FID/IS skipped: {why}, or pass --inception-weights PATH", flush=True)
    if video:
        path, why = find_weights(args.i3d_weights, I3D_FILE, I3D_URL)
        if path:
            nets["i3d"], used["i3d"] = torch.jit.load(path, map_location=device).eval(), path
        elif rank == 0:
            print(f"FVD skipped: {why}, or pass --i3d-weights PATH", flush=True)
    return nets, used


def load_dataset(args, size, T):
    """--data at the evaluation size; clips take every --frame-stride-th frame of the files --split-file lists."""
    try:
        return data.build_dataset(args.data, size, T, frame_stride=args.frame_stride, split_file=args.split_file)
    except (ValueError, FileNotFoundError, ImportError) as err:
        fail(str(err))


def fail(message):
    print(f"evaluate.py: {message}", file=sys.stderr)
    sys.exit(2)


def read_checkpoint(path, mmap=False):
    """The dict of a train_ae.py or train_dit.py checkpoint, read once (the model is built from it, not read again;
    mmap: tensors are read only when used); a missing, unreadable or foreign file fails with one line naming it."""
    if not os.path.exists(path):
        fail(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        kind, _ = ckpt["config"]["kind"], ckpt["config"]["num_frames"]  # both are read by every evaluation
    except Exception as err:
        fail(f"{path} is not a vitok checkpoint (train_ae.py or train_dit.py): {type(err).__name__}: "
             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}")
    if kind not in ("ae", "dit"):
        fail(f"{path} has kind {kind!r}; expected 'ae' (train_ae.py) or 'dit' (train_dit.py)")
    return ckpt


# --------------------------------------------------------------------------------------------------------------
# Tokenizer: reconstructions from the posterior mean
# --------------------------------------------------------------------------------------------------------------
def bilinear_codec(x, floats):
    """The trivial codec with at most as many floats as the latent: downsample each frame (antialiased) to the largest
    square that fits its share of the budget (E = 256 floats: 9x9x3 = 243), upsample again."""
    frames = x.shape[2] if x.dim() == 5 else 1
    side = max(1, int(math.sqrt(floats / frames / 3)))
    low = F.interpolate(frames_to_batch(x), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate_tokenizer(args, ckpt, rank, world, device):
    config = ckpt["config"]
    try:
        model = vitok.from_checkpoint(args.ckpt, state=ckpt).to(device)
    except RuntimeError as err:
        fail(f"{args.ckpt}: the weights do not match its config ({config['model']}, c={config['channels']}): "
             f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}")
    size, T = args.image_size or config["image_size"], config["num_frames"]
    try:
        grid = model.grid((T, size, size))
    except ValueError as err:
        fail(str(err))
    n, part = data.shard(load_dataset(args, size, T), args.num_samples, rank, world)
    if n < world:
        fail(f"{n} samples cannot be split over {world} ranks")
    nets, used = load_networks(args, T > 1, rank, device)
    used["model"] = model.weights
    try:
        lpips = losses.LPIPS().to(device)
        used["lpips"] = "vgg"
    except FileNotFoundError as err:
        lpips = None
        if rank == 0:
            print(f"LPIPS skipped: {err}", flush=True)
    if rank == 0:
        print(f"{args.ckpt}: {config['model']} c={config['channels']} step {ckpt.get('step')}, {model.weights} "
              f"weights; {n} samples of {args.data} at {'x'.join(map(str, (T, size, size)))}", flush=True)
    floats = grid[0] * grid[1] * grid[2] * model.channels
    sums, shown = Sums(device), None
    loader = torch.utils.data.DataLoader(part, batch_size=args.batch_size, num_workers=args.workers)
    for b, (x, _) in enumerate(tqdm(loader, desc="reconstruct", disable=rank != 0)):
        indices = part.indices[b * args.batch_size:(b + 1) * args.batch_size]
        x = x.to(device)
        with autocast(device, args.precision):
            x_hat = model.decode(model.encode(x).mode(), x.shape[2:])
        real8, recon8 = to_uint8(x), to_uint8(x_hat)
        frames, B = frames_to_batch(real8), x.shape[0]
        per_frame = {"psnr": psnr(frames, frames_to_batch(recon8)),
                     "ssim": ssim(frames, frames_to_batch(recon8), form=args.ssim),
                     "baseline_psnr": psnr(frames, to_uint8(bilinear_codec(x, floats)))}
        for name, v in per_frame.items():  # a clip's frames averaged, then summed over clips
            sums.add(name, v.view(B, -1).mean(1).sum())
        sums.add("count", B)
        real, recon = real8 / 127.5 - 1, recon8 / 127.5 - 1
        if lpips is not None:
            sums.add("lpips", lpips(recon, real, reduce=False).sum())
        add_features(sums, nets, "real", real, indices, n, args.video_fid)
        add_features(sums, nets, "recon", recon, indices, n, args.video_fid)
        shown = shown if shown is not None else (real[:8].cpu(), recon[:8].cpu())
    s = sums.reduce()
    if rank != 0:
        return {}, n, used, shown
    results = {k: float(s[k] / s["count"]) for k in ("psnr", "ssim", "lpips", "baseline_psnr") if k in s}
    if "real_pool_n" in s:
        results["rfid"] = fid(gaussian(s, "real_pool"), gaussian(s, "recon_pool"))
        results["ris"] = inception_score(s, "recon")[0]
    if "real_i3d_n" in s:
        results["rfvd"] = fid(gaussian(s, "real_i3d"), gaussian(s, "recon_i3d"))
    return results, n, used, shown


# --------------------------------------------------------------------------------------------------------------
# Generator: N samples with CFG, decoded by the tokenizer, against reference statistics
# --------------------------------------------------------------------------------------------------------------
def noise_and_labels(indices, shape, num_classes, seed, balanced=False):
    """Sample i's initial noise [*shape] and class come from a generator seeded by (seed, i) alone, so that samples
    depend on neither the number of ranks nor the batch size. Classes are uniform at random, as DiT's sample_ddp.py
    draws them; balanced: i mod K. Unconditional models (K = 0) get label 0."""
    z, y = [], []
    for i in indices:
        g = torch.Generator().manual_seed(seed * 10_000_019 + i)
        z.append(torch.randn(shape, generator=g))
        y.append(0 if not num_classes else i % num_classes if balanced else
                 int(torch.randint(num_classes, (), generator=g)))
    return torch.stack(z), torch.tensor(y)


@torch.no_grad()
def reference_stats(args, size, T, nets, rank, world, device):
    """Mean and covariance of the features of --data's first --num-ref samples (all ranks take part), rounded to uint8
    as the samples are; the groups of per-frame video FID kept."""
    n, part = data.shard(load_dataset(args, size, T), args.num_ref, rank, world)
    if n < world:
        fail(f"{n} reference samples cannot be split over {world} ranks")
    sums = Sums(device)
    loader = torch.utils.data.DataLoader(part, batch_size=args.batch_size, num_workers=args.workers)
    for b, (x, _) in enumerate(tqdm(loader, desc="reference", disable=rank != 0)):
        indices = part.indices[b * args.batch_size:(b + 1) * args.batch_size]
        add_features(sums, nets, "real", to_uint8(x) / 127.5 - 1, indices, n, args.video_fid)
    s, stats = sums.reduce(), {}
    for name, key in (("real_pool", ""), ("real_i3d", "_i3d")):
        if f"{name}_n" in s:
            stats[f"mu{key}"], stats[f"sigma{key}"] = gaussian(s, name)
    return stats, n


def load_reference(path):
    """mu/sigma (and mu_i3d/sigma_i3d) of a reference .npz, with a group axis: ADM's reference batches (whose
    images, arr_0, are not read) and --save-ref's files both load."""
    with np.load(path) as f:
        ref = {k: f[k].astype(np.float64) for k in ("mu", "sigma", "mu_i3d", "sigma_i3d") if k in f.files}
    return {k: v[None] if v.ndim == (1 if k.startswith("mu") else 2) else v for k, v in ref.items()}


@torch.no_grad()
def evaluate_generator(args, ckpt, rank, world, device):
    config = ckpt["config"]
    ae_path = args.ae_ckpt or config["ae_ckpt"]
    if not os.path.exists(ae_path):
        fail(f"the tokenizer {ae_path} named by {args.ckpt} is missing; pass --ae-ckpt")
    try:
        model = dit.from_checkpoint(args.ckpt, state=ckpt).to(device)  # the file main read, not read again
    except RuntimeError as err:
        fail(f"{args.ckpt}: the weights do not match its config ({config['model']}): {str(err).splitlines()[0]}")
    ae = vitok.from_checkpoint(ae_path).to(device)
    grid, K, c = config["grid"], config["num_classes"], config["channels"]
    T, S = config["num_frames"], config["image_size"]
    n = args.num_samples or 50_000
    if n < world:
        fail(f"{n} samples cannot be split over {world} ranks")
    cfg_scale = args.cfg_scale if K else 1.0  # unconditional: nothing to guide
    nets, used = load_networks(args, T > 1, rank, device)
    used.update(model=model.weights, tokenizer=f"{ae_path} ({ae.weights})")
    if rank == 0:
        print(f"{args.ckpt}: {config['model']} step {ckpt.get('step')}, {model.weights} weights; {n} samples, "
              f"{args.sample_steps} DDIM steps, cfg {cfg_scale}, {K} classes "
              f"({'balanced' if args.balanced_labels else 'random'}), {args.precision}", flush=True)
    out = args.samples or os.path.splitext(args.ckpt)[0] + "_samples.npz"
    mine = range(rank, n, world)
    shard = data.open_shard(out, rank, len(mine), (S, S, 3) if T == 1 else (T, S, S, 3))  # NHWC (video: NTHWC)
    sums = Sums(device)
    for start in tqdm(range(0, len(mine), args.batch_size), desc="sample", disable=rank != 0):
        indices = mine[start:start + args.batch_size]
        z, y = noise_and_labels(indices, (math.prod(grid), c), K, args.seed, args.balanced_labels)
        with autocast(device, args.precision):
            latents = dit.sample(model, z.to(device), y.to(device), steps=args.sample_steps, cfg_scale=cfg_scale)
            x = ae.decode(latents / config["latent_scale"], (S, S) if T == 1 else (T, S, S)).float()
        x8 = to_uint8(x)
        add_features(sums, nets, "gen", x8 / 127.5 - 1, indices, n, args.video_fid)
        shard[start:start + len(indices)] = x8.to(torch.uint8).movedim(1, -1).cpu().numpy()
    shard.flush()
    del shard
    s, ref = sums.reduce(), {}
    if nets:
        if args.ref:
            ref = load_reference(args.ref)
        elif args.data:
            ref = reference_stats(args, S, T, nets, rank, world, device)[0]
        elif rank == 0:
            print("gFID/gFVD skipped: pass --ref stats.npz or --data FOLDER for the reference statistics")
    if world > 1:
        dist.barrier()  # every shard is on disk before rank 0 joins them
    if rank != 0:
        return {}, n, used, None
    head = data.join_shards(out, n, world)  # uint8 NHWC arr_0, as the ADM evaluator reads
    print(f"samples: {out} {(n, *head.shape[1:])} uint8", flush=True)
    results = {}
    for name, key, metric in (("gen_pool", "", "gfid"), ("gen_i3d", "_i3d", "fvd")):
        if f"{name}_n" in s and f"mu{key}" in ref:
            mu, sigma = gaussian(s, name)
            if ref[f"mu{key}"].shape != mu.shape:
                fail(f"the reference statistics {ref[f'mu{key}'].shape} do not match the samples' {mu.shape} "
                     f"(per-frame video FID needs per-frame references: --save-ref with --num-frames)")
            results[metric] = fid((mu, sigma), (ref[f"mu{key}"], ref[f"sigma{key}"]))
    if "gen_is_n" in s:
        results["gis"] = inception_score(s, "gen")[0]
    shown = torch.from_numpy(head).movedim(-1, 1).float() / 127.5 - 1
    return results, n, used, (shown[:8], shown[8:16])


def save_reference(args, rank, world, device):
    """--save-ref: mu/sigma (mu_i3d/sigma_i3d for clips) of --data, in the layout of ADM's reference batches."""
    if not (args.save_ref and args.data):
        fail("pass --ckpt (a train_ae.py or train_dit.py checkpoint), or --data with --save-ref")
    nets, used = load_networks(args, args.num_frames > 1, rank, device)
    if not nets:
        fail("no feature network available for reference statistics (see above)")
    stats, n = reference_stats(args, args.image_size or 256, args.num_frames, nets, rank, world, device)
    if rank == 0:  # one group (images, pooled frames) is stored without its group axis, as ADM's files
        np.savez(args.save_ref, **{k: v[0] if len(v) == 1 else v for k, v in stats.items()})
        print(f"reference statistics of {n} samples of {args.data}: {args.save_ref} ({', '.join(stats)})")


# --------------------------------------------------------------------------------------------------------------
# The scaling sweep (Fig. 3): each metric against E = L*c over tokenizers of different patch size and channels
# --------------------------------------------------------------------------------------------------------------
# The metrics a sweep fits and plots where computed, with their axis labels; baseline_psnr (the bilinear codec with the
# same floats, or slightly fewer) is only tabulated.
SWEEP_METRICS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "rfid": "rFID"}


def sweep_point(path, ckpt, size, source, results, n):
    """One row of the sweep table: the bottleneck of a tokenizer checkpoint evaluated at `size` (patch p, tubelet q,
    channels c, tokens L, E = L*c floats) and its metrics on `source`."""
    config = ckpt["config"]
    with torch.device("meta"):  # the shapes only: no memory, no initialisation
        model = vitok.from_name(config["model"], channels=config["channels"])
    t, h, w = model.grid((config["num_frames"], size, size))
    return dict(ckpt=path, model=config["model"], p=model.patch_size, q=model.tubelet_size, c=model.channels,
                L=t * h * w, E=t * h * w * model.channels, image_size=size, num_frames=config["num_frames"],
                step=ckpt.get("step"), data=source, num_samples=n, **results)


def fit_log_e(E, y):
    """Least squares y = intercept + slope * log2(E) (the slope is per doubling of E), and R^2 (None when y is
    constant, where it is undefined). Fig. 3's claim is that R^2 is high whatever the split of E into L and c."""
    x, y = np.log2(np.asarray(E, dtype=np.float64)), np.asarray(y, dtype=np.float64)
    (intercept, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
    ss_res, ss_tot = float(((y - intercept - slope * x) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return dict(slope=float(slope), intercept=float(intercept), r2=1 - ss_res / ss_tot if ss_tot > 0 else None,
                n=len(x))


def sweep_fits(points):
    """Each metric's fit on log2 E over the points that have it. Points at several resolutions (Fig. 4: 256p and
    512p) are fitted per resolution, keyed "psnr@512"; a single resolution gives plain keys ("psnr")."""
    groups = {}
    for pt in points:
        groups.setdefault((pt["num_frames"], pt["image_size"]), []).append(pt)
    fits = {}
    for (T, size), group in sorted(groups.items()):
        suffix = "" if len(groups) == 1 else f"@{size}" if T == 1 else f"@{T}x{size}"
        for metric in SWEEP_METRICS:
            have = [pt for pt in group if pt.get(metric) is not None]
            if len({pt["E"] for pt in have}) < 2:
                continue  # a line needs two distinct E
            fits[metric + suffix] = fit_log_e([pt["E"] for pt in have], [pt[metric] for pt in have])
    return fits


def sweep_spreads(points):
    """Fig. 3's other half: points of equal E but a different split (p, c) should score alike. For each resolution and
    each E reached by two or more splits: the splits and each metric's spread (largest minus smallest) over them, a
    split that has several checkpoints (seeds) counting with their mean. (p, c) fixes q, given E and the frames."""
    groups = {}  # (frames, size, E) -> (p, c) -> points
    for pt in points:
        key = (pt["num_frames"], pt["image_size"], pt["E"])
        groups.setdefault(key, {}).setdefault((pt["p"], pt["c"]), []).append(pt)
    spreads = []
    for (T, size, E), splits in sorted(groups.items()):
        if len(splits) < 2:
            continue
        row = dict(num_frames=T, image_size=size, E=E, splits=[list(split) for split in splits])
        for metric in SWEEP_METRICS:  # not baseline_psnr: the bilinear codec depends on E alone
            values = [[pt[metric] for pt in pts if pt.get(metric) is not None] for pts in splits.values()]
            means = [float(np.mean(v)) for v in values if v]
            if len(means) > 1:
                row[metric] = max(means) - min(means)
        spreads.append(row)
    return spreads


def print_sweep(points, fits, spreads):
    metrics = [m for m in (*SWEEP_METRICS, "baseline_psnr") if any(m in pt for pt in points)]
    print(f"\n{'checkpoint':<28}{'model':>10}{'p':>4}{'q':>3}{'c':>5}{'L':>7}{'E':>8}{'size':>6}"
          + "".join(f"{m:>14}" for m in metrics))
    for pt in sorted(points, key=lambda pt: (pt["num_frames"], pt["image_size"], pt["E"], pt["p"])):
        name = os.path.basename(pt["ckpt"])
        size = pt["image_size"] if pt["num_frames"] == 1 else f"{pt['num_frames']}x{pt['image_size']}"
        print(f"{name[-28:]:<28}{pt['model']:>10}{pt['p']:>4}{pt['q']:>3}{pt['c']:>5}{pt['L']:>7}{pt['E']:>8}"
              f"{size:>6}" + "".join(f"{pt[m]:>14.4f}" if m in pt else f"{'-':>14}" for m in metrics))
    print(f"\n{'fit: metric = intercept + slope * log2(E)':<44}{'slope':>10}{'intercept':>12}{'R^2':>8}{'points':>8}")
    for key, f in fits.items():
        r2 = f"{f['r2']:.3f}" if f["r2"] is not None else "-"
        print(f"{key:<44}{f['slope']:>10.4f}{f['intercept']:>12.4f}{r2:>8}{f['n']:>8}")
    for row in spreads:
        size = row["image_size"] if row["num_frames"] == 1 else f"{row['num_frames']}x{row['image_size']}"
        splits = ", ".join(f"p={p} c={c}" for p, c in row["splits"])
        print(f"equal E = {row['E']} at {size}: spread (max - min) "
              + " ".join(f"{m} {row[m]:.4f}" for m in SWEEP_METRICS if m in row) + f" over {splits}")


def plot_sweep(path, points, fits):
    """Fig. 3: one panel per metric, the metric against E on a log axis, one marker shape per patch size, one colour
    per resolution, and the fitted line. matplotlib is optional: without it, no plot and a message (False)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"plot skipped: {path} needs matplotlib (pip install matplotlib); the table above has the numbers")
        return False
    metrics = [m for m in SWEEP_METRICS if any(m in pt for pt in points)]
    resolutions = sorted({(pt["num_frames"], pt["image_size"]) for pt in points})
    markers = dict(zip(sorted({pt["p"] for pt in points}), "osD^vP*Xh<>"))
    colours = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    fig = Figure(figsize=(4.2 * len(metrics), 3.6), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for k, (T, size) in enumerate(resolutions):
            res = f"{size}p" if T == 1 else f"{T}x{size}p"
            colour = colours[k % len(colours)]
            group = [pt for pt in points if (pt["num_frames"], pt["image_size"]) == (T, size) and metric in pt]
            for p, marker in markers.items():
                mine = [pt for pt in group if pt["p"] == p]
                if mine:
                    ax.scatter([pt["E"] for pt in mine], [pt[metric] for pt in mine], marker=marker, color=colour,
                               label=f"p={p}" + (f", {res}" if len(resolutions) > 1 else ""), zorder=3)
            fit = fits.get(metric + ("" if len(resolutions) == 1 else f"@{size}" if T == 1 else f"@{T}x{size}"))
            if fit:
                E = np.geomspace(min(pt["E"] for pt in group), max(pt["E"] for pt in group), 50)
                r2 = f"{fit['r2']:.2f}" if fit["r2"] is not None else "-"
                ax.plot(E, fit["intercept"] + fit["slope"] * np.log2(E), color=colour, alpha=0.6,
                        label=f"fit{' ' + res if len(resolutions) > 1 else ''}: R$^2$ {r2}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("E = L x c (floats in the latent)")
        ax.set_ylabel(SWEEP_METRICS[metric])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return True


def sweep(args, rank, world, device):
    """Evaluate every tokenizer of --sweep on the same data, then tabulate, fit, plot (--plot) and save (--json)."""
    # Every file is read and checked before hours of evaluation, not after; memory-mapped, a checkpoint's tensors are
    # read from disk only when its model is built.
    ckpts = [read_checkpoint(path, mmap=True) for path in args.sweep]
    for path, ckpt in zip(args.sweep, ckpts):
        if ckpt["config"]["kind"] != "ae":
            fail(f"--sweep takes tokenizer checkpoints (train_ae.py); {path} is a {ckpt['config']['kind']} checkpoint")
    points = []
    for path, ckpt in zip(args.sweep, ckpts):
        run = argparse.Namespace(**{**vars(args), "ckpt": path, "data": args.data or ckpt["config"]["data"],
                                    "frame_stride": args.frame_stride or ckpt["config"].get("frame_stride", 3)})
        results, n, _, _ = evaluate_tokenizer(run, ckpt, rank, world, device)
        points.append(sweep_point(path, ckpt, args.image_size or ckpt["config"]["image_size"], run.data, results, n))
    if rank != 0:
        return points, None
    if len({pt["data"] for pt in points}) > 1:
        print("note: the points were evaluated on different data (no --data: each on its training source)")
    fits, spreads = sweep_fits(points), sweep_spreads(points)
    print_sweep(points, fits, spreads)
    if args.plot and plot_sweep(args.plot, points, fits):
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"points": points, "fits": fits, "spreads": spreads}, f, indent=2)
        print(f"json: {args.json}")
    return points, fits


def main(args):
    rank, world, device = setup_distributed()
    if args.sweep:  # Fig. 3: several tokenizers, one table, fit and plot
        args.precision = args.precision or "bf16"
        sweep(args, rank, world, device)
        return cleanup_distributed()
    if args.ckpt is None:
        args.frame_stride = args.frame_stride or 3
        save_reference(args, rank, world, device)
        return cleanup_distributed()
    ckpt = read_checkpoint(args.ckpt)
    kind, video = ckpt["config"]["kind"], ckpt["config"]["num_frames"] > 1
    args.frame_stride = args.frame_stride or ckpt["config"].get("frame_stride", 3)  # the clips it was trained on
    # bf16 for tokenizers (the paper found bf16 and fp32 equal, App. A); fp32 for DiT sampling, as DiT's sampler
    args.precision = args.precision or ("fp32" if kind == "dit" else "bf16")
    protocol = {"precision": args.precision, **({"video_fid": args.video_fid} if video else {})}
    if kind == "ae":
        if args.data is None:  # default to the training source ("synthetic" has a separate eval stream)
            args.data = ckpt["config"]["data"]
            if rank == 0:
                print(f"no --data: evaluating on the training source {args.data} (pass --data for held-out images)")
        results, n, used, shown = evaluate_tokenizer(args, ckpt, rank, world, device)
        protocol["ssim_form"] = args.ssim
    else:
        results, n, used, shown = evaluate_generator(args, ckpt, rank, world, device)
        protocol["labels"] = "balanced" if args.balanced_labels else "random"
    if rank == 0:
        print(f"\n{'metric':<14}{'value':>12}")
        for k, v in results.items():
            print(f"{k:<14}{v:>12.4f}")
        print(f"{'samples':<14}{n:>12d}\nweights: {used}\nprotocol: {protocol}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**results, "num_samples": n, "weights": used, **protocol}, f, indent=2)
        grid_path = args.grid or os.path.splitext(args.json or args.ckpt)[0] + "_grid.png"
        save_grid(grid_path, *shown)
        print(f"grid: {grid_path}" + (f"; json: {args.json}" if args.json else ""), flush=True)
    cleanup_distributed()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a tokenizer (train_ae.py) or DiT (train_dit.py) checkpoint; its kind is in it")
    p.add_argument("--data", help="dataset folder, 'synthetic' or 'deadleaves': images to reconstruct, or the "
                                  "generator's reference")
    p.add_argument("--num-samples", type=int, help="tokenizer: at most this many (default all); DiT: samples to "
                                                    "draw (default 50000)")
    p.add_argument("--inception-weights", help=f"the FID Inception file ({FID_FILE}; default: the torch hub cache)")
    p.add_argument("--inception", choices=["fid", "torchvision"], default="fid",
                   help="fid: the standard FID network (default); torchvision: its ImageNet Inception, as the "
                        "official ViTok code (numbers not comparable to published FIDs)")
    p.add_argument("--i3d-weights", help=f"StyleGAN-V's {I3D_FILE} for FVD (default: the torch hub cache)")
    p.add_argument("--json", help="write the results as one JSON object here")
    p.add_argument("--grid", help="PNG of originals/reconstructions or samples (default next to --json or --ckpt)")
    p.add_argument("--image-size", type=int, help="evaluate at this resolution (default: the checkpoint's)")
    p.add_argument("--num-frames", type=int, default=1, help="--save-ref only: clip length of the reference data")
    p.add_argument("--frame-stride", type=int, help="clips: every n-th frame (default: the checkpoint's; 3 for "
                                                    "--save-ref: 8 fps on UCF-101's 25, as the paper)")
    p.add_argument("--split-file", help="keep the files this list names (UCF-101: testlist01.txt, or testlist01)")
    p.add_argument("--ssim", choices=["paper", "valid"], default="paper",
                   help="paper: reflect-padded, every pixel (torchmetrics, the paper's code); valid: Wang's reference")
    p.add_argument("--video-fid", choices=["per-frame", "pooled"], default="per-frame",
                   help="video FID: one per frame index, averaged (the paper's code), or all frames pooled")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--precision", choices=["bf16", "fp32"], help="autocast on GPU (default: bf16 for tokenizers, "
                                                                 "fp32 for DiT sampling; bf16's gFID is unmeasured)")
    p.add_argument("--ae-ckpt", help="DiT: the tokenizer to decode with (default: the one its checkpoint names)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="DiT: classifier-free guidance scale")
    p.add_argument("--sample-steps", type=int, default=250, help="DiT: DDIM steps (default 250)")
    p.add_argument("--balanced-labels", action="store_true", help="DiT: class i mod K for sample i (default: "
                                                                  "uniform at random, as DiT)")
    p.add_argument("--seed", type=int, default=0, help="DiT: seed of the sampling noise and labels")
    p.add_argument("--ref", help="DiT: reference statistics .npz (mu, sigma; mu_i3d, sigma_i3d for FVD), e.g. ADM's "
                                 "VIRTUAL_imagenet256_labeled.npz")
    p.add_argument("--num-ref", type=int, help="DiT/--save-ref: at most this many reference samples")
    p.add_argument("--samples", help="DiT: where to write the samples .npz (default <ckpt>_samples.npz)")
    p.add_argument("--save-ref", help="with --data and no --ckpt: write reference statistics to this .npz")
    p.add_argument("--sweep", nargs="+", metavar="CKPT", help="tokenizer checkpoints of an E sweep (Fig. 3): one "
                   "table of p, c, L, E = L*c and the metrics, each metric's least-squares fit on log2 E and its "
                   "R^2, and its spread over the splits of one E")
    p.add_argument("--plot", metavar="PNG", help="--sweep: each metric against E on a log axis, one marker per patch "
                                                 "size, with the fit (needs matplotlib)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
