r"""Evaluate tokenizers and generators as the paper does (§4); the protocol's choices are in the
README's Differences.

    python evaluate.py --ckpt ae.pt --data /datasets/imagenet/val --json ae.json  # PSNR SSIM rFID
    torchrun --nproc_per_node=8 evaluate.py --ckpt vae.pt --data /datasets/ucf101 \
        --split-file testlist01  # + rFVD
    python evaluate.py --ckpt dit.pt --ref VIRTUAL_imagenet256_labeled.npz  # gFID gIS
    python evaluate.py --data /datasets/imagenet/train --save-ref imagenet_ref.npz  # reference
    python evaluate.py --sweep sweep_*.pt --data deadleaves --plot scaling.png  # Fig. 3

Feature networks are the standard tools' files; a metric whose file is missing is skipped, saying
what to download where, never estimated. Memory does not grow with the samples (running sums;
samples in per-rank shards on disk).
"""
import argparse
import json
import math
import os
import zipfile

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import dit
import features
import losses
import runtime
import sweep
import vitok
from runtime import UserError, autocast
from vitok import frames_to_batch

IS_SPLITS = 10  # the improved-GAN code's 10 splits; ADM's 5,000-sample splits equal them at 50k
GFID_PROTOCOL = ("running estimate: torch resize; for published numbers run ADM's evaluator "
                 "(guided-diffusion/evaluations/evaluator.py) on the samples .npz")


# ---- Pixel metrics on uint8-rounded images ----
def to_uint8(x):
    """[-1,1] -> rounded 0..255 (float), as if the images were saved and read back."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def psnr(x, y, data_range=255.0):
    """10 log10(range^2 / MSE) per image [N] of x, y [N,3,H,W] in 0..255 (the paper's code pools
    the MSE over a batch first)."""
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-10))


def ssim(x, y, form="paper", data_range=255.0, size=11, sigma=1.5, k1=0.01, k2=0.03):
    """SSIM (Wang et al. 2004) per image [N] of x, y [N,3,H,W] in 0..255: the mean map of a Gaussian
    window per channel. form "paper": reflect-padded, every pixel (torchmetrics, as the paper's
    code); "valid": windows inside only (Wang's code), most different on small images."""
    g = torch.exp(-(torch.arange(size, dtype=torch.float64) - size // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    window = torch.outer(g, g).expand(3, 1, size, size).to(x.device)
    x, y = x.double(), y.double()
    if form == "paper":
        x, y = (F.pad(v, [size // 2] * 4, mode="reflect") for v in (x, y))
    blur = lambda v: F.conv2d(v, window, groups=3)  # noqa: E731  ('valid' on the padded images)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2, blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    return (num / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))).mean(dim=(1, 2, 3))


# ---- Statistics: running sums, summed over ranks once; FID, IS ----
def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) (Heusel et al. 2017), scipy's sqrtm as the
    standard tools; retried with eps I on both covariances if singular; an error if not real."""
    (mu1, mu2), (sigma1, sigma2) = np.atleast_1d(mu1, mu2), np.atleast_2d(sigma1, sigma2)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("Frechet distance: imaginary component "
                             f"{np.abs(covmean.imag).max():.3g} in sqrtm")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class Sums:
    """Named float64 sums on the device; reduce() sums over ranks (each sees a batch, so all have
    the same names)."""

    def __init__(self, device):
        self.device, self.sums = device, {}

    def add(self, name, value):
        value = torch.as_tensor(value, dtype=torch.float64, device=self.device)
        self.sums.setdefault(name, torch.zeros_like(value)).add_(value)

    def add_moments(self, name, x):
        """x [B,G,D] (G groups: frame indices, or one) -> count, sum x [G,D], sum x x^T [G,D,D]."""
        x = x.to(self.device, torch.float64).transpose(0, 1)  # [G,B,D]
        self.add(f"{name}_n", x.shape[1])
        self.add(f"{name}_sum", x.sum(1))
        self.add(f"{name}_outer", x.mT @ x)

    def add_is(self, name, logits, split, splits):
        """Per IS split (split [N] gives each row's): count, sum of p(y|x), sum of sum_y p log p."""
        logp = logits.to(self.device, torch.float64).log_softmax(1)  # [N,K]
        p, split = logp.exp(), split.to(self.device)
        for key, v in (("n", torch.ones_like(p[:, 0])), ("p", p), ("plogp", (p * logp).sum(1))):
            self.add(f"{name}_is_{key}", v.new_zeros(splits, *v.shape[1:]).index_add_(0, split, v))

    def reduce(self):
        """All ranks: the sums over ranks, as numpy arrays."""
        if dist.is_initialized():
            for name in sorted(self.sums):
                dist.all_reduce(self.sums[name])
        return {k: v.cpu().numpy() for k, v in self.sums.items()}


def gaussian(s, name):
    """Mean [G,D] and covariance [G,D,D] (ddof=1, as np.cov) of G feature groups from the sums."""
    n, mu = s[f"{name}_n"], s[f"{name}_sum"] / s[f"{name}_n"]
    return mu, (s[f"{name}_outer"] - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)


def fid(a, b):
    """Frechet distance of each group (frame index) of the (mu, sigma) pairs a and b, averaged."""
    return float(np.mean([frechet_distance(*ab) for ab in zip(*a, *b)]))


def inception_score(s, name):
    """(mean, std) over splits of exp E_x KL(p(y|x) || p(y)) (Salimans et al. 2016), exact from
    the sums: E_x KL = E_x sum_y p log p - sum_y p(y) log p(y), p(y) the split's mean p(y|x)."""
    n = s[f"{name}_is_n"]
    marginal = s[f"{name}_is_p"] / n[:, None]
    kl = s[f"{name}_is_plogp"] / n - (marginal * np.log(np.maximum(marginal, 1e-300))).sum(1)
    return float(np.exp(kl).mean()), float(np.exp(kl).std())


def add_features(sums, nets, prefix, x, indices, n, video_fid="per-frame", is_splits=IS_SPLITS):
    """Inception features of every frame, I3D features of each clip, of x in [-1,1] (samples
    `indices` of n). IS takes every frame, a clip's frames in its split."""
    B = x.shape[0]
    if "inception" in nets:
        pool, logits = nets["inception"](frames_to_batch(x).to(sums.device))  # [B*T,2048]
        T = pool.shape[0] // B
        sums.add_moments(f"{prefix}_pool",
                         pool.view(B, T, -1) if video_fid == "per-frame" else pool[:, None])
        s = min(is_splits, n)  # the improved-GAN code's splits [k n/s, (k+1) n/s)
        split = ((torch.as_tensor(indices) + 1) * s - 1) // n
        sums.add_is(prefix, logits, split.repeat_interleave(T), s)
    if "i3d" in nets and x.dim() == 5:
        i3d = features.i3d_features(nets["i3d"], x.to(sums.device))
        sums.add_moments(f"{prefix}_i3d", i3d[:, None])


def networks(opts, video, rank, device):
    return features.load_networks(opts["inception"], opts["inception_weights"],
                                  opts["i3d_weights"], video, rank, device)


def shard(dataset, num_samples, rank, world):
    """(n, Subset): rank r's items r, r + world, ... of the first num_samples or all."""
    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    if n < world:
        raise UserError(f"{n} samples cannot be split over {world} ranks")
    return n, torch.utils.data.Subset(dataset, list(range(rank, n, world)))


def batches(part, batch_size, workers, desc, rank):
    """(global indices, x) of each batch of a shard, a progress bar on rank 0."""
    workers = min(workers, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=workers)
    for b, (x, _) in enumerate(tqdm(loader, desc=desc, disable=rank != 0)):
        yield part.indices[b * batch_size:(b + 1) * batch_size], x


# ---- Tokenizer: reconstructions from the posterior mean ----
def bilinear_codec(x, floats):
    """The trivial codec with at most the latent's floats: each frame downsampled (antialiased) to
    the largest square within its share (E = 256 floats: 9x9x3 = 243), upsampled again."""
    frames = x.shape[2] if x.dim() == 5 else 1
    side = max(1, int(math.sqrt(floats / frames / 3)))
    low = F.interpolate(frames_to_batch(x), size=(side, side), mode="bilinear", antialias=True,
                        align_corners=False)
    return F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False)


@torch.no_grad()
def reconstruct(model, part, n, nets, lpips, opts, rank, device):
    """PSNR, SSIM, LPIPS, the bilinear codec's PSNR and both sides' features of the reconstructions
    of `part` (of n), summed over ranks: (results on rank 0, samples to show)."""
    sums, shown = Sums(device), None
    for indices, x in batches(part, opts["batch_size"], opts["workers"], "reconstruct", rank):
        x = x.to(device)
        with autocast(device, opts["precision"]):
            x_hat = model.decode(model.encode(x).mode(), x.shape[2:])
        real8, recon8 = to_uint8(x), to_uint8(x_hat)
        frames, recon_frames, B = frames_to_batch(real8), frames_to_batch(recon8), x.shape[0]
        codec = to_uint8(bilinear_codec(x, math.prod(model.grid(x.shape[2:])) * model.channels))
        per_frame = {"psnr": psnr(frames, recon_frames),
                     "ssim": ssim(frames, recon_frames, form=opts["ssim"]),
                     "baseline_psnr": psnr(frames, codec)}
        for name, v in per_frame.items():  # a clip's frames averaged, then summed over clips
            sums.add(name, v.view(B, -1).mean(1).sum())
        sums.add("count", B)
        sums.add("sq_err", (frames.double() - recon_frames).pow(2).sum())  # psnr_pooled
        sums.add("pixels", frames.numel())
        real, recon = real8 / 127.5 - 1, recon8 / 127.5 - 1
        if lpips is not None:
            sums.add("lpips", lpips(recon, real, reduce=False).sum())
        for prefix, v in (("real", real), ("recon", recon)):
            add_features(sums, nets, prefix, v, indices, n, opts["video_fid"], opts["is_splits"])
        if shown is None:
            shown = real[:8].cpu(), recon[:8].cpu()
    s = sums.reduce()
    if rank != 0:
        return {}, shown
    results = {k: float(s[k] / s["count"]) for k in ("psnr", "ssim", "lpips", "baseline_psnr")
               if k in s}
    mse = np.maximum(s["sq_err"] / s["pixels"], 1e-10)  # the whole set's, as one batch
    results["psnr_pooled"] = float(10 * np.log10(255 ** 2 / mse))
    if "real_pool_n" in s:
        results["rfid"] = fid(gaussian(s, "real_pool"), gaussian(s, "recon_pool"))
        results["ris"] = inception_score(s, "recon")[0]
    if "real_i3d_n" in s:
        results["rfvd"] = fid(gaussian(s, "real_i3d"), gaussian(s, "recon_i3d"))
    return results, shown


def evaluate_tokenizer(ckpt, name, source, opts, rank, world, device):
    """A tokenizer on `source` at opts' resolution (default: its own)."""
    config = ckpt["config"]
    model = vitok.from_checkpoint(ckpt, name=name).to(device)
    size, T = opts["image_size"] or config["image_size"], config["num_frames"]
    model.grid((T, size, size))  # a size the tubelet does not divide fails here, before the data
    stride = opts["frame_stride"] or config.get("frame_stride", 3)  # the clips it was trained on
    dataset = data.build_dataset(source, size, T, frame_stride=stride,
                                 split_file=opts["split_file"])
    n, part = shard(dataset, opts["num_samples"], rank, world)
    nets, used = networks(opts, T > 1, rank, device)
    used["model"] = runtime.weights_key(ckpt)
    try:
        lpips, used["lpips"] = losses.LPIPS().to(device), "vgg"
    except UserError as err:  # no VGG16 file
        lpips = None
        if rank == 0:
            print(f"LPIPS skipped: {err}", flush=True)
    if rank == 0:
        print(f"{name}: {config['model']} c={config['channels']} step {ckpt.get('step')}, "
              f"{used['model']} weights; {n} samples of {source} at {T}x{size}x{size}", flush=True)
    results, shown = reconstruct(model, part, n, nets, lpips, opts, rank, device)
    return results, n, used, shown


# ---- Generator: CFG samples, decoded, against reference statistics ----
def noise_and_labels(indices, shape, num_classes, seed, balanced=False):
    """Sample i's noise [*shape], class and DDIM noise (a function), seeded by (seed, i) alone:
    independent of ranks and batch size. Classes uniform (DiT's sample_ddp.py) or, balanced, i mod
    K; 0 if K = 0."""
    gens = [torch.Generator().manual_seed(seed * 10_000_019 + i) for i in indices]
    z = torch.stack([torch.randn(shape, generator=g) for g in gens])  # before g draws a class
    y = [0 if not num_classes else i % num_classes if balanced else
         int(torch.randint(num_classes, (), generator=g)) for i, g in zip(indices, gens)]

    def noise(x):  # DDIM's eta > 0 noise for x [B,*shape]: row i's from sample i's generator
        return torch.stack([torch.randn(shape, generator=g) for g in gens]).to(x.device)
    return z, torch.tensor(y), noise


def open_shard(path, rank, rows, shape, run=None):
    """This rank's rows of the future `path` (.npz): a memory-mapped .npy beside it, and how many
    are done: a rerun of the same `run` continues where a crash left it (its .json says)."""
    npy, done = f"{path}.rank{rank}.npy", 0
    if run is not None and os.path.exists(npy + ".json"):
        with open(npy + ".json") as f:
            saved = json.load(f)
        done = saved["done"] if saved["run"] == run else 0
    return np.lib.format.open_memmap(npy, mode="r+" if done else "w+", dtype=np.uint8,
                                     shape=(rows, *shape)), done


def join_shards(path, n, world, block=256, head=16):
    """Rank 0, all shards flushed: the n rows in order to `path` as np.savez's `arr_0`, a block at
    a time; shards removed. Returns the first `head`."""
    shards = [np.load(f"{path}.rank{r}.npy", mmap_mode="r") for r in range(world)]
    header = {**np.lib.format.header_data_from_array_1_0(shards[0][:1]),
              "shape": (n, *shards[0].shape[1:])}
    with zipfile.ZipFile(f"{path}.tmp", "w", allowZip64=True) as archive:  # stored, as np.savez
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)
            for start in range(0, n, block):
                rows = np.stack([shards[i % world][i // world]
                                 for i in range(start, min(n, start + block))])
                f.write(rows.tobytes())
                if start == 0:
                    first = rows[:head].copy()
    os.replace(f"{path}.tmp", path)  # complete or absent, never half-written
    for r in range(world):
        for f in (f"{path}.rank{r}.npy", f"{path}.rank{r}.npy.json"):
            if os.path.exists(f):
                os.remove(f)
    return first


@torch.no_grad()
def reference_stats(source, size, T, stride, nets, opts, rank, world, device):
    """Feature mean and covariance of the first opts["num_ref"] samples of `source` (all ranks),
    rounded to uint8 as the samples are; per-frame video FID's groups kept."""
    dataset = data.build_dataset(source, size, T, frame_stride=stride,
                                 split_file=opts["split_file"])
    n, part = shard(dataset, opts["num_ref"], rank, world)
    sums = Sums(device)
    for indices, x in batches(part, opts["batch_size"], opts["workers"], "reference", rank):
        add_features(sums, nets, "real", to_uint8(x) / 127.5 - 1, indices, n, opts["video_fid"])
    s, stats = sums.reduce(), {}
    for name, key in (("real_pool", ""), ("real_i3d", "_i3d")):
        if f"{name}_n" in s:
            stats[f"mu{key}"], stats[f"sigma{key}"] = gaussian(s, name)
    return stats, n


def load_reference(path):
    """mu/sigma (mu_i3d/sigma_i3d), with a group axis, of ADM's reference batches (arr_0 unread)
    or --save-ref's .npz."""
    with np.load(path) as f:
        ref = {k: f[k].astype(np.float64) for k in ("mu", "sigma", "mu_i3d", "sigma_i3d")
               if k in f.files}
    return {k: v[None] if v.ndim == (1 if k.startswith("mu") else 2) else v for k, v in ref.items()}


@torch.no_grad()
def evaluate_generator(ckpt, name, source, opts, rank, world, device):
    """n DiT samples (opts["num_samples"]), decoded, written to a .npz; their gFID/gIS (gFVD)
    against opts["ref"] or `source`."""
    config = ckpt["config"]
    ae_path = opts["ae_ckpt"] or config["ae_ckpt"]
    if not os.path.exists(ae_path):
        raise UserError(f"the tokenizer {ae_path} named by {name} is missing; pass --ae-ckpt")
    model = dit.from_checkpoint(ckpt, name=name).to(device)
    ae_ckpt = runtime.read_checkpoint(ae_path, kind="ae")
    ae = vitok.from_checkpoint(ae_ckpt, name=ae_path).to(device)
    K, T, S = config["num_classes"], config["num_frames"], config["image_size"]
    size = (S, S) if T == 1 else (T, S, S)
    n = opts["num_samples"] or (10_000 if T > 1 else 50_000)  # clips: MAGVIT's, LARP's UCF
    mine = shard(range(n), n, rank, world)[1].indices
    cfg_scale = opts["cfg_scale"] if K else 1.0  # unconditional: nothing to guide
    labels = "balanced" if opts["balanced_labels"] else "random"
    nets, used = networks(opts, T > 1, rank, device)
    used.update(model=runtime.weights_key(ckpt),
                tokenizer=f"{ae_path} ({runtime.weights_key(ae_ckpt)})")
    if rank == 0:
        print(f"{name}: {config['model']} step {ckpt.get('step')}, {used['model']} weights; {n} "
              f"samples, {opts['sample_steps']} DDIM steps, cfg {cfg_scale}, {K} classes "
              f"({labels}), {opts['precision']}", flush=True)
    out = opts["samples"] or os.path.splitext(name)[0] + "_samples.npz"
    run = dict(ckpt=os.path.abspath(name), step=ckpt.get("step"), n=n, world=world,
               **{k: opts[k] for k in ("seed", "sample_steps", "cfg_scale", "eta", "precision",
                                       "balanced_labels")})
    rows, done = open_shard(out, rank, len(mine), (*size, 3), run)  # N(T)HWC
    sums, batch = Sums(device), opts["batch_size"]
    for start in tqdm(range(0, len(mine), batch), desc="sample", disable=rank != 0):
        indices = mine[start:start + batch]
        if start + len(indices) <= done:  # drawn before a crash: read back
            x8 = torch.from_numpy(rows[start:start + len(indices)]).movedim(-1, 1).float()
        else:
            z, y, noise = noise_and_labels(indices, (math.prod(config["grid"]),
                                           config["channels"]), K, opts["seed"],
                                           opts["balanced_labels"])
            with autocast(device, opts["precision"]):
                latents = dit.sample(model, z.to(device), y.to(device), noise=noise,
                                     steps=opts["sample_steps"], cfg_scale=cfg_scale,
                                     eta=opts["eta"])
                x8 = to_uint8(ae.decode(latents / config["latent_scale"], size).float())
            rows[start:start + len(indices)] = x8.to(torch.uint8).movedim(1, -1).cpu().numpy()
            rows.flush()
            with open(f"{out}.rank{rank}.npy.json.tmp", "w") as f:
                json.dump(dict(run=run, done=start + len(indices)), f)
            os.replace(f"{out}.rank{rank}.npy.json.tmp", f"{out}.rank{rank}.npy.json")
        add_features(sums, nets, "gen", x8.to(device) / 127.5 - 1, indices, n,
                     opts["video_fid"], opts["is_splits"])
    del rows
    s, ref = sums.reduce(), {}
    if nets:
        if opts["ref"]:
            ref = load_reference(opts["ref"])
        elif source:
            stride = opts["frame_stride"] or config.get("frame_stride", 3)
            ref = reference_stats(source, S, T, stride, nets, opts, rank, world, device)[0]
        elif rank == 0:
            print("gFID/gFVD skipped: pass --ref stats.npz or --data FOLDER for the reference "
                  "statistics")
    if world > 1:
        dist.barrier()  # every shard is on disk before rank 0 joins them
    if rank != 0:
        return {}, n, used, None
    head = join_shards(out, n, world)  # uint8 NHWC arr_0, as the ADM evaluator reads
    print(f"samples: {out} {(n, *head.shape[1:])} uint8", flush=True)
    results = {}
    for stat, key, metric in (("gen_pool", "", "gfid"), ("gen_i3d", "_i3d", "fvd")):
        if f"{stat}_n" in s and f"mu{key}" in ref:
            ours, theirs = gaussian(s, stat), (ref[f"mu{key}"], ref[f"sigma{key}"])
            if theirs[0].shape != ours[0].shape:
                raise UserError(f"the reference statistics {theirs[0].shape} do not match the "
                                f"samples' {ours[0].shape} (per-frame video FID needs per-frame "
                                f"references: --save-ref with --num-frames)")
            results[metric] = fid(ours, theirs)
    if "gen_is_n" in s:
        results["gis"] = inception_score(s, "gen")[0]
    shown = torch.from_numpy(head).movedim(-1, 1).float() / 127.5 - 1
    return results, n, used, (shown[:8], shown[8:16])


def save_reference(path, source, opts, rank, world, device):
    """--save-ref: mu/sigma (mu_i3d/sigma_i3d for clips) of --data, in ADM's reference layout."""
    T = opts["num_frames"]
    nets, _ = networks(opts, T > 1, rank, device)
    if not nets:
        raise UserError("no feature network available for reference statistics (see above)")
    stats, n = reference_stats(source, opts["image_size"] or 256, T, opts["frame_stride"] or 3,
                               nets, opts, rank, world, device)
    if rank == 0:  # one group (images, pooled frames) is stored without group axis, as ADM's
        np.savez(path, **{k: v[0] if len(v) == 1 else v for k, v in stats.items()})
        print(f"reference statistics of {n} samples of {source}: {path} ({', '.join(stats)})")


def evaluate_sweep(paths, source, opts, plot, json_path, rank, world, device):
    """Each tokenizer of an E sweep on the same data, then sweep.report. All files are read (mmap)
    and checked first, before hours of evaluation."""
    ckpts = [runtime.read_checkpoint(path, kind="ae", mmap=True) for path in paths]
    points = []
    for path, ckpt in zip(paths, ckpts):
        config = ckpt["config"]
        src, size = source or config["data"], opts["image_size"] or config["image_size"]
        results, n, _, _ = evaluate_tokenizer(ckpt, path, src, opts, rank, world, device)
        points.append(sweep.sweep_point(path, config, ckpt.get("step"), size, src, results, n))
    if rank == 0:
        sweep.report(points, plot, json_path)
    return points


def main(args):
    rank, world, device = runtime.setup_distributed()
    opts = vars(args)  # options by name; args itself never changes
    if args.sweep:  # Fig. 3
        opts = {**opts, "precision": args.precision or "bf16"}
        evaluate_sweep(args.sweep, args.data, opts, args.plot, args.json, rank, world, device)
        return runtime.cleanup_distributed()
    if args.ckpt is None:
        if not (args.save_ref and args.data):
            raise UserError("pass --ckpt (a train_ae.py or train_dit.py checkpoint), or --data "
                            "with --save-ref")
        save_reference(args.save_ref, args.data, opts, rank, world, device)
        return runtime.cleanup_distributed()
    ckpt = runtime.read_checkpoint(args.ckpt)
    kind = ckpt["config"]["kind"]
    # bf16 for tokenizers (equal to fp32 in the paper, App. A); fp32 for DiT sampling, as DiT's
    precision = args.precision or ("fp32" if kind == "dit" else "bf16")
    opts = {**opts, "precision": precision}
    protocol = {"precision": runtime.precision_used(device, precision), "is_splits": args.is_splits,
                "fid_network": features.InceptionFeatures.NAMES[args.inception]}
    if ckpt["config"]["num_frames"] > 1:
        protocol["video_fid"] = args.video_fid
    if kind == "ae":
        source = args.data or ckpt["config"]["data"]  # "synthetic" has a separate eval stream
        if args.data is None and rank == 0:
            print(f"no --data: the training source {source} (--data for held-out images)")
        protocol.update(ssim_form=args.ssim, psnr_pooled_form="MSE of the whole set")
    else:
        source = args.data
        protocol.update(labels="balanced" if args.balanced_labels else "random", eta=args.eta,
                        gfid_protocol=GFID_PROTOCOL)
    run = evaluate_tokenizer if kind == "ae" else evaluate_generator
    results, n, used, shown = run(ckpt, args.ckpt, source, opts, rank, world, device)
    if rank == 0:
        print(f"\n{'metric':<14}{'value':>12}")
        for k, v in results.items():
            print(f"{k:<14}{v:>12.4f}")
        print(f"{'samples':<14}{n:>12d}\nweights: {used}\nprotocol: {protocol}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**results, "num_samples": n, "weights": used, **protocol}, f, indent=2)
        grid_path = args.grid or os.path.splitext(args.json or args.ckpt)[0] + "_grid.png"
        runtime.save_grid(grid_path, *shown)
        print(f"grid: {grid_path}" + (f"; json: {args.json}" if args.json else ""), flush=True)
    runtime.cleanup_distributed()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--ckpt", help="a tokenizer (train_ae.py) or DiT (train_dit.py) checkpoint, or its export")
    add("--data", help="folder, 'synthetic' or 'deadleaves': to reconstruct, or DiT's reference")
    add("--num-samples", type=int, help="tokenizer: at most (default all); DiT: to draw (50000; "
        "10000 clips, the UCF-101 gFVD convention of MAGVIT and LARP)")
    add("--inception-weights", help=f"{features.FID_FILE} (default: the torch hub cache)")
    add("--inception", choices=["fid", "torchvision"], default="fid", help="fid: the standard FID "
        "network (published gFIDs); torchvision: the official code's (likely the paper's rFIDs)")
    add("--is-splits", type=int, default=IS_SPLITS, help="IS splits (the official code's 1 reads "
        "5-8%% higher)")
    add("--i3d-weights", help=f"StyleGAN-V's {features.I3D_FILE} for FVD (default: as above)")
    add("--json", help="the results as JSON")
    add("--grid", help="PNG of originals/reconstructions or samples (default: by --json/--ckpt)")
    add("--image-size", type=int, help="resolution (default: the checkpoint's)")
    add("--num-frames", type=int, default=1, help="--save-ref only: clip length")
    add("--frame-stride", type=int, help="clips: every n-th frame (default: the checkpoint's, or "
        "3 for --save-ref: 8 fps of UCF-101's 25, as the paper)")
    add("--split-file", help="only the files this list names (UCF-101: testlist01[.txt])")
    add("--ssim", choices=["paper", "valid"], default="paper",
        help="paper: padded, every pixel (torchmetrics, the paper's code); valid: Wang's")
    add("--video-fid", choices=["per-frame", "pooled"], default="per-frame",
        help="one FID per frame index, averaged (the paper's code), or all frames pooled")
    add("--batch-size", type=int, default=32, help="per rank")
    add("--workers", type=int, default=4, help="loader workers per rank (<= cores)")
    add("--precision", choices=["bf16", "fp32"], help="GPU autocast (default: bf16 for tokenizers, "
        "fp32 for DiT; bf16's gFID is unmeasured)")
    add("--ae-ckpt", help="DiT: its tokenizer (default: its checkpoint's)")
    add("--cfg-scale", type=float, default=1.5, help="DiT: classifier-free guidance scale")
    add("--sample-steps", type=int, default=250, help="DiT: DDIM steps (default 250)")
    add("--eta", type=float, default=1.0, help="DiT: DDIM eta (the official "
        "code's 1; 0: deterministic)")
    add("--balanced-labels", action="store_true", help="DiT: class i mod K (default: random)")
    add("--seed", type=int, default=0, help="DiT: seed of the noise and labels")
    add("--ref", help="DiT: reference statistics .npz (mu, sigma; mu_i3d, sigma_i3d), e.g. ADM's")
    add("--num-ref", type=int, help="DiT/--save-ref: at most this many reference samples")
    add("--samples", help="DiT: the samples .npz (default <ckpt>_samples.npz)")
    add("--save-ref", help="with --data, no --ckpt: write reference statistics to this .npz")
    add("--sweep", nargs="+", metavar="CKPT", help="tokenizers of an E sweep (Fig. 3): a table, "
        "fits on log2 E (R^2), spreads at equal E, encoder/decoder effects (Findings 3-4)")
    add("--plot", metavar="PNG", help="--sweep: Figs. 3, 6-7's plot (needs matplotlib)")
    return p.parse_args(argv)


if __name__ == "__main__":
    runtime.run_main(main, parse_args(), "evaluate.py")
