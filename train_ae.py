r"""Train the ViTok tokenizer (§3.2, App. A): stage 1 (MSE + KL + LPIPS), then stage 2 (+ GAN,
decoder only).

    python train_ae.py --preset tiny                      # CPU demo, a few minutes, writes ae.pt
    torchrun --nproc_per_node=8 train_ae.py --stage 1 --data /datasets/imagenet/train --ckpt s1.pt
    torchrun --nproc_per_node=8 train_ae.py --stage 2 --data /datasets/imagenet/train --init s1.pt \
        --ckpt ae.pt

main() is the recipe: setup, build, resume, loop, save. What the scripts share (ranks, flags,
resume, EMA, the interval log, checkpoints) is in runtime.py.
"""
import copy
import math
import os
from types import SimpleNamespace

import torch

import data
import losses
import runtime
import vitok
from runtime import UserError, autocast, step_generator

# The paper's stage-1 ImageNet run (§3.2, App. A): every constant of the recipe is here, and every
# entry with a help line below is also a flag.
DEFAULTS = dict(
    stage=1, model="S-B/16", channels=16, data=None, image_size=256, num_frames=1,
    frame_stride=3, split_file=None,  # video: 8 fps on UCF-101's 25 fps; its official train list
    global_batch_size=None,  # stage 1: 1024 images / 256 clips; stage 2: 256 / 128
    steps=100_000, ckpt=None, init=None, out_dir=None,
    lr=1e-4, warmup=0.03, final_lr=1e-5,  # peak lr at a global batch of 256 (scaled), cosine
    betas=(0.9, 0.95), weight_decay=1e-4, grad_clip=1.0,
    beta=1e-3, lpips_weight=1.0,  # Eq. 1: the KL weight beta and the LPIPS weight eta
    gan_weight=0.05, gan_ramp=25_000,  # lambda (the appendix's ablation; the main text: 1.0)
    disc_lr=2e-5, disc_channels=None,  # None: by resolution, as the official code (64 at 256^2)
    ema=0.9999, ema_warmup=10,  # decay min(ema, (1 + step) / (ema_warmup + step))
    stage1_ema=False,  # the paper keeps an EMA in stage 2 only
    precision="bf16", compile=False, grad_ckpt=False, workers=8, seed=0,
    log_every=100, ckpt_every=2_000, sample_every=5_000,
)
INT = dict(type=int)
HELP = {
    "stage": "1: MSE + KL + LPIPS; 2: + GAN, encoder frozen",
    "model": "tokenizer <encoder>-<decoder>/<patch> or /<tubelet>x<patch>: S-B/16, S-B/4x8, tiny",
    "channels": "latent channels c",
    "image_size": "training resolution",
    "num_frames": "frames per clip; 1 = images",
    "frame_stride": "video: keep every n-th frame",
    "global_batch_size": ("images or clips per step over all ranks (None: 1024/256 in stage 1, "
                          "256/128 in stage 2)", INT),
    "ckpt": "checkpoint written at intervals, resumed from when it exists (None: ae.pt, stage 2 "
            "ae_stage2.pt)",
    "init": "stage 2: the stage-1 checkpoint to start from",
    "out_dir": "metrics.jsonl and reconstruction grids (None: <ckpt>-logs)",
    "lr": "peak learning rate for a global batch of 256",
    "beta": "KL weight",
    "lpips_weight": "LPIPS weight eta; 0 turns LPIPS off",
    "gan_weight": "stage 2: adversarial weight lambda",
    "gan_ramp": "stage 2: steps over which lambda ramps up from 0",
    "disc_lr": "discriminator learning rate for a global batch of 256",
    "disc_channels": ("discriminator width at full resolution (None: by resolution, 64 at 256^2)",
                      INT),
    "grad_clip": "gradient-norm clipping of the tokenizer",
    "stage1_ema": "keep an EMA in stage 1 too (the paper keeps one in stage 2 only)",
    "compile": "torch.compile the tokenizer and the discriminator",
    "grad_ckpt": "activation checkpointing in the transformer blocks",
    **runtime.RUN_HELP,
}
# CPU demo (its time and PSNR are in the README): a tiny model with 16x16 patches on 64x64
# dead-leaves images, 16 tokens of 16 channels. No LPIPS (it needs the VGG16 weights); a narrow
# discriminator for the stage-2 demo.
TINY = dict(model="T-T/16", data="deadleaves", image_size=64, global_batch_size=32, steps=2000,
            lr=24e-3, lpips_weight=0.0, gan_ramp=200, disc_channels=16, disc_lr=2e-3, ema=0.999,
            stage1_ema=True, precision="fp32", workers=2, log_every=50, ckpt_every=300,
            sample_every=600)
PRESETS = {
    "tiny": TINY,
    # The same for 4-frame 32x32 synthetic clips with 2x8x8 tubelets.
    "tiny-video": {**TINY, "model": "T-T/2x8", "data": "synthetic", "image_size": 32,
                   "num_frames": 4, "global_batch_size": 16, "steps": 1000},
}


def resolve(args):
    """The run's configuration: defaults < preset < flags, then the fields derived from them (set
    here only)."""
    config = runtime.merge(args, DEFAULTS, PRESETS, kind="ae")
    if config["data"] is None:
        raise UserError("--data is required: a dataset folder, or 'synthetic' or 'deadleaves' "
                        "for a built-in source")
    video = config["num_frames"] > 1
    if config["global_batch_size"] is None:  # App. A: smaller batches for stage 2 and for video
        config["global_batch_size"] = {1: (1024, 256), 2: (256, 128)}[config["stage"]][video]
    if config["ckpt"] is None:  # stage 2 writes its own file: stage 1's stays as it was
        config["ckpt"] = "ae.pt" if config["stage"] == 1 else "ae_stage2.pt"
    if config["out_dir"] is None:
        config["out_dir"] = os.path.splitext(config["ckpt"])[0] + "-logs"
    if config["disc_channels"] is None:
        config["disc_channels"] = losses.disc_channels(config["image_size"])
    return config


def build(config, device, lpips=None, init=None):
    """A tokenizer run's raw modules (§3.2): the ViTok (from `init` weights), AdamW (lr scaled
    with the global batch, App. A), the EMA (stage 2, or --stage1-ema); in stage 2 the
    discriminator and its AdamW, the encoder and its projection to 2c frozen. `stateful`: what a
    checkpoint holds; *_fwd: what the step calls (main compiles and wraps them)."""
    gb, stage = config["global_batch_size"], config["stage"]
    model = vitok.from_name(config["model"], channels=config["channels"],
                            grad_ckpt=config["grad_ckpt"]).to(device)
    if init is not None:
        model.load_state_dict(init)
    parts = SimpleNamespace(model=model, model_fwd=model, lpips=lpips, ema=None, disc=None)
    if stage == 2:  # the discriminator sees single frames: a video is judged frame by frame
        parts.disc = losses.Discriminator(config["image_size"], config["disc_channels"]).to(device)
        for frozen in (model.embed, model.encoder, model.to_moments):
            frozen.requires_grad_(False)
    parts.params = [p for p in model.parameters() if p.requires_grad]
    adamw = dict(betas=config["betas"], weight_decay=config["weight_decay"],
                 fused=device.type == "cuda")
    parts.opt = torch.optim.AdamW(parts.params, lr=config["lr"] * gb / 256, **adamw)
    parts.stateful = dict(model=model, opt=parts.opt)
    if stage == 2 or config["stage1_ema"]:  # the paper keeps no EMA in stage 1
        parts.ema = copy.deepcopy(model).eval().requires_grad_(False)
        parts.stateful["ema"] = parts.ema
    if parts.disc is not None:
        parts.d_opt = torch.optim.AdamW(parts.disc.parameters(), lr=config["disc_lr"] * gb / 256,
                                        **adamw)
        parts.stateful.update(disc=parts.disc, disc_opt=parts.d_opt)
        parts.disc_fwd = parts.disc_ddp = parts.disc
    return parts


def train_step(parts, step, x, config, rank=0, world=1):
    """One step of Eq. 1, L = MSE + beta KL + eta LPIPS + lambda GAN, on this rank's images x
    [B,3,(T,)H,W] (rows rank, rank + world, ... of the global batch); then, in stage 2, the
    discriminator's step. Returns the loss terms as device tensors: no host sync. main() and
    tools/gpu_check.py both run this function."""
    device, precision, gb = x.device, config["precision"], config["global_batch_size"]
    runtime.set_lr(parts.opt, step, config)
    # The posterior noise is drawn for the global batch: a run is the same for any rank count.
    L = math.prod(parts.model.grid(x.shape[2:]))
    noise = torch.randn(gb, L, config["channels"], device=device,
                        generator=step_generator(config["seed"], step, device))[rank::world]

    with autocast(device, precision):
        x_hat, posterior = parts.model_fwd(x, noise)  # a posterior sample is decoded (§3.1)
    # Losses in fp32: MSE and KL are means, so they do not depend on the batch split.
    terms = {"mse": losses.mse_loss(x_hat, x), "kl": posterior.kl().mean()}
    loss = terms["mse"] + config["beta"] * terms["kl"]
    if parts.lpips is not None:
        terms["lpips"] = parts.lpips(x_hat, x)
        loss = loss + config["lpips_weight"] * terms["lpips"]
    if parts.disc is not None:
        # The generator's loss needs gradients with respect to x_hat only: D is frozen for it and
        # called without DDP (which would wait for D's gradients); D's own step goes through DDP.
        parts.disc.requires_grad_(False)
        with autocast(device, precision):
            terms["g_adv"] = losses.g_adv_loss(parts.disc_fwd(x_hat).float())
        ramp = losses.adv_weight(step, config["gan_ramp"])
        loss = loss + config["gan_weight"] * ramp * terms["g_adv"]
    parts.opt.zero_grad(set_to_none=True)
    loss.backward()
    # Clipped after backward, for real (the official code clips before backward: a no-op).
    terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(parts.params, config["grad_clip"])
    parts.opt.step()
    if parts.ema is not None:
        decay = runtime.ema_decay(step, config["ema"], config["ema_warmup"])
        runtime.update_ema(parts.ema, parts.model, decay)

    # The discriminator's step: hinge loss on the batch and its reconstruction, one pass.
    if parts.disc is not None:
        parts.disc.requires_grad_(True)
        with autocast(device, precision):
            real, fake = parts.disc_ddp(torch.cat([x, x_hat.detach()])).float().chunk(2)
        terms["d_loss"] = losses.d_hinge_loss(real, fake)
        parts.d_opt.zero_grad(set_to_none=True)
        terms["d_loss"].backward()  # not clipped: neither the paper nor StyleGAN2 clips D
        parts.d_opt.step()
    psnr = 10 * torch.log10(4.0 / terms["mse"].detach())  # the range of [-1,1] is 2
    terms.update(loss=loss.detach(), psnr=psnr)
    return terms


def main(args):
    config = resolve(args)
    run = runtime.TrainingRun(config)
    device, seed = run.device, config["seed"]

    # Build. LPIPS first: with eta > 0 a missing VGG16 file stops the run before any work.
    lpips = None
    if config["lpips_weight"] > 0:  # its VGG trunk in bf16 on GPU
        precision = runtime.precision_used(device, config["precision"])
        lpips = losses.LPIPS(precision=precision).to(device)
    init = stage1_weights(config) if config["stage"] == 2 and run.state is None else None
    parts = build(config, device, lpips, init)
    # The raw modules stay for EMA, grids and checkpoints.
    run.resume(parts.stateful, same=("kind", "stage", "model", "channels", "num_frames"))
    parts.model_fwd = run.ddp(run.compile(parts.model))
    if parts.disc is not None:
        parts.disc_fwd = run.compile(parts.disc)
        parts.disc_ddp = run.ddp(parts.disc_fwd)

    dataset = data.build_dataset(config["data"], config["image_size"], config["num_frames"],
                                 train=True, frame_stride=config["frame_stride"],
                                 split_file=config["split_file"])
    loader = data.infinite_loader(dataset, run.batch, run.rank, run.world, seed,
                                  start_step=run.start, num_workers=config["workers"])
    x_vis = torch.stack([dataset[i][0] for i in range(8)]).to(device)  # for the grids
    shown = parts.ema if parts.ema is not None else parts.model  # what evaluate.py would use
    millions = lambda ps: sum(p.numel() for p in ps) / 1e6  # noqa: E731
    run.print0(f"{config['model']} c={config['channels']}: {millions(parts.model.parameters()):.1f}"
               f"M params ({millions(parts.params):.1f}M trained), {len(dataset)} samples, "
               f"{run.world} rank(s), batch {run.batch}/rank, stage {config['stage']}, steps "
               f"{run.start}->{config['steps']}")

    for step in range(run.start, config["steps"]):
        x, _ = next(loader)  # labels are not used: the tokenizer is unconditional
        terms = train_step(parts, step, x.to(device, non_blocking=True), config, run.rank,
                           run.world)
        run.after_step(step, terms, parts.stateful, lr=parts.opt.param_groups[0]["lr"])
        if run.every(step, "sample_every") and run.rank == 0:
            training, path = shown.training, os.path.join(config["out_dir"],
                                                          f"recon_{step + 1:07d}.png")
            with torch.no_grad(), autocast(device, config["precision"]):
                runtime.save_grid(path, x_vis, shown.eval()(x_vis)[0])  # posterior means
            shown.train(training)
    run.finish()


def stage1_weights(config):
    """A fresh stage 2 starts from --init's evaluation weights: its EMA when it kept one (the
    better stage-1 model), else its model (the paper's stage 1 keeps no EMA)."""
    if config["init"] is None:
        raise UserError("stage 2 starts from stage-1 weights: pass --init stage1.pt")
    init = runtime.read_checkpoint(config["init"], kind="ae")
    theirs = (init["config"]["model"], init["config"]["channels"])
    if theirs != (config["model"], config["channels"]):
        raise UserError(f"--init {config['init']} holds {theirs[0]} c={theirs[1]}, not "
                        f"{config['model']} c={config['channels']}")
    return init[runtime.weights_key(init)]


def parse_args(argv=None):
    return runtime.parse_flags(__doc__, DEFAULTS, PRESETS, HELP, argv)


if __name__ == "__main__":
    runtime.run_main(main, parse_args(), "train_ae.py")
