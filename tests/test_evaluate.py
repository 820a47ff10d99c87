"""evaluate.py: the FID network's layout and blocks, IS without the fc bias, the official code's torchvision network, Frechet
and the streamed statistics (moments, IS, per-frame video FID) against independent formulas, constant memory, random
labels, uint8 references, missing weights, bad inputs, two-rank runs equal to one, and the DiT path."""
import json
import os
import socket
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.signal import correlate2d
from torchvision.models import inception as tv_inception

import data
import dit
import evaluate
import features
import runtime
import vitok

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fid_file(tmp_path_factory):
    """A randomly initialised FID network saved in the standard file's layout (no real weights exist here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / features.FID_FILE
    net = features.build_fid_inception()
    with torch.no_grad():  # BN statistics away from (0, 1) so the blocks' arithmetic is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        net.fc.bias.normal_(0, 3)  # a bias that would change IS, were it (wrongly) included
    torch.save(net.state_dict(), path)
    return path


def run(*argv):
    runtime.run_main(evaluate.main, evaluate.parse_args([str(a) for a in argv]), "evaluate.py")


def test_fid_network_has_the_standard_files_layout(fid_file):
    ours = features.build_fid_inception().state_dict()
    reference = tv_inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    assert ours["fc.weight"].shape == (1008, 2048) and not any(k.startswith("AuxLogits") for k in ours)
    assert "Mixed_7c.branch_pool.conv.weight" in ours and "Conv2d_1a_3x3.bn.running_var" in ours
    net = features.InceptionFeatures("fid", fid_file)  # loads with strict=True
    pool, logits = net(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(logits, pool @ net.net.fc.weight.T)  # IS logits: no fc bias, as the standard IS
    assert not torch.allclose(logits, net.net.fc(pool), atol=0.1)


def test_torchvision_network_is_fed_as_the_official_evaluator(tmp_path):
    """--inception torchvision, as the official metrics.py calls it: 2 x/255 - 1 resized by nn.Upsample(299,
    bilinear, align_corners=True) straight into the first conv (no transform_input, no ImageNet mean/std), float32;
    the IS logits are fc with its bias."""
    torch.manual_seed(0)
    ref = tv_inception.Inception3(num_classes=1000, aux_logits=True, transform_input=False, init_weights=False)
    with torch.no_grad():
        ref.fc.bias.normal_(0, 3)
    torch.save(ref.state_dict(), tmp_path / features.TV_INCEPTION_FILE)
    ours = features.InceptionFeatures("torchvision", tmp_path / features.TV_INCEPTION_FILE)
    seen = []
    ours.net.Conv2d_1a_3x3.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x8 = torch.randint(0, 256, (2, 3, 37, 53), generator=torch.Generator().manual_seed(1)).float()
    pool, logits = ours(x8 / 127.5 - 1)  # as evaluate.py passes uint8-rounded images
    expected = torch.nn.Upsample(size=(299, 299), mode="bilinear", align_corners=True)(2 * (x8 / 255) - 1)
    assert seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], expected)
    torch.testing.assert_close(logits, ref.eval()(expected))  # torchvision's own eval forward: fc(pool) + bias
    assert pool.shape == (2, 2048) and not torch.allclose(logits, pool @ ref.fc.weight.T, atol=0.1)
    assert ours.NAMES["torchvision"] != ours.NAMES["fid"]


def test_is_splits_reach_the_score():
    fake = FakeInception()
    x = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for splits in (1, 4):
        sums = evaluate.Sums(torch.device("cpu"))
        for batch in (list(range(0, 12, 2)), list(range(1, 12, 2))):
            evaluate.add_features(sums, {"inception": fake}, "a", x[batch], batch, 12, is_splits=splits)
        assert evaluate.inception_score(sums.reduce(), "a") == pytest.approx(
            _improved_gan_is(fake(x)[1].numpy(), splits), rel=1e-9)


def _pool_excluding_padding(x):
    """3x3 average over the valid neighbours only, computed as a sum divided by a count (independent of avg_pool2d)."""
    ones = torch.ones(x.shape[1], 1, 3, 3)
    total = F.conv2d(x, ones, padding=1, groups=x.shape[1])
    count = F.conv2d(torch.ones(1, 1, *x.shape[2:]), torch.ones(1, 1, 3, 3), padding=1)
    return total / count


def test_changed_blocks_compute_the_fid_graph(fid_file):
    net = features.InceptionFeatures("fid", fid_file).net
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


def _gaussian_window():
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    return np.outer(g, g) / g.sum() ** 2


def _ssim_scipy(x, y, form):
    """SSIM of one [3,H,W] pair with scipy: 'valid' correlation (Wang's code), or the whole image with mirrored
    borders (scipy's 'mirror' is torch's 'reflect': the edge pixel is not repeated), as torchmetrics computes it."""
    w, c1, c2, out = _gaussian_window(), (0.01 * 255) ** 2, (0.03 * 255) ** 2, []
    for a, b in zip(x, y):
        f = (lambda v: correlate2d(v, w, mode="valid")) if form == "valid" else \
            (lambda v: ndimage.correlate(v, w, mode="mirror"))
        ma, mb = f(a), f(b)
        va, vb, cov = f(a * a) - ma ** 2, f(b * b) - mb ** 2, f(a * b) - ma * mb
        out.append((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).mean())
    return np.mean(out)


def test_ssim_forms_and_psnr_against_scipy():
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(40, 200, 20).expand(2, 3, 24, 20)  # a smooth image: noise is what SSIM sees
    x = (ramp + 10 * torch.rand(2, 3, 24, 20, generator=g)).round()
    noisy = (x + torch.randn(x.shape, generator=g) * 20).clamp(0, 255).round()
    for form in ("paper", "valid"):
        assert torch.allclose(evaluate.ssim(x, x, form=form), torch.ones(2, dtype=torch.float64))
        s = evaluate.ssim(x, noisy, form=form)
        assert (s < 0.9).all()
        for i in range(2):
            expected = _ssim_scipy(x[i].double().numpy(), noisy[i].double().numpy(), form)
            assert s[i].item() == pytest.approx(expected, rel=1e-9), form
    assert torch.equal(evaluate.ssim(x, noisy), evaluate.ssim(x, noisy, form="paper"))  # the paper's is the default
    assert not torch.allclose(evaluate.ssim(x, noisy, form="valid"), evaluate.ssim(x, noisy, form="paper"))
    mse = ((x[0].double() - noisy[0].double()) ** 2).mean()
    assert evaluate.psnr(x, noisy)[0].item() == pytest.approx((10 * torch.log10(255 ** 2 / mse)).item())


def _improved_gan_is(logits, splits=10):
    """The improved-GAN reference code's Inception Score on softmax(logits): contiguous splits [k N/s, (k+1) N/s)."""
    logits = np.asarray(logits, dtype=np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for k in range(splits):
        part = p[k * len(p) // splits:(k + 1) * len(p) // splits]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return np.mean(scores), np.std(scores)


def _inception_score(logits, batches, splits=evaluate.IS_SPLITS):
    """evaluate's streamed IS over the given index batches (any order, any sizes)."""
    sums = evaluate.Sums(torch.device("cpu"))
    n = len(logits)
    for idx in batches:
        idx = torch.as_tensor(idx)
        sums.add_is("x", logits[idx], ((idx + 1) * min(splits, n) - 1) // n, min(splits, n))
    return evaluate.inception_score(sums.reduce(), "x")


def test_streamed_inception_score_equals_the_reference_code():
    logits = torch.randn(23, 1008, generator=torch.Generator().manual_seed(0)) * 3
    batches = [[0, 2, 4, 6], list(range(7, 23, 2)), [1, 3, 5], list(range(8, 23, 2))]  # two "ranks", uneven batches
    ours = _inception_score(logits, batches)
    assert ours == pytest.approx(_improved_gan_is(logits.numpy()), rel=1e-10)
    assert _inception_score(torch.zeros(20, 1008), [range(20)])[0] == pytest.approx(1.0)
    confident = torch.full((48, 1008), -1e4)  # 10 splits of 4-5: classes cycle over 4
    confident[torch.arange(48), torch.arange(48) % 4] = 0
    assert _inception_score(confident, [range(48)], splits=4)[0] == pytest.approx(4.0)


def test_moments_equal_numpy_and_their_memory_is_constant():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(203, 3, 16)) * rng.uniform(0.5, 2, 16) + rng.uniform(-3, 3, 16)  # [N,G,D], off-centre
    state = {}
    for N in (23, 203):
        sums = evaluate.Sums(torch.device("cpu"))
        for start in range(0, N, 10):
            sums.add_moments("f", torch.from_numpy(feats[start:min(N, start + 10)]).float())
            rows = torch.from_numpy(feats[start:min(N, start + 10), 0]).float()
            sums.add_is("f", rows, torch.arange(len(rows)) % 10, 10)
        state[N] = sum(v.numel() * v.element_size() for v in sums.sums.values())
        mu, sigma = evaluate.gaussian(sums.reduce(), "f")
        x = feats[:N].astype(np.float32).astype(np.float64)
        for t in range(3):
            np.testing.assert_allclose(mu[t], x[:, t].mean(0), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(sigma[t], np.cov(x[:, t], rowvar=False), rtol=1e-9, atol=1e-11)
    assert state[23] == state[203]  # the accumulator does not grow with N


class FakeInception:
    """Stands in for InceptionFeatures (6-d "pool" features and 5 logits from pixel statistics) and records inputs."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x):
        self.inputs.append(x.clone())
        pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # [N,6]
        return pool, 3 * pool[:, :5]


def test_video_fid_is_per_frame_index_or_pooled():
    clips = torch.rand(9, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1  # [N,3,T,H,W]
    for t in range(4):
        clips[:, :, t] += 0.2 * t  # frames differ in distribution
    other = clips.flip(0) * 0.8
    fake = FakeInception()
    expected = (fake(vitok.frames_to_batch(clips))[0].view(9, 4, 6).double().numpy(),
                fake(vitok.frames_to_batch(other))[0].view(9, 4, 6).double().numpy())
    stats = lambda f: (f.mean(0), np.cov(f, rowvar=False))  # noqa: E731
    per_frame = np.mean([evaluate.frechet_distance(*stats(expected[0][:, t]), *stats(expected[1][:, t]))
                         for t in range(4)])
    pooled = evaluate.frechet_distance(*stats(expected[0].reshape(36, 6)), *stats(expected[1].reshape(36, 6)))
    for mode, value in (("per-frame", per_frame), ("pooled", pooled)):
        sums = evaluate.Sums(torch.device("cpu"))
        for batch in ([0, 1, 2, 3], [4, 5, 6, 7, 8]):
            evaluate.add_features(sums, {"inception": fake}, "a", clips[batch], batch, 9, mode)
            evaluate.add_features(sums, {"inception": fake}, "b", other[batch], batch, 9, mode)
        s = sums.reduce()
        distance = evaluate.fid(evaluate.gaussian(s, "a_pool"), evaluate.gaussian(s, "b_pool"))
        assert distance == pytest.approx(value, rel=1e-6), mode
        logits = fake(vitok.frames_to_batch(other))[1]
        splits = [list(range(4 * k, 4 * k + 4)) for k in range(9)]  # 9 splits of one clip's 4 frames
        assert evaluate.inception_score(s, "b")[0] == pytest.approx(
            np.mean([_improved_gan_is(logits[i].numpy(), 1)[0] for i in splits]), rel=1e-9)
    assert abs(per_frame - pooled) > 1e-3 * pooled


def test_reference_images_are_rounded_to_uint8_like_the_samples():
    fake = FakeInception()
    opts = vars(evaluate.parse_args(["--num-ref", "5", "--batch-size", "3", "--workers", "0"]))
    stats, n = evaluate.reference_stats("synthetic", 16, 1, 3, {"inception": fake}, opts, 0, 1, torch.device("cpu"))
    x = torch.cat(fake.inputs)
    assert n == 5 and x.shape == (5, 3, 16, 16) and stats["mu"].shape == (1, 6)
    torch.testing.assert_close((x + 1) * 127.5, ((x + 1) * 127.5).round(), rtol=0, atol=1e-4)
    raw = torch.stack([data.build_dataset("synthetic", 16)[i][0] for i in range(5)])
    assert not torch.allclose(x, raw, atol=1e-4)  # the data themselves are not on the uint8 grid


def test_labels_are_random_by_default_and_independent_of_ranks():
    z, y, _ = evaluate.noise_and_labels(range(6000), (2, 3), 10, seed=0)
    counts = torch.bincount(y, minlength=10)
    assert z.shape == (6000, 2, 3) and (counts - 600).abs().max() < 120  # uniform: 600 +- 4.9 sd
    assert (y != torch.arange(6000) % 10).float().mean() > 0.8
    z0, y0, noise = evaluate.noise_and_labels(range(0, 6000, 3), (2, 3), 10, seed=0)  # rank 0 of 3
    assert torch.equal(z0, z[0::3]) and torch.equal(y0, y[0::3])
    # DDIM's eta noise: sample i's next draws from its own generator, whatever the batch
    _, _, alone = evaluate.noise_and_labels(range(3, 6000, 3), (2, 3), 10, seed=0)
    first, second = noise(z0), noise(z0)
    assert first.shape == z0.shape and not torch.equal(first, second)
    torch.testing.assert_close(alone(z0[1:]), first[1:], rtol=0, atol=0)
    _, balanced, _ = evaluate.noise_and_labels(range(1, 40, 2), (2, 3), 10, seed=0, balanced=True)
    assert torch.equal(balanced, torch.arange(1, 40, 2) % 10)
    assert not torch.equal(evaluate.noise_and_labels(range(5), (2, 3), 10, seed=1)[0], z[:5])


def test_joined_samples_are_in_sample_order_in_constant_memory(tmp_path):
    samples = np.random.default_rng(0).integers(0, 256, (1001, 4, 16, 16, 3), dtype=np.uint8)  # 3 MB of clips
    path, world = str(tmp_path / "s.npz"), 3
    for r in range(world):
        shard, done = evaluate.open_shard(path, r, len(range(r, 1001, world)), samples.shape[1:])
        assert done == 0
        shard[:] = samples[r::world]
        shard.flush()
        del shard
    tracemalloc.start()
    head = evaluate.join_shards(path, 1001, world, block=16)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < samples.nbytes / 8, peak  # a few blocks, not the array
    assert np.array_equal(np.load(path)["arr_0"], samples) and np.array_equal(head, samples[:16])
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]  # shards removed


def test_missing_weights_are_reported_and_their_metrics_absent(ae_ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    run("--ckpt", ae_ckpt, "--data", "synthetic", "--num-samples", 5, "--json", tmp_path / "r.json", "--workers", 0)
    out = capsys.readouterr().out
    assert features.FID_FILE in out and features.FID_URL in out and str(tmp_path / "home" / "hub" / "checkpoints") in out
    assert "LPIPS skipped" in out and "vgg16-397923af.pth" in out
    report = json.load(open(tmp_path / "r.json"))
    assert {"psnr", "ssim", "num_samples", "weights"} <= set(report) and report["num_samples"] == 5
    assert not {"rfid", "ris", "lpips"} & set(report) and report["weights"]["model"] == "ema"
    # psnr_pooled: the squared error pooled over all 5 images before the log; per image reads higher (Jensen)
    model = vitok.from_checkpoint(ae_ckpt)
    x = torch.stack([data.build_dataset("synthetic", 32)[i][0] for i in range(5)])
    with torch.no_grad():
        x_hat = model.decode(model.encode(x).mode(), (32, 32))
    x8, x_hat8 = (((v.double().clamp(-1, 1) + 1) * 127.5).round().numpy() for v in (x, x_hat))
    assert report["psnr_pooled"] == pytest.approx(10 * np.log10(255 ** 2 / np.mean((x8 - x_hat8) ** 2)), abs=1e-4)
    assert report["psnr"] > report["psnr_pooled"] and report["psnr_pooled_form"] == "MSE of the whole set"
    assert report["fid_network"] == "tf-inception-2015-12-05 (pytorch-fid)" and report["is_splits"] == 10
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
    cases.append((["--ckpt", tmp_path / "wrong.pt", "--data", "synthetic"], "do not fit the model its config names"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            run(*argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def _stats_distance(mu1, sigma1, mu2, sigma2):
    """Stands in for the Frechet distance (tested above; scipy's sqrtm of 2048x2048 costs ~20 CPU seconds): a function
    of every entry of both Gaussians."""
    return float(((mu1 - mu2) ** 2).sum() + ((sigma1 - sigma2) ** 2).sum())


def _rank(rank, port, argv):
    """One of two gloo ranks, with the environment torchrun would give it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    evaluate.frechet_distance = _stats_distance
    evaluate.main(evaluate.parse_args(argv))


def test_two_processes_give_the_same_numbers_as_one(ae_ckpt, fid_file, tmp_path, monkeypatch):
    """Every statistic (per-image sums, feature moments, IS split sums) summed over two gloo ranks equals one rank's."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))  # no LPIPS weights: the same on both runs
    monkeypatch.setattr(evaluate, "frechet_distance", _stats_distance)
    common = ["--ckpt", str(ae_ckpt), "--data", "synthetic", "--num-samples", "5", "--batch-size", "2",
              "--workers", "0", "--inception-weights", str(fid_file), "--is-splits", "1"]
    run(*common, "--json", tmp_path / "one.json")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank, args=(port, common + ["--json", str(tmp_path / "two.json")]), nprocs=2)
    one, two = json.load(open(tmp_path / "one.json")), json.load(open(tmp_path / "two.json"))
    assert one["num_samples"] == two["num_samples"] == 5 and "rfid" in one  # ranks: samples 0, 2, 4 and 1, 3
    assert one["is_splits"] == two["is_splits"] == 1
    for key in ("psnr", "psnr_pooled", "ssim", "baseline_psnr", "rfid", "ris"):
        assert two[key] == pytest.approx(one[key], rel=1e-4), key


def test_dit_checkpoint_samples_and_scores(ae_ckpt, fid_file, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "frechet_distance", _stats_distance)
    torch.manual_seed(0)
    model = dit.DiT_models["DiT-tiny"](channels=4, grid=(1, 4, 4), num_classes=10)
    config = {"kind": "dit", "model": "DiT-tiny", "ae_ckpt": str(ae_ckpt), "channels": 4, "grid": [1, 4, 4],
              "num_classes": 10, "image_size": 32, "num_frames": 1, "latent_scale": 1.0}
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "config": config},
               tmp_path / "dit.pt")
    run("--ckpt", tmp_path / "dit.pt", "--num-samples", 5, "--sample-steps", 2, "--data", "synthetic", "--num-ref", 6,
        "--inception-weights", fid_file, "--json", tmp_path / "g.json", "--workers", 0)
    report = json.load(open(tmp_path / "g.json"))
    assert {"gfid", "gis"} <= set(report) and report["num_samples"] == 5 and np.isfinite(report["gfid"])
    assert report["precision"] == "fp32" and report["labels"] == "random"  # DiT's sampler: fp32, random classes
    assert report["eta"] == 1.0 and "ADM's evaluator" in report["gfid_protocol"]  # the official code's eta
    samples = np.load(tmp_path / "dit_samples.npz")["arr_0"]
    assert samples.shape == (5, 32, 32, 3) and samples.dtype == np.uint8
    # Two ranks write a shard each; rank 0 joins them: the same samples in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py",
                    "--ckpt", str(tmp_path / "dit.pt"), "--num-samples", "5", "--sample-steps", "2", "--workers", "0",
                    "--batch-size", "2", "--inception-weights", str(tmp_path / "none.pth"), "--samples",
                    str(tmp_path / "two.npz")], cwd=ROOT, env=env, check=True, capture_output=True)
    two = np.load(tmp_path / "two.npz")["arr_0"]
    assert two.shape == samples.shape and np.abs(two.astype(int) - samples).max() <= 1  # float rounding at most
    assert not [f for f in os.listdir(tmp_path) if ".rank" in f or f.endswith(".tmp")]  # shards removed


def test_sampling_killed_midway_continues_where_it_stopped(ae_ckpt, tmp_path, monkeypatch):
    """A crash after two of four batches: the same command again draws only the last two, and the samples and scores
    equal an uninterrupted run's (the scores are computed from them); another seed starts over."""
    model = dit.DiT_models["DiT-tiny"](channels=4, grid=(1, 4, 4), num_classes=10)
    config = {"kind": "dit", "model": "DiT-tiny", "ae_ckpt": str(ae_ckpt), "channels": 4, "grid": [1, 4, 4],
              "num_classes": 10, "image_size": 32, "num_frames": 1, "latent_scale": 1.0}
    torch.save({"model": model.state_dict(), "step": 1, "config": config}, tmp_path / "dit.pt")
    argv = ["--ckpt", tmp_path / "dit.pt", "--num-samples", 7, "--batch-size", 2, "--sample-steps", 2, "--workers", 0,
            "--inception-weights", tmp_path / "none.pth"]
    run(*argv, "--samples", tmp_path / "full.npz", "--json", tmp_path / "full.json")
    real, calls = dit.sample, []

    def crash_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(dit, "sample", crash_at_third)
    with pytest.raises(KeyboardInterrupt):
        run(*argv, "--samples", tmp_path / "again.npz")
    calls.clear()
    monkeypatch.setattr(dit, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(*argv, "--samples", tmp_path / "again.npz", "--json", tmp_path / "again.json")
    assert len(calls) == 2  # batches 3 and 4 only
    full, again = (np.load(tmp_path / f)["arr_0"] for f in ("full.npz", "again.npz"))
    assert np.array_equal(full, again)
    monkeypatch.setattr(dit, "sample", crash_at_third)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run(*argv, "--samples", tmp_path / "seed.npz")
    calls.clear()
    monkeypatch.setattr(dit, "sample", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(*argv, "--samples", tmp_path / "seed.npz", "--seed", 1)
    assert len(calls) == 4  # another run: nothing reused


def test_generator_draws_50k_images_and_10k_clips_by_default(ae_ckpt, tmp_path, monkeypatch):
    """--num-samples unset: 50,000 images (ADM's reference), 10,000 clips (UCF-101 gFVD, as MAGVIT and LARP)."""
    torch.manual_seed(0)
    torch.save({"model": vitok.from_name("T-T/2x8", channels=4).state_dict(), "step": 1, "config": {
        "kind": "ae", "model": "T-T/2x8", "channels": 4, "image_size": 32, "num_frames": 4}}, tmp_path / "v.pt")

    class Drawn(Exception):
        pass

    def drawn(path, rank, rows, shape, run):  # stop where the samples' file is opened
        raise Drawn(rows)

    monkeypatch.setattr(evaluate, "open_shard", drawn)
    opts = vars(evaluate.parse_args(["--inception-weights", str(tmp_path / "none.pth")]))
    for T, ae, grid, n in ((1, ae_ckpt, [1, 4, 4], 50_000), (4, tmp_path / "v.pt", [2, 4, 4], 10_000)):
        model = dit.DiT_models["DiT-tiny"](channels=4, grid=grid, num_classes=10)
        config = {"kind": "dit", "model": "DiT-tiny", "ae_ckpt": str(ae), "channels": 4, "grid": grid,
                  "num_classes": 10, "image_size": 32, "num_frames": T, "latent_scale": 1.0}
        with pytest.raises(Drawn) as rows:
            evaluate.evaluate_generator({"model": model.state_dict(), "config": config}, "d.pt", None, opts, 0, 1,
                                        torch.device("cpu"))
        assert rows.value.args == (n,)


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
    torch.jit.script(StandInI3D()).save(str(tmp_path / features.I3D_FILE))
    run("--ckpt", tmp_path / "v.pt", "--data", "synthetic", "--num-samples", 6, "--workers", 0,
        "--i3d-weights", tmp_path / features.I3D_FILE, "--json", tmp_path / "v.json")
    report = json.load(open(tmp_path / "v.json"))
    assert {"psnr", "ssim", "rfvd"} <= set(report) and report["weights"]["model"] == "model"
    assert report["num_samples"] == 6 and np.isfinite(report["rfvd"]) and report["rfvd"] > 0
    assert report["video_fid"] == "per-frame" and report["ssim_form"] == "paper"


def test_bilinear_baseline_spends_the_latent_budget_over_all_frames():
    clip = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    out = evaluate.bilinear_codec(clip, floats=512)  # 128 floats a frame: 6x6x3
    frames = clip.transpose(1, 2).flatten(0, 1)
    low = F.interpolate(frames, size=(6, 6), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(out, F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False))
