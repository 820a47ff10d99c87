"""Generation vs E (Finding 2, Fig. 5) in miniature, scored without downloaded weights.

Each DiT (train_dit.py on one tokenizer of a sweep, on the synthetic shapes) draws --num-samples class-balanced
samples through evaluate.py's generator path (its seeds and sampler; gFID and gIS too when the FID Inception file is
present, with no download attempt). Two proxies score them with the small CNN of tools/class_accuracy.py, trained
on the synthetic shapes:

  class accuracy  the share of samples that the classifier names as the class they were drawn for (chance 10%);
  classifier FD   the Frechet distance between the classifier's 64-d pooled features of the samples and those of
                  --num-ref held-out synthetic images. A proxy, not FID: another network and feature space, so its
                  numbers compare with each other only, never with a published FID.

Prints a table against each tokenizer's p, c and E, writes it as JSON, and plots Fig. 5 (each score against E, one
line per patch size; matplotlib optional). At full size the same command, under torchrun, draws the samples of
DiTs trained on a dataset folder and scores them by gFID/gIS against --ref (the proxies need the synthetic shapes).

    python tools/gen_proxy.py gen/dit_p8_c4.pt gen/dit_p8_c16.pt ... --json generation.json --plot generation.png
    torchrun --nproc_per_node=8 tools/gen_proxy.py dit_p*_c*.pt --ref VIRTUAL_imagenet256_labeled.npz \
        --num-samples 50000 --sample-steps 250 --json generation.json --plot fig5.png
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import evaluate  # noqa: E402
import features  # noqa: E402
import runtime  # noqa: E402
import sweep  # noqa: E402
from class_accuracy import train_classifier  # noqa: E402

SCORES = {"classifier_fd": "classifier FD (proxy, not FID)", "class_accuracy": "class accuracy of samples",
          "gfid": "gFID"}


@torch.no_grad()
def classify(net, x, batch=250):
    """(logits [N,10], pooled features [N,64]) of images x [N,3,H,W] in [-1,1], float64 numpy."""
    out = [(net[-1](f), f) for f in (net[:-1](x[i:i + batch]) for i in range(0, len(x), batch))]
    return tuple(torch.cat(part).double().numpy() for part in zip(*out))


def class_accuracy(logits, labels):
    """The share of rows whose largest logit is their label."""
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def classifier_fd(a, b):
    """The Frechet distance between Gaussians fitted to feature rows a [N,D] and b [M,D] (evaluate.py's
    frechet_distance, as FID's, in the classifier's feature space)."""
    return evaluate.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def synthetic(config):
    """Whether a DiT's images are the synthetic shapes, the only images the classifier knows."""
    return config["data"] == "synthetic" and config["num_frames"] == 1


def score(path, classifier, args, rank, world, device):
    """One DiT's row (rank 0; None elsewhere): its tokenizer's bottleneck (sweep.sweep_point), gFID/gIS when the
    Inception file is present (against --ref, or held-out synthetic images), and for a DiT of the synthetic shapes
    the two proxies of its class-balanced samples (sample i of class i mod 10)."""
    ckpt = runtime.read_checkpoint(path, kind="dit")
    config = ckpt["config"]
    samples = os.path.splitext(path)[0] + "_samples.npz"
    flags = ["--num-samples", args.num_samples, "--sample-steps", args.sample_steps, "--cfg-scale", args.cfg_scale,
             "--inception-weights", args.inception_weights, "--samples", samples, "--batch-size", args.batch_size,
             "--workers", args.workers, "--seed", args.seed, "--balanced-labels"]
    flags += ["--ref", args.ref] if args.ref else ["--num-ref", args.num_ref]
    opts = {**vars(evaluate.parse_args([str(f) for f in flags])), "precision": "fp32"}
    source = "synthetic" if synthetic(config) and not args.ref else None
    results, n, _, _ = evaluate.evaluate_generator(ckpt, path, source, opts, rank, world, device)
    if rank != 0:
        return None
    if classifier:
        net, ref = classifier
        with np.load(samples) as f:  # uint8 NHWC, as the ADM evaluator reads
            x = torch.from_numpy(f["arr_0"]).movedim(-1, 1).float() / 127.5 - 1
        logits, feats = classify(net, x)
        results.update(class_accuracy=class_accuracy(logits, np.arange(n) % config["num_classes"]),
                       classifier_fd=classifier_fd(feats, ref))
    bottleneck = dict(model=config["ae_model"], channels=config["channels"], num_frames=config["num_frames"])
    return dict(sweep.sweep_point(path, bottleneck, ckpt.get("step"), config["image_size"], config["data"],
                                  results, n), dit=config["model"], ae_ckpt=config["ae_ckpt"])


def plot_generation(path, rows):
    """Fig. 5: each score against E (log axis), one line per patch size. Without matplotlib: a message, False."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"plot skipped: {path} needs matplotlib (pip install matplotlib); the table above has the numbers")
        return False
    scores = [s for s in SCORES if any(s in row for row in rows)]
    fig = Figure(figsize=(4.2 * len(scores), 3.6), layout="constrained")
    for ax, s in zip(fig.subplots(1, len(scores), squeeze=False)[0], scores):
        for k, p in enumerate(sorted({row["p"] for row in rows})):
            mine = sorted((row["E"], row[s]) for row in rows if row["p"] == p and s in row)
            if mine:
                ax.plot(*zip(*mine), marker="osD^vP*Xh<>"[k % 11], label=f"p={p}")
        sweep.axes(ax, SCORES[s])
    fig.savefig(path, dpi=120)
    return True


def cell(row, key, fmt, width):
    """row[key] in fmt, or "-" where it was not computed, right-aligned in width."""
    return f"{row[key]:>{width}{fmt}}" if key in row else f"{'-':>{width}}"


def main(args):
    rank, world, device = runtime.setup_distributed()
    configs = [runtime.read_checkpoint(path, kind="dit")["config"] for path in args.ckpt]  # all checked first
    classifiers, accuracy, rows = {}, {}, []
    for path, config in zip(args.ckpt, configs):
        size = config["image_size"]
        if rank == 0 and synthetic(config) and size not in classifiers:  # once per resolution: the classifier
            start = time.time()                                           # and the reference's features
            net, accuracy[size] = train_classifier(size, args.train_steps, workers=args.workers)
            held_out = data.build_dataset("synthetic", size)
            x = torch.stack([held_out[i][0] for i in range(args.num_ref)])
            classifiers[size] = net, classify(net, x)[1]
            print(f"classifier at {size}x{size}: {accuracy[size]:.1%} on 500 held-out synthetic images; features "
                  f"of {args.num_ref} more ({time.time() - start:.0f}s)", flush=True)
        rows.append(score(path, classifiers.get(size) if synthetic(config) else None, args, rank, world, device))
    if rank != 0:
        return runtime.cleanup_distributed()
    print(f"\n{'DiT checkpoint':<28}{'tokenizer':>10}{'p':>4}{'c':>5}{'E':>7}{'class acc':>11}{'classifier FD':>15}"
          f"{'gFID':>9}")
    for row in sorted(rows, key=lambda row: (row["p"], row["E"])):
        print(f"{os.path.basename(row['ckpt'])[-28:]:<28}{row['model']:>10}{row['p']:>4}{row['c']:>5}{row['E']:>7}"
              f"{cell(row, 'class_accuracy', '.1%', 11)}{cell(row, 'classifier_fd', '.3f', 15)}"
              f"{cell(row, 'gfid', '.2f', 9)}")
    protocol = dict(classifier_steps=args.train_steps, classifier_accuracy=accuracy, num_ref=args.num_ref,
                    ref=args.ref or "held-out synthetic images", sample_steps=args.sample_steps,
                    cfg_scale=args.cfg_scale, labels="balanced",
                    note="classifier FD is a proxy in a small CNN's feature space, not FID")
    if args.plot and plot_generation(args.plot, rows):
        print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(points=rows, protocol=protocol), f, indent=2)
        print(f"json: {args.json}")
    runtime.cleanup_distributed()
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", nargs="+", help="train_dit.py checkpoints on synthetic images (one per tokenizer)")
    p.add_argument("--num-samples", type=int, default=500, help="class-balanced samples per DiT")
    p.add_argument("--num-ref", type=int, default=1000, help="held-out synthetic images: the FDs' reference")
    p.add_argument("--ref", help="gFID's reference statistics .npz (e.g. ADM's VIRTUAL_imagenet256_labeled.npz); "
                   "default for the synthetic shapes: --num-ref held-out images")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance (the paper's 1.5)")
    p.add_argument("--train-steps", type=int, default=300, help="classifier steps (batches of 64)")
    p.add_argument("--inception-weights", default=os.path.join(torch.hub.get_dir(), "checkpoints", features.FID_FILE),
                   help="gFID/gIS when this file exists (default: the torch hub cache; never downloaded)")
    p.add_argument("--batch-size", type=int, default=100, help="samples per DiT batch")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples' noise")
    p.add_argument("--json", help="the rows and the protocol as JSON")
    p.add_argument("--plot", metavar="PNG", help="Fig. 5's plot (needs matplotlib)")
    return p.parse_args(argv)


if __name__ == "__main__":
    runtime.run_main(main, parse_args(), "gen_proxy.py")
