"""The paper's other findings in miniature: encoder vs decoder size (Findings 3-4, evaluate.py --sweep's `sizes`),
resolution vs E (Fig. 4, tools/resolution_ratio.py) and generation vs E (Finding 2, tools/gen_proxy.py), on toy
checkpoints and hand-made points against hand computation and independent formulas."""
import json
import os
import sys

import numpy as np
import pytest
import torch

import data
import dit
import evaluate
import runtime
import sweep
import vitok

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import class_accuracy  # noqa: E402
import gen_proxy  # noqa: E402
import resolution_ratio  # noqa: E402

FAST = ["--data", "synthetic", "--num-samples", "8", "--batch-size", "8", "--workers", "0",
        "--inception-weights", "no-such-file.pth"]  # FID skipped at once (no download attempt)


def point(model, p, c, size=32, **metrics):
    L = (size // p) ** 2
    return dict(ckpt=f"{model}_{p}_{c}_{size}.pt", model=f"{model}/{p}", p=p, q=1, c=c, L=L, E=L * c,
                image_size=size, num_frames=1, data="synthetic", **metrics)


def test_m_size_parses_and_sits_between_t_and_s():
    model = vitok.from_name("M-T/16", channels=4)
    assert model.name == "M-T/16" and model.encoder.blocks[0].norm1.normalized_shape[0] == 192
    assert len(model.encoder.blocks) == 6 and len(model.decoder.blocks) == 4
    assert list(vitok.VIT_SIZES).index("M") == 1  # sweep_sizes orders sizes as the dict: T < M < S < B < L


def test_sweep_groups_encoder_and_decoder_sizes(tmp_path, capsys):
    """evaluate.py --sweep over random-weight T-T (two seeds), M-T and T-M at one bottleneck (p=16, c=4 at 32^2)
    and T-T at a second E: each size's effect is the difference of the means, with the seed spread."""
    toys = [("T-T/16", 0), ("T-T/16", 1), ("M-T/16", 2), ("T-M/16", 3), ("T-T/8", 4)]
    paths = []
    for name, seed in toys:
        torch.manual_seed(seed)
        model = vitok.from_name(name, channels=4)
        config = {"kind": "ae", "model": name, "channels": 4, "image_size": 32, "num_frames": 1, "data": "synthetic"}
        paths.append(tmp_path / f"{name.replace('/', '_')}_s{seed}.pt")
        torch.save({"model": model.state_dict(), "step": 3, "config": config}, paths[-1])
    out, png = tmp_path / "sizes.json", tmp_path / "sizes.png"
    runtime.run_main(evaluate.main, evaluate.parse_args([str(a) for a in ["--sweep", *paths, *FAST, "--json", out,
                                                                           "--plot", png]]), "evaluate.py")
    report = json.loads(out.read_text())
    tt0, tt1, mt, tm, _ = report["points"]
    assert [pt["model"] for pt in report["points"]] == [name for name, _ in toys]
    enc, dec = report["sizes"]  # the decoder row compares T-T with T-M; the encoder row T-T with M-T
    enc, dec = (enc, dec) if enc["encoder"] == "T -> M" else (dec, enc)
    assert (enc["encoder"], enc["decoder"], dec["encoder"], dec["decoder"]) == ("T -> M", "T -> T", "T -> T", "T -> M")
    for row, larger in ((enc, mt), (dec, tm)):
        assert (row["E"], row["p"], row["c"], row["image_size"]) == (4 * 4, 16, 4, 32)  # 4 tokens of 4 channels
        for metric in ("psnr", "ssim"):
            assert row[metric] == pytest.approx(larger[metric] - (tt0[metric] + tt1[metric]) / 2, abs=1e-12)
            assert row[f"{metric}_seeds"] == pytest.approx(abs(tt0[metric] - tt1[metric]), abs=1e-12)
    # Fits and plot lines per encoder-decoder sizes (Figs. 6-7): only T-T has two E.
    assert {"psnr@T-T", "ssim@T-T"} <= set(report["fits"]) and not any("M" in key for key in report["fits"])
    shown = capsys.readouterr().out
    assert "one size larger (Findings 3-4): " in shown and "encoder T -> M, decoder T -> T" in shown
    assert f"psnr {np.round(enc['psnr'], 4)}" in shown
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_size_effects_on_hand_made_points():
    """Only pairs that differ in exactly one size are compared, smaller to larger, at the same bottleneck; a
    metric missing on one side is left out; no seed spread without two checkpoints of a size."""
    points = [point("T-T", 16, 4, psnr=10.0, ssim=0.5), point("M-T", 16, 4, psnr=10.25, ssim=0.5),
              point("T-M", 16, 4, psnr=11.0), point("M-M", 16, 4, psnr=11.5, ssim=0.7),
              point("T-T", 8, 4, psnr=12.0), point("M-T", 16, 16, psnr=30.0)]
    rows = {(r["encoder"], r["decoder"]): r for r in sweep.sweep_sizes(points)}
    assert set(rows) == {("T -> M", "T -> T"), ("T -> T", "T -> M"), ("M -> M", "T -> M"), ("T -> M", "M -> M")}
    assert rows[("T -> M", "T -> T")]["psnr"] == pytest.approx(0.25) and rows[("T -> M", "T -> T")]["ssim"] == 0
    assert rows[("T -> T", "T -> M")]["psnr"] == pytest.approx(1.0) and "ssim" not in rows[("T -> T", "T -> M")]
    assert rows[("M -> M", "T -> M")]["psnr"] == pytest.approx(1.25) and rows[("T -> M", "M -> M")]["psnr"] == 0.5
    assert not any(key.endswith("_seeds") for row in rows.values() for key in row)
    # Fits keyed per resolution and sizes where there are several of each.
    lines = [point(m, p, c, size, psnr=off + np.log2((size // p) ** 2 * c))
             for m, off in (("T-T", 1.0), ("T-M", 2.0)) for size in (32, 64) for p, c in ((8, 4), (8, 16))]
    fits = sweep.sweep_fits(lines)
    assert set(fits) == {f"psnr@{s}@{m}" for s in (32, 64) for m in ("T-T", "T-M")}
    assert fits["psnr@64@T-M"]["intercept"] == pytest.approx(2.0) and fits["psnr@64@T-M"]["slope"] == pytest.approx(1)


def lines(slope64=1.5):
    """PSNR = 10 + 1.5 log2 E at 32^2 and, at 64^2, the same line of log2(E / 4) (4x the E for each PSNR) when
    slope64 is 1.5."""
    points = []
    for size, c_list in ((32, (1, 4, 16)), (64, (1, 4, 16))):
        for c in c_list:
            E = (size // 8) ** 2 * c
            psnr = 10 + 1.5 * np.log2(E) if size == 32 else 10 + slope64 * np.log2(E / 4)
            points.append(point("T-T", 8, c, size, psnr=psnr))
    return points


def test_resolution_ratio_of_exact_lines(tmp_path, capsys):
    """E = 16, 64, 256 at 32^2 and 64, 256, 1024 at 64^2 on lines 4x apart: 4.00x the E for 4x the pixels, at the
    middle of the PSNRs both reach (the overlap [10 + 1.5 * 4, 10 + 1.5 * 8] -> 19 dB)."""
    (row,) = resolution_ratio.resolution_ratios(lines())
    assert row["ratio"] == pytest.approx(4.0, rel=1e-12) and row["pixel_ratio"] == 4.0
    assert row["image_sizes"] == [32, 64] and row["sizes"] == "T-T" and row["interpolated"]
    assert row["psnr"] == pytest.approx(19.0)
    assert row["E"] == pytest.approx([2 ** (9 / 1.5), 4 * 2 ** (9 / 1.5)])
    # Other slopes: the ratio depends on the PSNR, as the two lines say; --psnr chooses it.
    (row,) = resolution_ratio.resolution_ratios(lines(slope64=2.0), psnr=20.0)
    e32, e64 = 2 ** ((20 - 10) / 1.5), 4 * 2 ** ((20 - 10) / 2.0)
    assert row["E"] == pytest.approx([e32, e64]) and row["ratio"] == pytest.approx(e64 / e32)
    (row,) = resolution_ratio.resolution_ratios(lines(), psnr=40.0)
    assert not row["interpolated"] and row["ratio"] == pytest.approx(4.0)
    # The tool reads evaluate.py --sweep's JSON, prints and writes the rows.
    (tmp_path / "sweep.json").write_text(json.dumps({"points": lines()}))
    rows = resolution_ratio.main(resolution_ratio.parse_args([str(tmp_path / "sweep.json"), "--json",
                                                              str(tmp_path / "ratio.json")]))
    assert json.loads((tmp_path / "ratio.json").read_text())["resolutions"][0]["ratio"] == pytest.approx(4.0)
    assert rows[0]["fits"][0]["slope"] == pytest.approx(1.5)
    assert "needs E = 64 at 32 and 256 at 64: 4.00x the E for 4x the pixels" in capsys.readouterr().out
    falling = [dict(pt, psnr=30 - np.log2(pt["E"])) for pt in lines()]  # no E reaches every PSNR: no row
    assert resolution_ratio.resolution_ratios(falling) == []


def independent_fd(a, b):
    """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2) with numpy's eigh alone (no scipy sqrtm)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a.T), np.cov(b.T)
    w, V = np.linalg.eigh(sa)
    root = V @ np.diag(np.sqrt(np.clip(w, 0, None))) @ V.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sb @ root), 0, None)).sum()
    return ((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross


def test_classifier_fd_and_accuracy_against_independent_computations():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(0.5, 1.0, size=(300, 8)) @ rng.normal(size=(8, 8))
    assert gen_proxy.classifier_fd(a, b) == pytest.approx(independent_fd(a, b), rel=1e-6)
    assert gen_proxy.classifier_fd(a, a) == pytest.approx(0.0, abs=1e-6)
    labels = np.arange(10)
    logits = np.eye(10)[[0, 1, 2, 3, 4, 5, 6, 0, 0, 0]]  # the last three named class 0
    assert gen_proxy.class_accuracy(logits, labels) == pytest.approx(0.7)


@pytest.fixture
def toy_dit(ae_ckpt, tmp_path):
    """A random DiT-tiny on the conftest's T-T/8 (c=4, 32^2: 16 tokens), marked as trained on the shapes."""
    torch.manual_seed(0)
    model = dit.DiT_models["DiT-tiny"](channels=4, grid=(1, 4, 4), num_classes=10)
    config = {"kind": "dit", "model": "DiT-tiny", "ae_ckpt": str(ae_ckpt), "ae_model": "T-T/8", "channels": 4,
              "grid": [1, 4, 4], "num_classes": 10, "image_size": 32, "num_frames": 1, "latent_scale": 1.0,
              "data": "synthetic"}
    path = tmp_path / "dit_p8_c4.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 5, "config": config}, path)
    return path


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 20 samples of 64 features: evaluate's eps retry
def test_gen_proxy_scores_samples_of_a_toy_dit(toy_dit, tmp_path, monkeypatch, capsys):
    """The tool's numbers are those of the classifier on the samples evaluate.py wrote (class i mod 10) and on the
    held-out images; no Inception file: no gFID and no download attempt."""
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    classifiers = []

    def untrained(size, steps, workers):  # the classifier's training is class_accuracy.py's; any net will do
        torch.manual_seed(len(classifiers))
        classifiers.append((class_accuracy.classifier().eval(), 0.1))
        return classifiers[-1]
    monkeypatch.setattr(gen_proxy, "train_classifier", untrained)
    args = gen_proxy.parse_args([str(toy_dit), "--num-samples", "20", "--num-ref", "30", "--sample-steps", "2",
                                 "--train-steps", "2", "--workers", "0", "--inception-weights",
                                 str(tmp_path / "none.pth"), "--json", str(tmp_path / "g.json"), "--plot",
                                 str(tmp_path / "g.png")])
    (row,) = gen_proxy.main(args)
    assert (row["p"], row["c"], row["L"], row["E"], row["model"], row["dit"]) == (8, 4, 16, 64, "T-T/8", "DiT-tiny")
    assert "gfid" not in row and row["num_samples"] == 20
    (net, _), = classifiers
    samples = np.load(tmp_path / "dit_p8_c4_samples.npz")["arr_0"]
    x = torch.from_numpy(samples).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        logits, feats = net(x).numpy(), net[:-1](x).double().numpy()
    assert row["class_accuracy"] == pytest.approx((logits.argmax(1) == np.arange(20) % 10).mean())
    held_out = data.build_dataset("synthetic", 32)
    ref = torch.stack([held_out[i][0] for i in range(30)])
    with torch.no_grad():
        ref_feats = net[:-1](ref).double().numpy()
    assert row["classifier_fd"] == pytest.approx(independent_fd(feats, ref_feats), rel=1e-4)
    report = json.loads((tmp_path / "g.json").read_text())
    assert report["points"][0]["classifier_fd"] == row["classifier_fd"] and "not FID" in report["protocol"]["note"]
    shown = capsys.readouterr().out
    assert "classifier FD" in shown and "FID/IS skipped" in shown
    pytest.importorskip("matplotlib")
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_class_accuracy_scores_each_guidance_scale(toy_dit, tmp_path, monkeypatch, capsys, eta):
    """One accuracy per --cfg-scale, that of the classifier on the DDIM samples (eta as passed, the same noise at every
    scale) of that scale, unscaled and decoded by the checkpoint's tokenizer into [-1, 1]; first, on the tokenizer's
    reconstructions of held-out shapes (its reference)."""
    ckpt = runtime.read_checkpoint(toy_dit)
    torch.manual_seed(0)  # a DiT that does not predict zero (adaLN-Zero's init would make every scale alike)
    ckpt["ema"] = {k: v + 0.3 * torch.randn_like(v) for k, v in ckpt["ema"].items()}
    ckpt["config"]["latent_scale"] = 2.0
    torch.save(ckpt, tmp_path / "dit.pt")
    net, scored = class_accuracy.classifier().eval(), []
    monkeypatch.setattr(class_accuracy, "train_classifier", lambda *a, **k: (net, 0.1))
    monkeypatch.setattr(class_accuracy, "accuracy", lambda net, x, y: scored.append((x, y)) or 0.25)
    monkeypatch.setattr(sys, "argv", ["class_accuracy.py", "--ckpt", str(tmp_path / "dit.pt"), "--per-class", "2",
                                      "--sample-steps", "3", "--cfg-scale", "1", "6", "--eta", str(eta)])
    class_accuracy.main()
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("samples: 25.0%")]
    assert len(shown) == 2 and "cfg 1.0" in shown[0] and "cfg 6.0" in shown[1] and f"eta {eta}" in shown[0]
    model, ae = dit.from_checkpoint(ckpt), vitok.from_checkpoint(ckpt["config"]["ae_ckpt"])
    xs, ys = class_accuracy.held_out(32)
    with torch.no_grad():
        assert torch.allclose(scored[0][0], ae(xs)[0].clamp(-1, 1)) and torch.equal(scored[0][1], ys)
    y = torch.arange(10).repeat_interleave(2)
    z = torch.randn(20, 16, 4, generator=torch.Generator().manual_seed(1))
    for scale, (x, labels) in zip((1.0, 6.0), scored[1:], strict=True):
        torch.manual_seed(0)  # eta's noise: the same draws at each scale
        with torch.no_grad():
            latents = dit.sample(model, z, y, steps=3, cfg_scale=scale, eta=eta)
            expected = ae.decode(latents / 2.0, (32, 32)).clamp(-1, 1)
        assert torch.allclose(x, expected, atol=1e-5) and torch.equal(labels, y) and x.abs().max() <= 1
    assert not torch.allclose(scored[1][0], scored[2][0], atol=1e-3)


@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_gen_proxy_passes_the_inception_file_and_plots_fig5(toy_dit, tmp_path, monkeypatch):
    """With an Inception file the generator path computes gFID (evaluate.py's own, tested there): the tool hands it
    the file; Fig. 5 has one line per patch size, and a panel for gFID when there is one."""
    seen = []
    monkeypatch.setattr(gen_proxy, "train_classifier", lambda *a, **k: (class_accuracy.classifier().eval(), 0.1))
    monkeypatch.setattr(evaluate, "networks", lambda opts, *a: seen.append(opts["inception_weights"]) or ({}, {}))
    args = gen_proxy.parse_args([str(toy_dit), "--num-samples", "10", "--num-ref", "20", "--sample-steps", "1",
                                 "--train-steps", "1", "--workers", "0", "--inception-weights", "pt_inception.pth"])
    gen_proxy.main(args)
    assert seen == ["pt_inception.pth"]
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    lines_drawn, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (lines_drawn.extend(
        (ax.get_ylabel(), len(ax.get_lines())) for ax in fig.axes), savefig(fig, *a, **k)))
    rows = [dict(p=p, E=E, class_accuracy=0.5, classifier_fd=1.0, **({"gfid": 3.0} if p == 8 else {}))
            for p in (8, 16) for E in (64, 256)]
    assert gen_proxy.plot_generation(str(tmp_path / "fig5.png"), rows)
    assert lines_drawn == [("classifier FD (proxy, not FID)", 2), ("class accuracy of samples", 2), ("gFID", 1)]
