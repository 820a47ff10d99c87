"""What the three scripts share, so that none imports another: ranks, precision, per-step
randomness, flags, checkpoints (the one reader, the model files' too), EMA, the interval log, a
user's mistake as one line. No trainer's field is named here.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.utils import save_image


class UserError(ValueError):
    """A mistake in what the user passed (a path, a name, a flag, a file): run_main shows it as one
    line and exits 2; any other exception is a bug and keeps its traceback."""


def run_main(main, args, script):
    """main(args); a UserError: `script: error: ...` on rank 0, exit 2."""
    try:
        main(args)
    except UserError as err:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"{script}: error: {err}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other ranks may never reach one
        sys.exit(2)


# ---- Ranks, precision and per-step randomness ----
def setup_distributed():
    """One code path for 1..N ranks: under torchrun (RANK/WORLD_SIZE set) join the group, NCCL on
    GPU and gloo on CPU (or $VITOK_BACKEND: tools/gpu_check.py runs 2 ranks on one GPU over
    gloo); alone, rank 0 of 1. TF32 matmuls on GPU (App. A trains with them).
    -> (rank, world_size, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: LPIPS's and D's convolutions
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        # An hour before a collective times out: rank 0 alone joins sample shards and computes
        # FIDs at the end of an evaluation.
        backend = os.environ.get("VITOK_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=1),
                                device_id=device if backend == "nccl" else None)
    return rank, world, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


THREADS = torch.get_num_threads()  # torch's default: the physical cores
CPU_BF16 = False  # set by tools/gpu_check.py --tiny only: its bf16 tolerances tested on a CPU


def precision_used(device, precision):
    """What autocast runs in: the CPU runs fp32 (but for the GPU check's CPU_BF16)."""
    return precision if device.type == "cuda" or CPU_BF16 else "fp32"


def autocast(device, precision):
    """The one precision context: bf16 autocast on GPU, else fp32 (a null context). The paper
    found bf16 and fp32 tokenizers equally good (App. A)."""
    if precision_used(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def download(url, path):
    """torch.hub's download, with a 30 s timeout for offline nodes."""
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        torch.hub.download_url_to_file(url, path, progress=False)
    finally:
        socket.setdefaulttimeout(timeout)


def step_generator(seed, step, device):
    """The (seed, step) generator of a step's random numbers, drawn for the whole GLOBAL batch;
    rank r takes rows r, r + world, ..., the samples data.infinite_loader gives it. A run is then
    the same for any number of ranks and resumes without replaying streams."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


# ---- Flags ----
def parse_flags(description, defaults, presets, helps, argv=None):
    """argparse over the entries of `defaults` named in `helps`. A help is its text, or (text,
    argparse options) for a flag whose default (None) does not give its type or that has choices.
    Every flag defaults to None, so that merge() can tell an explicit flag from a preset."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets),
                   help="a small named run; explicit flags still win")
    for name, text in helps.items():
        text, options = (text, {}) if isinstance(text, str) else text
        default, flag = defaults[name], "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=None, help=text)
            continue
        options = {"type": str if default is None else type(default), **options}
        shown = "" if default is None else f" (default: {default})"  # None: the help says
        p.add_argument(flag, help=text + shown, **options)
    return p.parse_args(argv)


RUN_HELP = {  # the flags that both trainers have, with one meaning
    "data": "dataset folder, 'synthetic', 'deadleaves' or tar shards ('train-{000..099}.tar')",
    "split_file": "video: a list of the videos to use (UCF-101's trainlist01.txt)",
    "steps": "optimizer steps", "weight_decay": "AdamW weight decay", "ema": "EMA decay",
    "precision": ("bf16 autocast on GPU, or fp32 (the CPU always runs fp32)",
                  dict(choices=["bf16", "fp32"])),
    "workers": "data-loader workers per rank", "seed": "seed of weights, data order and noise",
    "log_every": "steps per log line", "ckpt_every": "steps per checkpoint",
    "sample_every": "steps per grid",
}


def merge(args, defaults, presets, kind):
    """defaults < the preset's entries < explicit flags; `kind` ("ae" or "dit") is the trainer,
    stored in the config and so in every checkpoint."""
    flags = {k: v for k, v in vars(args).items() if v is not None}
    return {**defaults, **presets.get(args.preset, {}), **flags, "kind": kind}


# ---- Checkpoints: config["kind"] says whose ----
KINDS = {"ae": "a tokenizer checkpoint (train_ae.py)", "dit": "a DiT checkpoint (train_dit.py)"}


def save_folder(folder, weights, config):
    """config.json + model.safetensors, as the Hugging Face Hub shares models: no pickle."""
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, f"{folder}/model.safetensors")
    with open(f"{folder}/config.json", "w") as f:
        json.dump(config, f, indent=2)


def read_folder(folder):
    """A save_folder folder as read_checkpoint's dict."""
    with open(f"{folder}/config.json") as f:
        config = json.load(f)
    return {"config": config, "model": load_file(f"{folder}/model.safetensors"),
            "step": config.get("step")}


def hub_folder(path):
    """`path`, or the Hub repository "owner/name" it names, downloaded by huggingface_hub."""
    if os.path.exists(path) or str(path).count("/") != 1:
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{path} is no folder; pip install huggingface_hub to download it from "
                        "the Hub") from None
    return snapshot_download(path, allow_patterns=["config.json", "model.safetensors"])


def read_checkpoint(path, kind=None, mmap=False):
    """The one reader of checkpoints. A plain dict of tensors, numbers and strings, so it loads with
    weights_only (no code is unpickled), on the CPU; mmap reads tensors only when used. A missing,
    unreadable or foreign file, or one of another kind than `kind`, is a UserError naming it."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = read_folder(path) if os.path.isdir(path) else torch.load(
            path, map_location="cpu", weights_only=True, mmap=mmap)
        found = ckpt["config"]["kind"]
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise UserError(f"{path} is not a vitok checkpoint ({' or '.join(KINDS.values())}): "
                        f"{type(err).__name__}") from None
    if found not in KINDS or (kind is not None and found != kind):
        raise UserError(f"{path} is {KINDS.get(found, repr(found))}, not {KINDS[kind]}")
    return ckpt


def weights_key(ckpt):
    """The weights a checkpoint is evaluated with: its EMA when it has one."""
    return "ema" if ckpt.get("ema") is not None else "model"


def load_weights(model, ckpt, name):
    """The checkpoint's weights_key weights into `model`; misfits (a damaged or hand-made file)
    are a UserError naming the file and tensor."""
    weights, ours, config = ckpt[weights_key(ckpt)], model.state_dict(), ckpt["config"]
    for k in sorted(ours.keys() | weights.keys()):
        want, got = ([*d[k].shape] if k in d else None for d in (ours, weights))
        if want != got:
            raise UserError(f"{name}: its weights do not fit the model its config names "
                            f"({config['model']}): {k} is {got} in the file, {want} in the model")
    model.load_state_dict(weights)
    return model.eval()


# ---- The learning rate, EMA and image grids ----
def lr_at(step, total, peak, warmup, final):
    """Linear warmup over the first `warmup` fraction of the steps, then cosine decay to `final`."""
    warmup_steps = max(1, int(warmup * total))
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return final + 0.5 * (peak - final) * (1.0 + math.cos(math.pi * progress))


def set_lr(opt, step, config):
    """Set the lr of `step`: lr_at with the peak config["lr"] given for a global batch of 256 and
    scaled linearly (App. A), down to config["final_lr"] (None: constant). A function of the step
    alone: a resumed run continues it."""
    peak = config["lr"] * config["global_batch_size"] / 256
    final = peak if config["final_lr"] is None else config["final_lr"]
    for group in opt.param_groups:
        group["lr"] = lr_at(step, config["steps"], peak, config["warmup"], final)

def ema_decay(step, decay, warmup):
    """min(decay, (1 + step) / (warmup + step)): the usual warm-up, so that short runs have a
    useful EMA too (README, Differences); warmup 0 turns it off."""
    return decay if warmup <= 0 else min(decay, (1 + step) / (warmup + step))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model over parameters, one fused kernel per dtype and
    device; buffers are copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()],
                         1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def save_grid(path, x, x_hat, max_items=8):
    """A PNG of originals (top row) over reconstructions or samples; a video shows each of two
    clips' frames in a row."""
    if x.dim() == 5:  # [B,3,T,H,W] -> the frames of two clips [2T,3,H,W]
        nrow = x.shape[2]
        x, x_hat = (v[:2].transpose(1, 2).flatten(0, 1) for v in (x, x_hat))
    else:
        nrow = min(max_items, x.shape[0])
        x, x_hat = x[:nrow], x_hat[:nrow]
    save_image(torch.cat([x, x_hat]).float().clamp(-1, 1) * 0.5 + 0.5, path, nrow=nrow, padding=1)


# ---- A training run around its recipe ----
class TrainingRun:
    """Around a recipe: joins the ranks (one code path for 1..N), finds the checkpoint to resume,
    logs a line per interval (the loop's only host sync), stops at the first non-finite loss,
    writes checkpoints atomically with every rank's RNG: a resumed run is the same run."""

    def __init__(self, config):
        self.config = config
        self.rank, self.world, self.device = setup_distributed()
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # A core to each data worker, the rest to the step (README, Speed)
            torch.set_num_threads(max(1, THREADS - config["workers"]))
        gb = config["global_batch_size"]
        if gb % self.world:
            raise UserError(f"--global-batch-size {gb} does not split over {self.world} ranks")
        self.batch = gb // self.world
        ckpt = config["ckpt"]
        self.state = read_checkpoint(ckpt, config["kind"]) if os.path.exists(ckpt) else None
        steps = [self.state["step"] if self.state else -1] * self.world
        if self.world > 1:  # nodes that saw two checkpoints would run two runs
            dist.all_gather_object(steps, steps[0])
        if min(steps) < max(steps):
            raise UserError(f"rank {steps.index(min(steps))} cannot see --ckpt {ckpt}: put it "
                            "on storage every node shares")
        self.start = self.state["step"] if self.state else 0
        self.last_ckpt = ckpt if self.state else None  # named if a loss goes non-finite
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)  # on device
        self.history, self.t0 = [], time.time()
        if self.rank == 0:
            os.makedirs(config["out_dir"], exist_ok=True)
            print("config:", json.dumps(config, sort_keys=True), flush=True)
        torch.manual_seed(config["seed"])  # the same initial weights on every rank and world size

    def print0(self, message):
        if self.rank == 0:
            print(message, flush=True)

    def resume(self, stateful, same):
        """Load every state dict of the checkpoint found at --ckpt (by key) after checking that
        its `same` config entries equal this run's; then each rank draws from its own stream (an
        interrupted run's RNG continues)."""
        if self.state:
            missing = sorted(set(stateful) - set(self.state))
            if missing:
                raise UserError(f"cannot resume {self.config['ckpt']}: it holds no {missing} "
                                f"(written with other options); pass another --ckpt")
            for key in same:
                theirs, ours = self.state["config"].get(key), self.config[key]
                if theirs != ours:
                    raise UserError(f"cannot resume {self.config['ckpt']}: its {key} is "
                                    f"{theirs!r}, this run's is {ours!r}; pass another --ckpt")
            for key, obj in stateful.items():
                obj.load_state_dict(self.state[key])
        torch.manual_seed(self.config["seed"] * self.world + self.rank)
        if self.state and len(self.state["rng"]) == self.world:
            rng = self.state["rng"][self.rank]
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
        self.state = None  # freed: 2-11 GB per rank at full scale

    def compile(self, module):
        return torch.compile(module) if module is not None and self.config["compile"] else module

    def ddp(self, module):
        if module is None or self.world == 1:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=device_ids, broadcast_buffers=False)  # no buffer changes

    def every(self, step, interval):
        """Whether 0-based `step` ends an interval of config[interval] steps, or the run."""
        done = step + 1
        return done % self.config[interval] == 0 or done == self.config["steps"]

    def after_step(self, step, terms, stateful, **scalars):
        """Record the step's loss terms (device tensors: no host sync); at the end of a log interval
        print their means over the interval and the ranks, and at a checkpoint interval write the
        checkpoint. Both first check that no loss so far was non-finite."""
        finite = torch.stack([v.detach().float() for v in terms.values()]).isfinite().all()
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, step, self.first_bad)
        self.history.append({k: v.detach() for k, v in terms.items()})
        if self.every(step, "log_every"):
            self.check_finite()
            self.log(step, scalars)
        if self.every(step, "ckpt_every"):
            self.check_finite()  # never write a poisoned checkpoint
            self.save(step + 1, stateful)

    def log(self, step, scalars):
        names = list(self.history[0])
        means = torch.stack([torch.stack([h[k].float() for k in names])
                             for h in self.history]).mean(0)
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
            line = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            print(f"step {step + 1:>8d} | {line}", flush=True)
            with open(os.path.join(self.config["out_dir"], "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step + 1, **metrics}) + "\n")

    def check_finite(self):
        if self.world > 1:
            dist.all_reduce(self.first_bad, op=dist.ReduceOp.MAX)
        bad = int(self.first_bad.item())
        if bad >= 0:
            raise FloatingPointError(
                f"non-finite loss at step {bad}; no checkpoint written after it. Last finite "
                f"checkpoint: {self.last_ckpt or 'none'}. Lower --lr or check the data, then "
                f"rerun with the same --ckpt to resume.")

    def save(self, done, stateful):
        """Rank 0 writes the state dicts, step, configuration and every rank's RNG to a temporary
        file, then renames it over --ckpt: a crash mid-write leaves the previous one intact."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
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
        self.print0(f"done: {self.config['ckpt']} at step {self.config['steps']}")
        cleanup_distributed()
