"""The scaling study (§4.1, Figs. 3-4), apart from evaluate.py's metrics: tokenizers of different
patch size p and channels c, evaluated by `evaluate.py --sweep` (this module never reads a
checkpoint), tabulated, fitted against log E and plotted.
"""
import json
import os

import numpy as np
import torch

import vitok

# Fitted and plotted where computed (axis labels); baseline_psnr (bilinear) is only tabulated.
SWEEP_METRICS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "rfid": "rFID",
                 "rfvd": "rFVD"}
LOG_Y = {"rfid", "rfvd"}  # fitted and plotted in log, as Figs. 2 and 11


def sweep_point(path, config, step, size, source, results, n):
    """A table row: the bottleneck of `config`'s tokenizer at `size` (patch p, tubelet q, channels
    c, tokens L, E = L*c floats) and its metrics on `source`."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = vitok.from_name(config["model"], channels=config["channels"])
    t, h, w = model.grid((config["num_frames"], size, size))
    return dict(ckpt=path, model=config["model"], p=model.patch_size, q=model.tubelet_size,
                c=model.channels, L=t * h * w, E=t * h * w * model.channels, image_size=size,
                num_frames=config["num_frames"], step=step, data=source, num_samples=n, **results)


def fit_log_e(E, y):
    """Least squares y = intercept + slope * log2(E) (slope per doubling of E) and R^2 (None for
    a constant y). Fig. 3's claim: R^2 is high whatever the split of E into L and c."""
    x, y = np.log2(np.asarray(E, dtype=np.float64)), np.asarray(y, dtype=np.float64)
    (intercept, slope), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), y, rcond=None)
    ss_res = float(((y - intercept - slope * x) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return dict(slope=float(slope), intercept=float(intercept),
                r2=1 - ss_res / ss_tot if ss_tot > 0 else None, n=len(x))


def resolution(T, size):
    """A group's label: "256" for images, "16x128" for clips."""
    return f"{size}" if T == 1 else f"{T}x{size}"


def sweep_fits(points):
    """Each metric's (LOG_Y: its natural log's) fit on log2 E over the points having it; keyed
    "psnr@512" per resolution if there are several (Fig. 4: 256p and 512p), else "psnr"."""
    groups = {}
    for pt in points:
        groups.setdefault((pt["num_frames"], pt["image_size"]), []).append(pt)
    fits = {}
    for (T, size), group in sorted(groups.items()):
        suffix = "" if len(groups) == 1 else "@" + resolution(T, size)
        for metric in SWEEP_METRICS:
            log = metric in LOG_Y
            have = [pt for pt in group
                    if pt.get(metric) is not None and (pt[metric] > 0 or not log)]
            if len({pt["E"] for pt in have}) < 2:
                continue  # a line needs two distinct E
            y = np.array([pt[metric] for pt in have])
            y = np.log(y) if log else y
            fits[metric + suffix] = dict(fit_log_e([pt["E"] for pt in have], y), log_y=log)
    return fits


def sweep_spreads(points):
    """Fig. 3's other half: equal E split differently (p, c; they fix q given E and the frames)
    should score alike. Per resolution and E with several splits: the splits, each metric's spread
    (max - min) over them, a split's checkpoints (seeds) averaged."""
    groups = {}  # (frames, size, E) -> (p, c) -> points
    for pt in points:
        key = (pt["num_frames"], pt["image_size"], pt["E"])
        groups.setdefault(key, {}).setdefault((pt["p"], pt["c"]), []).append(pt)
    spreads = []
    for (T, size, E), splits in sorted(groups.items()):
        if len(splits) < 2:
            continue
        row = dict(num_frames=T, image_size=size, E=E, splits=[list(split) for split in splits])
        for metric in SWEEP_METRICS:  # not baseline_psnr: the bilinear codec depends on E alone
            values = [[pt[metric] for pt in pts if pt.get(metric) is not None]
                      for pts in splits.values()]
            means = [float(np.mean(v)) for v in values if v]
            if len(means) > 1:
                row[metric] = max(means) - min(means)
        spreads.append(row)
    return spreads


def print_sweep(points, fits, spreads):
    metrics = [m for m in (*SWEEP_METRICS, "baseline_psnr") if any(m in pt for pt in points)]
    print(f"\n{'checkpoint':<28}{'model':>10}{'p':>4}{'q':>3}{'c':>5}{'L':>7}{'E':>8}{'size':>6}"
          + "".join(f"{m:>14}" for m in metrics))
    for pt in sorted(points, key=lambda pt: (pt["num_frames"], pt["image_size"], pt["E"], pt["p"])):
        name = os.path.basename(pt["ckpt"])[-28:]
        size = resolution(pt["num_frames"], pt["image_size"])
        values = "".join(f"{pt[m]:>14.4f}" if m in pt else f"{'-':>14}" for m in metrics)
        print(f"{name:<28}{pt['model']:>10}{pt['p']:>4}{pt['q']:>3}{pt['c']:>5}{pt['L']:>7}"
              f"{pt['E']:>8}{size:>6}{values}")
    print(f"\n{'fit: metric = intercept + slope * log2(E)':<44}{'slope':>10}{'intercept':>12}"
          f"{'R^2':>8}{'points':>8}")
    for key, f in fits.items():
        r2 = f"{f['r2']:.3f}" if f["r2"] is not None else "-"
        key = "ln " * f["log_y"] + key
        print(f"{key:<44}{f['slope']:>10.4f}{f['intercept']:>12.4f}{r2:>8}{f['n']:>8}")
    for row in spreads:
        splits = ", ".join(f"p={p} c={c}" for p, c in row["splits"])
        values = " ".join(f"{m} {row[m]:.4f}" for m in SWEEP_METRICS if m in row)
        print(f"equal E = {row['E']} at {resolution(row['num_frames'], row['image_size'])}: "
              f"spread (max - min) {values} over {splits}")


def plot_sweep(path, points, fits):
    """Fig. 3: a panel per metric against E (log axis), a marker per patch size, a colour per
    resolution, the fitted line. Without matplotlib (optional): a message and False."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"plot skipped: {path} needs matplotlib (pip install matplotlib); the table above "
              "has the numbers")
        return False
    metrics = [m for m in SWEEP_METRICS if any(m in pt for pt in points)]
    resolutions = sorted({(pt["num_frames"], pt["image_size"]) for pt in points})
    several = len(resolutions) > 1
    markers = dict(zip(sorted({pt["p"] for pt in points}), "osD^vP*Xh<>"))
    fig = Figure(figsize=(4.2 * len(metrics), 3.6), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for k, (T, size) in enumerate(resolutions):
            res, colour = resolution(T, size), f"C{k % 10}"
            group = [pt for pt in points
                     if (pt["num_frames"], pt["image_size"]) == (T, size) and metric in pt]
            for p, marker in markers.items():
                mine = [pt for pt in group if pt["p"] == p]
                if mine:
                    ax.scatter([pt["E"] for pt in mine], [pt[metric] for pt in mine],
                               marker=marker, color=colour, zorder=3,
                               label=f"p={p}" + (f", {res}p" if several else ""))
            fit = fits.get(metric + (f"@{res}" if several else ""))
            if fit:
                E = np.geomspace(min(pt["E"] for pt in group), max(pt["E"] for pt in group), 50)
                r2 = f"{fit['r2']:.2f}" if fit["r2"] is not None else "-"
                line = fit["intercept"] + fit["slope"] * np.log2(E)
                ax.plot(E, np.exp(line) if fit["log_y"] else line, color=colour,
                        alpha=0.6, label=f"fit{f' {res}p' if several else ''}: R$^2$ {r2}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log" if metric in LOG_Y else "linear")
        ax.set_xlabel("E = L x c (floats in the latent)")
        ax.set_ylabel(SWEEP_METRICS[metric])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    return True


def report(points, plot=None, json_path=None):
    """Rank 0, all points evaluated: the table, fits and spreads; the plot; the JSON."""
    if len({pt["data"] for pt in points}) > 1:
        print("note: the points were evaluated on different data (no --data: each on its "
              "training source)")
    fits, spreads = sweep_fits(points), sweep_spreads(points)
    print_sweep(points, fits, spreads)
    if plot and plot_sweep(plot, points, fits):
        print(f"plot: {plot}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"points": points, "fits": fits, "spreads": spreads}, f, indent=2)
        print(f"json: {json_path}")
    return fits
