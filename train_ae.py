"""Train the ViTok tokenizer (§3.2, App. A): stage 1 (MSE + KL + LPIPS), then stage 2 (+ GAN,
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

import torch

import data
import losses
import runtime
import vitok
from runtime import UserError, autocast, step_generator

# The paper's stage-1 ImageNet run (§3.2, App. A): every constant of the recipe is here, and every
# entry with a help line below is also a flag. Presets override entries; flags override presets.
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
    precision="bf16", compile=False, grad_ckpt=False, workers=8, seed=0,
    log_every=100, ckpt_every=2_000, sample_every=5_000,
)
INT = dict(type=int)
HELP = {
    "stage": "1: MSE + KL + LPIPS; 2: + GAN, encoder frozen",
    "model": "tokenizer <encoder>-<decoder>/<patch> or /<tubelet>x<patch>: S-B/16, S-B/4x8, tiny",
    "channels": "latent channels c",
    "data": "dataset folder, 'synthetic' or 'deadleaves'",
    "image_size": "training resolution",
    "num_frames": "frames per clip; 1 = images",
    "frame_stride": "video: keep every n-th frame",
    "split_file": "video: a list of the videos to use (UCF-101's trainlist01.txt)",
    "global_batch_size": ("images or clips per step over all ranks (None: 1024/256 in stage 1, "
                          "256/128 in stage 2)", INT),
    "steps": "optimizer steps",
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
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient-norm clipping of the tokenizer",
    "ema": "EMA decay",
    "precision": ("bf16 autocast on GPU, or fp32 (the CPU always runs fp32)",
                  dict(choices=["bf16", "fp32"])),
    "compile": "torch.compile the tokenizer and the discriminator",
    "grad_ckpt": "activation checkpointing in the transformer blocks",
    "workers": "data-loader workers per rank",
    "seed": "seed of weights, data order and noise",
    "log_every": "steps per log line",
    "ckpt_every": "steps per checkpoint",
    "sample_every": "steps per grid",
}
# CPU demo (its time and PSNR are in the README): a tiny model with 16x16 patches on 64x64
# dead-leaves images, 16 tokens of 16 channels. No LPIPS (it needs the VGG16 weights); a narrow
# discriminator for the stage-2 demo.
TINY = dict(model="T-T/16", data="deadleaves", image_size=64, global_batch_size=32, steps=2000,
            lr=24e-3, lpips_weight=0.0, gan_ramp=200, disc_channels=16, disc_lr=2e-3, ema=0.999,
            precision="fp32", workers=2, log_every=50, ckpt_every=300, sample_every=600)
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


def lr_at(step, total, peak, warmup, final):
    """Linear warmup over the first `warmup` fraction of the steps, then cosine decay to `final`."""
    warmup_steps = max(1, int(warmup * total))
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def main(args):
    config = resolve(args)
    # Joins the ranks, finds the checkpoint to resume from, seeds the initial weights.
    run = runtime.TrainingRun(config)
    device, stage = run.device, config["stage"]
    gb, seed, precision = config["global_batch_size"], config["seed"], config["precision"]

    # Build. LPIPS first: with eta > 0 a missing VGG16 file stops the run before any work.
    lpips = None
    if config["lpips_weight"] > 0:  # its VGG trunk in bf16 on GPU
        lpips = losses.LPIPS(precision=runtime.precision_used(device, precision)).to(device)
    model = vitok.from_name(config["model"], channels=config["channels"],
                            grad_ckpt=config["grad_ckpt"]).to(device)
    # Stage 2's discriminator sees single frames: a video tokenizer is judged frame by frame.
    disc = None
    if stage == 2:
        disc = losses.Discriminator(config["image_size"], config["disc_channels"]).to(device)
        if run.state is None:
            model.load_state_dict(stage1_weights(config))
        # §3.2: freeze the encoder and its projection to 2c; fine-tune the decoder side only
        for frozen in (model.embed, model.encoder, model.to_moments):
            frozen.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW with the learning rates scaled linearly with the global batch (App. A).
    adamw = dict(betas=config["betas"], weight_decay=config["weight_decay"],
                 fused=device.type == "cuda")
    opt = torch.optim.AdamW(params, lr=config["lr"] * gb / 256, **adamw)
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # evaluation and stage 2 use it
    stateful = dict(model=model, ema=ema, opt=opt)  # what a checkpoint holds, by its key
    if disc is not None:
        d_opt = torch.optim.AdamW(disc.parameters(), lr=config["disc_lr"] * gb / 256, **adamw)
        stateful.update(disc=disc, disc_opt=d_opt)

    # Resume, then compile and wrap for DDP; the raw modules stay for EMA, grids and checkpoints.
    run.resume(stateful, same=("kind", "stage", "model", "channels", "num_frames"))
    model_ddp = run.ddp(run.compile(model))
    # The discriminator has two handles: the generator's adversarial loss only needs gradients
    # with respect to x_hat, so it calls D without DDP (D's weights are frozen then, and DDP would
    # wait for their gradients); D's own step goes through DDP to average them over ranks.
    disc_fwd = run.compile(disc)
    disc_ddp = run.ddp(disc_fwd)

    # Each rank loads its interleaved share of the global batch; a resumed run starts at the
    # batch it stopped at.
    dataset = data.build_dataset(config["data"], config["image_size"], config["num_frames"],
                                 train=True, frame_stride=config["frame_stride"],
                                 split_file=config["split_file"])
    loader = data.infinite_loader(dataset, run.batch, run.rank, run.world, seed,
                                  start_step=run.start, num_workers=config["workers"])
    x_vis = torch.stack([dataset[i][0] for i in range(8)]).to(device)  # for the grids
    # The posterior noise is drawn for the whole global batch: a run is the same for any number
    # of ranks.
    t, h, w = model.grid((config["num_frames"], config["image_size"], config["image_size"]))
    noise_shape = (gb, t * h * w, config["channels"])  # [B,L,c]
    millions = lambda ps: sum(p.numel() for p in ps) / 1e6  # noqa: E731
    run.print0(f"{config['model']} c={config['channels']}: {millions(model.parameters()):.1f}M "
               f"params ({millions(params):.1f}M trained), {len(dataset)} samples, {run.world} "
               f"rank(s), batch {run.batch}/rank, stage {stage}, steps {run.start}->"
               f"{config['steps']}")

    for step in range(run.start, config["steps"]):
        x, _ = next(loader)  # labels are not used: the tokenizer is unconditional
        x = x.to(device, non_blocking=True)
        # The schedule is a function of the step alone: a resumed run continues it.
        lr = lr_at(step, config["steps"], config["lr"] * gb / 256, config["warmup"],
                   config["final_lr"])
        for group in opt.param_groups:
            group["lr"] = lr
        noise = torch.randn(noise_shape, generator=step_generator(seed, step, device),
                            device=device)[run.rank::run.world]  # this rank's rows

        # The tokenizer's step, Eq. 1: L = MSE + beta KL + eta LPIPS + lambda GAN.
        with autocast(device, precision):
            x_hat, posterior = model_ddp(x, noise)  # a posterior sample is decoded (§3.1)
        # Losses in fp32: MSE and KL are means, so they do not depend on the batch split.
        terms = {"mse": losses.mse_loss(x_hat, x), "kl": posterior.kl().mean()}
        loss = terms["mse"] + config["beta"] * terms["kl"]
        if lpips is not None:
            terms["lpips"] = lpips(x_hat, x)
            loss = loss + config["lpips_weight"] * terms["lpips"]
        if disc is not None:
            disc.requires_grad_(False)  # the generator's loss must not leave gradients in D
            with autocast(device, precision):
                terms["g_adv"] = losses.g_adv_loss(disc_fwd(x_hat).float())
            ramp = losses.adv_weight(step, config["gan_ramp"])
            loss = loss + config["gan_weight"] * ramp * terms["g_adv"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Clipped after backward, for real (the official code clips before backward: a no-op).
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
        opt.step()
        runtime.update_ema(ema, model, runtime.ema_decay(step, config["ema"],
                                                         config["ema_warmup"]))

        # The discriminator's step: hinge loss on the batch and its reconstruction, one pass.
        if disc is not None:
            disc.requires_grad_(True)
            with autocast(device, precision):
                real, fake = disc_ddp(torch.cat([x, x_hat.detach()])).float().chunk(2)
            terms["d_loss"] = losses.d_hinge_loss(real, fake)
            d_opt.zero_grad(set_to_none=True)
            terms["d_loss"].backward()  # not clipped: neither the paper nor StyleGAN2 clips D
            d_opt.step()

        # Device tensors, read once per log interval (no host sync in the step).
        psnr = 10 * torch.log10(4.0 / terms["mse"].detach())  # the range of [-1,1] is 2
        terms.update(loss=loss.detach(), psnr=psnr)
        run.after_step(step, terms, stateful, lr=lr)
        if run.every(step, "sample_every") and run.rank == 0:
            with torch.no_grad(), autocast(device, precision):
                path = os.path.join(config["out_dir"], f"recon_{step + 1:07d}.png")
                runtime.save_grid(path, x_vis, ema(x_vis)[0])
    run.finish()


def stage1_weights(config):
    """A fresh stage 2 starts from the stage-1 EMA weights of --init (the better stage-1 model)."""
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
