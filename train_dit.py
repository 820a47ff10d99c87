r"""Train a class-conditional DiT on the latent tokens of a frozen ViTok (§3.3, §4.3).

    python train_dit.py --preset tiny          # CPU demo on the tiny tokenizer's ae.pt: dit.pt
    torchrun --nproc_per_node=8 train_dit.py --model DiT-L --ae-ckpt ae.pt \
        --data /datasets/imagenet/train

DiT's recipe (Peebles & Xie 2023): centre crops, random flips, class dropout 0.1, EMA 0.9999; the
authors' optimiser (below). The frozen tokenizer's EMA encodes each batch on the fly, and the DiT
trains on a posterior sample (the paper), or on moments from a latent cache (--latent-cache DIR)
of every image and its mirror: the same distribution.
"""
import copy
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import dit
import runtime
import vitok
from runtime import UserError, autocast, step_generator

DEFAULTS = dict(
    model="DiT-L", ae_ckpt=None, data=None, frame_stride=None, split_file=None,
    global_batch_size=256, steps=500_000, ckpt="dit.pt", out_dir=None,
    # The authors' (i1k_generation config): lr 1e-4 per 256 (scaled), 10% warm-up, cosine to
    # 3e-5; their clip_grad is never applied: none (the norm is logged). DiT's: --preset dit.
    lr=1e-4, warmup=0.1, final_lr=3e-5, betas=(0.9, 0.95), weight_decay=1e-4, grad_clip=0.0,
    ema=0.9999, ema_warmup=10, class_dropout=0.1, latent_scale=1.0, latent_cache=None,
    cache_windows=8,  # video: 8 overlapping windows span a 7 s UCF-101 clip (46 frames each)
    precision="bf16", compile=False, grad_ckpt=False, workers=8, seed=0,
    log_every=100, ckpt_every=5_000, sample_every=10_000, cfg_scale=4.0, sample_steps=50,
)
HELP = {
    "model": "DiT-B, DiT-L, DiT-XL or DiT-tiny",
    "ae_ckpt": "a train_ae.py tokenizer checkpoint or its export folder (EMA weights, frozen)",
    "frame_stride": ("video: keep every n-th frame (None: the tokenizer's)", dict(type=int)),
    "global_batch_size": "latents per step over all ranks",
    "ckpt": "checkpoint written at intervals, resumed from when it exists",
    "out_dir": "metrics.jsonl and sample grids (None: <ckpt>-logs)",
    "lr": "peak learning rate for a global batch of 256",
    "warmup": "fraction of the steps of linear warm-up",
    "final_lr": "learning rate at the end of the cosine (--preset dit: constant)",
    "grad_clip": "gradient-norm clipping; 0 is off",
    "class_dropout": "probability that a label becomes the null class (for guidance)",
    "latent_scale": "the DiT trains on z * scale (1: unscaled, as the paper)",
    "latent_cache": "folder of cached posterior moments, written on first use",
    "cache_windows": "video: temporal windows per clip in the latent cache, evenly spaced",
    "compile": "torch.compile the DiT",
    "grad_ckpt": "activation checkpointing in the DiT blocks",
    **runtime.RUN_HELP,
    "cfg_scale": "classifier-free guidance of the sample grids",
    "sample_steps": "DDIM steps of the sample grids",
}
PRESETS = {
    # DiT's recipe (Peebles & Xie 2023): AdamW's default betas, no weight decay, constant lr.
    "dit": dict(betas=(0.9, 0.999), weight_decay=0.0, warmup=0.0, final_lr=None),
    # CPU demo on train_ae.py --preset tiny's ae.pt: DiT's recipe at 1e-3 (8e-3 per 256).
    "tiny": dict(model="DiT-tiny", ae_ckpt="ae.pt", data="synthetic", global_batch_size=32,
                 steps=3000, lr=8e-3, betas=(0.9, 0.999), weight_decay=0.0, warmup=0.0,
                 final_lr=None, ema=0.999, precision="fp32", workers=2, log_every=50,
                 ckpt_every=500, sample_every=500),
}


def resolve(args):
    """The run's configuration (defaults < preset < flags) completed from the tokenizer's
    checkpoint, read here once: the latent grid, channels, resolution and clip length are the
    tokenizer's. Returns (config, tokenizer); the number of classes comes from the data, in
    main()."""
    config = runtime.merge(args, DEFAULTS, PRESETS, kind="dit")
    if config["ae_ckpt"] is None or config["data"] is None:
        raise UserError("--ae-ckpt (a train_ae.py checkpoint) and --data (a folder, 'synthetic' "
                        "or 'deadleaves') are required")
    if not os.path.exists(config["ae_ckpt"]):
        raise UserError(f"tokenizer checkpoint {config['ae_ckpt']} not found; train one first "
                        f"(python train_ae.py --preset tiny writes ae.pt)")
    ae_state = runtime.read_checkpoint(config["ae_ckpt"], kind="ae")
    ae = vitok.from_checkpoint(ae_state, name=config["ae_ckpt"]).requires_grad_(False)
    ae_config = ae_state["config"]
    config.update(ae_model=ae_config["model"], channels=ae.channels,
                  image_size=ae_config["image_size"], num_frames=ae_config["num_frames"])
    if config["frame_stride"] is None:  # the clips the tokenizer was trained on: same frame rate
        config["frame_stride"] = ae_config.get("frame_stride", 3)
    if config["num_frames"] == 1:
        config["cache_windows"] = 1
    size = (config["num_frames"], config["image_size"], config["image_size"])
    config["grid"] = list(ae.grid(size))
    if config["out_dir"] is None:
        config["out_dir"] = os.path.splitext(config["ckpt"])[0] + "-logs"
    return config, ae


def main(args):
    config, ae = resolve(args)
    run = runtime.TrainingRun(config)
    device = run.device

    ae = ae.to(device)
    # Centre crops (train=False) as DiT, flipped by the step. Clips start at random frames, as
    # the authors' and UCF-101 generators train (from each sample's key: rank-invariant,
    # resumable); the cache holds cache_windows evenly spaced windows, one picked per step.
    images = data.build_dataset(config["data"], config["image_size"], config["num_frames"],
                                train=False, frame_stride=config["frame_stride"],
                                split_file=config["split_file"])
    images.window = "random"
    if config["latent_cache"]:  # encode once, train many epochs: the tokenizer leaves the loop
        if not os.path.exists(os.path.join(config["latent_cache"], "meta.json")):
            write_latent_cache(config["latent_cache"], ae, images, config, run)
        dataset = LatentCache(config["latent_cache"], config)
    else:
        dataset = images
    config["num_classes"] = dataset.num_classes  # label num_classes is the null class
    if dataset.num_classes == 0:
        run.print0("unlabelled data: training with the null class only (unconditional)")

    # The raw modules stay for EMA, samples and checkpoints.
    parts = build(config, device, ae)
    # A checkpoint of another DiT, tokenizer grid or label set is refused, never half-loaded.
    run.resume(parts.stateful, same=("kind", "model", "channels", "grid", "num_classes"))
    parts.model_fwd = run.ddp(run.compile(parts.model))

    loader = data.infinite_loader(dataset, run.batch, run.rank, run.world, config["seed"],
                                  start_step=run.start, num_workers=config["workers"])
    millions = sum(p.numel() for p in parts.model.parameters()) / 1e6
    run.print0(f"{config['model']}: {millions:.1f}M params on {math.prod(config['grid'])} tokens "
               f"of {config['channels']} channels from {config['ae_model']}; {len(dataset)} "
               f"samples, {run.world} rank(s), batch {run.batch}/rank, steps {run.start}->"
               f"{config['steps']}")

    for step in range(run.start, config["steps"]):
        x, y = next(loader)  # pixels [B,3,(T,)H,W] or moments [B,K,2,L,2c]; labels or -1
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        terms = train_step(parts, step, x, y, config, run.rank, run.world)
        run.after_step(step, terms, parts.stateful, lr=parts.opt.param_groups[0]["lr"])
        if run.every(step, "sample_every") and run.rank == 0:
            path = os.path.join(config["out_dir"], f"samples_{step + 1:07d}.png")
            save_samples(path, parts.ema, ae, config, device)
    run.finish()


def build(config, device, ae=None):
    """The raw modules and optimizer of a DiT run: the DiT on the tokenizer's latent grid (one DiT
    token per latent token, §3.3), AdamW, the EMA that evaluate.py samples from; `ae` encodes
    pixels when there is no latent cache. `stateful` is what a checkpoint holds, by key."""
    model = dit.DiT_models[config["model"]](
        channels=config["channels"], grid=config["grid"], num_classes=config["num_classes"],
        grad_ckpt=config["grad_ckpt"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], betas=config["betas"],
                            weight_decay=config["weight_decay"], fused=device.type == "cuda")
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    return SimpleNamespace(model=model, model_fwd=model, ema=ema, opt=opt, ae=ae,
                           stateful=dict(model=model, ema=ema, opt=opt))


def train_step(parts, step, x, y, config, rank=0, world=1):
    """One step of L_hybrid = L_simple + L_vb (IDDPM) on this rank's samples: x pixels
    [B,3,(T,)H,W] encoded by the frozen tokenizer, or cached moments [B,K,2,L,2c] of each image
    and its mirror in K temporal windows; y labels [B]. Returns the loss terms as device tensors:
    no host sync. main() and tools/gpu_check.py both run this function."""
    device, gb, precision = x.device, config["global_batch_size"], config["precision"]
    runtime.set_lr(parts.opt, step, config)
    L, c, mine = math.prod(config["grid"]), config["channels"], slice(rank, None, world)
    # Drawn for the global batch (step_generator); this rank takes its samples' rows.
    gen = step_generator(config["seed"], step, device)
    flip = torch.rand(gb, generator=gen, device=device)[mine] < 0.5  # DiT's random flip
    posterior_noise = torch.randn(gb, L, c, generator=gen, device=device)[mine]
    t = torch.randint(0, dit.NUM_TIMESTEPS, (gb,), generator=gen, device=device)[mine]
    diffusion_noise = torch.randn(gb, L, c, generator=gen, device=device)[mine]
    u = torch.rand(gb, generator=gen, device=device)[mine]
    y = dit.drop_labels(y, config["num_classes"], u, config["class_dropout"])

    with torch.no_grad():  # the tokenizer is frozen: no graph through it
        if config["latent_cache"]:  # x: moments of K windows and their mirrors [B,K,2,L,2c]
            window = torch.randint(0, x.shape[1], (gb,), generator=gen, device=device)[mine]
            rows = torch.arange(len(x), device=device)
            posterior = vitok.DiagonalGaussian(x[rows, window, flip.long()])
        else:
            x = torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
            with autocast(device, precision):
                posterior = parts.ae.encode(x)
        z = posterior.sample(posterior_noise) * config["latent_scale"]  # [B,L,c]
    with autocast(device, precision):  # DDP averages the gradients over ranks
        terms = dit.training_losses(parts.model_fwd, z, y, t, diffusion_noise)
    parts.opt.zero_grad(set_to_none=True)
    terms["loss"].backward()
    params = parts.model.parameters()
    if config["grad_clip"] > 0:
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
    else:  # not clipped (DiT does not clip): the norm is only measured
        terms["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in params
                                                            if p.grad is not None])
    parts.opt.step()
    decay = runtime.ema_decay(step, config["ema"], config["ema_warmup"])
    runtime.update_ema(parts.ema, parts.model, decay)
    terms.update(z_mean=z.mean(), z_std=z.std())  # unscaled latents (the paper): their scale
    return terms


CACHE_KEYS = ("ae_ckpt", "data", "image_size", "num_frames", "frame_stride", "split_file",
              "cache_windows")


class LatentCache(torch.utils.data.Dataset):
    """Posterior moments (mean, logvar) of every image and its mirror in K temporal windows (1 for
    images), [N,K,2,L,2c] fp16, and labels: memory-mapped .npy files in DIR, of what CACHE_KEYS
    say. A step picks a window, and the mirror by the flip the pixels would get."""

    def __init__(self, root, config):
        meta = json.load(open(os.path.join(root, "meta.json")))
        if not meta.get("complete") or meta.get("mirrored") is not True:
            raise UserError(f"latent cache {root} is incomplete or from an older version; delete "
                            f"it and rerun to rewrite it")
        for key in CACHE_KEYS:
            if meta.get(key) != config[key]:  # latents of another tokenizer or data: refused
                raise UserError(f"latent cache {root} holds {key} {meta.get(key)!r}, this run's "
                                f"is {config[key]!r}; pass another --latent-cache (or delete it)")
        self.num_classes = meta["num_classes"]
        self.moments = np.load(os.path.join(root, "moments.npy"), mmap_mode="r")  # [N,K,2,L,2c]
        self.labels = np.load(os.path.join(root, "labels.npy"))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key  # the loader's keys: (index, seed)
        return torch.from_numpy(self.moments[i].astype(np.float32)), int(self.labels[i])


@torch.no_grad()
def write_latent_cache(root, ae, dataset, config, run):
    """Encode every centre crop and its mirror once, in K = cache_windows temporal windows of a
    clip (from its first frames to its last); ranks fill disjoint rows of one memmap."""
    n, L, c, K = len(dataset), math.prod(config["grid"]), ae.channels, config["cache_windows"]
    path = os.path.join(root, "moments.npy")
    if run.rank == 0:
        os.makedirs(root, exist_ok=True)
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, K, 2, L, 2 * c))
    if run.world > 1:
        dist.barrier()
    moments = np.load(path, mmap_mode="r+")
    labels = np.zeros(n, dtype=np.int64)
    mine = list(range(run.rank, n, run.world))
    for w in range(K):
        dataset.window = w / (K - 1) if K > 1 else 0.5
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine),
                                             batch_size=64, num_workers=config["workers"])
        done = 0
        for x, y in tqdm(loader, desc=f"latent cache {w + 1}/{K}", disable=run.rank != 0):
            x = x.to(run.device)
            with autocast(run.device, config["precision"]):
                posterior = ae.encode(torch.cat([x, x.flip(-1)]))  # the images, then mirrors
            both = torch.cat([posterior.mean, posterior.logvar], -1).float()  # [2B,L,2c]
            rows = mine[done:done + len(y)]
            moments[rows, w] = both.view(2, len(y), L, 2 * c).transpose(0, 1).cpu().numpy()
            labels[rows] = y.numpy()
            done += len(y)
    dataset.window = "random"
    moments.flush()
    if run.world > 1:  # labels are tiny: sum the disjoint per-rank arrays
        t = torch.from_numpy(labels).to(run.device)
        dist.all_reduce(t)
        labels = t.cpu().numpy()
        dist.barrier()
    if run.rank == 0:
        np.save(os.path.join(root, "labels.npy"), labels)
        meta = {key: config[key] for key in CACHE_KEYS}
        meta.update(num_classes=dataset.num_classes, mirrored=True, complete=True)
        json.dump(meta, open(os.path.join(root, "meta.json"), "w"))
    if run.world > 1:
        dist.barrier()


@torch.no_grad()
def save_samples(path, model, ae, config, device, n=16):
    """A grid of class-conditional samples (classes 0, 1, ... in order) decoded by the tokenizer."""
    z = torch.randn(n, int(np.prod(config["grid"])), config["channels"],
                    generator=torch.Generator(device).manual_seed(0), device=device)
    k = config["num_classes"]
    y = torch.arange(n, device=device) % k if k else torch.zeros(n, dtype=torch.long,
                                                                   device=device)
    size = (config["num_frames"], config["image_size"], config["image_size"])
    with autocast(device, config["precision"]):
        latents = dit.sample(model, z, y, steps=config["sample_steps"],
                             cfg_scale=config["cfg_scale"] if k else 1.0)
        x = ae.decode(latents / config["latent_scale"], size if config["num_frames"] > 1
                      else size[1:])
    runtime.save_grid(path, x[:n // 2], x[n // 2:])


def parse_args(argv=None):
    return runtime.parse_flags(__doc__, DEFAULTS, PRESETS, HELP, argv)


if __name__ == "__main__":
    runtime.run_main(main, parse_args(), "train_dit.py")
