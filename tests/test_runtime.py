"""runtime.py: EMA, flags, the one checkpoint reader, and a user's mistake as one line on rank 0."""
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import runtime
import train_ae
import train_dit
import vitok
from runtime import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ema_update_is_an_exponential_average_with_warmup():
    a, b = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        b.weight.fill_(3.0)
        b.running_mean.fill_(5.0)
    expected = 0.9 * a.weight.detach() + 0.1 * b.weight.detach()
    runtime.update_ema(a, b, 0.9)
    torch.testing.assert_close(a.weight.detach(), expected)
    assert torch.equal(a.running_mean, b.running_mean)  # buffers are copied
    assert runtime.ema_decay(0, 0.9999, 10) == pytest.approx(0.1)
    assert runtime.ema_decay(10 ** 6, 0.9999, 10) == 0.9999 and runtime.ema_decay(0, 0.99, 0) == 0.99


def test_a_cpu_run_leaves_a_core_to_each_data_worker(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(runtime, "THREADS", 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    config = dict(global_batch_size=2, ckpt=str(tmp_path / "run.pt"), kind="ae",
                  out_dir=str(tmp_path), seed=0)
    try:
        for workers, expected in ((2, 6), (0, 8), (8, 1), (12, 1)):
            runtime.TrainingRun(dict(config, workers=workers))
            assert torch.get_num_threads() == expected
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice stays
        torch.set_num_threads(3)
        runtime.TrainingRun(dict(config, workers=2))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_flags_take_their_type_choices_and_presets():
    defaults = dict(size=None, lr=0.1, on=False, mode="a")
    helps = {"size": ("a count", dict(type=int)), "lr": "rate", "on": "switch",
             "mode": ("mode", dict(choices=["a", "b"]))}
    args = runtime.parse_flags("t", defaults, {"p": {"lr": 0.5}}, helps,
                               ["--size", "3", "--preset", "p", "--on"])
    config = runtime.merge(args, defaults, {"p": {"lr": 0.5}}, kind="ae")
    assert config == dict(size=3, lr=0.5, on=True, mode="a", preset="p", kind="ae")
    with pytest.raises(SystemExit):
        runtime.parse_flags("t", defaults, {}, helps, ["--mode", "c"])


def test_the_checkpoint_reader_names_what_is_wrong(tmp_path, ae_ckpt):
    assert runtime.read_checkpoint(ae_ckpt, kind="ae")["config"]["kind"] == "ae"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    whole = open(ae_ckpt, "rb").read()
    (tmp_path / "cut.pt").write_bytes(whole[:len(whole) // 2])
    torch.save({"config": {"kind": "dit"}}, tmp_path / "dit.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")  # a plain dict of someone else's
    cases = {"gone.pt": "gone.pt does not exist", "junk.pt": "junk.pt is not a vitok checkpoint",
             "cut.pt": "cut.pt is not a vitok checkpoint", "other.pt": "other.pt is not a vitok",
             "dit.pt": "dit.pt is a DiT checkpoint (train_dit.py), not a tokenizer checkpoint"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            runtime.read_checkpoint(str(tmp_path / name), kind="ae")


def _one_line(capsys, main, argv, script):
    """main(argv) through run_main: exit status 2 and one line on stderr that starts with the
    script's name."""
    with pytest.raises(SystemExit) as exit_:
        runtime.run_main(main, argv, script)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{script}: error: ")
    return err


def test_a_users_mistake_is_one_line(tmp_path, ae_ckpt, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02garbage")
    torch.save({"model": {}, "config": {"kind": "dit", "model": "DiT-tiny"}}, tmp_path / "dit.pt")
    out = ["--out-dir", str(tmp_path / "logs"), "--workers", "0", "--steps", "1"]
    ae = lambda *a: train_ae.parse_args(["--preset", "tiny", *map(str, a), *out])  # noqa: E731
    cases = [
        (ae("--data", tmp_path / "nowhere"), "dataset folder"),
        (ae("--data", tmp_path / "empty"), "no images found"),
        (ae("--model", "S-X/16"), "unknown tokenizer name 'S-X/16'"),
        (ae("--stage", 2, "--init", tmp_path / "junk.pt", "--ckpt", tmp_path / "s2.pt"),
         "junk.pt is not a vitok checkpoint"),
        (ae("--stage", 2, "--init", tmp_path / "dit.pt", "--ckpt", tmp_path / "s2.pt"),
         "dit.pt is a DiT checkpoint"),
        (ae("--ckpt", tmp_path / "junk.pt"), "junk.pt is not a vitok checkpoint"),  # resume
    ]
    for argv, message in cases:
        assert message in _one_line(capsys, train_ae.main, argv, "train_ae.py")
    dit_args = lambda ckpt: train_dit.parse_args(  # noqa: E731
        ["--preset", "tiny", "--ae-ckpt", str(ckpt), "--ckpt", str(tmp_path / "d.pt"), *out])
    for ckpt, message in ((tmp_path / "junk.pt", "not a vitok checkpoint"),
                          (tmp_path / "dit.pt", "is a DiT checkpoint"),
                          (tmp_path / "gone.pt", "not found")):
        assert message in _one_line(capsys, train_dit.main, dit_args(ckpt), "train_dit.py")
    ev = evaluate.parse_args(["--ckpt", str(tmp_path / "junk.pt")])
    assert "not a vitok checkpoint" in _one_line(capsys, evaluate.main, ev, "evaluate.py")
    # Under torchrun only rank 0 prints it.
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        runtime.run_main(evaluate.main, ev, "evaluate.py")
    assert capsys.readouterr().err == ""


def test_the_scripts_print_one_line_from_the_command_line(tmp_path):
    """The __main__ path: no traceback, exit status 2. A bug still shows its traceback."""
    proc = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(tmp_path / "none.pt")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"evaluate.py: error: checkpoint {tmp_path / 'none.pt'} does not exist"], proc.stderr

    def bug(args):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        runtime.run_main(bug, None, "x.py")


def test_from_checkpoint_takes_a_path_or_a_read_dict(ae_ckpt):
    ckpt = runtime.read_checkpoint(ae_ckpt)
    a, b = vitok.from_checkpoint(ae_ckpt), vitok.from_checkpoint(ckpt, name=str(ae_ckpt))
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    damaged = {**ckpt, "config": {**ckpt["config"], "channels": 8}}
    with pytest.raises(UserError, match="its weights do not fit the model its config names"):
        vitok.from_checkpoint(damaged, name="x.pt")
