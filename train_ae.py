"""Train the ViTok tokenizer (§3.2, App. A): stage 1 (MSE + KL + LPIPS), then stage 2 (+ GAN, decoder only).

    python train_ae.py --preset tiny                                     # CPU demo, a few minutes, writes ae.pt
    torchrun --nproc_per_node=8 train_ae.py --stage 1 --data /datasets/imagenet/train --ckpt stage1.pt
    torchrun --nproc_per_node=8 train_ae.py --stage 2 --data /datasets/imagenet/train --init stage1.pt --ckpt ae.pt

main() is the recipe: setup, build, resume, loop, save. The bookkeeping that train_dit.py shares with it (flags from
one defaults dict, resume with a configuration check, EMA, the interval log, the finite check, atomic checkpoints)
is the small kit at the end of this file.
"""
import argparse
import copy
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import losses
import vitok
from data import autocast, save_grid, step_generator

# The paper's stage-1 ImageNet run (§3.2, App. A): every constant of the recipe is here, and every entry with a help
# line below is also a flag. Presets override entries; explicit flags override presets.
DEFAULTS = dict(
    stage=1, model="S-B/16", channels=16, data=None, image_size=256, num_frames=1,
    frame_stride=3, split_file=None,  # video: 8 fps on UCF-101's 25 fps; its official train list
    global_batch_size=None,  # stage 1: 1024 images / 256 clips; stage 2: 256 / 128
    steps=100_000, ckpt=None, init=None, out_dir=None,
    lr=1e-4, warmup=0.03, final_lr=1e-5,  # peak lr for a global batch of 256 (scaled linearly), 3% warmup, cosine
    betas=(0.9, 0.95), weight_decay=1e-4, grad_clip=1.0,
    beta=1e-3, lpips_weight=1.0,  # Eq. 1: the KL weight beta and the LPIPS weight eta
    gan_weight=0.05, gan_ramp=25_000,  # lambda (the appendix's ablation; the main text says 1.0), ramped in
    disc_lr=2e-5, disc_channels=None,  # None: by resolution, as the official code (64 at 256^2)
    ema=0.9999, ema_warmup=10,  # decay min(ema, (1 + step) / (ema_warmup + step)); 0 turns the warm-up off
    precision="bf16", compile=False, grad_ckpt=False, workers=8, seed=0,
    log_every=100, ckpt_every=2_000, sample_every=5_000,
)
HELP = {
    "stage": "1: MSE + KL + LPIPS; 2: + GAN, encoder frozen",
    "model": "tokenizer <encoder>-<decoder>/<patch> or /<tubelet>x<patch>: S-B/16, S-L/16, S-B/4x8, tiny",
    "channels": "latent channels c",
    "data": "dataset folder, 'synthetic' or 'deadleaves'",
    "image_size": "training resolution",
    "num_frames": "frames per clip; 1 = images",
    "frame_stride": "video: keep every n-th frame",
    "split_file": "video: a list of the videos to use (UCF-101's trainlist01.txt)",
    "global_batch_size": "images or clips per step over all ranks (None: 1024/256 in stage 1, 256/128 in stage 2)",
    "steps": "optimizer steps",
    "ckpt": "checkpoint written at intervals, resumed from when it exists (None: ae.pt, stage 2 ae_stage2.pt)",
    "init": "stage 2: the stage-1 checkpoint to start from",
    "out_dir": "metrics.jsonl and reconstruction grids (None: <ckpt>-logs)",
    "lr": "peak learning rate for a global batch of 256",
    "beta": "KL weight",
    "lpips_weight": "LPIPS weight eta; 0 turns LPIPS off",
    "gan_weight": "stage 2: adversarial weight lambda",
    "gan_ramp": "stage 2: steps over which lambda ramps up from 0",
    "disc_lr": "discriminator learning rate for a global batch of 256",
    "disc_channels": "discriminator width at full resolution (None: by resolution, 64 at 256^2)",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient-norm clipping of the tokenizer",
    "ema": "EMA decay",
    "precision": "bf16 autocast on GPU, or fp32 (the CPU always runs fp32)",
    "compile": "torch.compile the tokenizer and the discriminator",
    "grad_ckpt": "activation checkpointing in the transformer blocks",
    "workers": "data-loader workers per rank",
    "seed": "seed of weights, data order and noise",
    "log_every": "steps per log line", "ckpt_every": "steps per checkpoint", "sample_every": "steps per grid",
}
# CPU demo: a tiny model with 16x16 patches on 64x64 dead-leaves images (16 tokens of 16 channels: 256 floats), five
# to eight minutes on 2 cores (five on photographs, which are faster to read than dead leaves are to draw); on
# photographs (--data FOLDER) it beats the bilinear codec with (at most) the same floats by 2.4 dB.
# No LPIPS (it needs the VGG16 weights); a narrow discriminator for the stage-2 demo.
TINY = dict(model="T-T/16", data="deadleaves", image_size=64, global_batch_size=32, steps=2000, lr=24e-3,
            lpips_weight=0.0, gan_ramp=200, disc_channels=16, disc_lr=2e-3, ema=0.999, precision="fp32", workers=2,
            log_every=50, ckpt_every=300, sample_every=600)
PRESETS = {
    "tiny": TINY,
    # The same for 4-frame 32x32 synthetic clips with 2x8x8 tubelets.
    "tiny-video": {**TINY, "model": "T-T/2x8", "data": "synthetic", "image_size": 32, "num_frames": 4,
                   "global_batch_size": 16, "steps": 1000},
}


def resolve(args):
    """The run's configuration: defaults < preset < flags, then the fields derived from them (set here only)."""
    config = merge(args, DEFAULTS, PRESETS, kind="ae")
    if config["data"] is None:
        raise SystemExit("train_ae.py: --data is required: a dataset folder, or 'synthetic' for the built-in source")
    video = config["num_frames"] > 1
    if config["global_batch_size"] is None:  # App. A: smaller batches for stage 2 and for video
        config["global_batch_size"] = {1: (1024, 256), 2: (256, 128)}[config["stage"]][video]
    if config["ckpt"] is None:  # stage 2 writes its own file, so that stage 1's stays as it was
        config["ckpt"] = "ae.pt" if config["stage"] == 1 else "ae_stage2.pt"
    if config["out_dir"] is None:
        config["out_dir"] = os.path.splitext(config["ckpt"])[0] + "-logs"
    if config["disc_channels"] is None:
        config["disc_channels"] = losses.disc_channels(config["image_size"])
    return config


def lr_at(step, total, peak, warmup, final):
    """Linear warmup over the first `warmup` fraction of the steps, then cosine decay from peak to `final`."""
    warmup_steps = max(1, int(warmup * total))
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def main(args):
    config = resolve(args)
    # Joins the ranks, finds a checkpoint to resume from, seeds the initial weights (the same on every rank).
    run = Run(config)
    device, stage, gb, seed = run.device, config["stage"], config["global_batch_size"], config["seed"]

    # Build. LPIPS first: with eta > 0 a missing VGG16 file stops the run here, before any work is done.
    lpips_precision = config["precision"] if device.type == "cuda" else "fp32"  # its VGG trunk in bf16 on GPU
    lpips = losses.LPIPS(precision=lpips_precision).to(device) if config["lpips_weight"] > 0 else None
    model = vitok.from_name(config["model"], channels=config["channels"], grad_ckpt=config["grad_ckpt"]).to(device)
    # Stage 2's discriminator sees single frames: a video tokenizer is judged frame by frame (§3.2).
    disc = losses.Discriminator(config["image_size"], config["disc_channels"]).to(device) if stage == 2 else None
    if stage == 2 and run.state is None:
        model.load_state_dict(stage1_weights(config))
    if stage == 2:  # §3.2: freeze the encoder and its projection to 2c; fine-tune the decoder side only
        for frozen in (model.embed, model.encoder, model.to_moments):
            frozen.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW with the learning rates scaled linearly with the global batch (App. A); fused kernels on GPU.
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=config["lr"] * gb / 256, betas=config["betas"],
                            weight_decay=config["weight_decay"], fused=fused)
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # evaluation and stage 2 use the EMA weights
    stateful = dict(model=model, ema=ema, opt=opt)  # what a checkpoint holds, by its key
    if disc is not None:
        d_opt = torch.optim.AdamW(disc.parameters(), lr=config["disc_lr"] * gb / 256, betas=config["betas"],
                                  weight_decay=config["weight_decay"], fused=fused)
        stateful.update(disc=disc, disc_opt=d_opt)

    # Resume, then compile and wrap for DDP; the raw modules stay for EMA, grids and checkpoints.
    run.resume(stateful, same=("kind", "stage", "model", "channels", "num_frames"))
    model_ddp = run.ddp(run.compile(model))
    # The discriminator has two handles: the generator's adversarial loss only needs gradients with respect to
    # x_hat, so it calls D without DDP (D's weights are frozen then, and DDP would wait for their gradients);
    # D's own step goes through DDP to average them over ranks.
    disc_fwd = run.compile(disc)
    disc_ddp = run.ddp(disc_fwd)

    # Each rank loads its interleaved share of the global batch; a resumed run starts at the batch it stopped at.
    dataset = data.build_dataset(config["data"], config["image_size"], config["num_frames"], train=True,
                                 frame_stride=config["frame_stride"], split_file=config["split_file"])
    loader = data.infinite_loader(dataset, run.batch, run.rank, run.world, seed, start_step=run.start,
                                  num_workers=config["workers"])
    x_vis = torch.stack([dataset[i][0] for i in range(8)]).to(device)  # fixed samples for the reconstruction grids
    # The posterior noise is drawn for the whole global batch, so that a run is the same for any number of ranks.
    t, h, w = model.grid((config["num_frames"], config["image_size"], config["image_size"]))
    noise_shape = (gb, t * h * w, config["channels"])  # the global batch's posterior noise [B,L,c]
    run.say(f"{config['model']} c={config['channels']}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
            f"params ({sum(p.numel() for p in params) / 1e6:.1f}M trained), {len(dataset)} samples, {run.world} "
            f"rank(s), batch {run.batch}/rank, stage {stage}, steps {run.start}->{config['steps']}")

    for step in range(run.start, config["steps"]):
        x, _ = next(loader)  # labels are not used: the tokenizer is unconditional
        x = x.to(device, non_blocking=True)
        # The schedule is a function of the step alone, so a resumed run continues it where it stopped.
        lr = lr_at(step, config["steps"], config["lr"] * gb / 256, config["warmup"], config["final_lr"])
        for group in opt.param_groups:
            group["lr"] = lr
        noise = torch.randn(noise_shape, generator=step_generator(seed, step, device), device=device)
        noise = noise[run.rank::run.world]  # the rows of this rank's samples

        # The tokenizer's step, Eq. 1: L = MSE + beta KL + eta LPIPS + lambda GAN.
        with autocast(device, config["precision"]):
            x_hat, posterior = model_ddp(x, noise)  # a posterior sample is decoded during training (§3.1)
        # Losses in fp32 whatever the autocast: MSE and KL are means, so they do not depend on the batch split.
        terms = {"mse": losses.mse_loss(x_hat, x), "kl": posterior.kl().mean()}
        loss = terms["mse"] + config["beta"] * terms["kl"]
        if lpips is not None:
            terms["lpips"] = lpips(x_hat, x)
            loss = loss + config["lpips_weight"] * terms["lpips"]
        if disc is not None:
            disc.requires_grad_(False)  # the generator's loss must not leave gradients in D
            with autocast(device, config["precision"]):
                terms["g_adv"] = losses.g_adv_loss(disc_fwd(x_hat).float())
            loss = loss + config["gan_weight"] * losses.adv_weight(step, config["gan_ramp"]) * terms["g_adv"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # Clipped after backward, for real (the official code calls the clip before backward, where it does nothing).
        terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
        opt.step()
        update_ema(ema, model, ema_decay(step, config))

        # The discriminator's step: hinge loss on the real batch and its reconstruction, one pass through D.
        if disc is not None:
            disc.requires_grad_(True)
            with autocast(device, config["precision"]):
                real, fake = disc_ddp(torch.cat([x, x_hat.detach()])).float().chunk(2)
            terms["d_loss"] = losses.d_hinge_loss(real, fake)
            d_opt.zero_grad(set_to_none=True)
            terms["d_loss"].backward()  # not clipped: neither the paper nor StyleGAN2 clips D
            d_opt.step()

        # Logged as device tensors; Run reads them once per log interval (no host sync in the step).
        terms.update(loss=loss.detach(), psnr=10 * torch.log10(4.0 / terms["mse"].detach()))  # range 2 in [-1,1]
        run.end_step(step, terms, stateful, lr=lr)
        if run.due(step, "sample_every") and run.rank == 0:
            with torch.no_grad(), autocast(device, config["precision"]):
                save_grid(os.path.join(config["out_dir"], f"recon_{step + 1:07d}.png"), x_vis, ema(x_vis)[0])
    run.finish()


def stage1_weights(config):
    """A fresh stage 2 starts from the stage-1 EMA weights of --init (the better stage-1 model)."""
    if config["init"] is None:
        raise SystemExit("train_ae.py: stage 2 starts from stage-1 weights: pass --init stage1.pt")
    init = load_checkpoint(config["init"])
    if (init["config"]["model"], init["config"]["channels"]) != (config["model"], config["channels"]):
        raise SystemExit(f"train_ae.py: --init {config['init']} holds {init['config']['model']} c="
                         f"{init['config']['channels']}, not {config['model']} c={config['channels']}")
    return init.get("ema") or init["model"]


# --------------------------------------------------------------------------------------------------------------
# The training kit, shared with train_dit.py: flags, resume, EMA, the interval log, the finite check, checkpoints
# --------------------------------------------------------------------------------------------------------------
def parse_flags(description, defaults, presets, helps, argv=None):
    """argparse over the entries of `defaults` that have a help line; each help shows its default. Every flag
    defaults to None, so that merge() can tell an explicit flag from a preset's value."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets), help="a small named run; explicit flags still win")
    for name, text in helps.items():
        default, flag = defaults[name], "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=None, help=text)
        else:
            kind = {"precision": dict(choices=["bf16", "fp32"])}.get(name, {})
            value = int if name in ("global_batch_size", "disc_channels") else type(default) if default is not None \
                else str
            shown = "" if default is None else f" (default: {default})"  # None: the help says what it means
            p.add_argument(flag, type=value, help=text + shown, **kind)
    return p.parse_args(argv)


def merge(args, defaults, presets, kind):
    """defaults < the preset's entries < explicit flags; `kind` ("ae" or "dit") marks the checkpoint's trainer."""
    return {**defaults, **presets.get(args.preset, {}), **{k: v for k, v in vars(args).items() if v is not None},
            "kind": kind}


def load_checkpoint(path):
    """A checkpoint is a plain dict of tensors, numbers, strings and lists: safe to load with weights_only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def ema_decay(step, config):
    """EMA decay with the usual warm-up, so that short runs have a useful EMA too (README, Differences)."""
    if config["ema_warmup"] <= 0:
        return config["ema"]
    return min(config["ema"], (1 + step) / (config["ema_warmup"] + step))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model over parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


class Run:
    """What a training run does around its recipe. It joins the ranks (one code path for 1..N processes), finds the
    checkpoint to resume from, logs one line per interval (the loop's only host sync), stops at the first non-finite
    loss, and writes checkpoints atomically with every rank's RNG state, so that a resumed run is the same run."""

    def __init__(self, config):
        self.config, self.script = config, f"train_{config['kind']}.py"
        self.rank, self.world, self.device = data.setup_distributed()
        gb = config["global_batch_size"]
        if gb % self.world:
            raise SystemExit(f"{self.script}: --global-batch-size {gb} does not split over {self.world} ranks")
        self.batch = gb // self.world
        self.state = load_checkpoint(config["ckpt"]) if os.path.exists(config["ckpt"]) else None
        self.start = self.state["step"] if self.state else 0
        self.last_ckpt = config["ckpt"] if self.state else None  # named in the error when a loss goes non-finite
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # first non-finite step, on device
        self.history, self.t0 = [], time.time()
        if self.rank == 0:
            os.makedirs(config["out_dir"], exist_ok=True)
            print("config:", json.dumps(config, sort_keys=True), flush=True)
        torch.manual_seed(config["seed"])  # the same initial weights on every rank and for every world size

    def say(self, message):
        if self.rank == 0:
            print(message, flush=True)

    def resume(self, stateful, same):
        """Load every state dict of the checkpoint found at --ckpt (by key) after checking that its `same` entries
        equal this run's; then each rank draws from its own stream (and an interrupted run's RNG continues)."""
        if self.state:
            for key in same:
                if self.state["config"].get(key) != self.config[key]:
                    raise SystemExit(f"{self.script}: cannot resume {self.config['ckpt']}: its {key} is "
                                     f"{self.state['config'].get(key)!r}, this run's is {self.config[key]!r}; "
                                     f"pass another --ckpt")
            for key, obj in stateful.items():
                obj.load_state_dict(self.state[key])
        torch.manual_seed(self.config["seed"] * self.world + self.rank)
        if self.state and len(self.state["rng"]) == self.world:
            torch.set_rng_state(self.state["rng"][self.rank]["cpu"])
            if "cuda" in self.state["rng"][self.rank] and self.device.type == "cuda":
                torch.cuda.set_rng_state(self.state["rng"][self.rank]["cuda"])

    def compile(self, module):
        return torch.compile(module) if module is not None and self.config["compile"] else module

    def ddp(self, module):
        if module is None or self.world == 1:
            return module
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def due(self, step, every):
        done = step + 1
        return done % self.config[every] == 0 or done == self.config["steps"]

    def end_step(self, step, terms, stateful, **scalars):
        """Record the step's loss terms (device tensors: no host sync); when due, log their means over the interval
        and the ranks, and write the checkpoint. Both first check that no loss so far was non-finite."""
        finite = torch.stack([v.detach().float() for v in terms.values()]).isfinite().all()  # D's loss too
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, step, self.first_bad)
        self.history.append({k: v.detach() for k, v in terms.items()})
        if self.due(step, "log_every"):
            self.check_finite()
            names = list(self.history[0])
            means = torch.stack([torch.stack([h[k].float() for k in names]) for h in self.history]).mean(0)
            if self.world > 1:
                dist.all_reduce(means)
                means /= self.world
            elapsed, self.t0 = time.time() - self.t0, time.time()
            metrics = {**dict(zip(names, means.tolist())), **scalars,
                       "img_per_s": len(self.history) * self.config["global_batch_size"] / elapsed}
            if self.device.type == "cuda":
                metrics["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            self.history = []
            if self.rank == 0:
                print(f"step {step + 1:>8d} | " + " | ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
                with open(os.path.join(self.config["out_dir"], "metrics.jsonl"), "a") as f:
                    f.write(json.dumps({"step": step + 1, **metrics}) + "\n")
        if self.due(step, "ckpt_every"):
            self.check_finite()  # never write a poisoned checkpoint
            self.save(step + 1, stateful)

    def check_finite(self):
        if self.world > 1:
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MAX)
        bad = int(self.first_bad.item())
        if bad >= 0:
            raise FloatingPointError(
                f"non-finite loss at step {bad}; no checkpoint written after it. Last finite checkpoint: "
                f"{self.last_ckpt or 'none'}. Lower --lr or check the data, then rerun with the same --ckpt to resume.")

    def save(self, done, stateful):
        """Rank 0 writes the state dicts, step, configuration and every rank's RNG to a temporary file, then renames
        it over --ckpt: a crash mid-write leaves the previous checkpoint intact."""
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if self.device.type == "cuda"
                                                  else {})}
        rngs = [rng] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, rng)
        if self.rank == 0:
            state = {k: v.state_dict() for k, v in stateful.items()}
            state.update(step=done, config=self.config, rng=rngs)
            torch.save(state, self.config["ckpt"] + ".tmp")
            os.replace(self.config["ckpt"] + ".tmp", self.config["ckpt"])
        self.last_ckpt = self.config["ckpt"]

    def finish(self):
        self.say(f"done: {self.config['ckpt']} at step {self.config['steps']}")
        data.cleanup_distributed()


def parse_args(argv=None):
    return parse_flags(__doc__, DEFAULTS, PRESETS, HELP, argv)


if __name__ == "__main__":
    main(parse_args())
