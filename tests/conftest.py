"""Make the flat top-level modules (vitok.py, dit.py, ...) importable from the tests, however pytest is started."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    """A randomly initialised T-T/8 tokenizer checkpoint (c=4, 32x32 images: 16 tokens) in train_ae.py's format."""
    import vitok
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ae") / "ae.pt"
    model = vitok.from_name("T-T/8", channels=4)
    config = {"kind": "ae", "model": "T-T/8", "channels": 4, "image_size": 32, "num_frames": 1}
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "step": 1, "config": config}, path)
    return path


def kill_at_step(monkeypatch, step):
    """Make a trainer die like a killed process in the EMA update of 0-based step `step`, after that step's
    optimizer update and before its checkpoint; undo() restores it for the resumed run."""
    import runtime
    script = runtime
    real, calls = script.update_ema, {"n": 0}

    def update_ema(*args):
        calls["n"] += 1
        if calls["n"] == step + 1:
            raise KeyboardInterrupt("simulated kill")
        real(*args)

    monkeypatch.setattr(script, "update_ema", update_ema)
    return lambda: monkeypatch.setattr(script, "update_ema", real)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over ~30 s on 2 CPU cores (deselect with -m 'not slow')")
