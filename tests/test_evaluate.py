"""evaluate.py: the FID network's layout and blocks, Frechet distance, SSIM/PSNR/IS against independent formulas,
missing weights, bad inputs, sharded runs, and the DiT path."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.signal import correlate2d
from torchvision.models import inception as tv_inception

import dit
import evaluate
import vitok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fid_file(tmp_path_factory):
    """A randomly initialised FID network saved in the standard file's layout (no real weights exist here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / evaluate.FID_FILE
    net = evaluate.build_fid_inception()
    with torch.no_grad():  # BN statistics away from (0, 1) so the blocks' arithmetic is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path)
    return path


def run(*argv):
    evaluate.main(evaluate.parse_args([str(a) for a in argv]))


def test_fid_network_has_the_standard_files_layout(fid_file):
    ours = evaluate.build_fid_inception().state_dict()
    reference = tv_inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    assert ours["fc.weight"].shape == (1008, 2048) and not any(k.startswith("AuxLogits") for k in ours)
    assert "Mixed_7c.branch_pool.conv.weight" in ours and "Conv2d_1a_3x3.bn.running_var" in ours
    net = evaluate.InceptionFeatures("fid", fid_file)  # loads with strict=True
    pool, logits = net(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)


def _pool_excluding_padding(x):
    """3x3 average over the valid neighbours only, computed as a sum divided by a count (independent of avg_pool2d)."""
    ones = torch.ones(x.shape[1], 1, 3, 3)
    total = F.conv2d(x, ones, padding=1, groups=x.shape[1])
    count = F.conv2d(torch.ones(1, 1, *x.shape[2:]), torch.ones(1, 1, 3, 3), padding=1)
    return total / count


def test_changed_blocks_compute_the_fid_graph(fid_file):
    net = evaluate.InceptionFeatures("fid", fid_file).net
    x = torch.randn(1, 192, 9, 9)
    a = net.Mixed_5b
    expected = torch.cat([a.branch1x1(x), a.branch5x5_2(a.branch5x5_1(x)),
                          a.branch3x3dbl_3(a.branch3x3dbl_2(a.branch3x3dbl_1(x))),
                          a.branch_pool(_pool_excluding_padding(x))], 1)
    torch.testing.assert_close(a(x), expected)
    x = torch.randn(1, 768, 6, 6)
    c = net.Mixed_6b
    torch.testing.assert_close(c(x)[:, -192:], c.branch_pool(_pool_excluding_padding(x)))
    x = torch.randn(1, 1280, 5, 5)
    torch.testing.assert_close(net.Mixed_7b(x)[:, -192:], net.Mixed_7b.branch_pool(_pool_excluding_padding(x)))
    x = torch.randn(1, 2048, 5, 5)
    padded = F.pad(x, [1, 1, 1, 1], value=float("-inf"))
    max3 = padded.unfold(2, 3, 1).unfold(3, 3, 1).amax(dim=(-1, -2))  # 3x3 max over the valid neighbours
    torch.testing.assert_close(net.Mixed_7c(x)[:, -192:], net.Mixed_7c.branch_pool(max3))
    # ... and the changes matter: torchvision's own blocks give other numbers.
    assert not torch.allclose(tv_inception.InceptionE._forward(net.Mixed_7c, x)[-1], net.Mixed_7c(x)[:, -192:])


def test_frechet_distance_against_closed_form():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T  # commuting covariances: sqrt(S1 S2) = Q sqrt(ab) Q^T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert evaluate.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-6)
    assert evaluate.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    singular = np.diag([1.0, 0.0, 0.0, 1.0, 2.0])  # rank-deficient: the eps retry keeps it finite
    assert np.isfinite(evaluate.frechet_distance(mu1, singular, mu2, singular))


def _ssim_float64(x, y):
    """SSIM of one [3,H,W] pair with scipy's correlate2d and the same 11x11 sigma-1.5 window."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(g, g) / g.sum() ** 2
    c1, c2, out = (0.01 * 255) ** 2, (0.03 * 255) ** 2, []
    for a, b in zip(x, y):
        f = lambda v: correlate2d(v, w, mode="valid")  # noqa: E731
        ma, mb = f(a), f(b)
        va, vb, cov = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
        out.append((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean())
    return np.mean(out)


def test_ssim_psnr_and_inception_score_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(40, 200, 20).expand(2, 3, 24, 20)  # a smooth image: noise is what SSIM sees
    x = (ramp + 10 * torch.rand(2, 3, 24, 20, generator=g)).round()
    noisy = (x + torch.randn(x.shape, generator=g) * 20).clamp(0, 255).round()
    assert torch.allclose(evaluate.ssim(x, x), torch.ones(2, dtype=torch.float64))
    s = evaluate.ssim(x, noisy)
    assert (s < 0.9).all()
    assert s[1].item() == pytest.approx(_ssim_float64(x[1].double().numpy(), noisy[1].double().numpy()), rel=1e-9)
    mse = ((x[0].double() - noisy[0].double()) ** 2).mean()
    assert evaluate.psnr(x, noisy)[0].item() == pytest.approx((10 * torch.log10(255 ** 2 / mse)).item())
    assert evaluate.inception_score(torch.zeros(20, 1008))[0] == pytest.approx(1.0)
    confident = torch.full((48, 1008), -1e4)  # 4 splits of 12: three of each of 4 classes
    confident[torch.arange(48), torch.arange(48) % 4] = 0
    assert evaluate.inception_score(confident, splits=4)[0] == pytest.approx(4.0)


def test_missing_weights_are_reported_and_their_metrics_absent(ae_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    run("--ckpt", ae_ckpt, "--data", "synthetic", "--num-samples", 5, "--json", tmp_path / "r.json", "--workers", 0)
    out = capsys.readouterr().out
    assert evaluate.FID_FILE in out and evaluate.FID_URL in out and str(tmp_path / "home" / "hub" / "checkpoints") in out
    assert "LPIPS skipped" in out and "vgg16-397923af.pth" in out
    report = json.load(open(tmp_path / "r.json"))
    assert {"psnr", "ssim", "num_samples", "weights"} <= set(report) and report["num_samples"] == 5
    assert not {"rfid", "ris", "lpips"} & set(report) and report["weights"]["model"] == "ema"
    assert os.path.exists(tmp_path / "r_grid.png")


def test_bad_inputs_give_one_line_errors(ae_ckpt, tmp_path, capsys):
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    cases = [
        (["--ckpt", tmp_path / "notes.pt", "--data", "synthetic"], "is not a vitok checkpoint"),
        (["--ckpt", tmp_path / "missing.pt", "--data", "synthetic"], "does not exist"),
        (["--ckpt", ae_ckpt, "--data", "synthetic", "--image-size", 20], "not divisible by the tubelet 1x8x8"),
        (["--ckpt", ae_ckpt, "--data", tmp_path / "empty"], "empty"),
    ]
    (tmp_path / "empty").mkdir()
    state = torch.load(ae_ckpt, weights_only=True)
    state["config"]["channels"] = 8
    torch.save(state, tmp_path / "wrong.pt")
    cases.append((["--ckpt", tmp_path / "wrong.pt", "--data", "synthetic"], "do not match its config"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            run(*argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_two_processes_give_the_same_numbers_as_one(ae_ckpt, fid_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "home")}
    common = ["evaluate.py", "--ckpt", str(ae_ckpt), "--data", "synthetic", "--num-samples", "7", "--batch-size", "2",
              "--workers", "0", "--inception-weights", str(fid_file)]
    subprocess.run([sys.executable, *common, "--json", str(tmp_path / "one.json")], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common,
                    "--json", str(tmp_path / "two.json")], cwd=ROOT, env=env, check=True, capture_output=True)
    one, two = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    assert one["num_samples"] == two["num_samples"] == 7 and "rfid" in one
    for key in ("psnr", "ssim", "rfid", "ris"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key


def test_dit_checkpoint_samples_and_scores(ae_ckpt, fid_file, tmp_path):
    torch.manual_seed(0)
    model = dit.DiT_models["DiT-tiny"](channels=4, grid=(1, 4, 4), num_classes=10)
    config = {"kind": "dit", "model": "DiT-tiny", "ae_ckpt": str(ae_ckpt), "channels": 4, "grid": [1, 4, 4],
              "num_classes": 10, "image_size": 32, "num_frames": 1, "latent_scale": 1.0}
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "config": config},
               tmp_path / "dit.pt")
    run("--ckpt", tmp_path / "dit.pt", "--num-samples", 4, "--steps", 2, "--data", "synthetic", "--num-ref", 6,
        "--inception-weights", fid_file, "--json", tmp_path / "g.json", "--workers", 0)
    report = json.load(open(tmp_path / "g.json"))
    assert {"gfid", "gis"} <= set(report) and report["num_samples"] == 4 and np.isfinite(report["gfid"])
    samples = np.load(tmp_path / "dit_samples.npz")["arr_0"]
    assert samples.shape == (4, 32, 32, 3) and samples.dtype == np.uint8


class StandInI3D(torch.nn.Module):
    """A TorchScript module with the call signature of StyleGAN-V's i3d_torchscript.pt (the real one cannot be had
    here): it checks the input layout and returns 400-d features."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16, 400)

    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        assert x.shape[1] == 3 and x.shape[-2:] == (224, 224) and not rescale and not resize and return_features
        pooled = F.adaptive_avg_pool3d(x, (1, 4, 4)).flatten(1)  # [B, 3*16]
        return self.proj(pooled)


def test_video_tokenizer_reports_per_frame_metrics_and_rfvd(tmp_path):
    torch.manual_seed(0)
    model = vitok.from_name("T-T/2x8", channels=4)
    config = {"kind": "ae", "model": "T-T/2x8", "channels": 4, "image_size": 32, "num_frames": 4}
    torch.save({"model": model.state_dict(), "step": 1, "config": config}, tmp_path / "v.pt")
    torch.jit.script(StandInI3D()).save(str(tmp_path / evaluate.I3D_FILE))
    run("--ckpt", tmp_path / "v.pt", "--data", "synthetic", "--num-samples", 6, "--workers", 0,
        "--i3d-weights", tmp_path / evaluate.I3D_FILE, "--json", tmp_path / "v.json")
    report = json.load(open(tmp_path / "v.json"))
    assert {"psnr", "ssim", "rfvd"} <= set(report) and report["weights"]["model"] == "model"
    assert report["num_samples"] == 6 and np.isfinite(report["rfvd"]) and report["rfvd"] > 0


def test_bilinear_baseline_spends_the_latent_budget_over_all_frames():
    clip = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    out = evaluate.bilinear_codec(clip, floats=512)  # 128 floats a frame: 6x6x3
    frames = clip.transpose(1, 2).flatten(0, 1)
    low = F.interpolate(frames, size=(6, 6), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(out, F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False))
