"""Are a DiT's samples of the class they were asked for? (A measurement, not collected by pytest.)

Trains a small CNN on the synthetic images, checks it on held-out synthetic images, then classifies class-conditional
samples of a train_dit.py checkpoint on synthetic data and prints their accuracy against chance (10%), at each guidance
scale (by default DiT's FID scale 1.5 and the 4 of train_dit.py's grids: guidance is what makes a sample of its class),
and the tokenizer's reference score. The same classifier scores the generation study (tools/gen_proxy.py).

    python train_ae.py --preset tiny && python train_dit.py --preset tiny
    python tools/class_accuracy.py --ckpt dit.pt
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import dit  # noqa: E402
import runtime  # noqa: E402
import vitok  # noqa: E402


def classifier():
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(block(3, 32), block(32, 64), block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, 10))


def accuracy(net, x, y):
    net.eval()
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


def train_classifier(size, steps, seed=0, workers=2):
    """classifier() after `steps` AdamW steps on batches of 64 synthetic training images at size x size, and its
    accuracy on the first 500 held-out (eval) synthetic images."""
    torch.manual_seed(seed)
    train = data.build_dataset("synthetic", size, train=True)
    net = classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    loader = data.infinite_loader(train, 64, seed=seed, num_workers=workers)
    for _ in range(steps):
        x, y = next(loader)
        net.train()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), accuracy(net, *held_out(size))


def held_out(size, n=500):
    """The first n held-out (eval) synthetic images and their labels."""
    dataset = data.build_dataset("synthetic", size)
    xs, ys = zip(*[dataset[i] for i in range(n)])
    return torch.stack(xs), torch.tensor(ys)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default="dit.pt")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--cfg-scale", type=float, nargs="+", default=[1.5, 4.0],
                   help="guidance scales, each on the same noise (1.5: DiT's FID scale; 4: train_dit.py's grids)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta (1: evaluate.py's default, the official code's)")
    p.add_argument("--train-steps", type=int, default=300, help="classifier steps")
    args = p.parse_args()
    torch.manual_seed(0)
    ckpt = runtime.read_checkpoint(args.ckpt, kind="dit")
    config = ckpt["config"]
    if config["data"] != "synthetic" or config["num_frames"] != 1:
        raise SystemExit(f"{args.ckpt} was not trained on synthetic images")
    size = config["image_size"]

    start = time.time()
    net, real_acc = train_classifier(size, args.train_steps)
    print(f"classifier: {real_acc:.1%} on 500 held-out synthetic images ({time.time() - start:.0f}s)")

    ae = vitok.from_checkpoint(config["ae_ckpt"])
    # The tokenizer's reference: the same classifier on its reconstructions of held-out images (the
    # posterior mean): what the decoder makes of real shapes. Strongly guided samples can score higher
    # (they are typical of their class); unguided ones rarely do.
    xs, ys = held_out(size)
    with torch.no_grad():
        recon = ae(xs)[0].clamp(-1, 1)
    print(f"reconstructions: {accuracy(net, recon, ys):.1%} of the 500 held-out images classified as their "
          f"class after {config['ae_ckpt']} (the tokenizer's reference)")
    model = dit.from_checkpoint(ckpt, name=args.ckpt)
    y = torch.arange(10).repeat_interleave(args.per_class)
    L = config["grid"][0] * config["grid"][1] * config["grid"][2]
    z = torch.randn(len(y), L, config["channels"], generator=torch.Generator().manual_seed(1))
    for cfg_scale in args.cfg_scale:
        torch.manual_seed(0)  # the same noise (z and eta's draws) at every scale
        with torch.no_grad():
            latents = dit.sample(model, z, y, steps=args.sample_steps, cfg_scale=cfg_scale, eta=args.eta, progress=True)
            samples = ae.decode(latents / config["latent_scale"], (size, size)).clamp(-1, 1)
        print(f"samples: {accuracy(net, samples, y):.1%} of {len(y)} class-conditional samples classified as their "
              f"class (chance 10%; cfg {cfg_scale}, {args.sample_steps} DDIM steps, eta {args.eta}, {args.ckpt} at "
              f"step {ckpt['step']})")


if __name__ == "__main__":
    main()
