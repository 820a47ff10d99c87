"""Data: image/video folders, tar shards, procedural sources, a deterministic distributed loader.

build_dataset(source, image_size, ...) -> Dataset of (x, label): x in [-1,1], [3,H,W] (images) or
[3,T,H,W] (clips); label -1: unlabelled. Sources:
- a folder: ImageNet (class sub-folders, labels in sorted order), COCO (flat, images), UCF-101
  (class folders of videos; needs PyAV) or frames (a folder per clip, in class folders or not);
  `split_file` keeps the files it lists (UCF-101's trainlist01.txt).
- WebDataset tar shards of images ("train-{000000..001281}.tar").
- "synthetic": shapes in 10 classes; "deadleaves": the dead-leaves model of natural images.
Clips: num_frames frames every frame_stride-th (the paper's 16 at 8 fps: stride 3 on UCF-101's 25).
Eval resizes the short side, crops the centre. Training: images RandomResizedCrop (scale 0.8-1,
ratio 3/4-4/3); clips (the paper's recipe: no aspect jitter) resize, crop a random square, the same
for every frame; both flip horizontally.
Keys: an index, or (index, seed) from infinite_loader, whose seed (index_seed) draws the training
augmentation: a crop depends on (run seed, epoch, index) alone, so resumed runs repeat batches.
"""
import io
import json
import math
import os
import re
import tarfile
import warnings

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from runtime import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".jfif"}
VIDEO_EXTS = {".avi", ".mp4", ".mkv", ".webm", ".mov"}


def _ext(path):
    return os.path.splitext(path)[1].lower()


def _scan(folder, exts):
    """Sorted files with one of exts, sorted sub-folders (os.scandir: fast)."""
    entries = list(os.scandir(folder))
    return (sorted(e.path for e in entries if not e.is_dir() and _ext(e.name) in exts),
            sorted(e.path for e in entries if e.is_dir()))


def load_rgb(path):
    """Any image file -> RGB [3,H,W]: uint8 (a float copy costs a decode; transform converts the
    crop); 16-bit: float in [0,1], scaled, not clipped; alpha over white."""
    with Image.open(path) as img:
        img.load()  # a broken file fails here, in the caller's try
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32) / (
                65535.0 if img.mode != "I" or np.asarray(img).max() > 255 else 255.0)
            return torch.from_numpy(arr).clamp(0, 1).expand(3, -1, -1).clone()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def transform(frames, size, gen=None, square=False):
    """frames [T,3,h,w] (uint8 or float in [0,1]) -> float [T,3,size,size] in [0,1] (module
    docstring): eval without gen; clips (square) one draw each; 10 tries, as torchvision."""
    h, w = frames.shape[-2:]
    if gen is None or square:
        frames = TF.resize(frames, size, antialias=True)
        if gen is None:
            return to_unit(TF.center_crop(frames, size))
        (h, w), ch, cw = frames.shape[-2:], size, size
    else:
        for scale, aspect in torch.rand(10, 2, generator=gen).tolist():
            area = h * w * (0.8 + 0.2 * scale)
            ratio = math.exp(math.log(3 / 4) + aspect * math.log(16 / 9))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:  # no try fitted: the largest square
            ch = cw = min(h, w)
    uy, ux = torch.rand(2, generator=gen).tolist()
    top, left = int(uy * (h - ch + 1)), int(ux * (w - cw + 1))
    frames = to_unit(frames[..., top:top + ch, left:left + cw] if square
                     else TF.resized_crop(frames, top, left, ch, cw, [size, size], antialias=True))
    return frames.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else frames


def to_unit(frames):
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames


def _to_x(frames, num_frames):
    """[T,3,S,S] in [0,1] -> x in [-1,1], [3,S,S] or [3,T,S,S] (clips)."""
    x = frames * 2 - 1
    return (x[0] if num_frames == 1 else x.transpose(0, 1)).contiguous()


class FileDataset(torch.utils.data.Dataset):
    """Files, read by a subclass's load(i, gen) -> [T,3,h,w]; keys: module docstring."""
    window = None

    def __init__(self, items, labels, num_classes, size, num_frames, train, source, stride=3):
        self.items, self.labels, self.num_classes = items, labels, num_classes
        self.size, self.num_frames, self.train, self.source, self.stride, self._warned = (
            size, num_frames, train, source, stride, set())

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, index_seed(key))
        for attempt in range(len(self.items)):  # a bad file: warn, take the next
            i = (index + attempt) % len(self.items)
            gen = torch.Generator().manual_seed(seed)
            try:
                frames = self.load(i, gen)
            except Exception as err:  # PIL and PyAV raise many types
                if self.items[i] not in self._warned:
                    self._warned.add(self.items[i])
                    warnings.warn(
                        f"skipping unreadable file {self.items[i]}: {type(err).__name__}: {err}")
                continue
            frames = transform(
                frames, self.size, gen if self.train else None, square=self.num_frames > 1)
            return _to_x(frames, self.num_frames), self.labels[i]
        raise UserError(f"no readable file in {self.source}")

    def pick(self, n, gen):
        """num_frames of n frames, stride apart (a short clip repeats its last), from `window`:
        None ("random" training, else 0.5: centred), "random", or the fraction of free frames
        before the start (0: first frames, 1: last)."""
        free = max(0, n - (self.num_frames - 1) * self.stride - 1)  # starts after the first
        window = self.window if self.window is not None else "random" if self.train else 0.5
        start = (int(torch.randint(0, free + 1, (1,), generator=gen)) if window == "random"
                 else int(window * free))
        return [min(start + k * self.stride, n - 1) for k in range(self.num_frames)]


class ImageFolder(FileDataset):
    def load(self, i, gen):
        return load_rgb(self.items[i])[None]


class TarShards(FileDataset):
    """<key>.<image ext> (+ <key>.cls: an int) members read at offsets (_index): ranks and
    resumes pick samples as in a folder, which a stream cannot."""

    def load(self, i, gen):
        shard, offset, size = self.spans[i]
        with open(shard, "rb") as f:
            f.seek(offset)
            return load_rgb(io.BytesIO(f.read(size)))[None]


def _expand(pattern):
    """a{08..10}.tar -> [a08.tar, a09.tar, a10.tar]: widths kept."""
    m = re.search(r"{(\d+)\.\.(\d+)}", pattern)
    if m is None and "{" not in pattern:
        return [pattern]
    if m is None or int(m[1]) > int(m[2]):
        raise UserError(f"bad shard pattern {pattern} (braces: a range like {{000..099}})")
    return [s for n in range(int(m[1]), int(m[2]) + 1)
            for s in _expand(pattern[:m.start()] + str(n).zfill(len(m[1])) + pattern[m.end():])]


def _index(shard):
    """[[member, offset, size, label]] of a shard's images, read from its headers once (until it
    changes)."""
    if not os.path.isfile(shard):
        raise UserError(f"shard {shard} does not exist")
    path, stamp = os.path.abspath(shard) + ".idx.json", os.stat(shard).st_mtime_ns
    if not (os.path.isfile(path) or os.access(os.path.dirname(path), os.W_OK)):
        path = os.path.expanduser("~/.cache/vitok/") + path.replace("/", "%")
    index = json.load(open(path)) if os.path.isfile(path) else {}
    if index.get("stamp") == stamp:
        return index["samples"]
    images, labels = {}, {}
    try:
        with tarfile.open(shard, "r:") as tar:  # uncompressed: offsets are the file's
            for m in tar:
                key, ext = re.fullmatch(r"((?:.*/)?[^/.]*)\.?(.*)", m.name, re.S).groups()
                if ext == "cls":
                    labels[key] = int(tar.extractfile(m).read())
                elif "." + ext.lower() in IMAGE_EXTS:
                    images.setdefault(key, [m.name, m.offset_data, m.size])
    except (tarfile.TarError, ValueError) as err:  # or a .cls that is no int
        raise UserError(f"cannot index shard {shard}: {err}") from None
    samples = [[*v, labels.get(k, -1)] for k, v in images.items()]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.{os.getpid()}", "w") as f:  # renamed: ranks index at once
        json.dump({"stamp": stamp, "samples": samples}, f)
    os.replace(f.name, path)
    return samples


class FrameFolder(FileDataset):
    """Clips as folders of frames (sorted by name)."""

    def load(self, i, gen):
        frames, _ = _scan(self.items[i], IMAGE_EXTS)
        if not frames:
            raise ValueError("no frames")
        return torch.stack([load_rgb(frames[k]) for k in self.pick(len(frames), gen)])


class VideoFolder(FileDataset):
    """Video files via PyAV; to spare CPU, decoding stops after the clip (picked from the header's
    frame count if any) and only its frames become RGB."""

    def load(self, i, gen):
        import av
        with av.open(self.items[i]) as container:
            stream = container.streams.video[0]
            want = self.pick(stream.frames, gen) if stream.frames > 0 else None
            decoded = {}
            for k, frame in enumerate(container.decode(stream)):
                if want is None or k in want:
                    decoded[k] = frame
                if want and k >= want[-1]:
                    break
        if not decoded:
            raise ValueError("no decodable video frames")
        want = want or self.pick(len(decoded), gen)
        # A header that over-counts: repeat the last frame, as a short clip does.
        clip = [decoded[min(k, max(decoded))].to_ndarray(format="rgb24") for k in want]
        return torch.from_numpy(np.stack(clip)).permute(0, 3, 1, 2)  # [T,3,h,w] uint8


class Procedural(torch.utils.data.Dataset):
    """Drawn, not read: sample `index` is seeded by it (eval: another stream); training adds the
    files' augmentation from the key's seed."""

    def __init__(self, size, num_frames=1, train=False, length=None):
        self.size, self.num_frames, self.train = size, num_frames, train
        self.length = length or (10_000 if train else 1_000)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, index_seed(key))
        gen = torch.Generator().manual_seed(index + (0 if self.train else 10 ** 9))
        frames, label = self.render(index, gen)  # [T,3,S,S] in [0,1]
        if self.train:
            gen = torch.Generator().manual_seed(seed)
            frames = transform(frames, self.size, gen, square=self.num_frames > 1)
        return _to_x(frames, self.num_frames), label


class Synthetic(Procedural):
    """Classes of shape (disc, square, triangle, ring, cross, striped square, striped disc, checker,
    diamond, two discs) and hue; position, size, background, texture, motion vary."""

    num_classes = 10

    def render(self, index, gen):
        label = index % self.num_classes
        return draw(label, self.size, self.num_frames, gen), label


def draw(label, size, num_frames, gen):
    """One clip [T,3,S,S] in [0,1]: a class shape moving linearly over a textured two-colour
    gradient."""
    r = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    line = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(line, line, indexing="ij")
    t = torch.arange(num_frames, dtype=torch.float32)[:, None, None]  # [T,1,1]
    center, velocity, radius = r(2) * 0.8 - 0.4, (r(2) - 0.5) * 0.15, 0.3 + 0.25 * r(1)
    dx, dy = xx - center[0] - velocity[0] * t, yy - center[1] - velocity[1] * t  # [T,S,S]
    dist, rad, ax, ay = (dx ** 2 + dy ** 2).sqrt(), radius.item(), dx.abs(), dy.abs()
    disc, square, freq = dist < rad, torch.maximum(ax, ay) < rad, 3 * math.pi / rad
    masks = [  # Synthetic's order
        disc, square, (dy > -rad) & (dy < 0.6 * rad) & (ax < (dy + rad) * 0.6),
        disc & (dist > 0.55 * rad), square & (torch.minimum(ax, ay) < rad / 3),
        square & (torch.sin(dy * freq) > 0), disc & (torch.sin(dx * freq) > 0),
        square & (torch.sin(dx * freq) * torch.sin(dy * freq) > 0), ax + ay < rad,
        torch.minimum((dx - rad / 2) ** 2, (dx + rad / 2) ** 2) + dy ** 2 < (rad / 2.2) ** 2]
    hue = (label / 10 + 0.03 * (r(1).item() - 0.5)) % 1.0
    colour = torch.tensor([abs(hue * 6 - 3) - 1, 2 - abs(hue * 6 - 2), 2 - abs(hue * 6 - 4)])
    colour = (0.15 + 0.8 * colour.clamp(0, 1))[:, None, None, None]  # [3,1,1,1] class hue
    angle = r(1).item() * 2 * math.pi
    ramp = (math.cos(angle) * xx + math.sin(angle) * yy + 1) / 2  # [S,S]
    c0, c1 = 0.2 + 0.6 * r(3, 1, 1), 0.2 + 0.6 * r(3, 1, 1)
    texture = 0.04 * torch.sin(xx * 8 * r(1) * math.pi + yy * 8 * r(1) * math.pi + r(1) * 6)
    background = (c0 * (1 - ramp) + c1 * ramp + texture) * 0.7  # [3,S,S], dim: shapes stand out
    frames = torch.where(masks[label][None], colour, background[:, None])  # [3,T,S,S]
    return frames.transpose(0, 1).clamp(0, 1)  # [T,3,S,S]


class DeadLeaves(Procedural):
    """Dead leaves (Matheron; Lee, Mumford and Huang 2001, "Occlusion models for natural images"):
    photos' spectrum and edges, no download. Unlabelled: made-up classes mean nothing to a DiT."""

    num_classes = 0

    def render(self, index, gen):
        # Drawn at twice the size and averaged (anti-aliased); leaves and gratings from 4 px:
        # photo tiles' statistics (README, Results).
        x = dead_leaves(2 * self.size, self.num_frames, gen, rmin=8.0, wmin=8.0, contrast=0.5)
        return torch.nn.functional.avg_pool2d(x, 2), -1


def dead_leaves(size, num_frames, gen, rmin=1.0, rmax=None, cover=3.0, wmin=2.0, contrast=1.0):
    """One clip [T,3,S,S] in [0,1]: discs and rotated rectangles fall one on another, radii of
    density r^-3 on [rmin, rmax or S] px, scale-invariant: a 1/f^2 spectrum. Over leaf 0 (all of
    it), textured leaves (below) cover the image `cover` times on average, drift up to S/128 px a
    frame; colours spread `contrast` around grey."""
    S, T, rmax = size, num_frames, float(rmax or size)
    # E[r^2] under r^-3
    mean_r2 = 2 * rmin ** 2 * rmax ** 2 * math.log(rmax / rmin) / (rmax ** 2 - rmin ** 2)
    n = int(cover * S * S / (math.pi * mean_r2))
    u = torch.rand(n + 1, 19, generator=gen).numpy()  # leaf i's numbers; higher i lies on top
    radius = (rmin ** -2 - u[:, 0] * (rmin ** -2 - rmax ** -2)) ** -0.5
    radius[0] = 2 * S  # above: the inverse CDF
    t = np.arange(T)[:, None]
    cy, cx = (u[:, j] * S + (u[:, j + 2] - 0.5) * t * S / 64 for j in (1, 2))  # [T,n+1]
    unit = lambda angle: np.stack([np.cos(angle), np.sin(angle)], 1)  # noqa: E731
    cos, sin = unit(u[:, 5] * math.pi).T
    rect, aspect = u[:, 6] < 0.5, math.pi / 8 + u[:, 7] * math.pi / 8
    half_a, half_b = radius * np.sin(aspect), radius * np.cos(aspect)  # half sides; half diagonal r
    # Vectorised by shape and octave: a leaf tests the square of half-width 2^ceil(log2 r) (each
    # octave of r^-3 costs about the same) in a canvas padded by P a side: no bounds test.
    group = 2 * np.maximum(np.ceil(np.log2(radius)), 0).astype(np.int64) + rect
    P = S // 2 + math.ceil(T * S / 128) + 2
    W = S + 2 * P
    flats, ids = [], []
    for g in np.unique(group).tolist():
        sel = np.flatnonzero(group == g)
        b, m = g // 2, len(sel)
        if 2 ** (b + 1) + 1 >= S:  # a square wider than the image: all of it
            offsets, y0 = np.arange(S), np.zeros((T, m, 1), dtype=np.int64)
            x0 = y0
        else:
            offsets = np.arange(-2 ** b, 2 ** b + 1)
            y0, x0 = (np.floor(c[:, sel, None]).astype(np.int64) for c in (cy, cx))
        oy, ox = np.repeat(offsets, len(offsets)), np.tile(offsets, len(offsets))  # [Q] pixels
        dy = (y0 + 0.5 - cy[:, sel, None]).astype(np.float32) + oy.astype(np.float32)  # [T,m,Q]
        dx = (x0 + 0.5 - cx[:, sel, None]).astype(np.float32) + ox.astype(np.float32)
        if g % 2:  # rectangles, in their own axes
            c, s = cos[sel, None], sin[sel, None]
            inside = ((abs(c * dx + s * dy) < half_a[sel, None])
                      & (abs(c * dy - s * dx) < half_b[sel, None]))
        else:
            inside = dx * dx + dy * dy < radius[sel, None] ** 2
        flat = ((t[:, :, None] * W + y0 + P) * W + x0 + P) + (oy * W + ox)  # [T,m,Q] in canvas
        flats.append(flat[inside])
        ids.append(np.broadcast_to(sel[:, None], inside.shape)[inside])
    top = np.zeros(T * W * W, dtype=np.int64)  # the last leaf to fall on each pixel
    np.maximum.at(top, np.concatenate(flats), np.concatenate(ids))
    k = top.reshape(T, W, W)[:, P:P + S, P:P + S].reshape(T, S * S)  # [T,S*S] the leaf seen
    # Per leaf: a luminance, a weaker tint, a ramp of up to +-0.2 across its radius; on half, a
    # grating of wavelength wmin px to ~r, amplitude up to 0.1.
    ramp = (u[:, 13:14] - 0.5) * 0.4 / radius[:, None] * unit(u[:, 14] * 2 * math.pi)
    wavenumber = 2 * math.pi / np.exp(
        math.log(wmin) + u[:, 16] * np.log(np.maximum(radius, wmin) / wmin + 1))
    wave = wavenumber[:, None] * unit(u[:, 17] * math.pi)
    amplitude = np.maximum(u[:, 15] - 0.5, 0) * 0.2
    colour = 0.5 + contrast * (u[:, 8:9] - 0.5 + (u[:, 9:12] - 0.5) * 0.6 * u[:, 12:13])
    table = np.concatenate(
        [colour, ramp, wave, amplitude[:, None], u[:, 18:19] * 2 * math.pi], 1).astype(np.float32)
    leaf = table[k]  # [T,S*S,9]
    yy, xx = np.divmod(np.arange(S * S), S)
    dy = (yy + 0.5 - np.take_along_axis(cy, k, 1)).astype(np.float32)  # [T,S*S] from centre
    dx = (xx + 0.5 - np.take_along_axis(cx, k, 1)).astype(np.float32)
    texture = (leaf[..., 3] * dy + leaf[..., 4] * dx
               + leaf[..., 7] * np.sin(leaf[..., 5] * dy + leaf[..., 6] * dx + leaf[..., 8]))
    image = np.clip(leaf[..., :3] + texture[..., None], 0, 1)  # [T,S*S,3]
    return torch.from_numpy(image).view(T, S, S, 3).permute(0, 3, 1, 2)


def build_dataset(source, image_size, num_frames=1, train=False, frame_stride=3, split_file=None,
                  length=None):
    """Module docstring; a bare split_file ("trainlist01") is sought in ucfTrainTestlist, in or
    beside `source`; length: a procedural source's size."""
    if source in ("synthetic", "deadleaves"):
        if split_file is not None:
            raise UserError(f"split_file selects files of a folder; {source} has none")
        return (Synthetic if source == "synthetic" else DeadLeaves)(
            image_size, num_frames, train, length)
    if source.endswith(".tar"):
        if num_frames > 1 or split_file:
            raise UserError("tar shards hold images (no clips, no split file)")
        rows = [(f"{s}:{m}", (s, o, n), y) for s in _expand(source) for m, o, n, y in _index(s)]
        items, spans, labels = list(zip(*rows)) or [()] * 3
        dataset = TarShards(items, labels, max(labels, default=-1) + 1, image_size, num_frames,
                            train, source)
        dataset.spans = spans
        return dataset
    if not os.path.isdir(source):
        raise UserError(f"dataset folder {source} does not exist "
                        "(or pass 'synthetic' or 'deadleaves')")
    reader, items, labels, num_classes = _find(source, num_frames)
    if split_file is not None:
        keep = _listed(source, split_file, items)
        items, labels = [items[i] for i in keep], [labels[i] for i in keep]
    if reader is VideoFolder:
        try:
            import av  # noqa: F401
        except ImportError:
            raise UserError(f"reading the videos in {source} needs PyAV: pip install av") from None
    return reader(items, labels, num_classes, image_size, num_frames, train, source, frame_stride)


def _find(source, num_frames):
    """A folder's layout -> (dataset class, items, labels, number of classes)."""
    files, dirs = _scan(source, IMAGE_EXTS | VIDEO_EXTS)
    if num_frames == 1:
        images = [f for f in files if _ext(f) in IMAGE_EXTS]
        if images:  # flat (COCO val2017)
            return ImageFolder, images, [-1] * len(images), 0
        found = [(f, label) for label, d in enumerate(dirs) for f in _scan(d, IMAGE_EXTS)[0]]
        if found:  # ImageNet
            return ImageFolder, [f for f, _ in found], [y for _, y in found], len(dirs)
        raise UserError(f"no images found in {source}: "
                        "expected image files, or class sub-folders of images")
    videos = [f for f in files if _ext(f) in VIDEO_EXTS]
    if videos:
        return VideoFolder, videos, [-1] * len(videos), 0
    # Class folders, less any with neither media nor sub-folders (UCF-101's ucfTrainTestlist).
    scans = [(d, *_scan(d, IMAGE_EXTS | VIDEO_EXTS)) for d in dirs]
    scans = [s for s in scans if s[1] or s[2]]
    items, labels = [], []
    for label, (d, media, subs) in enumerate(scans):
        videos = [f for f in media if _ext(f) in VIDEO_EXTS]
        if videos:  # UCF-101: class/video.avi
            found, reader = videos, VideoFolder
        elif media:  # root/clip/frames
            found, reader, label = [d], FrameFolder, -1
        else:  # root/class/clip/frames
            found, reader = subs, FrameFolder
        items += found
        labels += [label] * len(found)
    if not items:
        raise UserError(f"no videos found in {source}: expected class folders of video files "
                         f"({', '.join(sorted(VIDEO_EXTS))}), or folders of frames")
    return reader, items, labels, 0 if all(label < 0 for label in labels) else len(scans)


def _listed(source, split_file, items):
    """Indices of the items split_file lists (lines "Class/v_x.avi[ 1]", under source, all
    present). Labels stay the sorted class folders' in every split; UCF-101's column (sorted
    case-blind: it differs in places) is ignored."""
    path = split_file
    if not os.path.isfile(path):
        name = os.path.basename(path) + ("" if path.endswith(".txt") else ".txt")
        places = [os.path.join(source, "ucfTrainTestlist", name),
                  os.path.join(os.path.dirname(os.path.abspath(source)), "ucfTrainTestlist", name),
                  os.path.join(source, name)]
        path = next((p for p in places if os.path.isfile(p)), None)
        if path is None:
            raise UserError(f"split file {split_file} not found, nor at {', '.join(places)}")
    listed = []
    with open(path) as f:
        for line in filter(None, map(str.strip, f)):
            head, *tail = line.rsplit(maxsplit=1)
            listed.append(os.path.normpath(
                (head if tail and tail[0].isdigit() else line).replace("\\", "/")))
    where = {os.path.relpath(item, source): i for i, item in enumerate(items)}  # normalised
    missing = [rel for rel in listed if rel not in where]
    if missing:
        shown = ", ".join(os.path.join(source, rel) for rel in missing[:3])
        raise UserError(f"{len(missing)} of the {len(listed)} files listed in {path} are not in "
                        f"{source}: {shown}" + (", ..." if len(missing) > 3 else ""))
    return sorted({where[rel] for rel in listed})


def index_seed(index, seed=0, epoch=0):
    """A sample's augmentation seed in one epoch of one run."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2 ** 62


def infinite_loader(dataset, batch_size, rank=0, world_size=1, seed=0, start_step=0, num_workers=2):
    """Batches (x, y) of batch_size per rank, forever. Epoch e permutes (seed, e); rank r takes
    every world_size-th entry: global batch k is the same for any number of ranks, and step k
    depends only on (seed, k, rank, world_size): start_step skips batches undecoded."""
    per_rank = len(dataset) // world_size
    steps_per_epoch = per_rank // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} samples do not fill one batch of {batch_size} "
                        f"on {world_size} rank(s)")
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        gen = torch.Generator().manual_seed(seed * 7919 + epoch)
        perm = torch.randperm(len(dataset), generator=gen)
        mine = (perm[:per_rank * world_size][rank::world_size]
                [skip * batch_size:steps_per_epoch * batch_size])
        keys = [(i, index_seed(i, seed, epoch)) for i in mine.tolist()]
        yield from torch.utils.data.DataLoader(
            dataset, batch_size, sampler=keys, num_workers=num_workers, drop_last=True,
            pin_memory=torch.cuda.is_available())
        epoch, skip = epoch + 1, 0
