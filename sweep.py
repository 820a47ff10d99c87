"""The scaling study (§4.1, Figs. 3-4, 6-7), apart from evaluate.py's metrics: tokenizers of
different patch size p, channels c and encoder/decoder sizes, evaluated by `evaluate.py --sweep`
(this module never reads a checkpoint), tabulated, fitted against log E and plotted.
"""
import itertools
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


def group(pt):
    """(frames, "S-B", size) of a point."""
    name = vitok.ALIASES.get(pt["model"], pt["model"])
    return pt["num_frames"], name.split("/")[0], pt["image_size"]


def suffix(key, keys):
    """"@512" if the points have several resolutions, "@S-L" if several sizes (or both)."""
    res, pair = len({k[::2] for k in keys}) > 1, len({k[1] for k in keys}) > 1
    return f"@{resolution(*key[::2])}" * res + f"@{key[1]}" * pair


def sweep_fits(points):
    """Each metric's (LOG_Y: its natural log's) fit on log2 E over the points having it; keyed
    "psnr@512" per resolution (Fig. 4: 256p and 512p), "psnr@S-L" per sizes (Figs. 6-7) where
    there are several, else "psnr"."""
    groups = {}
    for pt in points:
        groups.setdefault(group(pt), []).append(pt)
    fits = {}
    for key, pts in sorted(groups.items()):
        for metric in SWEEP_METRICS:
            log = metric in LOG_Y
            have = [pt for pt in pts
                    if pt.get(metric) is not None and (pt[metric] > 0 or not log)]
            if len({pt["E"] for pt in have}) < 2:
                continue  # a line needs two distinct E
            y = np.array([pt[metric] for pt in have])
            y = np.log(y) if log else y
            fit = fit_log_e([pt["E"] for pt in have], y)
            fits[metric + suffix(key, groups)] = dict(fit, log_y=log)
    return fits


def sweep_spreads(points):
    """Fig. 3's other half: equal E split differently (p, c, which fix q given E and the frames)
    should score alike. Per resolution and E reached by several splits: the splits and each
    metric's spread (max - min) over them, a split's checkpoints (seeds) averaged."""
    groups = {}  # (frames, sizes, size, E) -> (p, c) -> points
    for pt in points:
        groups.setdefault((*group(pt), pt["E"]), {}).setdefault((pt["p"], pt["c"]), []).append(pt)
    spreads = []
    for (T, pair, size, E), splits in sorted(groups.items()):
        if len(splits) < 2:
            continue
        row = dict(num_frames=T, image_size=size, sizes=pair, E=E, splits=[*map(list, splits)])
        for metric in SWEEP_METRICS:  # not baseline_psnr: the bilinear codec depends on E alone
            values = [[pt[metric] for pt in pts if pt.get(metric) is not None]
                      for pts in splits.values()]
            means = [float(np.mean(v)) for v in values if v]
            if len(means) > 1:
                row[metric] = max(means) - min(means)
        spreads.append(row)
    return spreads


def sweep_sizes(points):
    """Findings 3-4 (Figs. 6-7): at one (resolution, p, c), each metric's change when only the
    encoder or decoder is larger (VIT_SIZES order); seeds averaged, <metric>_seeds their spread."""
    groups, rank, rows = {}, list(vitok.VIT_SIZES).index, []
    for pt in points:
        T, pair, size = group(pt)
        groups.setdefault((T, size, pt["p"], pt["c"], *pair.split("-")), []).append(pt)
    for a, b in itertools.permutations(groups, 2):
        up = [rank(y) - rank(x) for x, y in zip(a[4:], b[4:])]
        if a[:4] != b[:4] or 0 not in up or sum(up) < 1:
            continue  # b is not a with one size larger
        row = dict(zip(("num_frames", "image_size", "p", "c"), a), E=groups[a][0]["E"],
                   encoder=f"{a[4]} -> {b[4]}", decoder=f"{a[5]} -> {b[5]}")
        for m in SWEEP_METRICS:
            v = [[pt[m] for pt in groups[k] if m in pt] for k in (a, b)]
            if all(v):
                row[m] = float(np.mean(v[1]) - np.mean(v[0]))
                if max(map(len, v)) > 1:
                    row[m + "_seeds"] = max(max(x) - min(x) for x in v)
        rows.append(row)
    return rows


def print_sweep(points, fits, spreads, effects):
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
    for row in effects:
        print("one size larger (Findings 3-4): " + ", ".join(
            f"{k} {v if isinstance(v, str) else np.round(v, 4)}" for k, v in row.items()))


def plot_sweep(path, points, fits):
    """Figs. 3, 6-7: a panel per metric against E (log axis), a marker per patch size, a colour
    and fitted line per resolution and sizes. Without matplotlib (optional): a message and
    False."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"plot skipped: {path} needs matplotlib (pip install matplotlib); the table above "
              "has the numbers")
        return False
    metrics = [m for m in SWEEP_METRICS if any(m in pt for pt in points)]
    groups = sorted({group(pt) for pt in points})
    markers = dict(zip(sorted({pt["p"] for pt in points}), "osD^vP*Xh<>"))
    fig = Figure(figsize=(4.2 * len(metrics), 3.6), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for k, key in enumerate(groups):
            name, colour = suffix(key, groups).replace("@", " "), f"C{k % 10}"
            pts = [pt for pt in points if group(pt) == key and metric in pt]
            for p, marker in markers.items():
                mine = [pt for pt in pts if pt["p"] == p]
                if mine:
                    ax.scatter([pt["E"] for pt in mine], [pt[metric] for pt in mine],
                               marker=marker, color=colour, zorder=3, label=f"p={p}{name}")
            fit = fits.get(metric + suffix(key, groups))
            if fit:
                E = np.geomspace(min(pt["E"] for pt in pts), max(pt["E"] for pt in pts), 50)
                r2 = f"{fit['r2']:.2f}" if fit["r2"] is not None else "-"
                line = fit["intercept"] + fit["slope"] * np.log2(E)
                ax.plot(E, np.exp(line) if fit["log_y"] else line, color=colour,
                        alpha=0.6, label=f"fit{name}: R$^2$ {r2}")
        axes(ax, SWEEP_METRICS[metric], metric in LOG_Y)
    fig.savefig(path, dpi=120)
    return True


def axes(ax, label, log_y=False):
    """Every scaling plot's axes."""
    ax.set(yscale="log" if log_y else "linear", ylabel=label, xlabel="E = L x c (latent floats)")
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def report(points, plot=None, json_path=None):
    """Rank 0, all points evaluated: table, fits, spreads, size effects; plot; JSON."""
    if len({pt["data"] for pt in points}) > 1:
        print("note: the points were evaluated on different data (no --data: each on its "
              "training source)")
    fits, spreads = sweep_fits(points), sweep_spreads(points)
    effects = sweep_sizes(points)
    print_sweep(points, fits, spreads, effects)
    if plot and plot_sweep(plot, points, fits):
        print(f"plot: {plot}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(points=points, fits=fits, spreads=spreads, sizes=effects), f,
                      indent=2)
        print(f"json: {json_path}")
    return fits
