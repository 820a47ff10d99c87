"""data.py's WebDataset tar shards: read as the same images in a folder are (samples, batches, training), a killed
run resumes exactly, a corrupt member is skipped and named, a missing shard or a bad pattern is one line."""
import io
import json
import os
import shutil
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import kill_at_step
import data
import train_ae
from runtime import UserError


def _encoded(i):
    """Image i as file bytes: sizes and formats vary (PNG and JPEG)."""
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 255, (36 + i % 5, 40 + 3 * (i % 4), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG" if i % 3 else "JPEG")
    return buf.getvalue(), "png" if i % 3 else "jpg"


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_shards(folder, samples, per_shard, prefix="train-"):
    """samples: (key, bytes, ext, label or None), written in order as WebDataset does (the label after the image
    here, before it in shard 1: member order within a key does not matter). Returns the brace pattern."""
    os.makedirs(folder, exist_ok=True)
    n = (len(samples) + per_shard - 1) // per_shard
    for s in range(n):
        with tarfile.open(os.path.join(folder, f"{prefix}{s:03d}.tar"), "w") as tar:
            for key, payload, ext, label in samples[s * per_shard:(s + 1) * per_shard]:
                if label is not None and s == 1:
                    _add(tar, f"{key}.cls", str(label).encode())
                _add(tar, f"{key}.{ext}", payload)
                if label is not None and s != 1:
                    _add(tar, f"{key}.cls", f"{label}\n".encode())
    return os.path.join(folder, f"{prefix}{{000..{n - 1:03d}}}.tar")


@pytest.fixture(scope="module")
def same_images(tmp_path_factory):
    """24 images in two class folders and the same images, in the folder's order, in 3 shards of 8 (keys in a
    sub-folder with a dot, as `tar -C dir .` writes them). Returns (folder, pattern)."""
    root = tmp_path_factory.mktemp("same")
    samples = []
    for i in range(24):
        payload, ext = _encoded(i)
        label = i // 12
        path = root / "folder" / f"class_{label}" / f"img_{i:03d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
        samples.append((f"./v1.0/img_{i:03d}", payload, ext, label))
    return str(root / "folder"), write_shards(str(root / "shards"), samples, 8)


def test_expand_keeps_widths_and_multiplies():
    assert data._expand("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert data._expand("n{0..1}/s{000098..000099}.tar") == [
        "n0/s000098.tar", "n0/s000099.tar", "n1/s000098.tar", "n1/s000099.tar"]
    assert data._expand("/x/one.tar") == ["/x/one.tar"]


def test_shards_read_as_the_same_folder_and_cache_their_index(same_images, tmp_path, monkeypatch):
    folder, pattern = same_images
    for train in (False, True):
        a, b = data.build_dataset(folder, 24, train=train), data.build_dataset(pattern, 24, train=train)
        assert isinstance(b, data.TarShards) and len(a) == len(b) == 24
        assert b.num_classes == a.num_classes == 2 and list(b.labels) == list(a.labels)
        for key in (0, 7, (13, 12345), (23, 99)):
            assert torch.equal(a[key][0], b[key][0]) and a[key][1] == b[key][1]
    # The loader: rank 1 of 2, resumed at step 3, sees the same batches from either source.
    for (xa, ya), (xb, yb), _ in zip(data.infinite_loader(a, 4, 1, 2, seed=3, start_step=3, num_workers=0),
                                     data.infinite_loader(b, 4, 1, 2, seed=3, start_step=3, num_workers=0), range(4)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # The index is built once, beside the shard; a rewritten shard is indexed again.
    shard = pattern.replace("{000..002}", "000")
    assert json.load(open(shard + ".idx.json"))["samples"][0][:1] == ["./v1.0/img_000.jpg"]
    real = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("indexed again"))
    assert len(data.build_dataset(pattern, 24)) == 24
    monkeypatch.setattr(tarfile, "open", real)
    copy = tmp_path / "ro" / "one.tar"
    copy.parent.mkdir()
    write_shards(str(copy.parent), [("k", *_encoded(1), 5)], 8, prefix="one")
    os.rename(copy.parent / "one000.tar", copy)
    # A read-only folder (root writes anywhere: os.access stands in): the index goes to ~/.cache/vitok.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(os, "access", lambda *args: False)
    assert data.build_dataset(str(copy), 24).labels == (5,) and not os.path.exists(str(copy) + ".idx.json")
    assert os.listdir(tmp_path / "home" / ".cache" / "vitok") == [str(copy).replace("/", "%") + ".idx.json"]
    write_shards(str(copy.parent), [("k", *_encoded(1), 7)], 8, prefix="one")
    os.replace(copy.parent / "one000.tar", copy)
    os.utime(copy, ns=(1, 10 ** 18))
    assert data.build_dataset(str(copy), 24).labels == (7,)


def test_corrupt_member_is_skipped_and_named_and_labels_are_optional(tmp_path):
    good, ext = _encoded(2)
    samples = [("a", good, ext, None), ("bad", b"not an image", "jpg", None), ("c", good[:100], ext, None),
               ("d", good, ext, None)]
    unlabelled = data.build_dataset(write_shards(str(tmp_path / "u"), samples, 2), 16)
    assert unlabelled.num_classes == 0 and list(unlabelled.labels) == [-1] * 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, y = unlabelled[1]  # the next readable member stands in, as for a folder
    assert torch.equal(x, unlabelled[3][0]) and y == -1
    named = " ".join(str(w.message) for w in caught)
    assert f"{tmp_path}/u/train-000.tar:bad.jpg" in named and "train-001.tar:c.png" in named
    mixed = data.build_dataset(write_shards(str(tmp_path / "m"), [("a", good, ext, 4), ("b", good, ext, None)], 2), 16)
    assert mixed.num_classes == 5 and list(mixed.labels) == [4, -1]


def test_missing_shard_bad_pattern_and_clips_are_one_line_errors(same_images, tmp_path):
    _, pattern = same_images
    cases = [(pattern.replace("002}", "003}"), "train-003.tar does not exist"),
             (pattern.replace("{000..002}", "{000..}"), "bad shard pattern"),
             (pattern.replace("{000..002}", "{002..000}"), "bad shard pattern")]
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tar:  # compressed: no offsets to seek to
        _add(tar, "a.png", _encoded(1)[0])
    cases.append((str(tmp_path / "gz.tar"), "cannot index shard"))
    for source, message in cases:
        with pytest.raises(UserError, match=message) as err:
            data.build_dataset(source, 16)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no clips"):
        data.build_dataset(pattern, 16, num_frames=4)


# Training: train_ae.py's tiny preset at 32^2, batch 8, on the folder and on the shards.
def run(tmp_path, source, name, *extra):
    args = train_ae.parse_args(["--preset", "tiny", "--data", source, "--image-size", "32", "--global-batch-size", "8",
                                "--workers", "0", "--log-every", "1", "--steps", "4", "--ckpt-every", "2",
                                "--ckpt", str(tmp_path / f"{name}.pt"), "--out-dir", str(tmp_path / name),
                                *map(str, extra)])
    train_ae.main(args)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / name / "metrics.jsonl")]
    return torch.load(tmp_path / f"{name}.pt", weights_only=True), losses


@pytest.fixture(scope="module")
def on_shards(same_images, tmp_path_factory):
    return run(tmp_path_factory.mktemp("run"), same_images[1], "shards")


def test_training_on_shards_equals_training_on_the_folder(same_images, on_shards, tmp_path):
    folder_state, folder_losses = run(tmp_path, same_images[0], "folder")
    shard_state, shard_losses = on_shards
    assert shard_losses == folder_losses and len(shard_losses) == 4
    torch.testing.assert_close(shard_state["model"], folder_state["model"], rtol=0, atol=0)


def test_killed_run_on_shards_resumes_with_the_same_weights(same_images, on_shards, tmp_path, monkeypatch):
    undo = kill_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, same_images[1], "resumed")
    assert torch.load(tmp_path / "resumed.pt", weights_only=True)["step"] == 2
    undo()
    resumed, losses = run(tmp_path, same_images[1], "resumed")
    full, full_losses = on_shards
    assert resumed["step"] == 4 and losses[-2:] == pytest.approx(full_losses[-2:], rel=1e-5)
    for key in ("model", "ema"):
        torch.testing.assert_close(resumed[key], full[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed["opt"]["state"], full["opt"]["state"], rtol=1e-5, atol=1e-7)
