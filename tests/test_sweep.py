"""evaluate.py --sweep (Fig. 3): three toy tokenizers of different patch size and channels -> the table, the JSON, the
least-squares fits on log2 E (against numpy's polyfit and scipy's linregress), the spread of equal-E points and the
plot."""
import json
import sys

import numpy as np
import pytest
import torch
from scipy import stats

import evaluate
import runtime
import sweep
import vitok

# Random-weight tokenizers at 32^2: L = 64, 16 and 4 tokens; E = 64, 64 and 256 floats (two points of equal E).
TOYS = [("T-T/4", 1), ("T-T/8", 4), ("T-T/16", 64)]
FAST = ["--data", "synthetic", "--num-samples", "8", "--batch-size", "8", "--workers", "0",
        "--inception-weights", "no-such-file.pth"]  # FID skipped at once (no download attempt)


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    folder, paths = tmp_path_factory.mktemp("sweep"), []
    for seed, (name, c) in enumerate(TOYS):
        torch.manual_seed(seed)
        model = vitok.from_name(name, channels=c)
        config = {"kind": "ae", "model": name, "channels": c, "image_size": 32, "num_frames": 1, "data": "synthetic"}
        path = folder / f"{name.replace('/', '_')}_c{c}.pt"
        torch.save({"model": model.state_dict(), "step": 7, "config": config}, path)
        paths.append(path)
    return paths


def run(*argv):
    runtime.run_main(evaluate.main, evaluate.parse_args([str(a) for a in argv]), "evaluate.py")


def test_sweep_table_json_fit_and_plot(toys, tmp_path, capsys):
    out, png = tmp_path / "sweep.json", tmp_path / "scaling.png"
    run("--sweep", *toys, *FAST, "--json", out, "--plot", png)
    report = json.loads(out.read_text())
    points = report["points"]
    assert [pt["ckpt"] for pt in points] == [str(p) for p in toys]
    for pt, (name, c) in zip(points, TOYS):
        p = int(name.split("/")[1])
        assert (pt["p"], pt["q"], pt["c"], pt["L"], pt["image_size"]) == (p, 1, c, (32 // p) ** 2, 32)
        assert pt["E"] == (32 // p) ** 2 * c and pt["num_samples"] == 8 and pt["step"] == 7
        assert pt["model"] == name and pt["data"] == "synthetic" and "baseline_psnr" in pt
    assert [pt["E"] for pt in points] == [64, 64, 256]
    # Each metric's fit is the ordinary least-squares line on log2 E, with R^2 = r^2 of the two.
    assert {"psnr", "ssim"} <= set(report["fits"])
    for metric in report["fits"]:
        x, y = np.log2([pt["E"] for pt in points]), np.array([pt[metric] for pt in points])
        slope, intercept = np.polyfit(x, y, 1)
        fit = report["fits"][metric]
        assert fit["slope"] == pytest.approx(slope, rel=1e-9, abs=1e-12)
        assert fit["intercept"] == pytest.approx(intercept, rel=1e-9, abs=1e-12)
        assert fit["r2"] == pytest.approx(stats.linregress(x, y).rvalue ** 2, rel=1e-9, abs=1e-12)
        assert fit["n"] == 3
    # Fig. 3's other half: the two splits of E = 64 and how far apart they score.
    (spread,) = report["spreads"]
    assert (spread["E"], spread["image_size"], spread["splits"]) == (64, 32, [[4, 1], [8, 4]])
    for metric in ("psnr", "ssim"):
        assert spread[metric] == pytest.approx(abs(points[0][metric] - points[1][metric]), abs=1e-12)
    assert "baseline_psnr" not in spread and points[0]["baseline_psnr"] == points[1]["baseline_psnr"]  # E alone
    shown = capsys.readouterr().out
    assert f"equal E = 64 at 32: spread (max - min) psnr {spread['psnr']:.4f}" in shown
    assert all(p.name in shown for p in toys) and "R^2" in shown and f"{report['fits']['psnr']['slope']:.4f}" in shown
    # A point's metrics are those of a single --ckpt evaluation of the same checkpoint.
    single = tmp_path / "single.json"
    run("--ckpt", toys[1], *FAST, "--json", single)
    alone = json.loads(single.read_text())
    assert points[1]["psnr"] == alone["psnr"] and points[1]["ssim"] == alone["ssim"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists() and "plot skipped" in shown
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_fits_per_resolution_and_their_edge_cases(tmp_path):
    """Two resolutions are fitted apart (Fig. 4); exact lines come back exactly; a constant metric has no R^2; a
    metric with a single E has no line."""
    points = []
    for size, offset in ((256, 10.0), (512, 6.0)):
        for p, c in ((8, 4), (16, 16), (16, 64), (32, 64)):
            L = (size // p) ** 2
            E = L * c
            points.append(dict(ckpt=f"{size}_{p}_{c}.pt", model=f"S-B/{p}", p=p, q=1, c=c, L=L, E=E,
                               image_size=size, num_frames=1, psnr=offset + 1.5 * np.log2(E), ssim=0.5))
    points[0]["rfid"] = 3.0  # one point only: no rFID line
    fits = sweep.sweep_fits(points)
    assert set(fits) == {"psnr@256", "psnr@512", "ssim@256", "ssim@512"}
    assert fits["psnr@256"]["slope"] == pytest.approx(1.5) and fits["psnr@256"]["intercept"] == pytest.approx(10.0)
    assert fits["psnr@512"]["intercept"] == pytest.approx(6.0) and fits["psnr@512"]["r2"] == pytest.approx(1.0)
    assert fits["ssim@256"]["r2"] is None and fits["ssim@256"]["slope"] == pytest.approx(0.0, abs=1e-12)
    assert set(sweep.sweep_fits(points[:4])) == {"psnr", "ssim"}  # one resolution: plain keys
    # Equal E is grouped per resolution (E = 4096 at 256p, 16384 at 512p, each with three splits); E = 16384 at 256p
    # has one split only.
    points[3]["psnr"] += 0.75
    spreads = sweep.sweep_spreads(points)
    splits = [[8, 4], [16, 16], [32, 64]]
    assert [(s["image_size"], s["E"], s["splits"]) for s in spreads] == [(256, 4096, splits), (512, 16384, splits)]
    assert spreads[0]["psnr"] == pytest.approx(0.75) and spreads[1]["psnr"] == pytest.approx(0, abs=1e-12)
    assert spreads[0]["ssim"] == 0 and "rfid" not in spreads[0]
    # A split with two checkpoints (two seeds) counts with their mean: seed noise is not a split's difference.
    seed = dict(points[3], ckpt="256_32_64_seed1.pt", psnr=points[3]["psnr"] - 0.5)
    spreads = sweep.sweep_spreads(points + [seed])
    assert spreads[0]["splits"] == splits and spreads[0]["psnr"] == pytest.approx(0.5)
    noisy = sweep.fit_log_e([64, 128, 256, 512], [1.0, 3.0, 2.0, 5.0])
    assert 0 < noisy["r2"] < 1
    pytest.importorskip("matplotlib")
    assert sweep.plot_sweep(str(tmp_path / "two.png"), points, fits) and (tmp_path / "two.png").stat().st_size


def test_rfid_and_rfvd_are_fitted_and_plotted_in_log(tmp_path, monkeypatch):
    """Figs. 2 and 11: log rFID (log rFVD) against log E, on log axes; the JSON says which fits are in log."""
    rng = np.random.default_rng(0)
    points = []
    for T, size, metric in ((1, 256, "rfid"), (16, 128, "rfvd")):
        for p, c in ((8, 4), (16, 16), (16, 64), (32, 64)):
            E = (size // p) ** 2 * c
            points.append(dict(ckpt=f"{p}_{c}.pt", model=f"S-B/{p}", p=p, q=1, c=c, L=E // c, E=E, image_size=size,
                               num_frames=T, psnr=20 + np.log2(E), **{metric: 40 * E ** -0.3 * rng.uniform(0.8, 1.2)}))
    points[4]["rfvd"] = 0.0  # no log: left out of the fit
    fits = sweep.sweep_fits(points)
    assert set(fits) == {"psnr@256", "rfid@256", "psnr@16x128", "rfvd@16x128"}
    for key, metric, pts in (("rfid@256", "rfid", points[:4]), ("rfvd@16x128", "rfvd", points[5:])):
        x, y = np.log2([pt["E"] for pt in pts]), np.log([pt[metric] for pt in pts])
        slope, intercept = np.polyfit(x, y, 1)
        assert fits[key]["log_y"] is True and fits[key]["n"] == len(pts)
        assert fits[key]["slope"] == pytest.approx(slope, rel=1e-9) and fits[key]["intercept"] == pytest.approx(intercept)
        assert fits[key]["r2"] == pytest.approx(stats.linregress(x, y).rvalue ** 2, rel=1e-9)
    assert fits["psnr@256"]["log_y"] is False and fits["psnr@256"]["slope"] == pytest.approx(1.0)
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    scales, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (scales.extend(ax.get_yscale() for ax in fig.axes),
                                                                 savefig(fig, *a, **k)))
    assert sweep.plot_sweep(str(tmp_path / "log.png"), points, fits)
    assert scales == ["linear", "log", "log"]  # psnr, rfid, rfvd


def test_plot_is_optional_and_bad_inputs_fail(toys, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    pt = dict(ckpt="a.pt", p=8, E=64, image_size=32, num_frames=1, psnr=20.0)
    assert not sweep.plot_sweep(str(tmp_path / "x.png"), [pt], {})
    assert not (tmp_path / "x.png").exists() and "pip install matplotlib" in capsys.readouterr().out
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        run("--sweep", toys[0], junk, *FAST)
    assert exit_info.value.code == 2 and "junk.pt is not a vitok checkpoint" in capsys.readouterr().err
    dit_like = tmp_path / "dit.pt"
    torch.save({"config": {"kind": "dit", "num_frames": 1}}, dit_like)
    # Every file is checked before any is evaluated: a bad last file fails before the first evaluation.
    monkeypatch.setattr(evaluate, "evaluate_tokenizer", lambda *a: pytest.fail("evaluated before checking all files"))
    for bad, why in ((dit_like, "dit.pt is a DiT checkpoint (train_dit.py), not a tokenizer"), (tmp_path / "gone.pt", "gone.pt does not exist"),
                     (junk, "junk.pt is not a vitok checkpoint")):
        with pytest.raises(SystemExit) as exit_info:
            run("--sweep", toys[0], bad, *FAST)
        assert exit_info.value.code == 2 and why in capsys.readouterr().err
