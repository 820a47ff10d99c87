"""Checks and times the trainers' own steps on one CUDA GPU at the paper's sizes, or the same code tiny on a CPU.

    python tools/gpu_check.py --json gpu_check.json                # CUDA: the paper's sizes, within 540 s
    python tools/gpu_check.py --json gpu_check.json --keep-done    # again: only the rows the first run left out
    python tools/gpu_check.py --only compile,DiT-L                 # only the rows whose names contain one of these
    python tools/gpu_check.py --tiny                               # tiny sizes (automatic without CUDA); the suite's

What it times is the product: train_ae.train_step (stages 1 and 2, video) and train_dit.train_step (on cached latents)
on the modules of train_ae.build / train_dit.build, compiled as main() compiles them, on a fixed batch in memory (the
GPU's figures, not the loader's). Checks (PASS / FAIL): fused attention against the math kernel; 20 stage-1 steps of
train_ae.py in bf16 against fp32; torch.compile against eager (the step's loss terms, outputs and gradient norm) with
no recompilation after warm-up (dynamo's error_on_recompile); the paper's per-GPU batch within an 80 GB card (the
process is capped at CARD_GIB: out of memory is "does not fit"), eager and compiled; torchrun kill and resume of both
trainers with 2 ranks on the one GPU (gloo). Measurements (RAN, or PASS / MISSED against a target): images/s, ms/step,
peak GiB and MFU; latent-cache encoding and DDIM sampling; the data loader per worker (CPU). Every row reports the
seconds it took and its compile time (what a user waits on).

Rows run most valuable first: attention, stage-1 and DiT-L speed and MFU (and their compile checks), bf16, their
memory, resume, then the rest. With a time limit (--time-limit, 540 s on CUDA) a task whose estimate does not fit in
what is left is SKIPPED, a task that overruns is stopped at the limit and a torchrun launch after 120 s; the JSON is
rewritten after every row. Without the lpips package or the VGG16 file the check (only the check) uses an LPIPS of
random weights with the same shapes and FLOPs, and says so in the row.
"""
import argparse
import contextlib
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
import torchvision
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import dit  # noqa: E402
import losses  # noqa: E402
import runtime  # noqa: E402
import train_ae  # noqa: E402
import train_dit  # noqa: E402
import vitok  # noqa: E402

# ---- Sizes: the paper's per-GPU batch on 8 GPUs (global 1024 / 256 images in stages 1 / 2, 256 clips, 256 latents),
# and tiny stand-ins that run the same code on 2 CPU cores in seconds (one block per stack: dynamo traces each). ----
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
# Estimated seconds at full size, for the time limit: (eager, compiled) per training run (build, warm-up, timed steps;
# a compiled run is mostly compilation, cold caches), and per other task. Guesses until a GPU run: its JSON's took_s
# and compile_s are the numbers to put here.
RUN_SECONDS = {"stage 1 S-B/16": (30, 150), "stage 2 S-B/16": (30, 180), "stage 1 S-L/16": (45, 200),
               "video S-B/4x8": (30, 150), "DiT-L": (25, 120), "DiT-XL": (30, 140)}
TASK_SECONDS = dict(attention=20, bf16=90, torchrun=150, loader=45, encode=(15, 60), sample=(30, 120))
TORCHRUN_TIMEOUT = 120  # seconds per torchrun launch (its tiny runs take about 30)
# Dense bf16 peak of one GPU (vendor datasheets, TFLOP/s) for MFU, by device name and, where one name covers two parts,
# total memory (GiB); the first match wins; --peak-tflops overrides.
PEAK_TFLOPS = [("H200 NVL", None, 835.0), ("H100 NVL", None, 835.0), ("H100 PCIe", None, 756.0),
               ("H100", (90, 100), 835.0),  # an H100 of 94 GB is the NVL part, whatever its name says
               ("GH200", None, 989.0), ("H200", None, 989.0), ("H100", None, 989.0), ("A100", None, 312.0),
               ("L40S", None, 362.0)]
# An 80 GB card as its owner sees it: 79.2 GiB of device memory less the CUDA context and NCCL's buffers. (80e9 bytes,
# 74.5 GiB, would be stricter than any 80 GB card.)
CARD_GIB = 78.0
TOL = dict(attn_out=2e-2, attn_grad=5e-2, compile_out=3e-2, compile_grad=5e-2, bf16_loss=2e-2, resume=5e-2)
TARGET_IMG_S, TARGET_MFU = 1000, 0.5  # the targets on one H100: stage 1 S-B/16 images/s, DiT-L MFU (compiled)
# The video loader target: the stage-1 target's token rate (1000 x 256 tokens/s) at 1,024 tokens per 16x128^2 clip.
TARGET_CLIPS_S = 250
FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]

S = argparse.Namespace()  # the run's settings (device, sizes, compile backend, ...), set by configure()
RESULTS, CACHE = {}, {}  # training runs by (config, compiled, grad_ckpt); LPIPS modules and batches


# ---- The table ----
class Table:
    """Rows registered up front in priority order (the order tasks run), filled by tasks; printed, and JSON rewritten
    after every row. With keep, the rows of an earlier JSON that ran (not SKIPPED) are kept and not run again."""

    def __init__(self, names, env, json_path=None, keep=False):
        self.env, self.json_path, self.task_t0 = env, json_path, time.time()
        self.rows = {n: dict(name=n, status="SKIPPED", size="", result="", target="", note="not run", compile_s=None,
                             took_s=None, numbers={}) for n in names}
        self.done, self.kept = set(), set()
        if keep and json_path and os.path.exists(json_path):
            with open(json_path) as f:
                earlier = {r["name"]: r for r in json.load(f)["rows"]}
            self.kept = {n for n in names if earlier.get(n, {}).get("status", "SKIPPED") != "SKIPPED"}
            self.rows.update({n: earlier[n] for n in self.kept})
            env["kept_rows"] = len(self.kept)

    def set(self, name, status, result="", size="", target="", note="", compile_s=None, **numbers):
        took = time.time() - self.task_t0
        self.rows[name].update(status=status, result=result, size=size, target=target, note=note, compile_s=compile_s,
                               took_s=took, numbers=numbers)
        self.done.add(name)
        print(f"[{time.time() - S.t0:6.0f}s] {status:7s} {name}: {result} {note}", flush=True)
        self.save()

    def note(self, name, note):
        self.rows[name]["note"] = note
        self.save()

    def save(self):
        if self.json_path:
            with open(self.json_path + ".tmp", "w") as f:
                json.dump({"env": self.env, "rows": list(self.rows.values())}, f, indent=1)
            os.replace(self.json_path + ".tmp", self.json_path)  # a killed run leaves the last complete table

    def print(self):
        seconds = lambda v: "" if v is None else f"{v:.0f} s"  # noqa: E731
        cells = [dict(r, compile=seconds(r["compile_s"]), took=seconds(r["took_s"])) for r in self.rows.values()]
        cols = [("check", "name"), ("status", "status"), ("size", "size"), ("result", "result"), ("target", "target"),
                ("compile", "compile"), ("took", "took")]
        width = {k: max(len(title), *(len(c[k]) for c in cells)) for title, k in cols}
        print("\n" + " | ".join(f"{k}: {v}" for k, v in self.env.items()))
        print(" | ".join(title.ljust(width[k]) for title, k in cols) + " | note")
        print("-+-".join("-" * width[k] for _, k in cols) + "-+-" + "-" * 20)
        for c in cells:
            print(" | ".join(c[k].ljust(width[k]) for _, k in cols) + " | " + c["note"])


class OutOfTime(BaseException):
    """Raised by the alarm at --time-limit inside a running task; a BaseException, so no task code catches it."""


def on_alarm(signum, frame):
    raise OutOfTime()


def seconds_left():
    return S.time_limit - (time.time() - S.t0) if S.time_limit else math.inf


def run_task(table, task, only):
    """Run one task (names, fn, estimate) unless --only leaves all its rows out, --keep-done kept them, or its estimate
    does not fit in the time left. An alarm at the time limit stops a task that overruns (its unfilled rows say so); an
    exception (a kernel that is not available, a bug) fails the task's unfilled rows with its message; the other
    tasks still run."""
    names, fn, estimate = task
    if all(n in table.kept for n in names):
        return
    if only and not any(o in n for n in names for o in only):
        for n in names:
            table.note(n, "not selected by --only")
        return
    left, need = seconds_left(), estimate()
    if need > left:
        for n in names:
            table.note(n, f"estimated {need:.0f} s, {max(left, 0):.0f} s of the time limit left: rerun with --only "
                          f"'{n}' (or --keep-done)")
        return
    table.task_t0 = time.time()
    if S.time_limit:
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(left, 0.01))
    try:
        fn()
    except OutOfTime:
        for n in names:
            if n not in table.done:
                table.set(n, "SKIPPED", note=f"stopped at the time limit after {time.time() - table.task_t0:.0f} s "
                                             f"(estimated {need:.0f} s): rerun with --only '{n}'")
    except Exception as err:  # reported as FAIL rows with the message and the traceback on stderr, never hidden
        traceback.print_exc()
        message = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        for n in names:
            if n not in table.done:
                table.set(n, "FAIL", note=message)
    finally:
        if S.time_limit:
            signal.setitimer(signal.ITIMER_REAL, 0)
        free_memory()


# ---- Helpers ----
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


def rel(a, b, floor=1e-30):
    """||a - b|| / max(||b||, floor): relative, or absolute where ||b|| < floor."""
    a, b = a.double().flatten(), b.double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(floor)).item()


def trim_model(model):
    """Tiny mode keeps one block per stack (the same code path; dynamo traces each block, 2 CPU cores are slow)."""
    if S.tiny and model is not None:
        for stack in (model.encoder, model.decoder) if isinstance(model, vitok.ViTok) else (model,):
            del stack.blocks[1:]
    return model


def wake(model):
    """Redraw a DiT's zero-initialised adaLN and output layers from N(0, 0.02): with adaLN-Zero the output and the
    attention gradients are exactly zero at init, which would make every comparison vacuous."""
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.detach().any():
            torch.nn.init.normal_(m.weight, std=0.02)
    return model


def compile_(module):
    return torch.compile(module, backend=S.backend)


def batch_for(cfg, batch):
    """A fixed batch [B,3,(T,)H,W] in [-1,1]: up to 16 synthetic samples tiled (drawing is slow on a CPU; content does
    not change the cost of a step)."""
    key = (cfg["size"], cfg["frames"], batch)
    if key not in CACHE:
        ds = data.build_dataset("synthetic", cfg["size"], cfg["frames"], train=True)
        x = torch.stack([ds[i][0] for i in range(min(16, batch))])
        CACHE[key] = x.repeat(math.ceil(batch / len(x)), *[1] * (x.dim() - 1))[:batch].to(S.device)
    return CACHE[key]


def latents_for(cfg):
    """A latent-cache batch: moments [B,1,2,L,2c] of an image and its mirror in its one temporal window (fp32, as
    LatentCache gives them) and labels [B], fixed."""
    B, L, c = cfg["batch"], math.prod(cfg["grid"]), 16
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(B, 1, 2, L, c, generator=g), torch.full((B, 1, 2, L, c), -4.0)
    labels = torch.randint(0, cfg["classes"], (B,), generator=g)
    return torch.cat([mean, logvar], -1).to(S.device), labels.to(S.device)


def size_of(cfg, batch=None):
    batch = cfg["batch"] if batch is None else batch
    if cfg["kind"] == "dit":
        return f"{cfg['model']} {math.prod(cfg['grid'])} tok b{batch}" + (" 1 block" if S.tiny else "")
    shape = f"{cfg['size']}²" if cfg["frames"] == 1 else f"{cfg['frames']}x{cfg['size']}²"
    return f"{cfg['model']} {shape} b{batch}" + (" 1 block" if S.tiny else "")


def timed(fn, warmup, iters):
    """(seconds per call after warm-up, seconds of the warm-up calls beyond that rate: compilation)."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    sync()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    seconds = (time.perf_counter() - start) / iters
    return seconds, max(0.0, warm - warmup * seconds)


# ---- LPIPS where the package or the VGG16 file is missing: random weights, the same modules and FLOPs ----
class VGG16Slices(torch.nn.Module):
    """lpips.pretrained_networks.vgg16: torchvision's VGG16 features cut after relu1_2, relu2_2, relu3_3, relu4_3 and
    relu5_3 (the same module names, so that its state dict loads)."""

    def __init__(self):
        super().__init__()
        features = torchvision.models.vgg16().features  # random weights: nothing is downloaded
        for i, (a, b) in enumerate(zip([0, 4, 9, 16, 23], [4, 9, 16, 23, 30]), 1):
            setattr(self, f"slice{i}", features[a:b])  # a slice keeps the layers' indices as names

    def forward(self, x):
        feats = []
        for i in range(1, 6):
            x = getattr(self, f"slice{i}")(x)
            feats.append(x)
        return feats


class ScalingLayer(torch.nn.Module):
    """lpips.ScalingLayer: inputs in [-1,1] shifted and scaled as the VGG16 trunk was trained."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

    def forward(self, x):
        return (x - self.shift) / self.scale


class Head(torch.nn.Module):
    """lpips.NetLinLayer: dropout (a no-op in eval) and a 1x1 convolution to one channel."""

    def __init__(self, channels):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class RandomLPIPS(losses.LPIPS):
    """losses.LPIPS (its forward: the trainer's code) over lpips.LPIPS(net="vgg")'s modules, under the same names,
    rebuilt with random weights: the input scaling, the VGG16 trunk and the 1x1 heads. For timing only: never LPIPS."""

    def __init__(self, precision="fp32"):
        torch.nn.Module.__init__(self)  # not losses.LPIPS's: that one needs the lpips package
        self.net = torch.nn.Module()
        self.net.scaling_layer = ScalingLayer()
        self.net.net = VGG16Slices().to(memory_format=torch.channels_last)
        self.net.lins = torch.nn.ModuleList(Head(c) for c in (64, 128, 256, 512, 512))
        self.precision = precision
        self.eval().requires_grad_(False)


def vgg_present():
    return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", losses.VGG_FILE))


def lpips_package():
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False
    return True


def lpips_kind():
    """What the check's LPIPS is, said in every row that uses it."""
    if not lpips_package():
        return "lpips not installed: LPIPS of random VGG16 and heads (same FLOPs)"
    return "LPIPS" if vgg_present() else "LPIPS with a random VGG16 (its file absent: same FLOPs)"


def lpips_for(precision):
    """train_ae.py's LPIPS module (built once per precision): losses.LPIPS with its weights where present, else random
    ones of the same shapes."""
    if ("lpips", precision) not in CACHE:
        if not lpips_package():
            module = RandomLPIPS(precision)
        else:
            module = losses.LPIPS(pretrained=vgg_present(), precision=precision)
        CACHE["lpips", precision] = module.to(S.device)
    return CACHE["lpips", precision]


@contextlib.contextmanager
def substitute_lpips():
    """Around a call of train_ae.main: where lpips or its VGG16 file is missing, its losses.LPIPS(...) gets random
    weights of the same shapes instead of stopping."""
    real = losses.LPIPS
    if not lpips_package():
        losses.LPIPS = lambda pretrained=True, precision="fp32": RandomLPIPS(precision)
    elif not vgg_present():
        losses.LPIPS = lambda pretrained=True, **options: real(pretrained=False, **options)
    try:
        yield
    finally:
        losses.LPIPS = real


# ---- The trainers' steps on a fixed batch ----
def ae_config(cfg, grad_ckpt):
    """train_ae.py's configuration for this size (its defaults: the paper's run, LPIPS on, bf16) on one rank."""
    argv = ["--model", cfg["model"], "--data", "synthetic", "--image-size", str(cfg["size"]), "--num-frames",
            str(cfg["frames"]), "--stage", str(cfg["stage"]), "--global-batch-size", str(cfg["batch"])]
    argv += ["--grad-ckpt"] if grad_ckpt else []
    argv += ["--disc-channels", str(cfg["disc_channels"])] if cfg.get("disc_channels") else []
    return train_ae.resolve(train_ae.parse_args(argv))


def dit_config(cfg, grad_ckpt):
    """train_dit.py's configuration (its defaults: DiT's recipe, bf16) on a latent cache, on one rank."""
    return {**train_dit.DEFAULTS, "kind": "dit", "model": cfg["model"], "channels": 16, "grid": list(cfg["grid"]),
            "num_classes": cfg["classes"], "global_batch_size": cfg["batch"], "latent_cache": "(in memory)",
            "grad_ckpt": grad_ckpt}


def capture(fwd, first, key, pick=lambda out: out):
    """fwd, recording its first call's output under first[key] (a host copy: in the first step only)."""
    def call(*args):
        out = fwd(*args)
        if key not in first:
            first[key] = pick(out).detach().float().cpu()
        return out
    return call


def build_step(cfg, compiled, grad_ckpt):
    """(step(i) -> loss terms, first): the trainer's build and train_step, its modules compiled as its main() does;
    `first` receives the first step's outputs (the tokenizer's x_hat and D's logits, or the DiT's output)."""
    first = {}
    if cfg["kind"] == "ae":
        config = ae_config(cfg, grad_ckpt)
        lpips = lpips_for(runtime.precision_used(S.device, config["precision"]))  # as main(): bf16 on GPU
        torch.manual_seed(config["seed"])  # as TrainingRun: every run of a size starts from the same weights
        parts = train_ae.build(config, S.device, lpips)
        for model in (parts.model, parts.ema):
            trim_model(model)
        # (The optimizer keeps the removed blocks' parameters: they get no gradient, and it skips them.)
        parts.params = [p for p in parts.model.parameters() if p.requires_grad]
        parts.model_fwd = capture(compile_(parts.model) if compiled else parts.model, first, "out", lambda o: o[0])
        if parts.disc is not None:
            parts.disc_fwd = compile_(parts.disc) if compiled else parts.disc
            parts.disc_ddp = capture(parts.disc_fwd, first, "disc")
        x = batch_for(cfg, cfg["batch"])
        return lambda i: train_ae.train_step(parts, i, x, config), first
    config = dit_config(cfg, grad_ckpt)
    torch.manual_seed(config["seed"])
    parts = train_dit.build(config, S.device)
    wake(trim_model(parts.model))
    trim_model(parts.ema).load_state_dict(parts.model.state_dict())  # the EMA starts from the model, as in build
    parts.model_fwd = capture(compile_(parts.model) if compiled else parts.model, first, "out")
    moments, labels = latents_for(cfg)
    return lambda i: train_dit.train_step(parts, i, moments, labels, config), first


def run_key(name, compiled, grad_ckpt):
    return json.dumps(S.configs[name], sort_keys=True), compiled, grad_ckpt  # tiny mode's S-L/16, DiT-XL share runs


def run_seconds(name, compiled, grad_ckpt=False):
    """The estimated seconds of a training run, 0 when it has run already."""
    if run_key(name, compiled, grad_ckpt) in RESULTS:
        return 0.0
    if S.tiny:
        return 10.0 if compiled else 3.0
    return RUN_SECONDS[name][compiled] * (1.3 if grad_ckpt else 1.0)


def train_result(name, compiled=False, grad_ckpt=False):
    """Build and run one configuration (cached): warm-up steps (the second counted by FlopCounterMode in the plain eager
    run), then timed steps, recompilation an error. Returns the step time, compile time, peak memory, FLOPs, dynamo's
    graph counts and the first step's loss terms and outputs."""
    key = run_key(name, compiled, grad_ckpt)
    if key not in RESULTS:
        free_memory()
        if compiled:
            torch._dynamo.reset()
            counters.clear()
        try:
            step, first = build_step(S.configs[name], compiled, grad_ckpt)
            r = dict(batch=S.configs[name]["batch"])
            warmup, start = S.compiled_warmup if compiled else S.warmup, time.perf_counter()
            for i in range(warmup):
                if i == 1 and not compiled and not grad_ckpt:  # not step 0: compile_check's reference
                    with FlopCounterMode(display=False) as flop_counter:
                        step(i)
                    r["flops"] = flop_counter.get_total_flops()
                    continue
                terms = step(i)
                if i == 0:  # a host sync, in warm-up only
                    first.update({k: v.detach().float().cpu() for k, v in terms.items()})
            sync()
            warm = time.perf_counter() - start
            r["graphs_warmup"] = counters["stats"]["unique_graphs"]
            # A recompilation after warm-up is an error, so that a fall-back to eager at dynamo's recompile limit
            # cannot pass as "no new graph".
            with torch._dynamo.config.patch(error_on_recompile=True):
                start = time.perf_counter()
                for i in range(warmup, warmup + S.iters):
                    step(i)
                sync()
            r["step_s"] = (time.perf_counter() - start) / S.iters
            r["compile_s"] = max(0.0, warm - warmup * r["step_s"]) if compiled else None
            r["graphs_after"] = counters["stats"]["unique_graphs"] - r["graphs_warmup"]
            r["graph_breaks"] = sum(counters["graph_break"].values())
            r["first"] = first
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
    if not cuda():
        return None
    name, gib = torch.cuda.get_device_name(), torch.cuda.get_device_properties(S.device).total_memory / 2 ** 30
    return peak_for(name, gib)


def peak_for(name, total_gib):
    """The dense bf16 peak (TFLOP/s) of the GPU of this name and total memory, or None when unknown."""
    fits = lambda gib: gib is None or gib[0] <= total_gib < gib[1]  # noqa: E731
    return next((peak for key, gib, peak in PEAK_TFLOPS if key in name and fits(gib)), None)


def mfu(flops, seconds):
    peak = peak_tflops()
    return flops / seconds / (peak * 1e12) if flops and peak and cuda() else None


# ---- Checks ----
def check_attention(table, row, cfg):
    """Forward and backward under bf16 autocast with SDPA restricted to flash / memory-efficient / cuDNN (an error,
    not a silent math fallback, when none takes the shapes), against the math kernel in fp32: the fused kernels'
    error must stay within bf16's tolerance or twice the math kernel's own error in bf16; and which fused kernels run.
    (On CUDA the fp32 reference has TF32 matmuls, as training does: still 8x finer than bf16.)"""
    dev, B = S.device, S.attn_batch
    torch.manual_seed(0)
    if cfg["kind"] == "ae":
        model = trim_model(vitok.from_name(cfg["model"], channels=16)).to(dev)
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


def new_dit(cfg):
    torch.manual_seed(0)
    return wake(trim_model(dit.DiT_models[cfg["model"]](channels=16, grid=cfg["grid"], num_classes=cfg["classes"]))
                ).to(S.device)


def check_bf16(table, tmp):
    """The same 20 stage-1 steps of train_ae.py (4 in tiny mode; same weights, batches and noise: one seed) with
    --precision bf16 and with fp32, LPIPS on: the losses it logs every 5 steps must agree (the paper found the same
    rFID, App. A). The real loop, its loader included. In tiny mode on a CPU, bf16 is CPU autocast (runtime.CPU_BF16,
    this check's opt-in), so that the tolerance has been exercised before a GPU sees it."""
    if S.tiny:
        argv = ["--preset", "tiny", "--model", "T-T/8", "--image-size", "32", "--global-batch-size", "8",
                "--workers", "0"]
    else:
        argv = ["--model", "S-B/16", "--data", "synthetic", "--image-size", "256", "--global-batch-size", "32",
                "--workers", "8"]
    steps = S.bf16_steps
    argv += ["--stage", "1", "--lpips-weight", "1", "--steps", str(steps), "--log-every", str(steps // 4),
             "--ckpt-every", str(steps)]
    logged, speed = {}, {}
    for precision in ("fp32", "bf16"):
        free_memory()  # each run's peak its own
        out = os.path.join(tmp, f"bf16_check_{precision}")
        with open(out + ".log", "w") as log, contextlib.redirect_stdout(log), substitute_lpips():
            train_ae.main(train_ae.parse_args(argv + ["--precision", precision, "--ckpt", out + ".pt",
                                                      "--out-dir", out]))
        logged[precision] = read_jsonl(os.path.join(out, "metrics.jsonl"))
        speed[precision] = logged[precision][-1]
        os.remove(out + ".pt")  # 1 GB at full size
    fp32, bf16 = ([m["loss"] for m in logged[p]] for p in ("fp32", "bf16"))
    diff = max(abs(a - b) / abs(a) for a, b in zip(fp32, bf16))
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    size = f"train_ae.py {flag('--model')} b{flag('--global-batch-size')} {steps} steps"
    note = "; ".join(f"{p}: {s.get('img_per_s', 0):.0f} img/s" + (f", {s['mem_gb']:.1f} GiB" if "mem_gb" in s else "")
                     for p, s in speed.items()) + f" (the loop, loader included); {lpips_kind()}"
    if not cuda():
        note += "; bf16 is CPU autocast here (the check's opt-in; the trainers run fp32 on a CPU)"
    table.set("bf16 vs fp32 stage 1", "PASS" if diff <= TOL["bf16_loss"] else "FAIL",
              f"max rel Δ loss {diff:.1e} over {len(fp32)} logged intervals (last {fp32[-1]:.4f} / {bf16[-1]:.4f})",
              size, f"≤ {TOL['bf16_loss']:.0e}", note, loss_rel=diff)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def check_compile(table, name, grad_ckpt):
    """Compiled against eager from the same weights, batch and noise: the first step's outputs (the tokenizer's x_hat
    and D's logits, or the DiT's output), its gradient norm and every loss term train_step returns (absolute below 1);
    and no new dynamo graph after the warm-up steps (a recompilation there is an error)."""
    row = f"compile {name}" + (" grad-ckpt" if grad_ckpt else "")
    eager, comp = train_result(name, False, grad_ckpt)["first"], train_result(name, True, grad_ckpt)
    outputs = [k for k in ("out", "disc") if k in eager]
    errs = {k: rel(comp["first"][k], eager[k], 1e-30 if k in outputs or k == "grad_norm" else 1.0) for k in eager}
    terms = {k: v for k, v in errs.items() if k not in outputs and k != "grad_norm"}
    ok = (all(errs[k] <= TOL["compile_out"] for k in outputs) and errs["grad_norm"] <= TOL["compile_grad"]
          and all(v <= TOL["compile_out"] for v in terms.values()) and comp["graphs_after"] == 0)
    worst = max(terms, key=terms.get)
    result = (", ".join(f"{k} Δ {errs[k]:.1e}" for k in outputs) + f", |grad| Δ {errs['grad_norm']:.1e}, terms ≤ "
              f"{terms[worst]:.1e} ({worst}); graphs {comp['graphs_warmup']} in warm-up, {comp['graphs_after']} after")
    note = f"backend {S.backend}, {comp['graph_breaks']} graph breaks, {1e3 * comp['step_s']:.0f} ms/step compiled"
    if cuda():
        note += f", peak {comp['peak_gib']:.1f} GiB"
    if runtime.precision_used(S.device, "bf16") == "bf16":
        note += ", bf16 autocast" + ("" if cuda() else " on the CPU")
    if comp["graphs_warmup"] > (3 if S.configs[name].get("stage") == 2 else 1):
        note += "; TORCH_LOGS=recompiles says why warm-up compiled more than once"
    table.set(row, "PASS" if ok else "FAIL", result, size_of(S.configs[name]),
              f"≤ {TOL['compile_out']:.0e} / {TOL['compile_grad']:.0e}, 0 after", note, comp["compile_s"],
              **{f"{k}_rel": v for k, v in errs.items()}, graphs_warmup=comp["graphs_warmup"],
              graphs_after=comp["graphs_after"], graph_breaks=comp["graph_breaks"])


def memory_run(name, compiled, grad_ckpt):
    """A run's (peak allocated, peak reserved) GiB under the CARD_GIB cap, or None where it ran out of memory."""
    try:
        r = train_result(name, compiled, grad_ckpt)
    except torch.cuda.OutOfMemoryError:
        return None
    return r["peak_gib"], r["reserved_gib"], r["compile_s"]


def check_memory(table, name):
    """The paper's per-GPU batch in an 80 GB card, eager and compiled (the process is capped at CARD_GIB, so out of
    memory is "does not fit"); where a mode does not fit, again with --grad-ckpt."""
    row, cfg = f"memory {name}", S.configs[name]
    if not cuda():
        table.set(row, "SKIPPED", size=size_of(cfg), note="no CUDA")
        return
    parts, fits, compile_s = [], True, 0.0
    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"
        plain = memory_run(name, compiled, False)
        ckpt = memory_run(name, compiled, True) if plain is None else None
        if plain is not None:
            parts.append(f"{mode} {plain[0]:.1f} GiB (reserved {plain[1]:.1f})")
        elif ckpt is not None:
            parts.append(f"{mode} needs --grad-ckpt: {ckpt[0]:.1f} GiB (reserved {ckpt[1]:.1f})")
        else:
            parts.append(f"{mode} does not fit, even with --grad-ckpt")
            fits = False
        compile_s += (plain or ckpt or (0, 0, 0))[2] or 0.0
    table.set(row, "PASS" if fits else "FAIL", "; ".join(parts), size_of(cfg),
              f"fits {CARD_GIB:.0f} GiB (an 80 GB card)", f"peak allocated (train_ae.py's mem_gb); {lpips_kind()}"
              if cfg["kind"] == "ae" else "peak allocated; cached latents", compile_s or None, fits=fits)


def launch(argv, env, log, timeout):
    """Run a command in its own process group, output to `log`; at the timeout (or the time limit's alarm) the whole
    group is killed, torchrun's workers with it. Returns the exit status, None after a timeout."""
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def check_torchrun(table, tmp):
    """torchrun with 2 ranks on the one GPU (DDP, the per-rank RNG gather, the logged means' all-reduce and the
    multi-rank finite check, over gloo: NCCL refuses two ranks on one device) runs train_ae.py stage 1, stage 2 and
    train_dit.py for 6 steps with checkpoints every 2, twice in separate processes; a third run of each is SIGKILLed
    right after its checkpoint at step 4 is renamed into place and resumed by the next launch. The resumed run must end
    where the uninterrupted one does: ||w_resumed - w_full|| within 5% of how far steps 5 and 6 moved the weights, or
    twice the distance between the two uninterrupted runs where CUDA's nondeterminism makes that larger (a resume that
    loses the optimizer, RNG, schedule or data position is off by about 100%)."""
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
    killed, group_ok = {}, []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "4", "VITOK_BACKEND": "gloo"}
    for n, (jobs, kill_ckpt) in enumerate(launches):
        spec, log = p(f"launch{n}.json"), p(f"launch{n}.log")
        with open(spec, "w") as f:
            json.dump(jobs, f)
        rc = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     os.path.abspath(__file__), "--worker", spec], env, log, min(TORCHRUN_TIMEOUT, seconds_left()))
        text = open(log).read()
        if rc is None:
            raise TimeoutError(f"torchrun launch {n} ran past {TORCHRUN_TIMEOUT} s (log {log})")
        group_ok.append(text.count("all_reduce ok") == 2)
        if kill_ckpt:  # the checkpoint the kill left, before the next launch resumes from it and overwrites it
            killed[kill_ckpt] = (rc, runtime.read_checkpoint(p(kill_ckpt))
                                 if os.path.exists(p(kill_ckpt)) else None)
        elif rc:
            raise RuntimeError(f"torchrun launch {n} exited {rc}: {text.strip().splitlines()[-1:]} (log {log})")

    def flat(state):
        return torch.cat([v.float().flatten() for v in state["model"].values()])

    for row, (full, repeat, resumed) in zip(rows, [("a1.pt", "a1r.pt", "k1.pt"), ("a2.pt", "a2r.pt", "k2.pt"),
                                                   ("d.pt", "dr.pt", "kd.pt")]):
        rc, at_kill = killed[resumed]
        step = at_kill["step"] if at_kill else None
        w, r, w2 = (runtime.read_checkpoint(p(name)) for name in (full, resumed, repeat))
        moved = (flat(w) - flat(at_kill)).norm().item() if at_kill else math.nan  # steps 5 and 6 of the full run
        off, repeat_off = ((flat(other) - flat(w)).norm().item() / moved for other in (r, w2))
        tol = max(TOL["resume"], 2 * repeat_off)  # the measured spread of two uninterrupted bf16 runs
        judged = tol < 0.5  # beyond that, a lost state (off by about 1) would hide in the noise
        ok = rc != 0 and step == 4 and r["step"] == 6 and off <= tol and judged and all(group_ok)
        table.set(row, "PASS" if ok else "FAIL", f"killed at step {step} (exit {rc}), resumed to {r['step']}: off by "
                  f"{off:.1e} of steps 5-6 (a second full run: {repeat_off:.1e})", "tiny preset, bf16, b8, 2 ranks",
                  f"≤ {tol:.0e}" + ("" if judged else ": runs too nondeterministic to judge"),
                  f"gloo all_reduce of a CUDA tensor over 2 ranks: {all(group_ok)}; logs in {tmp}",
                  off=off, repeat_off=repeat_off, tol=tol, killed_step=step)


def worker(spec_path):
    """Under torchrun: join the group as the trainers do (runtime.setup_distributed, gloo by $VITOK_BACKEND) and
    all-reduce a device tensor once, then run the jobs in order; a job with kill_at SIGKILLs this process right after
    its kill_at-th checkpoint is renamed into place (atomic writes; rank 0 writes them)."""
    import torch.distributed as dist
    _, world, device = runtime.setup_distributed()
    ones = torch.ones(1, device=device)
    dist.all_reduce(ones)
    print(f"{dist.get_backend()} all_reduce {'ok' if ones.item() == world else 'WRONG'} on {device}", flush=True)
    # One group for all the jobs: the trainers' run.finish() destroys it, and a destroyed group does not join again
    # under torchrun's store.
    runtime.cleanup_distributed = dist.barrier
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
    dist.destroy_process_group()


# ---- Measurements ----
def speed_row(table, name, compiled):
    """Images (clips) per second per GPU, ms/step, peak GiB and MFU of the trainer's step. The targets (stage-1 S-B/16
    images/s, DiT-L MFU) are judged on the compiled step on CUDA at the paper's sizes; elsewhere the row says RAN."""
    row = f"speed {name} {'compiled' if compiled else 'eager'}"
    cfg = S.configs[name]
    try:
        flops = train_result(name)["flops"]  # FLOPs counted in the eager run
        r = train_result(name, compiled)
    except torch.cuda.OutOfMemoryError:
        table.set(row, "FAIL", size=size_of(cfg), note=f"out of memory within {CARD_GIB:.0f} GiB (an 80 GB card): "
                                                       "see the memory row")
        return
    rate, util = cfg["batch"] / r["step_s"], mfu(flops, r["step_s"])
    unit = "clips" if cfg["kind"] == "ae" and cfg["frames"] > 1 else "img"
    result = f"{rate:,.1f} {unit}/s, {1e3 * r['step_s']:.0f} ms/step"
    result += f", {r['peak_gib']:.1f} GiB" if cuda() else ""
    result += f", MFU {util:.0%}" if util is not None else ""
    status, target, met = "RAN", "", None
    if compiled and name == "stage 1 S-B/16":
        target, met = f"≥ {TARGET_IMG_S:,} img/s", rate >= TARGET_IMG_S
    elif compiled and name == "DiT-L":
        target, met = f"≥ {TARGET_MFU:.0%} MFU", util >= TARGET_MFU if util is not None else None
    if target and cuda() and not S.tiny and met is not None:
        status = "PASS" if met else "MISSED"
    elif target:
        target += ": not judged " + ("at tiny sizes" if S.tiny else "(no peak known for this GPU)")
    note = f"{flops / 1e12:.2f} TFLOP/step" if flops > 1e11 else f"{flops / 1e9:.3f} GFLOP/step"
    note += " (FlopCounterMode, eager)"
    note += f", peak {peak_tflops():.0f} TFLOP/s bf16 dense" if util is not None else ""
    note += f", backend {S.backend}, {r['graphs_after']} graphs after warm-up" if compiled else ""
    note += f"; {lpips_kind()}" if cfg["kind"] == "ae" else "; cached latents"
    table.set(row, status, result, size_of(cfg), target, note, r["compile_s"], per_s=rate, step_ms=1e3 * r["step_s"],
              peak_gib=r.get("peak_gib"), mfu=util, flops_per_step=flops)


def encode_row(table, compiled):
    """Encoding for the latent cache as train_dit.write_latent_cache does it: a batch of 64 and its mirror images in
    one call, posterior moments to the host."""
    row = f"speed encode S-B/16 {'compiled' if compiled else 'eager'}"
    cfg, B = S.configs["stage 1 S-B/16"], S.encode_batch
    torch._dynamo.reset()
    torch.manual_seed(0)
    ae = trim_model(vitok.from_name(cfg["model"], channels=16)).to(S.device).eval()
    encode = compile_(ae.encode) if compiled else ae.encode
    x = batch_for(cfg, B)

    @torch.no_grad()
    def step():
        with runtime.autocast(S.device, "bf16"):
            posterior = encode(torch.cat([x, x.flip(-1)]))
        return torch.cat([posterior.mean, posterior.logvar], -1).float().cpu()  # [2B,L,2c]

    seconds, compile_s = timed(step, S.compiled_warmup if compiled else S.warmup, S.iters)
    table.set(row, "RAN", f"{B / seconds:,.1f} img/s, {1e3 * seconds:.0f} ms/batch", size_of(cfg, B),
              note=f"image and mirror, moments copied to the host{', backend ' + S.backend if compiled else ''}",
              compile_s=compile_s if compiled else None, per_s=B / seconds)
    torch._dynamo.reset()


def sample_row(table, compiled):
    """dit.sample: DiT-L, 250 DDIM steps (10 in tiny mode), CFG 1.5 (a doubled batch), then the tokenizer's decoder,
    at evaluate.py's batch of 32; and the hours 50,000 samples take on 8 GPUs."""
    row = f"speed sample DiT-L {'compiled' if compiled else 'eager'}"
    cfg, ae_cfg, B = S.configs["DiT-L"], S.configs["stage 1 S-B/16"], S.sample_batch
    torch._dynamo.reset()
    model = new_dit(cfg).eval()
    ae = trim_model(vitok.from_name(ae_cfg["model"], channels=16)).to(S.device).eval()
    fwd = compile_(model) if compiled else model
    z = torch.randn(B, math.prod(cfg["grid"]), 16, device=S.device)
    y = torch.randint(0, cfg["classes"], (B,), device=S.device)

    @torch.no_grad()
    def generate(steps):
        with runtime.autocast(S.device, "bf16"):
            latents = dit.sample(fwd, z, y, steps=steps, cfg_scale=1.5)
            return ae.decode(latents, (ae_cfg["size"], ae_cfg["size"]))

    start = time.perf_counter()
    generate(2)  # warm-up (compilation)
    sync()
    warm = time.perf_counter() - start
    seconds, _ = timed(lambda: generate(S.sample_steps), 0, 1)
    rate = B / seconds
    hours = 50_000 / (rate * 8) / 3600
    note = f"{S.sample_steps} DDIM steps, CFG 1.5, decode included" + (f", backend {S.backend}" if compiled else "")
    table.set(row, "RAN", f"{rate:,.2f} img/s; 50,000 samples on 8 GPUs: {hours:.2f} h", size_of(cfg, B), note=note,
              compile_s=max(0.0, warm - seconds * 2 / S.sample_steps) if compiled else None, per_s=rate,
              hours_50k_8gpu=hours)
    torch._dynamo.reset()


# ---- The data loader (CPU): ImageNet-like JPEGs and UCF-101-like videos written here, decoded by data.build_dataset
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
    targets need; against the reference of decoding every frame of the file to keep 16 (the loader before it stopped
    early)."""
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
        seconds = timed(lambda: [ds[(i, i)] for i in range(len(ds))], 0, 1)[0] / len(ds)
    workers = math.ceil(TARGET_IMG_S * seconds)
    table.set("loader images", "RAN", f"{1 / seconds:,.0f} img/s per worker",
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
        clip = timed(lambda: [ds[k] for k in keys], 0, 1)[0] / len(keys)
        whole = timed(lambda: [whole_file_clip(ds, *k) for k in keys], 0, 1)[0] / len(keys)
    size = f"320x240 25 fps 7 s AVI -> 16x128², stride {ds.stride}"
    target = lambda s: f"{TARGET_CLIPS_S} clips/s/GPU: {math.ceil(TARGET_CLIPS_S * s)} workers"  # noqa: E731
    table.set("loader video", "RAN", f"{1 / clip:,.1f} clips/s per worker ({whole / clip:.2f}x the reference)", size,
              target(clip), "target: the stage-1 target's tokens/s at 1,024 tokens per clip; one thread",
              per_worker=1 / clip, gain=whole / clip, workers_needed=math.ceil(TARGET_CLIPS_S * clip))
    table.set("loader video whole-file decode", "RAN", f"{1 / whole:,.1f} clips/s per worker", size, target(whole),
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


# ---- Main ----
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the table here (rewritten after every row)")
    p.add_argument("--keep-done", action="store_true", help="keep the rows of an earlier --json file that ran (not "
                                                            "SKIPPED) and run only the others")
    p.add_argument("--tiny", action="store_true", help="tiny sizes and a short loader run (the test suite's); "
                                                       "without CUDA the sizes are tiny anyway, the loader rows full")
    p.add_argument("--only", help="comma-separated substrings: run only the rows whose names contain one")
    p.add_argument("--time-limit", type=float, help="wall-clock seconds for the whole run: a task whose estimate does "
                                                    "not fit is SKIPPED, one that overruns is stopped (default 540 on "
                                                    "CUDA, none in tiny mode)")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; in tiny mode eager: dynamo "
                                             "traces, guards and counts graphs as for inductor, without codegen)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (default: from its name)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: a torchrun worker of the resume check
    return p.parse_args(argv)


def configure(args):
    """The run's settings in S; on CUDA the process becomes an 80 GB card (CARD_GIB); in tiny mode on a CPU, bf16
    autocast runs on the CPU (runtime.CPU_BF16). Returns the table's header."""
    _, _, device = runtime.setup_distributed()  # the scripts' own setup: the GPU, TF32 and cuDNN autotuning on CUDA
    tiny = args.tiny or device.type != "cuda"
    S.__dict__.update(device=device, tiny=tiny, configs=TINY if tiny else FULL, t0=time.time(),
                      backend=args.compile_backend or ("eager" if tiny else "inductor"),
                      time_limit=args.time_limit if args.time_limit is not None else (0 if tiny else 540),
                      peak_tflops=args.peak_tflops, **KNOBS[tiny])
    S.jpegs, S.clips = KNOBS[args.tiny]["jpegs"], KNOBS[args.tiny]["clips"]  # the loader is measurable on any CPU
    runtime.CPU_BF16 = device.type == "cpu"
    env = dict(device=torch.cuda.get_device_name() if cuda() else "CPU", torch=torch.__version__,
               cuda_build=torch.version.cuda or "-", date=time.strftime("%Y-%m-%d"), sizes="tiny" if tiny else "paper",
               compile=S.backend, peak_tflops=peak_tflops() or "-", lpips=lpips_kind(),
               time_limit_s=S.time_limit or "-")
    if cuda():
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CARD_GIB * 2 ** 30 / total), device)
        env["memory_cap_gib"] = min(CARD_GIB, total / 2 ** 30)
    return env


def tasks(tmp):
    """(row names, run(table), estimated seconds) in priority order; the compile checks and memory rows of stage 1 and
    DiT-L reuse the speed rows' runs, at no cost."""
    t = []
    add = lambda names, fn, estimate: t.append((names, fn, estimate))  # noqa: E731
    full = lambda key, compiled=None: (  # noqa: E731
        2.0 if S.tiny else TASK_SECONDS[key] if compiled is None else TASK_SECONDS[key][compiled])
    for name, cfg in (("S-B/16", "stage 1 S-B/16"), ("DiT-L", "DiT-L"), ("S-L/16", "stage 1 S-L/16")):
        add([f"attention {name}"], lambda tb, n=name, c=cfg: check_attention(tb, f"attention {n}", S.configs[c]),
            lambda: full("attention"))
    for name in ("stage 1 S-B/16", "DiT-L"):
        for compiled in (False, True):
            add([f"speed {name} {'compiled' if compiled else 'eager'}"],
                lambda tb, n=name, c=compiled: speed_row(tb, n, c),
                lambda n=name, c=compiled: run_seconds(n, False) + (run_seconds(n, True) if c else 0))
        add([f"compile {name}"], lambda tb, n=name: check_compile(tb, n, False),
            lambda n=name: run_seconds(n, False) + run_seconds(n, True))
    add(["bf16 vs fp32 stage 1"], lambda tb: check_bf16(tb, tmp), lambda: full("bf16"))
    memory = lambda name: add([f"memory {name}"], lambda tb: check_memory(tb, name),  # noqa: E731
                              lambda: run_seconds(name, False) + run_seconds(name, True) if cuda() else 0)
    memory("stage 1 S-B/16")
    memory("DiT-L")  # these two reuse the speed rows' runs
    add(["torchrun resume train_ae stage 1", "torchrun resume train_ae stage 2", "torchrun resume train_dit"],
        lambda tb: check_torchrun(tb, tmp), lambda: full("torchrun") if cuda() else 0)
    for name in ("stage 2 S-B/16", "stage 1 S-L/16", "video S-B/4x8"):
        memory(name)
    add(["loader images", "loader video", "loader video whole-file decode"], lambda tb: loader_rows(tb, tmp),
        lambda: full("loader"))
    for name in ("stage 2 S-B/16", "video S-B/4x8", "stage 1 S-L/16", "DiT-XL"):
        add([f"speed {name} eager"], lambda tb, n=name: speed_row(tb, n, False), lambda n=name: run_seconds(n, False))
    add(["speed encode S-B/16 eager"], lambda tb: encode_row(tb, False), lambda: full("encode", False))
    add(["speed sample DiT-L eager"], lambda tb: sample_row(tb, False), lambda: full("sample", False))
    for name in ("stage 2 S-B/16", "video S-B/4x8"):
        add([f"speed {name} compiled"], lambda tb, n=name: speed_row(tb, n, True),
            lambda n=name: run_seconds(n, False) + run_seconds(n, True))
        add([f"compile {name}"], lambda tb, n=name: check_compile(tb, n, False),
            lambda n=name: run_seconds(n, False) + run_seconds(n, True))
    for name in ("stage 1 S-B/16", "DiT-L", "stage 2 S-B/16"):
        add([f"compile {name} grad-ckpt"], lambda tb, n=name: check_compile(tb, n, True),
            lambda n=name: run_seconds(n, False, True) + run_seconds(n, True, True))
    for name in ("stage 1 S-L/16", "DiT-XL"):
        add([f"speed {name} compiled"], lambda tb, n=name: speed_row(tb, n, True),
            lambda n=name: run_seconds(n, False) + run_seconds(n, True))
    add(["speed encode S-B/16 compiled"], lambda tb: encode_row(tb, True), lambda: full("encode", True))
    add(["speed sample DiT-L compiled"], lambda tb: sample_row(tb, True), lambda: full("sample", True))
    return t


def main(args):
    if args.worker:
        return worker(args.worker)
    env = configure(args)
    only = [o.strip() for o in args.only.split(",")] if args.only else []
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    todo = tasks(tmp)
    table = Table([n for names, _, _ in todo for n in names], env, args.json, keep=args.keep_done)
    table.save()
    for names, fn, estimate in todo:
        run_task(table, (names, lambda fn=fn: fn(table), estimate), only)
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
