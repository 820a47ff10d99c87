"""Throughput of the tokenizer (not collected by pytest): encode+decode and forward+backward images/s.

    python tests/bench_vitok.py                                   # S-B/16 at 256^2 on whatever device there is
    python tests/bench_vitok.py --compile --grad-ckpt --batch 64  # on a GPU: bf16 autocast is on by default
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vitok  # noqa: E402


def timed(fn, iters, device):
    fn()  # warm-up (and compilation)
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="S-B/16")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--num-frames", type=int, default=1)
    p.add_argument("--batch", type=int, default=None, help="default 64 on GPU, 2 on CPU")
    p.add_argument("--iters", type=int, default=None, help="default 20 on GPU, 2 on CPU")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on GPU")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (64 if device.type == "cuda" else 2)
    iters = args.iters or (20 if device.type == "cuda" else 2)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = vitok.from_name(args.model, grad_ckpt=args.grad_ckpt).to(device)
    fwd = torch.compile(model) if args.compile else model
    shape = (batch, 3, args.image_size, args.image_size) if args.num_frames == 1 else \
        (batch, 3, args.num_frames, args.image_size, args.image_size)
    x = torch.randn(shape, device=device).clamp(-1, 1)
    bf16 = device.type == "cuda" and not args.fp32
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16) if device.type == "cuda" \
        else torch.autocast("cpu", enabled=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def inference():
        with torch.no_grad(), amp:
            model.eval()
            fwd(x)

    def train_step():
        model.train()
        with amp:
            x_hat, posterior = fwd(x)
        loss = (x_hat.float() - x).square().mean() + 1e-3 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_inf, t_train = timed(inference, iters, device), timed(train_step, iters, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{args.model} {'x'.join(map(str, shape[2:]))} batch {batch} on {name} "
          f"({'bf16' if bf16 else 'fp32'}{', compile' if args.compile else ''}{', grad-ckpt' if args.grad_ckpt else ''})")
    print(f"  encode+decode:      {batch / t_inf:8.1f} images/s")
    print(f"  forward+backward:   {batch / t_train:8.1f} images/s (with AdamW step)")
    if device.type == "cuda":
        print(f"  peak memory:        {torch.cuda.max_memory_allocated() / 2 ** 30:8.1f} GiB")


if __name__ == "__main__":
    main()
