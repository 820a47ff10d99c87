"""Evaluate tokenizers and generators as the paper does (§4, SPEC §5).

    python evaluate.py --ckpt ae.pt --data /datasets/imagenet/val --json ae.json      # PSNR SSIM LPIPS rFID rIS
    torchrun --nproc_per_node=8 evaluate.py --ckpt ae.pt --data /datasets/ucf101      # + rFVD for a video model
    python evaluate.py --ckpt dit.pt --ref imagenet_ref.npz --num-samples 50000      # gFID gIS (+ gFVD for video)
    python evaluate.py --data /datasets/imagenet/val --save-ref imagenet_ref.npz     # reference statistics

Pretrained networks are the field's standard files (same names, URLs and keys as the standard tools); a metric
whose network is missing is skipped with a message saying what to download and where, never estimated.
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
import torchvision
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


# --------------------------------------------------------------------------------------------------------------
# Pixel metrics on uint8-rounded images (values 0..255 as floats), one number per image
# --------------------------------------------------------------------------------------------------------------
def to_uint8(x):
    """[-1,1] -> rounded 0..255 (float), as if the images were saved and read back."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def psnr(x, y, data_range=255.0):
    """Per image [N] for x, y [N,3,H,W] in 0..255: 10 log10(range^2 / MSE)."""
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-10))


def ssim(x, y, data_range=255.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM (Wang et al. 2004) per image [N]: 11x11 Gaussian window (sigma 1.5), 'valid' filtering as the
    reference implementation, on each RGB channel, averaged over pixels and channels."""
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    window = torch.outer(g, g).expand(3, 1, size, size).to(x.device)
    x, y = x.double(), y.double()
    blur = lambda v: F.conv2d(v, window, groups=3)  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------------------------
# The FID Inception: TensorFlow's 2015-12-05 graph in torchvision's Inception3 layout (as pytorch-fid ports it)
# --------------------------------------------------------------------------------------------------------------
class FIDInceptionA(tv_inception.InceptionA):
    """The TF graph averages its pool branch without counting the zero padding."""

    def _forward(self, x):
        out = super()._forward(x)
        out[-1] = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return out


class FIDInceptionC(tv_inception.InceptionC):
    def _forward(self, x):
        out = super()._forward(x)
        out[-1] = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return out


class FIDInceptionE(tv_inception.InceptionE):
    """Mixed_7b averages without the padding; Mixed_7c max-pools its pool branch (a quirk of the TF graph)."""
    max_pool = False

    def _forward(self, x):
        out = super()._forward(x)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else \
            F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        out[-1] = self.branch_pool(pooled)
        return out


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
    """x [N,3,H,W] in [-1,1] -> (2048-d pool features, class logits). kind "fid": the standard FID network
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
        return pool, net.fc(pool)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017), with scipy's sqrtm; retried with eps I
    on both covariances when the product is singular, and an error when the root is far from real."""
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


def feature_stats(features):
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def inception_score(logits, splits=10):
    """exp E_x KL(p(y|x) || p(y)) over `splits` equal parts (10 as standard; fewer when N < 10), mean and std."""
    probs = torch.as_tensor(logits, dtype=torch.float64).softmax(dim=1)
    scores = []
    for part in probs.chunk(min(splits, len(probs))):
        p_y = part.mean(0, keepdim=True)
        scores.append(torch.exp((part * (part.clamp_min(1e-30).log() - p_y.clamp_min(1e-30).log())).sum(1).mean()))
    scores = torch.stack(scores)
    return scores.mean().item(), (scores.std().item() if len(scores) > 1 else 0.0)


def i3d_features(i3d, clips):
    """StyleGAN-V's I3D (TorchScript): clips [B,3,T,H,W] in [-1,1], resized to 224^2 -> 400-d features."""
    B, C, T, H, W = clips.shape
    frames = F.interpolate(frames_to_batch(clips).float(), size=(224, 224), mode="bilinear",
                           align_corners=False)  # [B*T,3,224,224]
    clips = frames.view(B, T, C, 224, 224).transpose(1, 2)
    return i3d(clips, rescale=False, resize=False, return_features=True)


# --------------------------------------------------------------------------------------------------------------
# Sharding: rank r takes samples r, r + W, ...; gathered rows are put back in sample order
# --------------------------------------------------------------------------------------------------------------
def gather(rows, world, device):
    """Concatenate every rank's rows [n_r, ...] (n_r may differ) in global sample order (rank-interleaved)."""
    if world == 1:
        return rows
    rows = rows.to(device)
    sizes = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor(len(rows), device=device))
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    total = sum(sizes)
    out = torch.empty((total, *rows.shape[1:]), dtype=rows.dtype, device=device)
    for r, (part, n) in enumerate(zip(parts, sizes)):
        out[r::world][:n] = part[:n]  # sample i lives on rank i % W at position i // W
    return out.cpu()


class Collector:
    """Per-sample numbers of one rank, by name; gathered over ranks at the end."""

    def __init__(self):
        self.rows = {}

    def add(self, name, value):
        self.rows.setdefault(name, []).append(value.detach().double().cpu())

    def gathered(self, world, device):
        return {k: gather(torch.cat(v), world, device).numpy() for k, v in self.rows.items()}


def load_networks(args, video, rank):
    """The feature networks that are available, and (for the report) which files were used or why not."""
    nets, used = {}, {}
    file, url = (FID_FILE, FID_URL) if args.inception == "fid" else (TV_INCEPTION_FILE, TV_INCEPTION_URL)
    path, why = find_weights(args.inception_weights, file, url)
    if path:
        nets["inception"], used["inception"] = InceptionFeatures(args.inception, path), path
    elif rank == 0:
        print(f"FID/IS skipped: {why}, or pass --inception-weights PATH", flush=True)
    if video:
        path, why = find_weights(args.i3d_weights, I3D_FILE, I3D_URL)
        if path:
            nets["i3d"], used["i3d"] = torch.jit.load(path, map_location="cpu").eval(), path
        elif rank == 0:
            print(f"FVD skipped: {why}, or pass --i3d-weights PATH", flush=True)
    return nets, used


def add_features(col, nets, prefix, x, device):
    """Inception features (frames folded for video) and I3D features of a batch in [-1,1]."""
    frames = frames_to_batch(x)
    if "inception" in nets:
        pool, logits = nets["inception"](frames.to(device))
        col.add(f"{prefix}_pool", pool)
        col.add(f"{prefix}_logits", logits)
    if "i3d" in nets and x.dim() == 5:
        col.add(f"{prefix}_i3d", i3d_features(nets["i3d"], x.to(device)))


def shard(dataset, num_samples, rank, world):
    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    return n, torch.utils.data.Subset(dataset, list(range(rank, n, world)))


def fail(message):
    print(f"evaluate.py: {message}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer: reconstructions from the posterior mean
# --------------------------------------------------------------------------------------------------------------
def bilinear_codec(x, floats):
    """The trivial codec with the same number of floats as the latent: downsample each frame (antialiased) to its
    share of the budget, upsample again."""
    frames = x.shape[2] if x.dim() == 5 else 1
    side = max(1, int(math.sqrt(floats / frames / 3)))
    low = F.interpolate(frames_to_batch(x), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate_tokenizer(args, ckpt, rank, world, device):
    cfg = ckpt["config"]
    try:
        model = vitok.from_checkpoint(args.ckpt, state=ckpt).to(device)
    except RuntimeError as err:
        fail(f"{args.ckpt}: the weights do not match its config ({cfg['model']}, c={cfg['channels']}): "
             f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}")
    size, T = args.image_size or cfg["image_size"], cfg["num_frames"]
    try:
        grid = model.grid((T, size, size))
        dataset = data.build_dataset(args.data, size, T)
    except (ValueError, FileNotFoundError, ImportError) as err:
        fail(str(err))
    n, part = shard(dataset, args.num_samples, rank, world)
    if n < world:
        fail(f"{n} samples cannot be split over {world} ranks")
    nets, used = load_networks(args, T > 1, rank)
    used["model"] = model.weights
    try:
        lpips = losses.LPIPS().to(device)
        used["lpips"] = "vgg"
    except FileNotFoundError as err:
        lpips = None
        if rank == 0:
            print(f"LPIPS skipped: {err}", flush=True)
    if rank == 0:
        print(f"{args.ckpt}: {cfg['model']} c={cfg['channels']} step {ckpt.get('step')}, {model.weights} weights; "
              f"{n} samples of {args.data} at {'x'.join(map(str, (T, size, size)))}", flush=True)
    floats = grid[0] * grid[1] * grid[2] * model.channels
    col, shown = Collector(), None
    loader = torch.utils.data.DataLoader(part, batch_size=args.batch_size, num_workers=args.workers)
    for x, _ in tqdm(loader, desc="reconstruct", disable=rank != 0):
        x = x.to(device)
        with autocast(device, args.precision):
            x_hat = model.decode(model.encode(x).mode(), x.shape[2:])
        real8, recon8 = to_uint8(x), to_uint8(x_hat)
        B = x.shape[0]
        col.add("psnr", psnr(frames_to_batch(real8), frames_to_batch(recon8)).view(B, -1).mean(1))  # videos: mean over frames
        col.add("ssim", ssim(frames_to_batch(real8), frames_to_batch(recon8)).view(B, -1).mean(1))
        col.add("baseline_psnr", psnr(frames_to_batch(real8), to_uint8(bilinear_codec(x, floats))).view(B, -1).mean(1))
        real, recon = real8 / 127.5 - 1, recon8 / 127.5 - 1
        if lpips is not None:
            col.add("lpips", lpips(recon, real, reduce=False))
        add_features(col, nets, "real", real, device)
        add_features(col, nets, "recon", recon, device)
        shown = shown if shown is not None else (real[:8].cpu(), recon[:8].cpu())
    g = col.gathered(world, device)
    results = {k: float(g[k].mean()) for k in ("psnr", "ssim", "lpips", "baseline_psnr") if k in g}
    if "real_pool" in g:
        results["rfid"] = frechet_distance(*feature_stats(g["real_pool"]), *feature_stats(g["recon_pool"]))
        results["ris"] = inception_score(g["recon_logits"])[0]
    if "real_i3d" in g:
        results["rfvd"] = frechet_distance(*feature_stats(g["real_i3d"]), *feature_stats(g["recon_i3d"]))
    return results, n, used, shown


# --------------------------------------------------------------------------------------------------------------
# Generator: N samples with CFG, decoded by the tokenizer, against reference statistics
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_features(args, size, T, nets, rank, world, device):
    try:
        dataset = data.build_dataset(args.data, size, T)
    except (ValueError, FileNotFoundError, ImportError) as err:
        fail(str(err))
    n, part = shard(dataset, args.num_ref, rank, world)
    col = Collector()
    loader = torch.utils.data.DataLoader(part, batch_size=args.batch_size, num_workers=args.workers)
    for x, _ in tqdm(loader, desc="reference", disable=rank != 0):
        add_features(col, nets, "real", x, device)
    return col.gathered(world, device), n


@torch.no_grad()
def evaluate_generator(args, ckpt, rank, world, device):
    cfg = ckpt["config"]
    ae_path = args.ae_ckpt or cfg["ae_ckpt"]
    if not os.path.exists(ae_path):
        fail(f"the tokenizer {ae_path} named by {args.ckpt} is missing; pass --ae-ckpt")
    ae = vitok.from_checkpoint(ae_path).to(device)
    grid, K, c = tuple(cfg["grid"]), cfg["num_classes"], cfg["channels"]
    try:
        model = dit.from_checkpoint(args.ckpt, state=ckpt).to(device)
    except RuntimeError as err:
        fail(f"{args.ckpt}: the weights do not match its config ({cfg['model']}): {str(err).splitlines()[0]}")
    weights = model.weights
    T, S = cfg["num_frames"], cfg["image_size"]
    size = (S, S) if T == 1 else (T, S, S)
    n = args.num_samples or 50_000
    cfg_scale = args.cfg_scale if K else 1.0  # unconditional: nothing to guide
    nets, used = load_networks(args, T > 1, rank)
    used.update(model=weights, tokenizer=f"{ae_path} ({ae.weights})")
    if rank == 0:
        print(f"{args.ckpt}: {cfg['model']} step {ckpt.get('step')}, {weights} weights; {n} samples, {args.steps} DDIM "
              f"steps, cfg {cfg_scale}, {K} classes", flush=True)
    mine, col, images = list(range(rank, n, world)), Collector(), []
    L = grid[0] * grid[1] * grid[2]
    for start in tqdm(range(0, len(mine), args.batch_size), desc="sample", disable=rank != 0):
        idx = mine[start:start + args.batch_size]
        # Per-sample noise seeds and class-balanced labels: samples do not depend on the number of ranks.
        z = torch.stack([torch.randn(L, c, generator=torch.Generator().manual_seed(args.seed * 10_000_019 + i))
                         for i in idx]).to(device)
        y = torch.tensor([i % K if K else 0 for i in idx], device=device)
        with autocast(device, args.precision):
            latents = dit.sample(model, z, y, steps=args.steps, cfg_scale=cfg_scale)
            x = ae.decode(latents / cfg["latent_scale"], size).float()
        x8 = to_uint8(x)
        add_features(col, nets, "gen", x8 / 127.5 - 1, device)
        images.append(x8.to(torch.uint8).movedim(1, -1).cpu())  # NHWC (video: NTHWC)
    g = col.gathered(world, device)
    samples = gather(torch.cat(images), world, device).numpy()
    results = {}
    if "gen_pool" in g or "gen_i3d" in g:
        ref = {}
        if args.ref:
            ref = dict(np.load(args.ref))
        elif args.data:
            feats, _ = reference_features(args, S, T, nets, rank, world, device)
            if "real_pool" in feats:
                ref["mu"], ref["sigma"] = feature_stats(feats["real_pool"])
            if "real_i3d" in feats:
                ref["mu_i3d"], ref["sigma_i3d"] = feature_stats(feats["real_i3d"])
        elif rank == 0:
            print("gFID/gFVD skipped: pass --ref stats.npz or --data FOLDER for the reference statistics")
        if "gen_pool" in g:
            results["gis"] = inception_score(g["gen_logits"])[0]
            if "mu" in ref:
                results["gfid"] = frechet_distance(*feature_stats(g["gen_pool"]), ref["mu"], ref["sigma"])
        if "gen_i3d" in g and "mu_i3d" in ref:
            results["fvd"] = frechet_distance(*feature_stats(g["gen_i3d"]), ref["mu_i3d"], ref["sigma_i3d"])
    if rank == 0:
        out = args.samples or os.path.splitext(args.ckpt)[0] + "_samples.npz"
        np.savez(out, arr_0=samples)  # uint8 NHWC, as the ADM evaluator reads (video: NTHWC)
        print(f"samples: {out} {samples.shape} uint8", flush=True)
    shown = torch.from_numpy(samples[:16]).movedim(-1, 1).float() / 127.5 - 1
    return results, n, used, (shown[:8], shown[8:16])


# --------------------------------------------------------------------------------------------------------------
def main(args):
    rank, world, device = setup_distributed()
    if args.ckpt is None:
        if not (args.save_ref and args.data):
            fail("pass --ckpt (a train_ae.py or train_dit.py checkpoint), or --data with --save-ref")
        nets, used = load_networks(args, args.num_frames > 1, rank)
        if not nets:
            fail("no feature network available for reference statistics (see above)")
        feats, n = reference_features(args, args.image_size or 256, args.num_frames, nets, rank, world, device)
        if rank == 0:
            stats = {}
            if "real_pool" in feats:
                stats["mu"], stats["sigma"] = feature_stats(feats["real_pool"])
            if "real_i3d" in feats:
                stats["mu_i3d"], stats["sigma_i3d"] = feature_stats(feats["real_i3d"])
            np.savez(args.save_ref, **stats)
            print(f"reference statistics of {n} samples of {args.data}: {args.save_ref} ({', '.join(stats)})")
        return cleanup_distributed()
    if not os.path.exists(args.ckpt):
        fail(f"checkpoint {args.ckpt} does not exist")
    try:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        kind = ckpt["config"]["kind"]
    except Exception as err:  # any unreadable or foreign file: one line naming it
        fail(f"{args.ckpt} is not a vitok checkpoint (train_ae.py or train_dit.py): {type(err).__name__}: "
             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}")
    if kind == "ae":
        if args.data is None:  # default to the training source ("synthetic" has a separate eval stream)
            args.data = ckpt["config"]["data"]
            if rank == 0:
                print(f"no --data: evaluating on the training source {args.data} (pass --data for held-out images)")
        results, n, used, shown = evaluate_tokenizer(args, ckpt, rank, world, device)
    elif kind == "dit":
        results, n, used, shown = evaluate_generator(args, ckpt, rank, world, device)
    else:
        fail(f"{args.ckpt} has kind {kind!r}; expected 'ae' or 'dit'")
    if rank == 0:
        print(f"\n{'metric':<14}{'value':>12}")
        for k, v in results.items():
            print(f"{k:<14}{v:>12.4f}")
        print(f"{'samples':<14}{n:>12d}\nweights: {used}")
        report = {**results, "num_samples": n, "weights": used}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        grid_path = args.grid or os.path.splitext(args.json or args.ckpt)[0] + "_grid.png"
        save_grid(grid_path, *shown)
        print(f"grid: {grid_path}" + (f"; json: {args.json}" if args.json else ""), flush=True)
    cleanup_distributed()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a tokenizer (train_ae.py) or DiT (train_dit.py) checkpoint; its kind is in it")
    p.add_argument("--data", help="dataset folder or 'synthetic': images to reconstruct, or the generator's reference")
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
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="bf16 autocast on GPU")
    p.add_argument("--ae-ckpt", help="DiT: the tokenizer to decode with (default: the one its checkpoint names)")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="DiT: classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=250, help="DiT: DDIM steps")
    p.add_argument("--seed", type=int, default=0, help="DiT: seed of the sampling noise")
    p.add_argument("--ref", help="DiT: reference statistics .npz (mu, sigma; mu_i3d, sigma_i3d for FVD)")
    p.add_argument("--num-ref", type=int, help="DiT/--save-ref: at most this many reference samples")
    p.add_argument("--samples", help="DiT: where to write the samples .npz (default <ckpt>_samples.npz)")
    p.add_argument("--save-ref", help="with --data and no --ckpt: write reference statistics to this .npz")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
