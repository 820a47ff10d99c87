"""train_dit.py: the tiny chain from a tokenizer checkpoint, resume equivalence, the latent cache, unlabelled data."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import kill_at_step
import data
import evaluate
import train_dit
import vitok
from runtime import UserError


def run(tmp_path, ae_ckpt, *extra, name="dit.pt"):
    argv = ["--preset", "tiny", "--ae-ckpt", ae_ckpt, "--global-batch-size", 8, "--workers", 0, "--log-every", 1,
            "--sample-steps", 2, "--ckpt", tmp_path / name, "--out-dir", tmp_path / "logs", *extra]
    train_dit.main(train_dit.parse_args([str(a) for a in argv]))
    return torch.load(tmp_path / name, map_location="cpu", weights_only=True)


def test_tiny_chain_writes_a_dit_checkpoint_with_its_latent_grid(tmp_path, ae_ckpt):
    state = run(tmp_path, ae_ckpt, "--steps", 3)
    config = state["config"]
    assert config["kind"] == "dit" and config["grid"] == [1, 4, 4] and config["num_classes"] == 10
    assert config["channels"] == 4 and config["ae_ckpt"] == str(ae_ckpt) and state["step"] == 3
    logged = [json.loads(line) for line in open(tmp_path / "logs" / "metrics.jsonl")]
    assert len(logged) == 3 and {"loss", "mse", "vb", "z_mean", "z_std"} <= set(logged[0])
    assert (tmp_path / "logs" / "samples_0000003.png").exists()


def test_killed_and_resumed_run_matches(tmp_path, ae_ckpt, monkeypatch):
    full = run(tmp_path, ae_ckpt, "--steps", 4, "--ckpt-every", 2, name="full.pt")
    undo = kill_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, ae_ckpt, "--steps", 4, "--ckpt-every", 2, name="resumed.pt")
    undo()
    resumed = run(tmp_path, ae_ckpt, "--steps", 4, "--ckpt-every", 2, name="resumed.pt")
    for key in ("model", "ema"):
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)


def test_latent_cache_holds_the_posterior_moments(tmp_path, ae_ckpt):
    cache = tmp_path / "cache"
    run(tmp_path, ae_ckpt, "--steps", 2, "--latent-cache", cache, "--data", "synthetic")
    with pytest.raises(UserError, match="incomplete or from an older version"):  # a cache without mirrors is refused
        meta = json.load(open(cache / "meta.json"))
        json.dump({**meta, "mirrored": False}, open(cache / "meta.json", "w"))
        train_dit.LatentCache(cache, meta)
    json.dump({**meta, "mirrored": True}, open(cache / "meta.json", "w"))
    with pytest.raises(UserError, match="holds image_size 32, this run's is 64"):  # latents of other data: refused
        train_dit.LatentCache(cache, {**meta, "image_size": 64})
    moments = np.load(cache / "moments.npy")
    labels = np.load(cache / "labels.npy")
    assert moments.shape == (1000, 1, 2, 16, 8) and labels[:12].tolist() == [i % 10 for i in range(12)]
    ae = vitok.from_checkpoint(ae_ckpt)
    x = data.build_dataset("synthetic", 32)[5][0]
    for mirrored, image in enumerate([x, x.flip(-1)]):  # the centre crop and its mirror image
        posterior = ae.encode(image[None])
        expected = torch.cat([posterior.mean, posterior.logvar], -1)[0].detach().numpy()
        np.testing.assert_allclose(moments[5, 0, mirrored], expected, rtol=1e-2, atol=1e-2)  # stored in fp16


def test_latent_cache_and_on_the_fly_encoding_train_on_the_same_latents(tmp_path, ae_ckpt):
    """Same flips, same posterior noise, same data order: the two paths give the same losses (to fp16)."""
    common = ("--steps", 3, "--data", "synthetic", "--global-batch-size", 16)
    run(tmp_path, ae_ckpt, *common, "--latent-cache", tmp_path / "cache", "--out-dir", tmp_path / "a", name="a.pt")
    run(tmp_path, ae_ckpt, *common, "--out-dir", tmp_path / "b", name="b.pt")
    cached, live = ([json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("a", "b"))
    for a, b in zip(cached, live):
        assert a["z_mean"] == pytest.approx(b["z_mean"], abs=2e-3) and a["loss"] == pytest.approx(b["loss"], rel=2e-3)


def test_unlabelled_folder_trains_with_the_null_class(tmp_path, ae_ckpt, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(np.full((32, 32, 3), 30 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    state = run(tmp_path, ae_ckpt, "--steps", 1, "--data", folder)
    assert state["config"]["num_classes"] == 0 and state["model"]["y_embed.weight"].shape[0] == 1
    assert "null class only" in capsys.readouterr().out


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="train_ae.py --preset tiny"):
        train_dit.resolve(train_dit.parse_args(["--preset", "tiny", "--ae-ckpt", str(tmp_path / "none.pt")]))


def test_video_latents_train_and_sample(tmp_path):
    torch.manual_seed(0)
    model = vitok.from_name("T-T/2x8", channels=4)
    config = {"kind": "ae", "model": "T-T/2x8", "channels": 4, "image_size": 32, "num_frames": 4}
    torch.save({"model": model.state_dict(), "step": 1, "config": config}, tmp_path / "v.pt")
    state = run(tmp_path, tmp_path / "v.pt", "--steps", 2, name="vdit.pt")
    assert state["config"]["grid"] == [2, 4, 4] and state["config"]["num_frames"] == 4
    evaluate.main(evaluate.parse_args(["--ckpt", str(tmp_path / "vdit.pt"), "--num-samples", "3", "--sample-steps", "2",
                                       "--workers", "0", "--inception-weights", str(tmp_path / "none.pth")]))
    samples = np.load(tmp_path / "vdit_samples.npz")["arr_0"]
    assert samples.shape == (3, 4, 32, 32, 3) and samples.dtype == np.uint8  # NTHWC


def test_video_dit_trains_on_random_windows_on_both_paths(tmp_path, monkeypatch):
    """Clips of 24 frames whose frame k is the grey level k/24: the start frame of every clip a step
    sees can be read off its pixels. On the fly, the starts vary from step to step; the cache holds
    cache_windows windows from the first frames to the last, and the steps pick different ones."""
    for c in range(2):
        for v in range(2):
            clip = tmp_path / "clips" / f"class{c}" / f"v{v}"
            clip.mkdir(parents=True)
            for k in range(24):
                Image.fromarray(np.full((32, 32, 3), round(255 * k / 24), np.uint8)).save(clip / f"{k:03d}.png")
    torch.manual_seed(0)
    model = vitok.from_name("T-T/2x8", channels=4)
    config = {"kind": "ae", "model": "T-T/2x8", "channels": 4, "image_size": 32, "num_frames": 4,
              "frame_stride": 2, "data": "x"}
    torch.save({"model": model.state_dict(), "step": 1, "config": config}, tmp_path / "v.pt")
    starts, picked = [], []
    real_step = train_dit.train_step

    def spy(parts, step, x, y, config, rank=0, world=1):
        if not config["latent_cache"]:  # pixels [B,3,T,H,W]: the first frame's grey level gives its index
            starts.append(sorted(round(v) for v in ((x[:, :, 0].mean((1, 2, 3)) + 1) / 2 * 24).tolist()))
        else:  # cached moments [B,K,2,L,2c]: which window each sample's posterior mean came from
            seen = []
            real_gaussian = vitok.DiagonalGaussian

            def gaussian(moments):
                seen.append(moments)
                return real_gaussian(moments)

            monkeypatch.setattr(vitok, "DiagonalGaussian", gaussian)
            terms = real_step(parts, step, x, y, config, rank, world)
            monkeypatch.setattr(vitok, "DiagonalGaussian", real_gaussian)
            windows = [[k for k in range(x.shape[1]) if any(torch.equal(seen[0][i], x[i, k, f]) for f in (0, 1))]
                       for i in range(len(x))]
            picked.append([w[0] for w in windows])
            return terms
        return real_step(parts, step, x, y, config, rank, world)

    monkeypatch.setattr(train_dit, "train_step", spy)
    flags = ("--steps", 6, "--data", tmp_path / "clips", "--global-batch-size", 4, "--sample-every", 100)
    run(tmp_path, tmp_path / "v.pt", *flags, name="a.pt")
    assert len({tuple(s) for s in starts}) > 2 and max(max(s) for s in starts) > min(min(s) for s in starts)
    run(tmp_path, tmp_path / "v.pt", *flags, "--latent-cache", tmp_path / "cache", "--cache-windows", 4,
        name="b.pt")
    moments = np.load(tmp_path / "cache" / "moments.npy")  # [N,K,2,L,2c]
    assert moments.shape[1] == 4 and not np.allclose(moments[:, 0], moments[:, 3])  # first frames vs last
    assert len({w for step in picked for w in step}) > 1 and len({tuple(p) for p in picked}) > 1


def test_the_default_optimiser_is_the_authors_and_dit_s_is_a_preset():
    import runtime
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    lrs = lambda config: [runtime.set_lr(opt, s, config) or opt.param_groups[0]["lr"]  # noqa: E731
                          for s in (0, 99, 999)]
    authors = {**train_dit.DEFAULTS, "steps": 1000, "global_batch_size": 1024}
    assert authors["betas"] == (0.9, 0.95) and authors["weight_decay"] == 1e-4 and authors["grad_clip"] == 0
    assert lrs(authors) == pytest.approx([4e-4 / 100, 4e-4, 3e-5], rel=1e-3)  # 10% warm-up, cosine to 3e-5
    dit_recipe = {**authors, **train_dit.PRESETS["dit"], "global_batch_size": 256}
    assert lrs(dit_recipe) == pytest.approx([1e-4] * 3) and dit_recipe["betas"] == (0.9, 0.999)
