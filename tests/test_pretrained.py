"""Sharing: save_pretrained folders (config.json + model.safetensors), from_pretrained, tools/export.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import dit
import evaluate
import runtime
import vitok
from runtime import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder(tmp_path, ae_ckpt):
    model = vitok.from_checkpoint(ae_ckpt)
    model.save_pretrained(tmp_path / "ae", image_size=32, data="synthetic")
    return model, tmp_path / "ae"


def test_a_tokenizer_round_trips_through_a_folder(tmp_path, ae_ckpt):
    model, folder = _folder(tmp_path, ae_ckpt)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    config = json.load(open(folder / "config.json"))
    assert config == dict(kind="ae", model="T-T/8", channels=4, patch_size=8, tubelet_size=1, image_size=32,
                          num_frames=1, data="synthetic")
    loaded = vitok.from_pretrained(folder)  # a str or a Path
    assert not loaded.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
    assert vitok.from_name("S-B/4x8").name == "S-B/4x8"  # the name config.json holds is from_name's


def test_a_dit_round_trips_and_names_its_tokenizer(tmp_path):
    torch.manual_seed(0)
    model = dit.DiT_models["DiT-tiny"](channels=4, grid=(1, 4, 4), num_classes=3).eval()
    torch.nn.init.normal_(model.out.weight)  # adaLN-Zero starts at a zero output: make it informative
    model.save_pretrained(tmp_path / "dit", ae_model="T-T/8", ae_ckpt="ae_vitok", latent_scale=1.0)
    config = json.load(open(tmp_path / "dit" / "config.json"))
    assert config["model"] == "DiT-tiny" and config["ae_ckpt"] == "ae_vitok" and config["grid"] == [1, 4, 4]
    loaded = dit.from_pretrained(str(tmp_path / "dit"))
    x, t, y = torch.randn(2, 16, 4), torch.tensor([3, 700]), torch.tensor([0, 3])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), loaded(x, t, y))
    with pytest.raises(UserError, match="is a DiT checkpoint"):
        vitok.from_pretrained(str(tmp_path / "dit"))


def test_a_folder_whose_config_is_another_models_is_refused_by_name(tmp_path, ae_ckpt):
    _, folder = _folder(tmp_path, ae_ckpt)
    config = json.load(open(folder / "config.json"))
    for field, value, tensor in [("channels", 8, "from_latent.weight"), ("model", "T-T/16", "embed.weight"),
                                 ("model", "T-B/8", "decoder.blocks.0.attn.proj.bias")]:
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(UserError, match=f"do not fit the model its config names .*: {tensor} is .* in the file"):
            vitok.from_pretrained(str(folder))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "no config"])
def test_a_damaged_folder_is_one_line(tmp_path, ae_ckpt, damage):
    _, folder = _folder(tmp_path, ae_ckpt)
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(whole[:len(whole) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json" + whole[20:])
    else:
        os.remove(weights if damage == "missing" else folder / "config.json")
    with pytest.raises(UserError, match="is not a vitok checkpoint") as err:
        vitok.from_pretrained(str(folder))
    assert "\n" not in str(err.value)


def test_a_hub_id_without_huggingface_hub_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when not installed
    with pytest.raises(UserError, match="pip install huggingface_hub"):
        vitok.from_pretrained("someone/vitok-s-b-16")
    with pytest.raises(UserError, match="pip install huggingface_hub"):
        dit.from_pretrained("someone/dit-l")


def test_evaluate_gives_the_same_numbers_on_the_folder(tmp_path, ae_ckpt, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))  # no LPIPS/Inception files: PSNR and SSIM only

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    _, folder = _folder(tmp_path, ae_ckpt)
    results = []
    for ckpt in (ae_ckpt, folder):
        out = tmp_path / f"{len(results)}.json"
        argv = ["--ckpt", ckpt, "--data", "synthetic", "--num-samples", 4, "--json", out, "--workers", 0]
        runtime.run_main(evaluate.main, evaluate.parse_args([str(a) for a in argv]), "evaluate.py")
        results.append(json.load(open(out)))
    assert {"psnr", "ssim"} <= set(results[0])
    for key in ("psnr", "psnr_pooled", "ssim", "num_samples"):
        assert results[0].get(key) == results[1].get(key), key


def test_export_writes_a_folder_with_latent_statistics(tmp_path, ae_ckpt):
    state = torch.load(ae_ckpt, weights_only=True)
    state["config"].update(data="synthetic", frame_stride=3)
    torch.save(state, tmp_path / "ae.pt")
    cmd = [sys.executable, "tools/export.py", str(tmp_path / "ae.pt"), str(tmp_path / "ae_vitok"),
           "--num-images", "6", "--batch-size", "4", "--workers", "0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = json.load(open(tmp_path / "ae_vitok" / "config.json"))
    stats = config["latent_stats"]
    assert config["step"] == 1 and config["data"] == "synthetic" and config["image_size"] == 32
    assert stats["num_images"] == 6 and len(stats["channel_mean"]) == len(stats["channel_std"]) == 4
    # the statistics are those of posterior samples of the same six centre crops, measured here independently
    model = vitok.from_pretrained(str(tmp_path / "ae_vitok"))
    torch.testing.assert_close(model.state_dict(), vitok.from_checkpoint(ae_ckpt).state_dict())
    images = data.build_dataset("synthetic", 32, 1, train=False)
    gen = torch.Generator().manual_seed(0)
    chosen = torch.randperm(len(images), generator=gen)[:6].sort().values.tolist()
    x = torch.stack([images[i][0] for i in chosen])
    with torch.no_grad():
        z = torch.cat([model.encode(x[i:i + 4]).sample(torch.randn(len(x[i:i + 4]), 16, 4, generator=gen))
                       for i in (0, 4)]).double()
    assert stats["mean"] == pytest.approx(z.mean().item(), rel=1e-5)
    assert stats["std"] == pytest.approx(z.std(unbiased=False).item(), rel=1e-5)
    assert stats["channel_std"] == pytest.approx(z.flatten(0, 1).std(0, unbiased=False).tolist(), rel=1e-5)
    # a DiT checkpoint exports its EMA weights and its config
    model = dit.DiT_models["DiT-tiny"](channels=4, grid=(1, 4, 4), num_classes=3)
    config = {"kind": "dit", "model": "DiT-tiny", "channels": 4, "grid": [1, 4, 4], "num_classes": 3,
              "ae_model": "T-T/8", "ae_ckpt": str(tmp_path / "ae_vitok"), "latent_scale": 1.0, "image_size": 32,
              "num_frames": 1}
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 7, "config": config},
               tmp_path / "dit.pt")
    cmd = [sys.executable, "tools/export.py", str(tmp_path / "dit.pt"), str(tmp_path / "dit_vitok")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.load(open(tmp_path / "dit_vitok" / "config.json")) == {**config, "step": 7}
