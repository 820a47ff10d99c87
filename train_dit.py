"""Train a class-conditional DiT on the latent tokens of a frozen ViTok (§3.3, §4.3; SPEC §4).

    python train_dit.py --preset tiny                        # CPU demo on the tiny tokenizer's ae.pt, writes dit.pt
    torchrun --nproc_per_node=8 train_dit.py --model DiT-L --ae-ckpt ae.pt --data /datasets/imagenet/train

The tokenizer's EMA weights encode each batch on the fly (a posterior sample, as the paper), or a latent cache
(--latent-cache DIR) holds the posterior moments of every sample, written once by the same script.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from data import autocast, cleanup_distributed, save_grid, setup_distributed, step_generator
from train_ae import (Logger, check_finite, interval_means, load_checkpoint, rng_state, save_checkpoint,
                      set_rng_state, update_ema)

DEFAULTS = dict(
    model="DiT-L", ae_ckpt=None, data=None, global_batch_size=256, steps=500_000, ckpt="dit.pt", out_dir=None,
    lr=1e-4, weight_decay=0.0, grad_clip=1.0, ema=0.9999, class_dropout=0.1, latent_scale=1.0, latent_cache=None,
    precision="bf16", compile=False, grad_ckpt=False, workers=8, seed=0, log_every=100, ckpt_every=5_000,
    sample_every=10_000, cfg_scale=4.0, sample_steps=50,
)
PRESETS = {
    # CPU demo: chains with `python train_ae.py --preset tiny` (its ae.pt); a few minutes on 2 cores.
    "tiny": dict(model="DiT-tiny", ae_ckpt="ae.pt", data="synthetic", global_batch_size=32, steps=1500, lr=1e-3,
                 ema=0.999, precision="fp32", workers=2, log_every=50, ckpt_every=500, sample_every=500),
}


class LatentCache(torch.utils.data.Dataset):
    """Posterior moments [L,2c] (mean, logvar; fp16) and labels of every sample, in a .npy memmap under DIR."""

    def __init__(self, root):
        meta = json.load(open(os.path.join(root, "meta.json")))
        if not meta.get("complete"):
            raise SystemExit(f"train_dit.py: latent cache {root} is incomplete; delete it and rerun to rewrite it")
        self.meta, self.num_classes = meta, meta["num_classes"]
        self.moments = np.load(os.path.join(root, "moments.npy"), mmap_mode="r")  # [N,L,2c] fp16
        self.labels = np.load(os.path.join(root, "labels.npy"))

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        i = key[0] if isinstance(key, tuple) else key  # infinite_loader's keys are (index, augmentation seed)
        return torch.from_numpy(self.moments[i].astype(np.float32)), int(self.labels[i])


@torch.no_grad()
def write_latent_cache(root, ae, dataset, cfg, rank, world, device):
    """Encode every sample once (eval transform: centre crops, no augmentation, as DiT's feature extraction; for
    "synthetic" that is its 1,000-image eval stream); ranks fill disjoint rows of one memmap."""
    from tqdm import tqdm
    n, grid = len(dataset), ae.grid((cfg["num_frames"], cfg["image_size"], cfg["image_size"]))
    shape = (n, grid[0] * grid[1] * grid[2], 2 * ae.channels)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        np.lib.format.open_memmap(os.path.join(root, "moments.npy"), mode="w+", dtype=np.float16, shape=shape)
    if world > 1:
        dist.barrier()
    moments = np.load(os.path.join(root, "moments.npy"), mmap_mode="r+")
    labels = np.zeros(n, dtype=np.int64)
    mine = list(range(rank, n, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=64,
                                         num_workers=cfg["workers"])
    done = 0
    for x, y in tqdm(loader, desc="latent cache", disable=rank != 0):
        with autocast(device, cfg["precision"]):
            posterior = ae.encode(x.to(device))
        rows = mine[done:done + len(y)]
        moments[rows] = torch.cat([posterior.mean, posterior.logvar], -1).cpu().numpy().astype(np.float16)
        labels[rows] = y.numpy()
        done += len(y)
    moments.flush()
    if world > 1:  # labels are tiny: sum the disjoint per-rank arrays
        t = torch.from_numpy(labels).to(device)
        dist.all_reduce(t)
        labels = t.cpu().numpy()
        dist.barrier()
    if rank == 0:
        np.save(os.path.join(root, "labels.npy"), labels)
        meta = dict(ae_ckpt=cfg["ae_ckpt"], data=cfg["data"], image_size=cfg["image_size"],
                    num_frames=cfg["num_frames"], num_classes=dataset.num_classes, complete=True)
        json.dump(meta, open(os.path.join(root, "meta.json"), "w"))
    if world > 1:
        dist.barrier()


def resolve_config(args):
    cfg = {**DEFAULTS, **PRESETS.get(args.preset, {})}
    cfg.update({k: v for k, v in vars(args).items() if v is not None})
    if cfg["ae_ckpt"] is None or cfg["data"] is None:
        raise SystemExit("train_dit.py: --ae-ckpt (a train_ae.py checkpoint) and --data (a folder or 'synthetic') "
                         "are required")
    if not os.path.exists(cfg["ae_ckpt"]):
        raise SystemExit(f"train_dit.py: tokenizer checkpoint {cfg['ae_ckpt']} not found; train one first "
                         f"(python train_ae.py --preset tiny writes ae.pt)")
    if cfg["out_dir"] is None:
        cfg["out_dir"] = os.path.splitext(cfg["ckpt"])[0] + "-logs"
    return {**cfg, "kind": "dit"}


def main(args):
    import data
    import dit
    import vitok
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = resolve_config(args)
    rank, world, device = setup_distributed()
    gb, steps, seed = cfg["global_batch_size"], cfg["steps"], cfg["seed"]
    if gb % world:
        raise SystemExit(f"train_dit.py: --global-batch-size {gb} does not split over {world} ranks")
    batch = gb // world
    log = Logger(os.path.join(cfg["out_dir"], "metrics.jsonl"), rank)

    # The frozen tokenizer (EMA weights) fixes the latent grid, resolution and clip length.
    ae = vitok.from_checkpoint(cfg["ae_ckpt"]).to(device).requires_grad_(False)
    ae_cfg = load_checkpoint(cfg["ae_ckpt"])["config"]
    cfg.update(ae_model=ae_cfg["model"], channels=ae.channels, image_size=ae_cfg["image_size"],
               num_frames=ae_cfg["num_frames"])
    grid = ae.grid((cfg["num_frames"], cfg["image_size"], cfg["image_size"]))
    cfg["grid"] = list(grid)
    if cfg["latent_cache"]:
        if not os.path.exists(os.path.join(cfg["latent_cache"], "meta.json")):
            full = data.build_dataset(cfg["data"], cfg["image_size"], cfg["num_frames"], train=False)
            write_latent_cache(cfg["latent_cache"], ae, full, cfg, rank, world, device)
        dataset = LatentCache(cfg["latent_cache"])
    else:
        dataset = data.build_dataset(cfg["data"], cfg["image_size"], cfg["num_frames"], train=True)
    cfg["num_classes"] = dataset.num_classes
    if rank == 0:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        if dataset.num_classes == 0:
            print("unlabelled data: training with the null class only (unconditional; sampling ignores CFG)")
        print("config:", json.dumps(cfg, sort_keys=True), flush=True)

    torch.manual_seed(seed)
    model = dit.DiT_models[cfg["model"]](channels=cfg["channels"], grid=grid, num_classes=cfg["num_classes"])
    model.grad_ckpt = cfg["grad_ckpt"]
    model.to(device)
    state, start = None, 0
    if os.path.exists(cfg["ckpt"]):
        state = load_checkpoint(cfg["ckpt"])
        for key in ("kind", "model", "channels", "grid", "num_classes"):
            if state["config"].get(key) != cfg[key]:
                raise SystemExit(f"train_dit.py: cannot resume {cfg['ckpt']}: its {key} is {state['config'].get(key)!r},"
                                 f" this run's is {cfg[key]!r}; pass another --ckpt")
        model.load_state_dict(state["model"])
        start = state["step"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],  # constant, as DiT
                            fused=device.type == "cuda")
    ema = dit.DiT_models[cfg["model"]](channels=cfg["channels"], grid=grid, num_classes=cfg["num_classes"])
    ema.to(device).eval().requires_grad_(False)
    ema.load_state_dict(state["ema"] if state else model.state_dict())
    torch.manual_seed(seed * world + rank)
    if state:
        opt.load_state_dict(state["opt"])
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])
    model_fwd = torch.compile(model) if cfg["compile"] else model
    if world > 1:
        model_fwd = DDP(model_fwd, device_ids=[device.index] if device.type == "cuda" else None)

    loader = data.infinite_loader(dataset, batch, rank, world, seed, start_step=start, num_workers=cfg["workers"])
    L, c = grid[0] * grid[1] * grid[2], cfg["channels"]
    null = torch.full((), cfg["num_classes"], device=device)
    if rank == 0:
        print(f"{cfg['model']}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params on {L} tokens of "
              f"{c} channels from {cfg['ae_model']}; {len(dataset)} samples, {world} rank(s), batch {batch}/rank, "
              f"steps {start}->{steps}", flush=True)

    last_ckpt = cfg["ckpt"] if state else None
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    history, t0 = [], time.time()
    for step in range(start, steps):
        x, y = next(loader)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        # Every random number of the step is drawn for the global batch from one (seed, step) generator.
        gen = step_generator(seed, step, device)
        mine = slice(rank, None, world)  # the rows of this rank's samples (data.infinite_loader interleaves)
        posterior_noise = torch.randn(gb, L, c, generator=gen, device=device)[mine]
        t = torch.randint(0, dit.NUM_TIMESTEPS, (gb,), generator=gen, device=device)[mine]
        diffusion_noise = torch.randn(gb, L, c, generator=gen, device=device)[mine]
        drop = torch.rand(gb, generator=gen, device=device)[mine] < cfg["class_dropout"]
        y = torch.where(drop | (y < 0), null, y)  # class dropout 0.1 for CFG; unlabelled data is always null

        with torch.no_grad():
            if cfg["latent_cache"]:  # x holds the cached moments [B,L,2c]
                posterior = vitok.DiagonalGaussian(x)
            else:
                with autocast(device, cfg["precision"]):
                    posterior = ae.encode(x)
            z = posterior.sample(posterior_noise) * cfg["latent_scale"]  # [B,L,c]
        with autocast(device, cfg["precision"]):
            terms = dit.training_losses(model_fwd, z, y, t, diffusion_noise)
        loss = terms["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        update_ema(ema, model, min(cfg["ema"], (1 + step) / (10 + step)))

        terms = {k: v.detach() for k, v in terms.items()}
        terms.update(z_mean=z.mean(), z_std=z.std())  # the paper trains on unscaled latents: report them
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss.detach()), step, first_bad)
        history.append(terms)
        done = step + 1
        if done % cfg["log_every"] == 0 or done == steps:
            check_finite(first_bad, world, last_ckpt)
            metrics = interval_means(history, world)
            elapsed, t0 = time.time() - t0, time.time()
            metrics.update(img_per_s=len(history) * gb / elapsed)
            if device.type == "cuda":
                metrics["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            log(done, metrics)
            history = []
        if (done % cfg["sample_every"] == 0 or done == steps) and rank == 0:
            save_samples(os.path.join(cfg["out_dir"], f"samples_{done:07d}.png"), ema, ae, cfg, device)
        if done % cfg["ckpt_every"] == 0 or done == steps:
            check_finite(first_bad, world, last_ckpt)
            rngs = [rng_state()] * world
            if world > 1:
                dist.all_gather_object(rngs, rng_state())
            if rank == 0:
                save_checkpoint(cfg["ckpt"], {"model": model.state_dict(), "ema": ema.state_dict(), "step": done,
                                              "config": cfg, "opt": opt.state_dict(), "rng": rngs})
            last_ckpt = cfg["ckpt"]
    if rank == 0:
        print(f"done: {cfg['ckpt']} at step {steps}", flush=True)
    cleanup_distributed()


@torch.no_grad()
def save_samples(path, model, ae, cfg, device, n=16):
    """A grid of class-conditional samples (classes 0, 1, ... in order) decoded by the tokenizer."""
    import dit
    gen = torch.Generator(device).manual_seed(0)
    grid = tuple(cfg["grid"])
    z = torch.randn(n, grid[0] * grid[1] * grid[2], cfg["channels"], generator=gen, device=device)
    k = cfg["num_classes"]
    y = torch.arange(n, device=device) % k if k else torch.zeros(n, dtype=torch.long, device=device)
    with autocast(device, cfg["precision"]):
        latents = dit.sample(model, z, y, steps=cfg["sample_steps"], cfg_scale=cfg["cfg_scale"] if k else 1.0)
        size = (cfg["image_size"],) * 2 if cfg["num_frames"] == 1 else (cfg["num_frames"],) + (cfg["image_size"],) * 2
        x = ae.decode(latents / cfg["latent_scale"], size)
    half = n // 2
    save_grid(path, x[:half], x[half:])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a small named run; explicit flags still win")
    p.add_argument("--model", help="DiT-B, DiT-L (default), DiT-XL or DiT-tiny")
    p.add_argument("--ae-ckpt", help="the tokenizer checkpoint written by train_ae.py")
    p.add_argument("--data", help="dataset folder, or 'synthetic'")
    p.add_argument("--global-batch-size", type=int, help="over all ranks (default 256)")
    p.add_argument("--steps", type=int, help="total optimizer steps (default 500k)")
    p.add_argument("--ckpt", help="checkpoint written at intervals and resumed from when it exists (default dit.pt)")
    p.add_argument("--out-dir", help="metrics.jsonl and sample grids (default <ckpt>-logs)")
    p.add_argument("--lr", type=float, help="constant AdamW lr (default 1e-4)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--ema", type=float, help="EMA decay (default 0.9999)")
    p.add_argument("--class-dropout", type=float, help="label -> null class probability (default 0.1)")
    p.add_argument("--latent-scale", type=float, help="DiT trains on z * scale (default 1: unscaled, as the paper)")
    p.add_argument("--latent-cache", help="folder of cached posterior moments; written on first use")
    p.add_argument("--precision", choices=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true", default=None)
    p.add_argument("--grad-ckpt", action="store_true", default=None)
    p.add_argument("--workers", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--sample-every", type=int)
    p.add_argument("--cfg-scale", type=float, help="guidance of the sample grids (default 4.0)")
    p.add_argument("--sample-steps", type=int, help="DDIM steps of the sample grids (default 50)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
