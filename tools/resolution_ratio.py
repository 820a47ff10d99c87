"""Resolution vs E (Fig. 4): the E a tokenizer needs for one PSNR at two resolutions, and their ratio.

The paper: at 512p the same reconstruction needs 4x the E of 256p (2x the side), a constant number of pixels per
float. This reads the JSON of `evaluate.py --sweep` over tokenizers of one patch size at two (or more) resolutions,
fits PSNR = a + b log2 E per resolution and model size (sweep.fit_log_e, the sweep's own fit), and for each two
neighbouring resolutions takes one PSNR: --psnr, or else the middle of the range of PSNRs that both resolutions
reach (their measured PSNRs' overlap). Each line gives the E that reaches it, E = 2^((PSNR - a) / b); the ratio of
the two E is printed next to the ratio of pixels (4 for 2x the side). `interpolated` is false when the PSNR lies
outside the measured range of either resolution, so that a line is extrapolated.

    python evaluate.py --sweep res/p8_s32_c*.pt res/p8_s64_c*.pt --data deadleaves --json res/sweep.json
    python tools/resolution_ratio.py res/sweep.json --json res/ratio.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runtime  # noqa: E402
import sweep  # noqa: E402


def needed_e(fit, psnr):
    """The E at which the line PSNR = intercept + slope * log2 E reaches `psnr`."""
    return 2 ** ((psnr - fit["intercept"]) / fit["slope"])


def resolution_ratios(points, psnr=None):
    """Per model size (frames, "S-B") and neighbouring resolutions lo < hi with rising PSNR lines: the PSNR compared,
    each resolution's E for it, E_hi / E_lo and (hi / lo)^2."""
    groups = {}  # (frames, sizes) -> image size -> points
    for pt in points:
        if pt.get("psnr") is not None:
            T, pair, size = sweep.group(pt)
            groups.setdefault((T, pair), {}).setdefault(size, []).append(pt)
    rows = []
    for (T, pair), by_size in sorted(groups.items()):
        fits = {size: sweep.fit_log_e([pt["E"] for pt in pts], [pt["psnr"] for pt in pts])
                for size, pts in by_size.items() if len({pt["E"] for pt in pts}) > 1}
        sides = sorted(size for size, fit in fits.items() if fit["slope"] > 0)  # E reaches any PSNR
        for lo, hi in zip(sides, sides[1:]):
            ranges = [(min(y), max(y)) for y in ([pt["psnr"] for pt in by_size[s]] for s in (lo, hi))]
            bottom, top = max(r[0] for r in ranges), min(r[1] for r in ranges)
            target = (bottom + top) / 2 if psnr is None else psnr
            E = [needed_e(fits[s], target) for s in (lo, hi)]
            rows.append(dict(num_frames=T, sizes=pair, image_sizes=[lo, hi], psnr=target,
                             psnr_from="--psnr" if psnr is not None else "middle of the PSNR range both reach",
                             E=E, ratio=E[1] / E[0], pixel_ratio=(hi / lo) ** 2,
                             interpolated=all(r[0] <= target <= r[1] for r in ranges), fits=[fits[lo], fits[hi]]))
    return rows


def main(args):
    with open(args.sweep_json) as f:
        points = json.load(f)["points"]
    rows = resolution_ratios(points, args.psnr)
    if not rows:
        raise runtime.UserError(f"{args.sweep_json} has no model size with rising PSNR lines (two E or more) at two "
                                f"resolutions")
    for row in rows:
        (lo, hi), (e_lo, e_hi) = row["image_sizes"], row["E"]
        lo, hi = (sweep.resolution(row["num_frames"], s) for s in (lo, hi))
        print(f"{row['sizes']}: PSNR {row['psnr']:.2f} dB ({row['psnr_from']}) needs E = {e_lo:.0f} at {lo} and "
              f"{e_hi:.0f} at {hi}: {row['ratio']:.2f}x the E for {row['pixel_ratio']:.0f}x the pixels (Fig. 4: 4x "
              f"for 2x the side){'' if row['interpolated'] else '; extrapolated beyond the measured PSNRs'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(resolutions=rows), f, indent=2)
        print(f"json: {args.json}")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_json", help="the --json of evaluate.py --sweep over two resolutions")
    p.add_argument("--psnr", type=float, help="the PSNR (dB) to compare at (default: the middle of the range both "
                   "resolutions reach)")
    p.add_argument("--json", help="the rows as JSON")
    return p.parse_args(argv)


if __name__ == "__main__":
    runtime.run_main(main, parse_args(), "resolution_ratio.py")
