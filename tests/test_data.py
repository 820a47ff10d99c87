"""data.py: procedural sources, real folders with bad files, video and split lists, and the deterministic
distributed loader."""
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import data
from runtime import UserError


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
    with pytest.raises(UserError, match="nowhere"):
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


def _write_video(path, num_frames, size=(32, 24), rate=10):
    """A video whose frame t is uniformly grey at level 6 t: frames are told apart by their brightness."""
    import av
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for t in range(num_frames):
            frame = np.full((size[1], size[0], 3), 6 * t, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_video_files_decode_with_pyav(tmp_path):
    pytest.importorskip("av")
    (tmp_path / "ClassA").mkdir()
    _write_video(tmp_path / "ClassA" / "v.mp4", 8)
    ds = data.build_dataset(str(tmp_path), 16, num_frames=4, frame_stride=2)
    x, y = ds[0]
    assert x.shape == (3, 4, 16, 16) and y == 0 and ds.num_classes == 1
    brightness = x.mean(dim=(0, 2, 3))
    assert (brightness[1:] > brightness[:-1]).all()  # frames in temporal order, at the stride


class _Counting:
    """Wraps a PyAV container to count the frames decoded; `frames` overrides the header's frame count."""

    def __init__(self, container, log, frames=None):
        self.container, self.log, self.frames = container, log, frames
        stream = container.streams.video[0]
        fake = type("Stream", (), {"frames": stream.frames if frames is None else frames})()
        self.streams = type("Streams", (), {"video": [fake]})()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.container.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(video=0):
            self.log.append(1)
            yield frame


@pytest.mark.parametrize("header", [True, False])
def test_video_clip_stops_decoding_after_its_last_frame(tmp_path, monkeypatch, header):
    av = pytest.importorskip("av")
    (tmp_path / "A").mkdir()
    _write_video(tmp_path / "A" / "v.avi", 40)
    with av.open(str(tmp_path / "A" / "v.avi")) as container:  # the reference: every frame, decoded independently
        every = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])
    every = every.permute(0, 3, 1, 2).float() / 255  # [40,3,24,32]
    log, real_open = [], av.open
    monkeypatch.setattr(av, "open", lambda path: _Counting(real_open(path), log, None if header else 0))
    ds = data.build_dataset(str(tmp_path), 16, num_frames=4, frame_stride=3)
    x = ds[0][0]  # eval: the middle clip, start (40 - 10) // 2 = 15
    expected = TF.center_crop(TF.resize(every[[15, 18, 21, 24]], 16, antialias=True), 16) * 2 - 1
    torch.testing.assert_close(x.transpose(0, 1), expected)
    assert len(log) == (25 if header else 40)  # with a frame count, decoding ends at frame 24
    train = data.build_dataset(str(tmp_path), 16, num_frames=4, frame_stride=3, train=True)
    starts = set()
    for seed in range(6):
        log.clear()
        clip = train[(0, seed)][0].mean(dim=(0, 2, 3))  # brightness of each frame
        t = (clip[:, None] - (every.mean(dim=(1, 2, 3)) * 2 - 1)).abs().argmin(1).tolist()  # which frames
        assert [b - a for a, b in zip(t, t[1:])] == [3, 3, 3] and 0 <= t[0] <= 30
        assert len(log) == (t[-1] + 1 if header else 40)
        starts.add(t[0])
    assert len(starts) > 1  # a random start when training


def _write_ucf(root, classes):
    """A UCF-101-like tree: root/<Class>/v_<Class>_g0<k>_c01.avi, and the official ucfTrainTestlist folder in it."""
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for k in (1, 2):
            _write_video(root / cls / f"v_{cls}_g0{k}_c01.avi", 4)
    (root / "ucfTrainTestlist").mkdir()
    train = "".join(f"{cls}/v_{cls}_g01_c01.avi {i + 1}\r\n" for i, cls in enumerate(classes))
    (root / "ucfTrainTestlist" / "trainlist01.txt").write_text(train)
    (root / "ucfTrainTestlist" / "testlist01.txt").write_text("".join(f"{c}/v_{c}_g02_c01.avi\n" for c in classes))


def test_ucf101_split_lists_select_videos_and_keep_folder_labels(tmp_path):
    pytest.importorskip("av")
    root = tmp_path / "UCF-101"
    _write_ucf(root, ["JumpRope", "JumpingJack", "ApplyEyeMakeup"])  # sorted: ApplyEyeMakeup, JumpRope, JumpingJack
    full = data.build_dataset(str(root), 8, num_frames=2)
    assert len(full) == 6 and full.num_classes == 3 and isinstance(full, data.VideoFolder)  # the lists are no class
    train = data.build_dataset(str(root), 8, num_frames=2, split_file="trainlist01")  # found in ucfTrainTestlist
    test = data.build_dataset(str(root), 8, num_frames=2, split_file=str(root / "ucfTrainTestlist" / "testlist01.txt"))
    names = lambda ds: [p.replace(str(root) + "/", "") for p in ds.items]  # noqa: E731
    assert names(train) == ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "JumpRope/v_JumpRope_g01_c01.avi",
                            "JumpingJack/v_JumpingJack_g01_c01.avi"]
    assert all("_g02_" in n for n in names(test)) and len(test) == 3
    # Labels from the sorted folders for both splits (the list's own column, 1 for JumpRope here, is not used).
    assert train.labels == test.labels == [0, 1, 2] and train.num_classes == test.num_classes == 3
    assert train[1][1] == 1 and train[1][0].shape == (3, 2, 8, 8)
    (root / "JumpRope" / "v_JumpRope_g02_c01.avi").unlink()
    with pytest.raises(UserError, match="v_JumpRope_g02_c01.avi"):
        data.build_dataset(str(root), 8, num_frames=2, split_file="testlist01")
    with pytest.raises(UserError, match="trainlist09"):
        data.build_dataset(str(root), 8, num_frames=2, split_file="trainlist09")


def test_training_clips_take_a_square_crop_of_the_short_side_resize(tmp_path):
    frame = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)  # 4:3, as UCF-101's 320x240
    for cls in ("a", "b"):
        for f in range(2):
            (tmp_path / cls / "clip").mkdir(parents=True, exist_ok=True)
            Image.fromarray(frame).save(tmp_path / cls / "clip" / f"{f}.png")
    resized = TF.resize(torch.from_numpy(frame).permute(2, 0, 1), 24, antialias=True).float() / 255 * 2 - 1  # [3,24,32]
    windows = [resized[:, :, left:left + 24] for left in range(resized.shape[-1] - 24 + 1)]
    windows += [w.flip(-1) for w in windows]
    ds = data.build_dataset(str(tmp_path), 24, num_frames=2, frame_stride=1, train=True)
    seen = set()
    for seed in range(12):
        x = ds[(0, seed)][0][:, 0]
        match = [i for i, w in enumerate(windows) if torch.allclose(x, w, atol=1e-5)]
        assert match, "a training clip must be a window of the short-side resize (no zoom, no aspect change)"
        seen.add(match[0])
    assert len({i % 9 for i in seen}) > 2 and min(seen) < 9 <= max(seen)  # random offsets and both flips
    # Images keep RandomResizedCrop: they zoom, so most crops are no such window.
    images = data.transform(torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255, 24,
                            torch.Generator().manual_seed(0)) * 2 - 1
    assert not any(torch.allclose(images[0], w, atol=1e-5) for w in windows)


def test_dead_leaves_are_deterministic_unlabelled_and_move_slowly():
    ds = data.build_dataset("deadleaves", 32)
    x, y = ds[5]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert y == -1 and ds.num_classes == 0 and len(ds) == 1000
    assert torch.equal(data.build_dataset("deadleaves", 32)[5][0], x) and not torch.equal(ds[6][0], x)
    assert x.std() > 0.1 and len(torch.unique(x[0])) > 50  # many leaves, textured
    train = data.build_dataset("deadleaves", 32, train=True)
    assert not torch.equal(train[(5, 0)][0], x)  # another stream, augmented
    assert torch.equal(train[(5, 0)][0], train[(5, 0)][0])
    clip = data.build_dataset("deadleaves", 32, num_frames=4)[5][0]  # [3,4,32,32]
    step = (clip[:, 1:] - clip[:, :-1]).abs().mean()
    assert 0 < step < 0.5 * (ds[5][0] - ds[6][0]).abs().mean()  # frames change, less than images differ


def _spectrum_slope(images):
    """Log-log slope of the radially averaged power spectrum of grey images [N,3,S,S] (Hann window), fitted over 2 to
    S/4 cycles per image."""
    S = images.shape[-1]
    grey = images.mean(1).double()
    grey = grey - grey.mean(dim=(1, 2), keepdim=True)
    window = torch.hann_window(S, periodic=False, dtype=torch.float64)
    power = (torch.fft.fft2(grey * window[:, None] * window).abs() ** 2).mean(0)  # [S,S]
    f = torch.fft.fftfreq(S, d=1 / S)  # cycles per image
    ring = (f[:, None] ** 2 + f[None] ** 2).sqrt().round().long().flatten()
    radial = torch.bincount(ring, power.flatten()) / torch.bincount(ring)
    freqs = np.arange(2, S // 4 + 1)
    return np.polyfit(np.log(freqs), np.log(radial[freqs].numpy()), 1)[0]


def test_dead_leaves_have_the_spectrum_and_edges_of_photo_tiles():
    """At 64^2, photo tiles (tools/photo_tiles.py: scikit-image's test photos) have a power-spectrum slope of -2.9 and
    2.5-3.2% of pixels with a grey-level step |dx| > 0.2; one-pixel leaves drawn without anti-aliasing had 18% such
    steps. The leaves here: slope -2.6 to -2.7 and 2.4% (measured on 64 and 200 images)."""
    leaves = data.build_dataset("deadleaves", 64)
    x = torch.stack([leaves[i][0] for i in range(64)])
    assert -3.0 < _spectrum_slope(x) < -2.3
    grey = (x.mean(1) + 1) / 2
    steps = (grey.diff(dim=-1).abs() > 0.2).float().mean().item()
    assert 0.01 < steps < 0.05, steps


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


def test_dead_leaves_shard_over_ranks_and_resume_exactly():
    ds = data.build_dataset("deadleaves", 16, train=True, length=24)  # 3 global batches of 8 per epoch
    single = _batches(data.infinite_loader(ds, 8, seed=1, num_workers=0), 4)
    ranks = [_batches(data.infinite_loader(ds, 4, rank=r, world_size=2, seed=1, num_workers=0), 4) for r in (0, 1)]
    for k in range(4):  # global batch k, on one rank or split over two, holds the same augmented images
        union = torch.cat([ranks[0][k][0], ranks[1][k][0]])
        match = [[j for j in range(8) if torch.equal(row, union[j])] for row in single[k][0]]
        assert sorted(sum(match, [])) == list(range(8))
        assert set(single[k][1].tolist()) == {-1}
    assert not torch.equal(single[0][0], single[3][0])
    resumed = _batches(data.infinite_loader(ds, 4, rank=1, world_size=2, seed=1, start_step=2, num_workers=0), 2)
    for (a, _), (b, _) in zip(ranks[1][2:], resumed):  # across the epoch boundary too
        assert torch.equal(a, b)
