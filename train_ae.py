"""Train the ViTok tokenizer (§3.2 and App. A): stage 1 (MSE + KL + LPIPS), then stage 2 (+ GAN, decoder only).

    python train_ae.py --preset tiny                                     # CPU demo, a few minutes, writes ae.pt
    torchrun --nproc_per_node=8 train_ae.py --stage 1 --data /datasets/imagenet/train --ckpt stage1.pt
    torchrun --nproc_per_node=8 train_ae.py --stage 2 --data /datasets/imagenet/train --init stage1.pt --ckpt ae.pt

The helpers at the top (distributed setup, precision, EMA, checkpoints, schedule) are shared with train_dit.py and
evaluate.py, which import them from here.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist

from data import autocast, cleanup_distributed, save_grid, setup_distributed, step_generator


# --------------------------------------------------------------------------------------------------------------
# Shared training machinery
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, over parameters (buffers are copied)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def lr_at(step, total, peak, warmup_frac=0.03, final=1e-5):
    """Linear warmup over 3% of the steps, then cosine decay to `final` (SPEC §3)."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint is a plain dict of tensors, numbers, strings and lists: safe to load with weights_only."""
    return torch.load(path, map_location="cpu", weights_only=True)


class Logger:
    """One fixed-width line per interval on rank 0 and the same numbers appended to metrics.jsonl."""

    def __init__(self, path, rank):
        self.path, self.rank = path, rank

    def __call__(self, step, metrics):
        if self.rank != 0:
            return
        print(f"step {step:>8d} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def interval_means(history, world):
    """Average the per-step scalars of one log interval over steps and ranks: the only host sync in the loop."""
    names = list(history[0])
    values = torch.stack([torch.stack([h[k].float() for k in names]) for h in history]).mean(0)  # [metrics]
    if world > 1:
        dist.all_reduce(values)
        values /= world
    return dict(zip(names, values.tolist()))


# --------------------------------------------------------------------------------------------------------------
# The recipe (SPEC §3). Defaults are the paper's stage-1 ImageNet run; presets only override fields; flags win.
# --------------------------------------------------------------------------------------------------------------
DEFAULTS = dict(
    stage=1, model="S-B/16", channels=16, data=None, image_size=256, num_frames=1,
    global_batch_size=None,  # stage 1: 1024 images / 256 videos; stage 2: 256 / 128
    steps=100_000, ckpt=None, init=None, out_dir=None,
    lr=1e-4,  # peak lr for a global batch of 256, scaled linearly with the batch
    beta=1e-3, lpips_weight=1.0, gan_weight=0.05, gan_ramp=25_000, disc_lr=2e-5, disc_channels=64,
    weight_decay=1e-4, grad_clip=1.0, ema=0.9999, precision="bf16", compile=False, grad_ckpt=False,
    workers=8, seed=0, log_every=100, ckpt_every=2_000, sample_every=5_000,
)
PRESETS = {
    # CPU demo: a tiny model with 16x16 patches on synthetic 64x64 images (16 tokens of 16 channels), about four
    # minutes on 2 cores. No LPIPS (it needs the VGG16 weights); a narrow discriminator for the stage-2 demo.
    "tiny": dict(model="T-T/16", data="synthetic", image_size=64, global_batch_size=32, steps=1000, lr=24e-3,
                 lpips_weight=0.0, gan_ramp=200, disc_channels=16, disc_lr=2e-3, ema=0.999, precision="fp32",
                 workers=2, log_every=50, ckpt_every=300, sample_every=600),
    # The same for 4-frame 32x32 synthetic clips with 2x8x8 tubelets.
    "tiny-video": dict(model="T-T/2x8", data="synthetic", image_size=32, num_frames=4, global_batch_size=16,
                       steps=1000, lr=24e-3, lpips_weight=0.0, gan_ramp=200, disc_channels=16, disc_lr=2e-3,
                       ema=0.999, precision="fp32", workers=2, log_every=50, ckpt_every=300, sample_every=600),
}


def resolve_config(args):
    cfg = {**DEFAULTS, **PRESETS.get(args.preset, {})}
    cfg.update({k: v for k, v in vars(args).items() if v is not None})
    video = cfg["num_frames"] > 1
    if cfg["global_batch_size"] is None:
        cfg["global_batch_size"] = {1: (1024, 256), 2: (256, 128)}[cfg["stage"]][video]
    if cfg["ckpt"] is None:
        cfg["ckpt"] = "ae.pt" if cfg["stage"] == 1 else "ae_stage2.pt"
    if cfg["out_dir"] is None:
        cfg["out_dir"] = os.path.splitext(cfg["ckpt"])[0] + "-logs"
    if cfg["data"] is None:
        raise SystemExit("train_ae.py: --data is required: a dataset folder, or 'synthetic' for the built-in source")
    return {**cfg, "kind": "ae"}


def main(args):
    import data
    import losses
    import vitok
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg = resolve_config(args)
    rank, world, device = setup_distributed()
    stage, gb, steps, seed = cfg["stage"], cfg["global_batch_size"], cfg["steps"], cfg["seed"]
    if gb % world:
        raise SystemExit(f"train_ae.py: --global-batch-size {gb} does not split over {world} ranks")
    batch = gb // world
    torch.manual_seed(seed)  # the same initial weights on every rank and for every world size
    log = Logger(os.path.join(cfg["out_dir"], "metrics.jsonl"), rank)
    if rank == 0:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        print("config:", json.dumps(cfg, sort_keys=True), flush=True)

    # Build. LPIPS first: with eta > 0 a missing VGG16 file stops the run here, before any work is done.
    lpips = losses.LPIPS().to(device) if cfg["lpips_weight"] > 0 else None
    if lpips is None and rank == 0:
        print("LPIPS is off (--lpips-weight 0): the loss is MSE + beta KL"
              + (" + GAN" if stage == 2 else "") + "; no VGG16 weights needed", flush=True)
    model = vitok.from_name(cfg["model"], channels=cfg["channels"], grad_ckpt=cfg["grad_ckpt"]).to(device)
    disc = losses.Discriminator(cfg["image_size"], cfg["disc_channels"]).to(device) if stage == 2 else None

    # Load: resume from --ckpt when it exists, else (stage 2) start from the stage-1 weights of --init.
    state, start = None, 0
    if os.path.exists(cfg["ckpt"]):
        state = load_checkpoint(cfg["ckpt"])
        old = state["config"]
        for key in ("kind", "stage", "model", "channels", "num_frames"):
            if old.get(key) != cfg[key]:
                raise SystemExit(f"train_ae.py: cannot resume {cfg['ckpt']}: its {key} is {old.get(key)!r}, this run's"
                                 f" is {cfg[key]!r}; pass another --ckpt (stage 2 writes its own file)")
        model.load_state_dict(state["model"])
        start = state["step"]
    elif stage == 2:
        if cfg["init"] is None:
            raise SystemExit("train_ae.py: stage 2 starts from stage-1 weights: pass --init stage1.pt")
        init = load_checkpoint(cfg["init"])
        if (init["config"]["model"], init["config"]["channels"]) != (cfg["model"], cfg["channels"]):
            raise SystemExit(f"train_ae.py: --init {cfg['init']} holds {init['config']['model']} c="
                             f"{init['config']['channels']}, not {cfg['model']} c={cfg['channels']}")
        model.load_state_dict(init.get("ema") or init["model"])  # the EMA is the better stage-1 model
    if stage == 2:  # §3.2: freeze the encoder and its projection to 2c; fine-tune the decoder side only
        for frozen in (model.embed, model.encoder, model.to_moments):
            frozen.requires_grad_(False)

    # Optimizers and EMA (SPEC §3: AdamW (0.9, 0.95), wd 1e-4, lr scaled with the global batch).
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    peak = cfg["lr"] * gb / 256
    opt = torch.optim.AdamW(params, lr=peak, betas=(0.9, 0.95), weight_decay=cfg["weight_decay"], fused=fused)
    ema = vitok.from_name(cfg["model"], channels=cfg["channels"]).to(device).eval().requires_grad_(False)
    ema.load_state_dict(state["ema"] if state else model.state_dict())
    if disc is not None:
        d_opt = torch.optim.AdamW(disc.parameters(), lr=cfg["disc_lr"] * gb / 256, betas=(0.9, 0.95),
                                  weight_decay=cfg["weight_decay"], fused=fused)
    torch.manual_seed(seed * world + rank)  # per-rank streams from here on (sampling noise and data have their own)
    if state:
        opt.load_state_dict(state["opt"])
        if disc is not None:
            disc.load_state_dict(state["disc"])
            d_opt.load_state_dict(state["disc_opt"])
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])

    # Compile, then DDP; the raw modules are kept for EMA, grids and checkpoints (no _orig_mod./module. prefixes).
    model_fwd = torch.compile(model) if cfg["compile"] else model
    disc_fwd = torch.compile(disc) if cfg["compile"] and disc is not None else disc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model_fwd = DDP(model_fwd, device_ids=ids)
        disc_ddp = DDP(disc_fwd, device_ids=ids) if disc is not None else None
    else:
        disc_ddp = disc_fwd

    dataset = data.build_dataset(cfg["data"], cfg["image_size"], cfg["num_frames"], train=True)
    loader = data.infinite_loader(dataset, batch, rank, world, seed, start_step=start, num_workers=cfg["workers"])
    x_vis = torch.stack([dataset[i][0] for i in range(8)]).to(device)  # fixed samples for the reconstruction grids
    tokens = model.grid((cfg["num_frames"], cfg["image_size"], cfg["image_size"]))
    noise_shape = (gb, tokens[0] * tokens[1] * tokens[2], cfg["channels"])
    if rank == 0:
        print(f"{cfg['model']} c={cfg['channels']}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params "
              f"({sum(p.numel() for p in params) / 1e6:.1f}M trained), {len(dataset)} samples, {world} rank(s), "
              f"batch {batch}/rank, stage {stage}, steps {start}->{steps}", flush=True)

    last_ckpt = cfg["ckpt"] if state else None
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
    history, t0 = [], time.time()
    for step in range(start, steps):
        x, _ = next(loader)
        x = x.to(device, non_blocking=True)
        lr = lr_at(step, steps, peak)
        for group in opt.param_groups:
            group["lr"] = lr
        gen = step_generator(seed, step, device)
        noise = torch.randn(noise_shape, generator=gen, device=device)[rank::world]  # rows of this rank's samples

        # Generator / autoencoder step: Eq. 1, L = MSE + beta KL + eta LPIPS + lambda GAN.
        with autocast(device, cfg["precision"]):
            x_hat, posterior = model_fwd(x, noise)
        terms = {"mse": losses.mse_loss(x_hat, x), "kl": posterior.kl().mean()}
        loss = terms["mse"] + cfg["beta"] * terms["kl"]
        if lpips is not None:
            terms["lpips"] = lpips(x_hat, x)
            loss = loss + cfg["lpips_weight"] * terms["lpips"]
        if disc is not None:
            disc.requires_grad_(False)  # the generator's loss must not touch D's gradients
            with autocast(device, cfg["precision"]):
                terms["g_adv"] = losses.g_adv_loss(disc_fwd(x_hat).float())
            loss = loss + cfg["gan_weight"] * losses.adv_weight(step, cfg["gan_ramp"]) * terms["g_adv"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])  # after backward, for real
        opt.step()
        update_ema(ema, model, min(cfg["ema"], (1 + step) / (10 + step)))  # warm-up: useful in short runs too

        # Discriminator step: hinge loss on real vs reconstructed, one batch through D (and DDP) per step.
        if disc is not None:
            disc.requires_grad_(True)
            with autocast(device, cfg["precision"]):
                real, fake = disc_ddp(torch.cat([x, x_hat.detach()])).float().chunk(2)
            terms["d_loss"] = losses.d_hinge_loss(real, fake)
            d_opt.zero_grad(set_to_none=True)
            terms["d_loss"].backward()
            torch.nn.utils.clip_grad_norm_(disc.parameters(), cfg["grad_clip"])
            d_opt.step()

        terms["loss"] = loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(terms["loss"]), step, first_bad)
        history.append({k: v.detach() for k, v in terms.items()})
        done = step + 1
        if done % cfg["log_every"] == 0 or done == steps:
            check_finite(first_bad, world, last_ckpt)
            metrics = interval_means(history, world)
            elapsed, t0 = time.time() - t0, time.time()
            metrics.update(psnr=10 * math.log10(4.0 / max(metrics["mse"], 1e-12)), lr=lr,
                           img_per_s=len(history) * gb / elapsed)
            if device.type == "cuda":
                metrics["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            log(done, metrics)
            history = []
        if done % cfg["sample_every"] == 0 or done == steps:
            if rank == 0:
                with torch.no_grad(), autocast(device, cfg["precision"]):
                    save_grid(os.path.join(cfg["out_dir"], f"recon_{done:07d}.png"), x_vis, ema(x_vis)[0])
        if done % cfg["ckpt_every"] == 0 or done == steps:
            check_finite(first_bad, world, last_ckpt)  # never write a poisoned checkpoint
            rngs = [rng_state()] * world
            if world > 1:
                dist.all_gather_object(rngs, rng_state())
            if rank == 0:
                ckpt = {"model": model.state_dict(), "ema": ema.state_dict(), "step": done, "config": cfg,
                        "opt": opt.state_dict(), "rng": rngs}
                if disc is not None:
                    ckpt.update(disc=disc.state_dict(), disc_opt=d_opt.state_dict())
                save_checkpoint(cfg["ckpt"], ckpt)
            last_ckpt = cfg["ckpt"]
    if rank == 0:
        print(f"done: {cfg['ckpt']} at step {steps}", flush=True)
    cleanup_distributed()


def check_finite(first_bad, world, last_ckpt):
    """Stop on a non-finite loss (one host sync, at log and checkpoint intervals only)."""
    if world > 1:
        dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
    bad = int(first_bad.item())
    if bad >= 0:
        raise FloatingPointError(
            f"non-finite loss at step {bad}; no checkpoint written after it. Last finite checkpoint: "
            f"{last_ckpt or 'none'}. Lower --lr or check the data, then rerun with the same --ckpt to resume.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a small named run; explicit flags still win")
    p.add_argument("--stage", type=int, choices=[1, 2], help="1: MSE+KL+LPIPS; 2: + GAN, decoder only (default 1)")
    p.add_argument("--model", help="tokenizer name, e.g. S-B/16, S-L/16, S-B/4x8, tiny (default S-B/16)")
    p.add_argument("--channels", type=int, help="latent channels c (default 16)")
    p.add_argument("--data", help="dataset folder, or 'synthetic'")
    p.add_argument("--image-size", type=int, help="training resolution (default 256)")
    p.add_argument("--num-frames", type=int, help="frames per clip; 1 = images (default 1)")
    p.add_argument("--global-batch-size", type=int, help="over all ranks (default 1024/256 stage 1, 256/128 stage 2)")
    p.add_argument("--steps", type=int, help="total optimizer steps (default 100k)")
    p.add_argument("--ckpt", help="checkpoint written at intervals and resumed from when it exists "
                                  "(default ae.pt for stage 1, ae_stage2.pt for stage 2)")
    p.add_argument("--init", help="stage 2: the stage-1 checkpoint to start from")
    p.add_argument("--out-dir", help="metrics.jsonl and reconstruction grids (default <ckpt>-logs)")
    p.add_argument("--lr", type=float, help="peak lr for a global batch of 256 (default 1e-4)")
    p.add_argument("--beta", type=float, help="KL weight (default 1e-3)")
    p.add_argument("--lpips-weight", type=float, help="eta; 0 turns LPIPS off (default 1.0)")
    p.add_argument("--gan-weight", type=float, help="lambda, stage 2 (default 0.05, the paper's ablation)")
    p.add_argument("--gan-ramp", type=int, help="steps over which lambda ramps up from 0 (default 25k)")
    p.add_argument("--disc-lr", type=float, help="discriminator lr for a batch of 256 (default 2e-5)")
    p.add_argument("--disc-channels", type=int, help="discriminator width at full resolution (default 64)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--ema", type=float, help="EMA decay (default 0.9999)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="bf16 autocast on GPU (default); CPU is fp32")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--grad-ckpt", action="store_true", default=None, help="activation checkpointing")
    p.add_argument("--workers", type=int, help="data loader workers per rank")
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--ckpt-every", type=int)
    p.add_argument("--sample-every", type=int, help="steps between reconstruction grids")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
