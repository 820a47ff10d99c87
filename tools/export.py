"""A training checkpoint as a folder to share: config.json + model.safetensors (the Hub's layout; loading it
unpickles nothing).

    python tools/export.py ae.pt ae_vitok/      # a tokenizer: its EMA weights, + latent statistics
    python tools/export.py dit.pt dit_vitok/    # a DiT: its EMA weights, its config naming its tokenizer

Load with vitok.from_pretrained("ae_vitok") (dit.from_pretrained), or pass the folder wherever a checkpoint is taken
(evaluate.py --ckpt, train_dit.py --ae-ckpt); with huggingface_hub installed, from_pretrained("owner/name") downloads
a folder uploaded to the Hub.

A tokenizer's config.json holds `latent_stats`: the mean and standard deviation, per channel and overall, of the
posterior SAMPLES z = mean + std * noise (what train_dit.py trains its DiT on) over every token of --num-images
images (default 1,000) drawn at random (seed 0) from the checkpoint's own data (config["data"], or --data) as
centre crops at its training size (train=False). They tell a user of another generator the latents' scale; the
paper feeds these raw, unscaled latents to its DiT (train_dit.py's --latent-scale 1, whose log shows z_mean and
z_std of the same samples).
"""
import argparse
import os
import sys

import torch
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import dit  # noqa: E402
import runtime  # noqa: E402
import vitok  # noqa: E402

AE_KEYS = ("image_size", "num_frames", "frame_stride", "data")  # from the training config, into config.json
DIT_KEYS = ("ae_model", "ae_ckpt", "latent_scale", "image_size", "num_frames", "frame_stride", "data")


@torch.no_grad()
def latent_stats(model, config, source, num_images, batch_size, workers, seed=0):
    """Mean and std (per channel and overall) of posterior samples over every token of num_images random centre
    crops of `source`, accumulated in float64."""
    dataset = data.build_dataset(source, config["image_size"], config["num_frames"], train=False,
                                 frame_stride=config.get("frame_stride", 3), split_file=config.get("split_file"))
    gen = torch.Generator().manual_seed(seed)
    n = min(num_images, len(dataset))
    chosen = torch.randperm(len(dataset), generator=gen)[:n].sort().values.tolist()
    loader = DataLoader(Subset(dataset, chosen), batch_size=batch_size, num_workers=workers)
    device = next(model.parameters()).device
    count, sums, squares = 0, 0.0, 0.0
    for x, _ in loader:
        posterior = model.encode(x.to(device))
        z = posterior.sample(torch.randn(posterior.mean.shape, generator=gen).to(device))  # [B,L,c]
        z = z.double().flatten(0, 1)  # [B*L, c]
        count, sums, squares = count + len(z), sums + z.sum(0), squares + z.square().sum(0)
    mean, mean_sq = sums / count, squares / count  # [c]
    overall = mean.mean()
    return {"of": "posterior samples (unscaled)", "num_images": n, "data": source,
            "mean": overall.item(), "std": (mean_sq.mean() - overall ** 2).sqrt().item(),
            "channel_mean": mean.tolist(), "channel_std": (mean_sq - mean ** 2).sqrt().tolist()}


def main(args):
    ckpt = runtime.read_checkpoint(args.ckpt)
    config = ckpt["config"]
    keep = {"step": ckpt.get("step")}
    if config["kind"] == "dit":
        model = dit.from_checkpoint(ckpt, name=args.ckpt)
        keep.update({k: config[k] for k in DIT_KEYS if k in config})
    else:
        model = vitok.from_checkpoint(ckpt, name=args.ckpt)
        keep.update({k: config[k] for k in AE_KEYS if k in config})
        if args.num_images > 0:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            source = args.data or config["data"]
            keep["latent_stats"] = latent_stats(model.to(device), config, source, args.num_images,
                                                args.batch_size, args.workers)
            model.cpu()
            print(f"latents of {keep['latent_stats']['num_images']} images of {source}: mean "
                  f"{keep['latent_stats']['mean']:.4f}, std {keep['latent_stats']['std']:.4f}")
    model.save_pretrained(args.folder, **keep)
    print(f"{args.folder}: config.json + model.safetensors ({config['model']}, "
          f"{runtime.weights_key(ckpt)} weights of {args.ckpt} at step {keep['step']})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a checkpoint of train_ae.py or train_dit.py")
    p.add_argument("folder", help="the folder to write (created; its two files replaced)")
    p.add_argument("--num-images", type=int, default=1000,
                   help="tokenizer: images the latent statistics are measured on (0: none) (default: 1000)")
    p.add_argument("--data", help="tokenizer: measure on this source instead of the checkpoint's own data")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--workers", type=int, default=4, help="data loading processes (default: 4)")
    runtime.run_main(main, p.parse_args(), "export.py")
