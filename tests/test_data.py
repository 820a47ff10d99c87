"""data.py: synthetic source, real folders with bad files, video, and the deterministic distributed loader."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data


def test_synthetic_images_and_clips_are_deterministic_labelled_and_in_range():
    ds = data.build_dataset("synthetic", 32)
    x, y = ds[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1 and y == 3
    assert torch.equal(ds[3][0], x) and ds.num_classes == 10 and len(ds) == 1000
    train = data.build_dataset("synthetic", 32, train=True)
    assert not torch.equal(train[3][0], x)  # another split, and augmented
    clip, label = data.build_dataset("synthetic", 32, num_frames=4)[7]
    assert clip.shape == (3, 4, 32, 32) and label == 7
    assert not torch.equal(clip[:, 0], clip[:, -1])  # the shape moves
    # Classes look different: per-class mean images are further apart than two halves of one class.
    means = torch.stack([torch.stack([ds[c + 10 * k][0] for k in range(8)]).mean(0) for c in range(10)])
    between = torch.cdist(means.flatten(1), means.flatten(1))
    assert between[~torch.eye(10, dtype=torch.bool)].min() > 1.0


def _write(path, mode, size=(40, 30)):
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    if mode == "I;16":
        Image.fromarray((np.arange(size[0] * size[1]).reshape(size[1], size[0]) * 50).astype(np.uint16)).save(path)
    elif mode == "RGBA":
        Image.fromarray(arr, "RGBA").save(path)
    else:
        Image.fromarray(arr[..., :3], "RGB").convert(mode).save(path)


def test_imagenet_layout_converts_odd_images_and_skips_broken_ones(tmp_path):
    root = tmp_path / "train"
    for cls in ("a_cls", "b_cls"):
        (root / cls).mkdir(parents=True)
    _write(root / "a_cls" / "gray.png", "L")
    _write(root / "a_cls" / "cmyk.jpg", "CMYK")
    _write(root / "a_cls" / "deep.png", "I;16")
    _write(root / "b_cls" / "alpha.png", "RGBA")
    _write(root / "b_cls" / "tiny.png", "RGB", size=(5, 4))
    _write(root / "b_cls" / "full.jpg", "RGB")
    (root / "b_cls" / "cut.jpg").write_bytes((root / "b_cls" / "full.jpg").read_bytes()[:200])  # truncated JPEG
    (root / "b_cls" / "fake.png").write_bytes(b"not an image")
    (root / "b_cls" / "notes.txt").write_text("ignored")
    ds = data.build_dataset(str(root), 16)
    assert ds.num_classes == 2 and len(ds) == 8 and sorted(set(ds.labels)) == [0, 1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 for x, _ in items)
    named = " ".join(str(w.message) for w in caught)
    assert "cut.jpg" in named and "fake.png" in named and len(caught) == 2
    # 16-bit values are scaled, not clipped: the 16-bit ramp spans the range instead of saturating.
    deep = data.load_rgb(root / "a_cls" / "deep.png")
    expected = (np.arange(1200).reshape(30, 40) * 50).astype(np.float64) / 65535
    np.testing.assert_allclose(deep[0].numpy(), expected, atol=1e-6)
    white = data.load_rgb(root / "b_cls" / "alpha.png")  # alpha composited on white
    assert white.shape == (3, 30, 40) and white.min() >= 0


def test_flat_folder_is_unlabelled_and_bad_folders_are_named(tmp_path):
    for i in range(3):
        _write(tmp_path / f"{i}.png", "RGB")
    ds = data.build_dataset(str(tmp_path), 8)
    assert ds.num_classes == 0 and ds[0][1] == -1
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.build_dataset(str(tmp_path / "nowhere"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        data.build_dataset(str(tmp_path / "empty"), 8)


def test_train_crop_is_shared_by_all_frames_of_a_clip(tmp_path):
    for c in range(2):
        clip = tmp_path / "cls" / f"clip{c}"
        clip.mkdir(parents=True)
        for f in range(5):
            Image.fromarray(np.tile(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (40, 1, 3))).save(clip / f"{f:03d}.png")
    ds = data.build_dataset(str(tmp_path), 16, num_frames=3, train=True, frame_stride=2)
    x, y = ds[(1, 123)]
    assert x.shape == (3, 3, 16, 16) and y == 0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])  # identical frames, identical crops
    assert torch.equal(ds[(1, 123)][0], x) and not torch.equal(ds[(1, 124)][0], x)


def test_video_files_decode_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    (tmp_path / "ClassA").mkdir()
    path = tmp_path / "ClassA" / "v.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for t in range(8):
            frame = np.full((24, 32, 3), 30 * t, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    ds = data.build_dataset(str(tmp_path), 16, num_frames=4, frame_stride=2)
    x, y = ds[0]
    assert x.shape == (3, 4, 16, 16) and y == 0 and ds.num_classes == 1
    brightness = x.mean(dim=(0, 2, 3))
    assert (brightness[1:] > brightness[:-1]).all()  # frames in temporal order, at the stride


def _batches(loader, n):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_loader_yields_the_same_batches(workers):
    ds = data.build_dataset("synthetic", 16, train=True, length=40)
    full = _batches(data.infinite_loader(ds, 4, seed=3, num_workers=workers), 14)  # 10 steps per epoch
    resumed = _batches(data.infinite_loader(ds, 4, seed=3, start_step=7, num_workers=workers), 7)
    for (a, ya), (b, yb) in zip(full[7:], resumed):
        assert torch.equal(a, b) and torch.equal(ya, yb)


class Indices(torch.utils.data.Dataset):
    """Returns each sample's index as its label, to watch the sampler."""

    def __len__(self):
        return 24

    def __getitem__(self, key):
        return torch.zeros(1), key[0]


def test_ranks_take_disjoint_shards_and_epochs_reshuffle():
    def epochs(rank, world, batch, steps):
        loader = data.infinite_loader(Indices(), batch, rank=rank, world_size=world, num_workers=0)
        return [next(loader)[1].tolist() for _ in range(steps)]

    r0, r1 = epochs(0, 2, 4, 6), epochs(1, 2, 4, 6)  # 3 steps per epoch per rank
    first0, first1 = sum(r0[:3], []), sum(r1[:3], [])
    assert len(first0) == len(first1) == 12 and not set(first0) & set(first1) and len(set(first0 + first1)) == 24
    assert sum(r0[3:], []) != first0 and set(sum(r0[3:] + r1[3:], [])) == set(range(24))  # reshuffled epoch 2
    single = epochs(0, 1, 8, 3)
    for k in range(3):  # global batch k is the same set of samples for one rank or two
        assert sorted(single[k]) == sorted(r0[k] + r1[k])
