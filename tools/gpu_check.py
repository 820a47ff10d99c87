"""Checks and times every full-scale path on one CUDA GPU, or the same code at tiny sizes on a CPU.

    python tools/gpu_check.py                          # CUDA: the paper's sizes; prints one table
    python tools/gpu_check.py --json gpu_check.json    # also writes the table as JSON (after every task)
    python tools/gpu_check.py --only compile,DiT-L     # only the rows whose names contain one of these
    python tools/gpu_check.py --tiny                   # tiny sizes (automatic without CUDA); the test suite runs this

Checks (PASS / FAIL / SKIPPED, each with its number): fused attention against the math kernel; bf16 against fp32 over
20 stage-1 steps of train_ae.py; torch.compile against eager, and recompilations after warm-up (dynamo's counters);
torchrun kill and resume of train_ae.py (stages 1 and 2) and train_dit.py; the paper's per-GPU batch on 8 GPUs in an
80 GB card. Measurements: images/s, ms/step, peak GiB and MFU, eager and compiled, of replicas of train_ae.py's and
train_dit.py's steps at the paper's per-GPU batch, of encoding for the latent cache and of DDIM sampling; the data
loader's images/s and clips/s per worker (CPU). Timed steps run on a fixed batch in memory: the GPU's figures, not the
loader's. Rows that need CUDA, PyAV or lpips say SKIPPED with the reason. Tasks run most important first; on CUDA,
those not started after --time-limit seconds (480) say SKIPPED, so that one run fits a 10-minute slot (torch.compile
of each full-size model takes about a minute; rerun the rest with --only).
"""
import argparse
import contextlib
import copy
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import runtime  # noqa: E402
import dit  # noqa: E402
import losses  # noqa: E402
import vitok  # noqa: E402

# --------------------------------------------------------------------------------------------------------------
# Sizes: the paper's per-GPU batch on 8 GPUs (global 1024 / 256 images in stages 1 / 2, 256 clips, 256 latents), and
# tiny stand-ins that run the same code on 2 CPU cores in seconds (one block per stack: dynamo traces every block).
# --------------------------------------------------------------------------------------------------------------
FULL = {
    "stage 1 S-B/16": dict(kind="ae", stage=1, model="S-B/16", size=256, frames=1, batch=128),
    "stage 2 S-B/16": dict(kind="ae", stage=2, model="S-B/16", size=256, frames=1, batch=32),
    "stage 1 S-L/16": dict(kind="ae", stage=1, model="S-L/16", size=256, frames=1, batch=128),
    "video S-B/4x8": dict(kind="ae", stage=1, model="S-B/4x8", size=128, frames=16, batch=32),
    "DiT-L": dict(kind="dit", model="DiT-L", grid=(1, 16, 16), classes=1000, batch=32),
    "DiT-XL": dict(kind="dit", model="DiT-XL", grid=(1, 16, 16), classes=1000, batch=32),
}
TINY = {  # S-L/16 and DiT-XL run the same code as S-B/16 and DiT-L: in tiny mode they are the same runs
    "stage 1 S-B/16": dict(kind="ae", stage=1, model="T-T/8", size=32, frames=1, batch=4),
    "stage 2 S-B/16": dict(kind="ae", stage=2, model="T-T/8", size=32, frames=1, batch=4, disc_channels=16),
    "video S-B/4x8": dict(kind="ae", stage=1, model="T-T/2x8", size=32, frames=4, batch=2),
    "DiT-L": dict(kind="dit", model="DiT-tiny", grid=(1, 4, 4), classes=10, batch=4),
}
TINY["stage 1 S-L/16"], TINY["DiT-XL"] = TINY["stage 1 S-B/16"], TINY["DiT-L"]
KNOBS = {  # warm-up and timed steps, batches of the attention check, the latent-cache encoder and the sampler, DDIM
    # steps, train_ae.py steps of the bf16 check, JPEGs and video clips of the loader rows
    False: dict(warmup=2, compiled_warmup=3, iters=8, attn_batch=8, encode_batch=64, sample_batch=32, sample_steps=250,
                bf16_steps=20, jpegs=200, clips=12),
    True: dict(warmup=2, compiled_warmup=2, iters=1, attn_batch=2, encode_batch=4, sample_batch=2, sample_steps=10,
               bf16_steps=4, jpegs=12, clips=2),
}
# Dense bf16 peak of one GPU (vendor datasheets, TFLOP/s) for MFU; --peak-tflops overrides. First match wins.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0),
               ("L40S", 362.0)]
MEMORY_LIMIT_GIB = 78.0  # an 80 GB card (79.6 GiB) less the CUDA context and some headroom
TOL = dict(attn_out=2e-2, attn_grad=5e-2, compile_out=3e-2, compile_grad=5e-2, bf16_loss=2e-2)
TARGET_IMG_S, TARGET_MFU = 1000, 0.5  # the targets on one H100: stage 1 S-B/16 images/s, DiT-L MFU
# The video loader target: the stage-1 target's token rate (1000 x 256 tokens/s) at 1,024 tokens per 16x128^2 clip.
TARGET_CLIPS_S = 250
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

S = argparse.Namespace()  # the run's settings (device, sizes, compile backend, ...), set in main()
RESULTS, CACHE = {}, {}  # training runs by (config, compiled, grad_ckpt); LPIPS and batches


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------
class Table:
    """Rows registered up front in reading order, filled by tasks in priority order; one table, and JSON."""

    def __init__(self, names, env, json_path=None):
        self.env, self.json_path = env, json_path
        self.rows = {n: dict(name=n, status="SKIPPED", size="", result="", target="", note="not run", numbers={})
                     for n in names}
        self.done = set()

    def set(self, name, status, result="", size="", target="", note="", **numbers):
        self.rows[name].update(status=status, result=result, size=size, target=target, note=note, numbers=numbers)
        self.done.add(name)
        print(f"[{time.time() - S.t0:6.0f}s] {status:7s} {name}: {result} {note}", flush=True)
        self.save()

    def save(self):
        if self.json_path:
            with open(self.json_path, "w") as f:
                json.dump({"env": self.env, "rows": list(self.rows.values())}, f, indent=1)

    def print(self):
        cols = [("check", "name"), ("status", "status"), ("size", "size"), ("result", "result"), ("target", "target")]
        width = {k: max(len(title), *(len(r[k]) for r in self.rows.values())) for title, k in cols}
        print("\n" + " | ".join(f"{k}: {v}" for k, v in self.env.items()))
        print(" | ".join(title.ljust(width[k]) for title, k in cols) + " | note")
        print("-+-".join("-" * width[k] for _, k in cols) + "-+-" + "-" * 20)
        for r in self.rows.values():
            print(" | ".join(r[k].ljust(width[k]) for _, k in cols) + " | " + r["note"])


def run_task(table, names, fn, only):
    """Run one task unless --only leaves all its rows out or the time limit has passed. An exception (an OOM, a kernel
    that is not available) fails the task's unfilled rows with its message; the other tasks still run."""
    if only and not any(o in n for n in names for o in only):
        for n in names:
            table.rows[n]["note"] = "not selected by --only"
        return
    if S.time_limit and time.time() - S.t0 > S.time_limit:
        for n in names:
            table.rows[n]["note"] = f"time limit {S.time_limit:.0f}s reached: rerun with --only '{n}'"
        return
    try:
        fn()
    except Exception as err:  # reported as FAIL rows with the message and the traceback on stderr, never hidden
        traceback.print_exc()
        message = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        for n in names:
            if n not in table.done:
                table.set(n, "FAIL", note=message)
    finally:
        free_memory()


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def cuda():
    return S.device.type == "cuda"


def sync():
    if cuda():
        torch.cuda.synchronize()


def free_memory():
    """Release a finished run's GPU memory and restart the peak count (CUDA only: the CPU's memory is not measured)."""
    if cuda():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def rel(a, b):
    """Relative L2 difference ||a - b|| / ||b||."""
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def trim(model):
    """Tiny mode keeps one block per stack (the same code path; dynamo traces each block, 2 CPU cores are slow)."""
    if S.tiny:
        for stack in (model.encoder, model.decoder) if isinstance(model, vitok.ViTok) else (model,):
            del stack.blocks[1:]
    return model


def new_dit(cfg):
    """A DiT of cfg whose zero-initialised adaLN and output layers are redrawn from N(0, 0.02): with adaLN-Zero the
    output and the attention gradients are exactly zero at init, which would make every comparison vacuous."""
    model = trim(dit.DiT_models[cfg["model"]](channels=16, grid=cfg["grid"], num_classes=cfg["classes"]))
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.detach().any():
            torch.nn.init.normal_(m.weight, std=0.02)
    return model.to(S.device)


def compile_(module):
    return torch.compile(module, backend=S.backend)


def lpips_module():
    """(LPIPS or None, what it is, whether the lpips package is missing), built once per process: the VGG16 weights
    when their file is present, else a random VGG16 (the same FLOPs; timed, never reported as LPIPS). Tiny mode has
    none: a VGG16 costs 2 CPU cores seconds per step, and the code around it is one call."""
    if "lpips" not in CACHE:
        try:
            import lpips  # noqa: F401
        except ImportError:
            CACHE["lpips"] = (None, "lpips not installed", True)
        else:
            pretrained = vgg_present()
            CACHE["lpips"] = (None, "no LPIPS in tiny mode", False) if S.tiny else (
                losses.LPIPS(pretrained).to(S.device),
                "LPIPS VGG16 weights" if pretrained else "LPIPS with a random VGG16 (weights absent)", False)
    return CACHE["lpips"]


def vgg_present():
    return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", losses.VGG_FILE))


def batch_for(cfg, batch):
    """A fixed batch [B,3,(T,)H,W] in [-1,1]: up to 16 synthetic samples tiled (drawing is slow on a CPU; content does
    not change the cost of a step)."""
    key = (cfg["size"], cfg["frames"], batch)
    if key not in CACHE:
        ds = data.build_dataset("synthetic", cfg["size"], cfg["frames"], train=True)
        x = torch.stack([ds[i][0] for i in range(min(16, batch))])
        CACHE[key] = x.repeat(math.ceil(batch / len(x)), *[1] * (x.dim() - 1))[:batch].to(S.device)
    return CACHE[key]


def size_of(cfg, batch=None):
    batch = cfg["batch"] if batch is None else batch
    if cfg["kind"] == "dit":
        return f"{cfg['model']} {math.prod(cfg['grid'])} tok b{batch}" + (" 1 block" if S.tiny else "")
    shape = f"{cfg['size']}²" if cfg["frames"] == 1 else f"{cfg['frames']}x{cfg['size']}²"
    return f"{cfg['model']} {shape} b{batch}" + (" 1 block" if S.tiny else "")


# --------------------------------------------------------------------------------------------------------------
# Replicas of one training step (train_ae.py stages 1 and 2, train_dit.py on cached latents) on a fixed batch
# --------------------------------------------------------------------------------------------------------------
def build_ae_step(cfg, compiled, grad_ckpt):
    """train_ae.py's step: Eq. 1 (MSE + beta KL + eta LPIPS, + lambda GAN in stage 2 with the encoder frozen), backward,
    clipping, fused AdamW, EMA; in stage 2 then the discriminator's hinge step on one concatenated batch (unclipped)."""
    dev, stage = S.device, cfg["stage"]
    torch.manual_seed(0)
    model = trim(vitok.from_name(cfg["model"], channels=16, grad_ckpt=grad_ckpt)).to(dev)
    disc = losses.Discriminator(cfg["size"], cfg.get("disc_channels")).to(dev) if stage == 2 else None
    if stage == 2:
        for frozen in (model.embed, model.encoder, model.to_moments):
            frozen.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4, fused=cuda())
    d_opt = None if disc is None else torch.optim.AdamW(disc.parameters(), lr=2e-5, betas=(0.9, 0.95),
                                                        weight_decay=1e-4, fused=cuda())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    lpips = lpips_module()[0]
    model_fwd = compile_(model) if compiled else model
    disc_fwd = compile_(disc) if compiled and disc is not None else disc
    x = batch_for(cfg, cfg["batch"])
    grid = model.grid(x.shape[2:])
    noise_shape = (x.shape[0], math.prod(grid), 16)
    first = {}

    def step(i):
        noise = torch.randn(noise_shape, generator=runtime.step_generator(0, i, dev), device=dev)
        with runtime.autocast(dev, "bf16"):
            x_hat, posterior = model_fwd(x, noise)
        loss = losses.mse_loss(x_hat, x) + 1e-3 * posterior.kl().mean()
        if lpips is not None:
            loss = loss + lpips(x_hat, x)
        if disc is not None:
            disc.requires_grad_(False)
            with runtime.autocast(dev, "bf16"):
                g_adv = losses.g_adv_loss(disc_fwd(x_hat).float())
            loss = loss + 0.05 * losses.adv_weight(i) * g_adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        runtime.update_ema(ema, model, runtime.ema_decay(i, 0.9999, 10))
        if disc is not None:
            disc.requires_grad_(True)
            with runtime.autocast(dev, "bf16"):
                logits = disc_fwd(torch.cat([x, x_hat.detach()])).float()
            d_loss = losses.d_hinge_loss(*logits.chunk(2))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
        if i == 0:  # the first step's outputs, for compile-vs-eager (a host sync, in warm-up only)
            first.update(out=x_hat.detach().float().cpu(), grad_norm=grad_norm.detach().float().cpu())
            if disc is not None:
                first["disc"] = logits.detach().cpu()

    return step, first


def build_dit_step(cfg, compiled, grad_ckpt):
    """train_dit.py's step on a latent cache: the moments of the image or its mirror, a posterior sample, class
    dropout, L_hybrid (dit.training_losses), backward, the gradient norm (clipping is off, as DiT), fused AdamW, EMA.
    Every random number comes from the step's generator, as there."""
    dev = S.device
    torch.manual_seed(0)
    model = new_dit(cfg)
    model.grad_ckpt = grad_ckpt
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, fused=cuda())
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    fwd = compile_(model) if compiled else model
    B, L, c, K = cfg["batch"], math.prod(cfg["grid"]), 16, cfg["classes"]
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(B, 2, L, c, generator=g), torch.full((B, 2, L, c), -4.0)
    moments = torch.cat([mean, logvar], -1).to(dev)  # [B,2,L,2c]: an image's and its mirror's, as the cache holds
    labels = torch.randint(0, K, (B,), generator=g).to(dev)
    first = {}

    def step(i):
        gen = runtime.step_generator(0, i, dev)
        flip = torch.rand(B, generator=gen, device=dev) < 0.5
        posterior_noise = torch.randn(B, L, c, generator=gen, device=dev)
        t = torch.randint(0, dit.NUM_TIMESTEPS, (B,), generator=gen, device=dev)
        noise = torch.randn(B, L, c, generator=gen, device=dev)
        y = dit.drop_labels(labels, K, torch.rand(B, generator=gen, device=dev), 0.1)
        with torch.no_grad():
            posterior = vitok.DiagonalGaussian(moments[torch.arange(B, device=dev), flip.long()])
            z = posterior.sample(posterior_noise)  # [B,L,c]

        def model_fn(*args):
            out = fwd(*args)
            if i == 0:
                first["out"] = out.detach().float().cpu()
            return out

        with runtime.autocast(dev, "bf16"):
            loss = dit.training_losses(model_fn, z, y, t, noise)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        opt.step()
        runtime.update_ema(ema, model, runtime.ema_decay(i, 0.9999, 10))
        if i == 0:
            first["grad_norm"] = grad_norm.detach().float().cpu()

    return step, first


def train_result(name, compiled=False, grad_ckpt=False):
    """Build and run one configuration (cached): warm-up steps (the first counted by FlopCounterMode in the plain eager
    run), then timed steps. Returns step time, peak memory, FLOPs, dynamo graph counts and the first step's outputs."""
    cfg = S.configs[name]
    key = (json.dumps(cfg, sort_keys=True), compiled, grad_ckpt)  # tiny mode's S-L/16 and DiT-XL share runs
    if key not in RESULTS:
        free_memory()
        fresh = compiled and not S.compiled_once
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            S.compiled_once = True
        if fresh:  # the first compiled run starts, like a training process, with no RoPE table cached (vitok.py)
            getattr(vitok, "_ROPE_CACHE", {}).clear()
        try:
            step, first = (build_ae_step if cfg["kind"] == "ae" else build_dit_step)(cfg, compiled, grad_ckpt)
            r = dict(first=first, batch=cfg["batch"], fresh=fresh)
            warmup = S.compiled_warmup if compiled else S.warmup
            for i in range(warmup):
                if i == 0 and not compiled and not grad_ckpt:
                    with FlopCounterMode(display=False) as flop_counter:
                        step(0)
                    r["flops"] = flop_counter.get_total_flops()
                else:
                    step(i)
            sync()
            r["graphs_warmup"] = counters["stats"]["unique_graphs"]
            start = time.perf_counter()
            for i in range(warmup, warmup + S.iters):
                step(i)
            sync()
            r["step_s"] = (time.perf_counter() - start) / S.iters
            r["graphs_after"] = counters["stats"]["unique_graphs"] - r["graphs_warmup"]
            r["graph_breaks"] = sum(counters["graph_break"].values())
            if cuda():
                r["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                r["reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
            RESULTS[key] = r
        except Exception as err:  # cached, so that the rows that share this run report the same failure
            traceback.print_exc()
            RESULTS[key] = err.with_traceback(None)  # its frames hold the run's tensors: let them go
            err.__context__ = err.__cause__ = None
        finally:
            step = first = None
            if compiled:
                torch._dynamo.reset()  # its caches hold the modules
            free_memory()
    if isinstance(RESULTS[key], Exception):
        raise RESULTS[key]
    return RESULTS[key]


def peak_tflops():
    if S.peak_tflops:
        return S.peak_tflops
    name = torch.cuda.get_device_name() if cuda() else ""
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def mfu(flops, seconds):
    peak = peak_tflops()
    return flops / seconds / (peak * 1e12) if flops and peak and cuda() else None


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------
def check_attention(table, row, cfg):
    """Forward and backward under bf16 autocast with SDPA restricted to flash / memory-efficient / cuDNN (an error,
    not a silent math fallback, when none takes the shapes), against the math kernel in fp32: the fused kernels'
    error must stay within bf16's tolerance or twice the math kernel's own error in bf16; and which fused kernels run.
    (On CUDA the fp32 reference has TF32 matmuls, as training does: still 8x finer than bf16.)"""
    dev, B = S.device, S.attn_batch
    torch.manual_seed(0)
    if cfg["kind"] == "ae":
        model = trim(vitok.from_name(cfg["model"], channels=16)).to(dev)
        x = batch_for(cfg, B)
        noise = torch.randn(B, math.prod(model.grid(x.shape[2:])), 16, device=dev)
        forward = lambda: model(x, noise)[0]  # noqa: E731
    else:
        model, L = new_dit(cfg), math.prod(cfg["grid"])
        x, t = torch.randn(B, L, 16, device=dev), torch.randint(0, 1000, (B,), device=dev)
        y = torch.randint(0, cfg["classes"], (B,), device=dev)
        forward = lambda: model(x, t, y)  # noqa: E731
    weight = []

    def run(backends, bf16=True):
        model.zero_grad(set_to_none=True)
        with sdpa_kernel(backends), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward().float()
        if not weight:  # drawn once, shared by the three runs
            weight.append(torch.randn(out.shape, device=dev))
        (out * weight[0]).mean().backward()  # a random projection: every output element gets a gradient
        return out.detach(), torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])

    reference = run([SDPBackend.MATH], bf16=False)
    fused, plain = run(FUSED), run([SDPBackend.MATH])
    errs = {k: (rel(fused[i], reference[i]), rel(plain[i], reference[i])) for i, k in enumerate(("out", "grad"))}
    accepted = []
    for backend in FUSED:  # which fused kernels take these shapes alone (forward); the rest say why on stderr
        try:
            with torch.no_grad(), sdpa_kernel([backend]), torch.autocast(dev.type, dtype=torch.bfloat16), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "... not used because ...": the error says enough
                forward()
            accepted.append(backend.name.split("_")[0].lower())
        except RuntimeError:
            pass
    ok = all(f <= max(2 * m, TOL[f"attn_{k}"]) for k, (f, m) in errs.items())
    table.set(row, "PASS" if ok else "FAIL", ", ".join(f"{k} Δ {f:.1e} (math in bf16 {m:.1e})" for k, (f, m) in
                                                        errs.items()) + " vs fp32 math",
              size_of(cfg, B), f"≤ 2x math's or {TOL['attn_out']:.0e} / {TOL['attn_grad']:.0e}",
              f"fused kernels that run: {', '.join(accepted) or 'none'}", out_rel=errs["out"][0],
              grad_rel=errs["grad"][0], out_rel_math=errs["out"][1], grad_rel_math=errs["grad"][1], backends=accepted)


@contextlib.contextmanager
def random_vgg_if_absent():
    """train_ae.py builds losses.LPIPS() with the VGG16 file; where the file is absent, it gets a random VGG16 (the same
    cost and the same code) instead of stopping."""
    if S.tiny or vgg_present():
        yield
        return
    real = losses.LPIPS
    losses.LPIPS = lambda pretrained=True, **options: real(pretrained=False, **options)
    try:
        yield
    finally:
        losses.LPIPS = real


def check_bf16(table, tmp):
    """The same 20 stage-1 steps of train_ae.py (4 in tiny mode; same weights, batches and noise: one seed) with
    --precision bf16 and with fp32: the losses it logs every 5 steps must agree (the paper found the same rFID, App. A).
    The timed steps elsewhere are replicas; this row also shows what the real loop does with its loader."""
    import train_ae
    if S.tiny:
        argv = ["--preset", "tiny", "--model", "T-T/8", "--image-size", "32", "--global-batch-size", "8",
                "--workers", "0"]
    else:
        lpips_weight = "0" if lpips_module()[2] else "1"
        argv = ["--model", "S-B/16", "--data", "synthetic", "--image-size", "256", "--global-batch-size", "32",
                "--workers", "8", "--lpips-weight", lpips_weight]
    steps = S.bf16_steps
    argv += ["--stage", "1", "--steps", str(steps), "--log-every", str(steps // 4), "--ckpt-every", str(steps)]
    logged = {}
    for precision in ("fp32", "bf16"):
        out = os.path.join(tmp, f"bf16_check_{precision}")
        with open(out + ".log", "w") as log, contextlib.redirect_stdout(log), random_vgg_if_absent():
            train_ae.main(train_ae.parse_args(argv + ["--precision", precision, "--ckpt", out + ".pt",
                                                      "--out-dir", out]))
        logged[precision] = read_jsonl(os.path.join(out, "metrics.jsonl"))
        os.remove(out + ".pt")  # 2 GB at full size
    fp32, bf16 = ([m["loss"] for m in logged[p]] for p in ("fp32", "bf16"))
    diff = max(abs(a - b) / abs(a) for a, b in zip(fp32, bf16))
    result = f"max rel Δ loss {diff:.1e} over {len(fp32)} logged intervals (last {fp32[-1]:.4f} / {bf16[-1]:.4f})"
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    size = f"train_ae.py {flag('--model')} b{flag('--global-batch-size')} {steps} steps"
    if not cuda():
        table.set("bf16 vs fp32 stage 1", "SKIPPED", result, size, note="no CUDA: train_ae.py's bf16 autocast is "
                  "CUDA-only, so both runs were fp32 here (the CLI path ran)", loss_rel=diff)
        return
    speed = logged["bf16"][-1]
    table.set("bf16 vs fp32 stage 1", "PASS" if diff <= TOL["bf16_loss"] else "FAIL", result, size,
              f"≤ {TOL['bf16_loss']:.0e}", f"train_ae.py loop on synthetic data (loader included): "
              f"{speed.get('img_per_s', 0):.0f} img/s, {speed.get('mem_gb', 0):.1f} GB", loss_rel=diff)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_compile(table, name, grad_ckpt):
    """Compiled against eager from the same weights, batch and noise: the first step's outputs (tokenizer x_hat and
    discriminator logits, or DiT's output) and gradient norm; and no new dynamo graph after the warm-up steps."""
    row = f"compile {name}" + (" grad-ckpt" if grad_ckpt else "")
    eager, comp = train_result(name, False, grad_ckpt), train_result(name, True, grad_ckpt)
    errs = {k: rel(comp["first"][k], eager["first"][k]) for k in eager["first"]}
    ok = (errs["grad_norm"] <= TOL["compile_grad"] and all(v <= TOL["compile_out"] for k, v in errs.items()
                                                           if k != "grad_norm") and comp["graphs_after"] == 0)
    outs = ", ".join(f"{k} Δ {v:.1e}" for k, v in errs.items() if k != "grad_norm")
    result = (f"{outs}, |grad| Δ {errs['grad_norm']:.1e}; graphs {comp['graphs_warmup']} in warm-up, "
              f"{comp['graphs_after']} after")
    note = f"backend {S.backend}, {comp['graph_breaks']} graph breaks, {1e3 * comp['step_s']:.0f} ms/step compiled"
    if cuda():
        note += f", peak {comp['peak_gib']:.1f} GiB"
    note += ", RoPE tables not yet cached (a fresh process)" if comp["fresh"] else ", RoPE tables cached"
    if comp["graphs_warmup"] > (3 if S.configs[name].get("stage") == 2 else 1):
        note += "; TORCH_LOGS=recompiles says why warm-up compiled more than once"
    table.set(row, "PASS" if ok else "FAIL", result, size_of(S.configs[name]),
              f"≤ {TOL['compile_out']:.0e} / {TOL['compile_grad']:.0e}, 0 after", note,
              **{f"{k}_rel": v for k, v in errs.items()}, graphs_warmup=comp["graphs_warmup"],
              graphs_after=comp["graphs_after"], graph_breaks=comp["graph_breaks"])


def check_memory(table, name):
    """The paper's per-GPU batch with and without --grad-ckpt: peak allocated (as train_ae.py's mem_gb) and reserved."""
    row = f"memory {name}"
    if not cuda():
        table.set(row, "SKIPPED", size=size_of(S.configs[name]), note="no CUDA")
        return
    if S.configs[name]["kind"] == "ae" and lpips_module()[2]:
        table.set(row, "SKIPPED", size=size_of(S.configs[name]), note="lpips not installed: not the paper's step")
        return
    peaks = {}
    for ckpt in (False, True):
        try:
            r = train_result(name, grad_ckpt=ckpt)
            peaks[ckpt] = (r["peak_gib"], r["reserved_gib"])
        except torch.cuda.OutOfMemoryError:
            peaks[ckpt] = (math.inf, math.inf)
    fits = [ckpt for ckpt in (False, True) if peaks[ckpt][1] <= MEMORY_LIMIT_GIB]
    verdict = "fits without --grad-ckpt" if False in fits else "needs --grad-ckpt" if fits else "does not fit"
    table.set(row, "PASS" if fits else "FAIL", f"peak {peaks[False][0]:.1f} GiB, --grad-ckpt {peaks[True][0]:.1f} GiB",
              size_of(S.configs[name]), f"reserved ≤ {MEMORY_LIMIT_GIB:.0f} GiB",
              f"{verdict}; reserved {peaks[False][1]:.1f} / {peaks[True][1]:.1f} GiB; {lpips_module()[1]}",
              **{f"{kind}_gib{suffix}": None if math.isinf(value) else value  # inf: out of memory
                 for ckpt, suffix in ((False, ""), (True, "_grad_ckpt"))
                 for kind, value in zip(("peak", "reserved"), peaks[ckpt])})


def check_torchrun(table, tmp):
    """torchrun --nproc_per_node=1 (an NCCL group is joined and all-reduced once) runs train_ae.py stage 1, stage 2 and
    train_dit.py for 6 steps with checkpoints every 2, twice in separate processes; a third run of each is SIGKILLed
    right after its checkpoint at step 4 is renamed into place and resumed by the next launch. The resumed run must end
    where the uninterrupted one does: ||w_resumed - w_full|| at most 5% of how far steps 5 and 6 moved the weights (a
    resume that loses the optimizer, RNG, schedule or data position is off by about 100%; CUDA kernels need not be
    deterministic, and the second uninterrupted run shows by how much)."""
    rows = ["torchrun resume train_ae stage 1", "torchrun resume train_ae stage 2", "torchrun resume train_dit"]
    if not cuda():
        for row in rows:
            table.set(row, "SKIPPED", note="no CUDA (the CPU suite's test_train_ae/test_train_dit resume on gloo)")
        return
    p = lambda name: os.path.join(tmp, name)  # noqa: E731
    common = ["--preset", "tiny", "--steps", "6", "--ckpt-every", "2", "--log-every", "1", "--global-batch-size", "8",
              "--workers", "0", "--precision", "bf16"]
    argv = dict(  # by script: the flags of a run that writes `ckpt`
        ae1=lambda ckpt: ["--stage", "1", *common, "--ckpt", p(ckpt), "--out-dir", p(ckpt + "-logs")],
        ae2=lambda ckpt: ["--stage", "2", "--init", p("a1.pt"), *common, "--ckpt", p(ckpt), "--out-dir",
                          p(ckpt + "-logs")],
        dit=lambda ckpt: ["--ae-ckpt", p("a1.pt"), *common, "--ckpt", p(ckpt), "--out-dir", p(ckpt + "-logs")])
    job = lambda kind, ckpt, kill=None: dict(script="train_dit" if kind == "dit" else "train_ae",  # noqa: E731
                                             argv=argv[kind](ckpt), kill_at=kill)
    launches = [  # (jobs, the checkpoint a kill leaves behind)
        ([job("ae1", "a1.pt"), job("ae2", "a2.pt"), job("dit", "d.pt")], None),
        ([job("ae1", "a1r.pt"), job("ae2", "a2r.pt"), job("dit", "dr.pt"), job("ae1", "k1.pt", kill=2)], "k1.pt"),
        ([job("ae1", "k1.pt"), job("ae2", "k2.pt", kill=2)], "k2.pt"),
        ([job("ae2", "k2.pt"), job("dit", "kd.pt", kill=2)], "kd.pt"),
        ([job("dit", "kd.pt")], None),
    ]
    killed, nccl = {}, []
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "4"}
    for n, (jobs, kill_ckpt) in enumerate(launches):
        spec, log = p(f"launch{n}.json"), p(f"launch{n}.log")
        with open(spec, "w") as f:
            json.dump(jobs, f)
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                 os.path.abspath(__file__), "--worker", spec], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, timeout=600).returncode
        text = open(log).read()
        nccl.append("nccl all_reduce ok" in text)
        if kill_ckpt:  # the checkpoint the kill left, before the next launch resumes from it and overwrites it
            killed[kill_ckpt] = (rc, torch.load(p(kill_ckpt), map_location="cpu", weights_only=True)
                                 if os.path.exists(p(kill_ckpt)) else None)
        elif rc:
            raise RuntimeError(f"torchrun launch {n} exited {rc}: {text.strip().splitlines()[-1:]} (log {log})")

    def flat(state):
        return torch.cat([v.float().flatten() for v in state["model"].values()])

    for row, (full, repeat, resumed) in zip(rows, [("a1.pt", "a1r.pt", "k1.pt"), ("a2.pt", "a2r.pt", "k2.pt"),
                                                   ("d.pt", "dr.pt", "kd.pt")]):
        rc, at_kill = killed[resumed]
        step = at_kill["step"] if at_kill else None
        w, r, w2 = (torch.load(p(name), map_location="cpu", weights_only=True) for name in (full, resumed, repeat))
        moved = (flat(w) - flat(at_kill)).norm().item() if at_kill else math.nan  # steps 5 and 6 of the full run
        off, repeat_off = ((flat(other) - flat(w)).norm().item() / moved for other in (r, w2))
        ok = rc != 0 and step == 4 and r["step"] == 6 and off <= 0.05 and all(nccl)
        table.set(row, "PASS" if ok else "FAIL", f"killed at step {step} (exit {rc}), resumed to {r['step']}: off by "
                  f"{off:.1e} of steps 5-6 (a second full run: {repeat_off:.1e})", "tiny preset, bf16, b8, 6 steps",
                  "≤ 5e-02", f"NCCL group joined and all-reduced: {all(nccl)}; logs in {tmp}",
                  off=off, repeat_off=repeat_off, killed_step=step)


def worker(spec_path):
    """Under torchrun: join an NCCL group (world size 1) and all-reduce once, then run the jobs in order; a job with
    kill_at SIGKILLs this process right after its kill_at-th checkpoint is renamed into place (atomic writes)."""
    import torch.distributed as dist
    import train_ae
    import train_dit
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
        ones = torch.ones(1, device=device)
        dist.all_reduce(ones)
        print("nccl all_reduce ok" if ones.item() == dist.get_world_size() else "nccl all_reduce WRONG", flush=True)
    with open(spec_path) as f:
        jobs = json.load(f)
    for job in jobs:
        module = train_ae if job["script"] == "train_ae" else train_dit
        if job["kill_at"]:
            target = os.path.abspath(job["argv"][job["argv"].index("--ckpt") + 1])
            saves, real_replace = [0], os.replace

            def replace_then_kill(src, dst, *args, **kwargs):
                real_replace(src, dst, *args, **kwargs)
                if os.path.abspath(dst) == target:
                    saves[0] += 1
                    if saves[0] == job["kill_at"]:
                        print(f"killing after checkpoint {saves[0]} of {target}", flush=True)
                        os.kill(os.getpid(), signal.SIGKILL)

            os.replace = replace_then_kill
        module.main(module.parse_args(job["argv"]))


# --------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------
def speed_row(table, name, compiled):
    """Images (clips) per second per GPU, ms/step, peak GiB and MFU of one configuration's step."""
    row = f"speed {name} {'compiled' if compiled else 'eager'}"
    cfg = S.configs[name]
    if cfg["kind"] == "ae" and lpips_module()[2]:
        table.set(row, "SKIPPED", size=size_of(cfg), note="lpips not installed: not the paper's step")
        return
    flops = train_result(name)["flops"]  # eager first: the compiled run finds the RoPE tables cached, as in training
    r = train_result(name, compiled)
    rate, util = cfg["batch"] / r["step_s"], mfu(flops, r["step_s"])
    unit = "clips" if cfg["kind"] == "ae" and cfg["frames"] > 1 else "img"
    result = f"{rate:,.1f} {unit}/s, {1e3 * r['step_s']:.0f} ms/step"
    result += f", {r['peak_gib']:.1f} GiB" if cuda() else ""
    result += f", MFU {util:.0%}" if util is not None else ""
    target = ""
    if name == "stage 1 S-B/16":
        target = f"≥ {TARGET_IMG_S:,} img/s" + (f": {'met' if rate >= TARGET_IMG_S else 'missed'}" if cuda() else "")
    elif name == "DiT-L":
        target = f"≥ {TARGET_MFU:.0%} MFU" + (f": {'met' if util >= TARGET_MFU else 'missed'}" if util else "")
    note = f"{flops / 1e12:.2f} TFLOP/step" if flops > 1e11 else f"{flops / 1e9:.3f} GFLOP/step"
    note += " (FlopCounterMode, eager)"
    note += f", peak {peak_tflops():.0f} TFLOP/s bf16 dense" if util is not None else ""
    note += f", backend {S.backend}, {r['graphs_after']} graphs after warm-up" if compiled else ""
    note += f"; {lpips_module()[1]}" if cfg["kind"] == "ae" else "; cached latents"
    table.set(row, "PASS", result, size_of(cfg), target, note, per_s=rate, step_ms=1e3 * r["step_s"],
              peak_gib=r.get("peak_gib"), mfu=util, flops_per_step=flops)


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def encode_row(table, compiled):
    """Encoding for the latent cache (train_dit.py --latent-cache): its batch of 64, posterior moments to the host."""
    row = f"speed encode S-B/16 {'compiled' if compiled else 'eager'}"
    cfg, B = S.configs["stage 1 S-B/16"], S.encode_batch
    torch._dynamo.reset()
    torch.manual_seed(0)
    ae = trim(vitok.from_name(cfg["model"], channels=16)).to(S.device).eval()
    encode = compile_(ae.encode) if compiled else ae.encode
    x = batch_for(cfg, B)

    @torch.no_grad()
    def step():
        with runtime.autocast(S.device, "bf16"):
            posterior = encode(x)
        return torch.cat([posterior.mean, posterior.logvar], -1).cpu()  # [B,L,2c]

    seconds = timed(step, S.compiled_warmup if compiled else S.warmup, S.iters)
    table.set(row, "PASS", f"{B / seconds:,.1f} img/s, {1e3 * seconds:.0f} ms/batch", size_of(cfg, B),
              note=f"moments copied to the host each batch{', backend ' + S.backend if compiled else ''}",
              per_s=B / seconds)
    torch._dynamo.reset()


def sample_row(table, compiled):
    """dit.sample: DiT-L, 250 DDIM steps (10 in tiny mode), CFG 1.5 (a doubled batch), then the tokenizer's decoder,
    at evaluate.py's batch of 32; and the hours 50,000 samples take on 8 GPUs."""
    row = f"speed sample DiT-L {'compiled' if compiled else 'eager'}"
    cfg, ae_cfg, B = S.configs["DiT-L"], S.configs["stage 1 S-B/16"], S.sample_batch
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = new_dit(cfg).eval()
    ae = trim(vitok.from_name(ae_cfg["model"], channels=16)).to(S.device).eval()
    fwd = compile_(model) if compiled else model
    z = torch.randn(B, math.prod(cfg["grid"]), 16, device=S.device)
    y = torch.randint(0, cfg["classes"], (B,), device=S.device)

    @torch.no_grad()
    def generate(steps):
        with runtime.autocast(S.device, "bf16"):
            latents = dit.sample(fwd, z, y, steps=steps, cfg_scale=1.5)
            return ae.decode(latents, (ae_cfg["size"], ae_cfg["size"]))

    generate(2)  # warm-up (compilation)
    seconds = timed(lambda: generate(S.sample_steps), 0, 1)
    rate = B / seconds
    hours = 50_000 / (rate * 8) / 3600
    note = f"{S.sample_steps} DDIM steps, CFG 1.5, decode included" + (f", backend {S.backend}" if compiled else "")
    table.set(row, "PASS", f"{rate:,.2f} img/s; 50,000 samples on 8 GPUs: {hours:.2f} h", size_of(cfg, B), note=note,
              per_s=rate, hours_50k_8gpu=hours)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------------------
# The data loader (CPU): ImageNet-like JPEGs and UCF-101-like videos written here, decoded by data.build_dataset
# --------------------------------------------------------------------------------------------------------------
def photo_like(h, w, rng):
    """uint8 [h,w,3]: smooth colour regions, mid-frequency texture and fine grain (JPEGs of about ImageNet's cost)."""
    from PIL import Image

    def field(gh, gw, scale):
        small = rng.uniform(0, 255, (gh, gw, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32) * scale

    img = field(6, 8, 0.5) + field(h // 8, w // 8, 0.25) + field(h // 3, w // 3, 0.25)
    img += rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@contextlib.contextmanager
def one_thread():
    """A DataLoader worker runs with one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def loader_rows(table, tmp):
    """Per-worker throughput of data.build_dataset(folder, 256, train=True) on 500x375 JPEGs (quality 90) and of
    build_dataset(folder, 128, num_frames=16, train=True) on 7 s 320x240 25 fps AVIs, and the workers per GPU that the
    targets need; against the reference of decoding every frame of the file to keep 16 (the loader before it stopped early)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    folder = os.path.join(tmp, "imagenet")
    for i in range(S.jpegs):
        os.makedirs(os.path.join(folder, f"n{i % 2:08d}"), exist_ok=True)
        path = os.path.join(folder, f"n{i % 2:08d}", f"{i}.JPEG")
        Image.fromarray(photo_like(375, 500, rng)).save(path, quality=90)
    kb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs) / S.jpegs / 1024
    ds = data.build_dataset(folder, 256, train=True)
    with one_thread():
        seconds = timed(lambda: [ds[(i, i)] for i in range(len(ds))], 0, 1) / len(ds)
    workers = math.ceil(TARGET_IMG_S * seconds)
    table.set("loader images", "PASS", f"{1 / seconds:,.0f} img/s per worker",
              f"500x375 JPEG q90 ({kb:.0f} kB) -> 256²", f"{TARGET_IMG_S:,} img/s/GPU: {workers} workers",
              "decode + RandomResizedCrop + flip, one thread", per_worker=1 / seconds, workers_needed=workers)
    video_rows = ["loader video", "loader video whole-file decode"]
    try:
        import av
    except ImportError:
        for row in video_rows:
            table.set(row, "SKIPPED", note="PyAV not installed (pip install av)")
        return
    folder = os.path.join(tmp, "ucf", "ApplyEyeMakeup")
    os.makedirs(folder)
    n_videos = max(1, S.clips // 3)
    for v in range(n_videos):
        base = photo_like(240, 480, rng)
        with av.open(os.path.join(folder, f"v_{v}.avi"), "w") as out:
            stream = out.add_stream("mpeg4", rate=25)  # UCF-101's AVIs are MPEG-4 part 2 (Xvid), 25 fps
            stream.width, stream.height, stream.pix_fmt, stream.bit_rate = 320, 240, "yuv420p", 500_000
            for k in range(175):  # 7 s: a slow pan over a photo-like frame
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[:, k:k + 320]), format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    ds = data.build_dataset(os.path.dirname(folder), 128, num_frames=16, train=True)
    keys = [(i % n_videos, i) for i in range(S.clips)]
    with one_thread():
        clip = timed(lambda: [ds[k] for k in keys], 0, 1) / len(keys)
        whole = timed(lambda: [whole_file_clip(ds, *k) for k in keys], 0, 1) / len(keys)
    size = f"320x240 25 fps 7 s AVI -> 16x128², stride {ds.stride}"
    target = lambda s: f"{TARGET_CLIPS_S} clips/s/GPU: {math.ceil(TARGET_CLIPS_S * s)} workers"  # noqa: E731
    table.set("loader video", "PASS", f"{1 / clip:,.1f} clips/s per worker ({whole / clip:.2f}x the reference)", size,
              target(clip), "target: the stage-1 target's tokens/s at 1,024 tokens per clip; one thread",
              per_worker=1 / clip, gain=whole / clip, workers_needed=math.ceil(TARGET_CLIPS_S * clip))
    table.set("loader video whole-file decode", "PASS", f"{1 / whole:,.1f} clips/s per worker", size, target(whole),
              "reference: every frame of the file decoded to RGB, then the same 16 frames and transform",
              per_worker=1 / whole, workers_needed=math.ceil(TARGET_CLIPS_S * whole))


def whole_file_clip(ds, index, seed):
    """The clip ds[(index, seed)] makes, the way the loader used to: every frame of the file decoded."""
    import av
    gen = torch.Generator().manual_seed(seed)
    with av.open(ds.items[index]) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    clip = np.stack([frames[k] for k in ds.pick(len(frames), gen)])  # [T,h,w,3]
    clip = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255.0
    return data.transform(clip, ds.size, gen, square=True) * 2 - 1


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the table here (rewritten after every task)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and a short loader run (the test suite's); "
                                                       "without CUDA the sizes are tiny anyway, the loader rows full")
    p.add_argument("--only", help="comma-separated substrings: run only the rows whose names contain one")
    p.add_argument("--time-limit", type=float, help="seconds after which tasks not yet started are SKIPPED "
                                                    "(default 480 on CUDA, none in tiny mode)")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; in tiny mode eager: dynamo "
                                             "traces, guards and counts graphs as for inductor, without codegen)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (default: from its name)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a torchrun worker of the resume check
    return p.parse_args(argv)


def main(args):
    if args.worker:
        return worker(args.worker)
    _, _, device = runtime.setup_distributed()  # the scripts' own setup: the GPU and TF32 matmuls on CUDA
    tiny = args.tiny or device.type != "cuda"
    S.__dict__.update(device=device, tiny=tiny, configs=TINY if tiny else FULL, t0=time.time(),
                      backend=args.compile_backend or ("eager" if tiny else "inductor"),
                      time_limit=args.time_limit if args.time_limit is not None else (0 if tiny else 480),
                      peak_tflops=args.peak_tflops, compiled_once=False, **KNOBS[tiny])
    S.jpegs, S.clips = KNOBS[args.tiny]["jpegs"], KNOBS[args.tiny]["clips"]  # the loader is measurable on any CPU
    only = [o.strip() for o in args.only.split(",")] if args.only else []
    env = dict(device=torch.cuda.get_device_name() if cuda() else "CPU", torch=torch.__version__,
               cuda_build=torch.version.cuda or "-", date=time.strftime("%Y-%m-%d"), sizes="tiny" if tiny else "paper",
               compile=S.backend, peak_tflops=peak_tflops() or "-")
    compile_rows = [("stage 1 S-B/16", False), ("stage 1 S-B/16", True), ("stage 2 S-B/16", False),
                    ("stage 2 S-B/16", True), ("DiT-L", False), ("DiT-L", True), ("video S-B/4x8", False)]
    memory_names = ["stage 1 S-B/16", "stage 2 S-B/16", "stage 1 S-L/16", "video S-B/4x8", "DiT-L"]
    rows = ([f"attention {n}" for n in ("S-B/16", "DiT-L", "S-L/16")] + ["bf16 vs fp32 stage 1"]
            + [f"compile {n}" + (" grad-ckpt" if ck else "") for n, ck in compile_rows]
            + ["torchrun resume train_ae stage 1", "torchrun resume train_ae stage 2", "torchrun resume train_dit"]
            + [f"memory {n}" for n in memory_names]
            + [f"speed {n} {m}" for n in FULL for m in ("eager", "compiled")]
            + [f"speed {w} {m}" for w in ("encode S-B/16", "sample DiT-L") for m in ("eager", "compiled")]
            + ["loader images", "loader video", "loader video whole-file decode"])
    table = Table(rows, env, args.json)
    table.save()
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    task = lambda names_, fn, *a: run_task(table, names_, lambda: fn(table, *a), only)  # noqa: E731
    # Priority order: what decides whether a first GPU hour is wasted comes first; the time limit cuts the tail.
    task(["attention S-B/16"], check_attention, "attention S-B/16", S.configs["stage 1 S-B/16"])
    task(["attention DiT-L"], check_attention, "attention DiT-L", S.configs["DiT-L"])
    task(["attention S-L/16"], check_attention, "attention S-L/16", S.configs["stage 1 S-L/16"])
    for name in ("stage 1 S-B/16", "DiT-L"):
        task([f"speed {name} eager"], speed_row, name, False)
        task([f"speed {name} compiled"], speed_row, name, True)
        task([f"compile {name}"], check_compile, name, False)
    task(["bf16 vs fp32 stage 1"], check_bf16, tmp)
    task(["torchrun resume train_ae stage 1", "torchrun resume train_ae stage 2", "torchrun resume train_dit"],
         check_torchrun, tmp)
    task(["loader images", "loader video", "loader video whole-file decode"], loader_rows, tmp)
    for name in memory_names:
        task([f"memory {name}"], check_memory, name)
    for name in ("stage 2 S-B/16", "video S-B/4x8", "stage 1 S-L/16", "DiT-XL"):
        task([f"speed {name} eager"], speed_row, name, False)
    task(["speed encode S-B/16 eager"], encode_row, False)
    task(["speed sample DiT-L eager"], sample_row, False)
    for name in ("stage 2 S-B/16", "video S-B/4x8"):
        task([f"speed {name} compiled"], speed_row, name, True)
        task([f"compile {name}"], check_compile, name, False)
    for name in ("stage 1 S-B/16", "DiT-L", "stage 2 S-B/16"):
        task([f"compile {name} grad-ckpt"], check_compile, name, True)
    for name in ("stage 1 S-L/16", "DiT-XL"):
        task([f"speed {name} compiled"], speed_row, name, True)
    task(["speed encode S-B/16 compiled"], encode_row, True)
    task(["speed sample DiT-L compiled"], sample_row, True)
    table.print()
    failed = any(r["status"] == "FAIL" for r in table.rows.values())
    if failed:
        print(f"\nlogs and checkpoints kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{time.time() - S.t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
