"""train_ae.py: schedule, presets, resume equivalence, stage 2 freezing, NaN handling, DDP equivalence, learning."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import kill_at_step
import losses
import train_ae
import runtime
import vitok
from runtime import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny, fast run: 32x32 synthetic images, batch 8, no data-loader workers.
FAST = ["--preset", "tiny", "--data", "synthetic", "--image-size", "32", "--global-batch-size", "8", "--workers", "0",
        "--log-every", "1"]


def run(tmp_path, *extra, name="ae.pt"):
    args = train_ae.parse_args(FAST + ["--ckpt", str(tmp_path / name), "--out-dir", str(tmp_path / "logs")] +
                               list(map(str, extra)))
    train_ae.main(args)
    return torch.load(tmp_path / name, map_location="cpu", weights_only=True)


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_lr_schedule_warms_up_then_decays_to_final():
    total, peak, d = 1000, 1e-3, train_ae.DEFAULTS
    lr = lambda step: runtime.lr_at(step, total, peak, d["warmup"], d["final_lr"])  # noqa: E731
    assert lr(0) == pytest.approx(peak / 30)  # 3% warmup = 30 steps
    assert lr(29) == pytest.approx(peak)
    assert lr(30 + 485) == pytest.approx((peak + 1e-5) / 2)  # half way through the cosine
    assert lr(total) == pytest.approx(1e-5)


def test_presets_only_override_and_flags_win():
    config = train_ae.resolve(train_ae.parse_args(["--preset", "tiny", "--steps", "7"]))
    assert (config["model"], config["steps"], config["data"], config["lpips_weight"]) == ("T-T/16", 7, "deadleaves", 0.0)
    assert config["beta"] == 1e-3 and config["kind"] == "ae" and config["ckpt"] == "ae.pt"
    assert vitok.ALIASES["tiny"] == config["model"]  # one meaning of "tiny"
    paper = train_ae.resolve(train_ae.parse_args(["--data", "x", "--num-frames", "16", "--stage", "2"]))
    assert (paper["model"], paper["global_batch_size"], paper["lr"], paper["gan_weight"]) == ("S-B/16", 128, 1e-4, 0.05)
    assert paper["ckpt"] == "ae_stage2.pt" and paper["disc_channels"] == 64 and paper["frame_stride"] == 3
    with pytest.raises(UserError, match="--data is required"):
        train_ae.resolve(train_ae.parse_args([]))
    help_text = subprocess.run([sys.executable, "train_ae.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "--lr LR" in help_text and "(default: 0.0001)" in help_text.replace("\n", " ")


def test_checkpoint_is_plain_and_loads_as_a_tokenizer(tmp_path):
    state = run(tmp_path, "--steps", 2)
    assert {"model", "ema", "step", "config", "opt", "rng"} <= set(state) and state["step"] == 2
    assert {"model", "channels", "image_size", "num_frames"} <= set(state["config"])
    model = vitok.from_checkpoint(tmp_path / "ae.pt")
    torch.testing.assert_close(model.state_dict(), state["ema"])  # the EMA weights, in eval mode
    assert not model.training
    assert os.path.exists(tmp_path / "logs" / "recon_0000002.png") and len(metrics(tmp_path / "logs/metrics.jsonl")) == 2


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch):
    full = run(tmp_path, "--steps", 6, "--ckpt-every", 3, name="full.pt")
    undo = kill_at_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--steps", 6, "--ckpt-every", 3, name="resumed.pt")
    assert torch.load(tmp_path / "resumed.pt", weights_only=True)["step"] == 3  # the interval checkpoint survived
    undo()
    resumed = run(tmp_path, "--steps", 6, "--ckpt-every", 3, name="resumed.pt")
    assert resumed["step"] == 6
    for key in ("model", "ema"):
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed["opt"]["state"], full["opt"]["state"], rtol=1e-5, atol=1e-7)


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    run(tmp_path, "--steps", 1)
    with pytest.raises(UserError, match="its channels is 16"):
        run(tmp_path, "--steps", 2, "--channels", 8)


def test_stage2_freezes_the_encoder_and_trains_decoder_and_discriminator(tmp_path):
    stage1 = run(tmp_path, "--steps", 2, name="s1.pt")
    stage2 = run(tmp_path, "--stage", 2, "--init", tmp_path / "s1.pt", "--steps", 3, "--gan-ramp", 2, name="s2.pt")
    encoder = ("embed.", "encoder.", "to_moments.")
    for key, value in stage2["model"].items():
        if key.startswith(encoder):  # bit-identical to the stage-1 weights it started from (the EMA)
            assert torch.equal(value, stage1["ema"][key]) and torch.equal(stage2["ema"][key], value), key
    assert not torch.equal(stage2["model"]["head.weight"], stage1["ema"]["head.weight"])
    assert {"disc", "disc_opt"} <= set(stage2) and stage2["config"]["stage"] == 2
    logged = metrics(tmp_path / "logs/metrics.jsonl")[-3:]
    assert all({"g_adv", "d_loss"} <= set(m) for m in logged)
    with pytest.raises(UserError, match="pass --init"):
        run(tmp_path, "--stage", 2, "--steps", 1, name="s2b.pt")


def test_non_finite_loss_stops_without_writing_a_poisoned_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_mse = losses.mse_loss

    def nan_from_step_2(x_hat, x):
        calls["n"] += 1
        out = real_mse(x_hat, x)
        return out * float("nan") if calls["n"] >= 3 else out

    monkeypatch.setattr(losses, "mse_loss", nan_from_step_2)
    with pytest.raises(FloatingPointError, match=r"step 2.*ae.pt"):
        run(tmp_path, "--steps", 6, "--ckpt-every", 2)
    state = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path):
    """Compiled and wrapped for DDP, two ranks train as one: same losses, same weights, plain checkpoint keys."""
    common = FAST + ["--steps", "3", "--compile", "--out-dir"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "train_ae.py", *common, str(tmp_path / "one"), "--ckpt", str(tmp_path / "one.pt")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "train_ae.py", *common, str(tmp_path / "two"), "--ckpt", str(tmp_path / "two.pt")],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    one, two = metrics(tmp_path / "one/metrics.jsonl"), metrics(tmp_path / "two/metrics.jsonl")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    w1, w2 = (torch.load(tmp_path / f, weights_only=True)["model"] for f in ("one.pt", "two.pt"))
    torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-5)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in w2)  # compiled + DDP, saved from the raw module


def test_tiny_run_learns(tmp_path):
    run(tmp_path, "--model", "T-T/8", "--steps", 120, "--log-every", 10, "--ckpt-every", 120, "--sample-every", 120)
    logged = metrics(tmp_path / "logs/metrics.jsonl")
    assert logged[-1]["mse"] < logged[0]["mse"] / 4, (logged[0]["mse"], logged[-1]["mse"])
    assert all(math.isfinite(m["grad_norm"]) for m in logged)


def test_video_preset_trains(tmp_path):
    args = train_ae.parse_args(["--preset", "tiny-video", "--steps", "2", "--global-batch-size", "2", "--workers", "0",
                                "--ckpt", str(tmp_path / "v.pt"), "--out-dir", str(tmp_path / "v")])
    train_ae.main(args)
    model = vitok.from_checkpoint(tmp_path / "v.pt")
    x = torch.rand(1, 3, 4, 32, 32) * 2 - 1
    assert model(x)[0].shape == x.shape and model.tubelet_size == 2
