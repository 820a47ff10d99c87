"""Data: image and video folders, two procedural sources, and a deterministic distributed loader.

    build_dataset(source, image_size, num_frames=1, train=False, frame_stride=3, split_file=None,
                  length=None)
        -> Dataset of (x, label): x in [-1,1], [3,H,W] for images or [3,T,H,W] for clips; label -1
           when unlabelled.

Sources:
- a folder: ImageNet (class sub-folders of images, labels in sorted folder order), a flat folder
  of images (COCO), UCF-101 (class folders of video files, decoded with PyAV: `pip install av`),
  or folders of frames (a clip is a folder of images, under class folders or not). `split_file`
  keeps only the files a list names, as UCF-101's official splits (trainlist01.txt /
  testlist01.txt); labels stay those of the sorted class folders.
- "synthetic": drawn shapes, 10 classes (shape and hue), for the demo and the tests.
- "deadleaves": the dead-leaves model of natural images (occluding textured shapes with r^-3
  sizes, so a 1/f^2 power spectrum and the sharp edges of photographs), unlabelled; clips drift
  slowly.
Clips take num_frames frames every frame_stride-th: the paper's 16 frames at 8 fps are stride 3 on
UCF-101's 25 fps.
Transforms: eval resizes the short side and crops the centre. Training images: RandomResizedCrop
(scale 0.8-1, ratio 3/4-4/3) + horizontal flip. Training clips: resize the short side, a random
square crop and a flip, the same for every frame (the paper's video recipe: no aspect jitter).
"""
import math
import os
import warnings

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from runtime import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".jfif"}
VIDEO_EXTS = {".avi", ".mp4", ".mkv", ".webm", ".mov"}


def _scan(folder, exts):
    """Sorted files of folder with one of exts, and its sorted sub-folders (os.scandir: fast on
    ImageNet)."""
    files, dirs = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_dir():
                dirs.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in exts:
                files.append(e.path)
    return sorted(files), sorted(dirs)


def load_rgb(path):
    """Any image file -> uint8 [3,H,W] (16-bit images: float in [0,1], scaled, not clipped);
    transparency is composited on white; grayscale, palette and CMYK are converted to RGB. The
    transform crops and resizes in uint8 and converts the small result to float: converting the
    whole decoded image costs as much as decoding it."""
    with Image.open(path) as img:
        img.load()  # a truncated or non-image file fails here, inside the caller's error handling
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32) / (
                65535.0 if img.mode != "I" or np.asarray(img).max() > 255 else 255.0)
            return torch.from_numpy(arr.copy()).clamp(0, 1).expand(3, -1, -1).clone()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def transform(frames, size, gen=None, square=False):
    """frames [T,3,h,w] (uint8, or float in [0,1]) -> float [T,3,size,size] in [0,1]. Without a
    generator (eval): resize the short side to `size` and crop the centre. With one (training),
    drawn once for the whole clip: RandomResizedCrop (scale 0.8-1, log-uniform aspect 3/4-4/3, ten
    tries, as torchvision), or with square=True (clips) the short side resized and a random square
    crop; then a horizontal flip."""
    h, w = frames.shape[-2:]
    if gen is None or square:
        frames = TF.resize(frames, size, antialias=True)
        if gen is None:
            return to_unit(TF.center_crop(frames, size))
        h, w = frames.shape[-2:]
        top, left = (int(u * (n + 1))
                     for u, n in zip(torch.rand(2, generator=gen).tolist(), (h - size, w - size)))
        frames = frames[..., top:top + size, left:left + size]
    else:
        for scale, aspect in torch.rand(10, 2, generator=gen).tolist():
            area, ratio = (h * w * (0.8 + 0.2 * scale),
                           math.exp(math.log(3 / 4) + aspect * math.log(16 / 9)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:  # no try fitted: the largest square
            ch = cw = min(h, w)
        top, left = (int(u * (n + 1))
                     for u, n in zip(torch.rand(2, generator=gen).tolist(), (h - ch, w - cw)))
        frames = TF.resized_crop(frames, top, left, ch, cw, [size, size], antialias=True)
    frames = to_unit(frames)
    return frames.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else frames


def to_unit(frames):
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames


class FileDataset(torch.utils.data.Dataset):
    """Keys are an index, or (index, seed) from infinite_loader: the seed draws the training
    augmentation, so a sample's crop is a function of (run seed, epoch, index) alone and a resumed
    run sees the same batches."""

    def __init__(self, items, labels, num_classes, size, num_frames, train, source, stride=3):
        self.items, self.labels, self.num_classes = items, labels, num_classes
        self.size, self.num_frames, self.train, self.source, self.stride = (
            size, num_frames, train, source, stride)
        self._warned = set()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, index_seed(key))
        # A bad file is replaced by the next good one, with a warning.
        for attempt in range(len(self.items)):
            i = (index + attempt) % len(self.items)
            gen = torch.Generator().manual_seed(seed)
            try:
                frames = self.load(i, gen)  # [T,3,h,w], uint8 or in [0,1]
            except Exception as err:
                # PIL and PyAV raise many types for broken files; we name the file, then skip it.
                if self.items[i] not in self._warned:
                    self._warned.add(self.items[i])
                    warnings.warn(f"skipping unreadable file {self.items[i]}: "
                                  f"{type(err).__name__}: {err}")
                continue
            frames = transform(frames, self.size, gen if self.train else None,
                               square=self.num_frames > 1)
            frames = frames * 2 - 1  # [T,3,S,S] in [-1,1]
            # [3,S,S] or [3,T,S,S]
            x = frames[0] if self.num_frames == 1 else frames.transpose(0, 1)
            return x.contiguous(), self.labels[i]
        raise UserError(f"no readable file in {self.source}")

    def pick(self, n, gen):
        """Indices of num_frames frames at the fixed stride out of n; a random start when training,
        else the middle. A clip too short for the span repeats its last frame."""
        span = (self.num_frames - 1) * self.stride + 1
        start = (int(torch.randint(0, max(1, n - span + 1), (1,), generator=gen)) if self.train
                 else max(0, n - span) // 2)
        return [min(start + k * self.stride, n - 1) for k in range(self.num_frames)]


class ImageFolder(FileDataset):
    def load(self, i, gen):
        return load_rgb(self.items[i])[None]


class FrameFolder(FileDataset):
    """Clips stored as folders of frames (sorted by file name)."""

    def load(self, i, gen):
        frames, _ = _scan(self.items[i], IMAGE_EXTS)
        if not frames:
            raise ValueError("no frames")
        return torch.stack([load_rgb(frames[k]) for k in self.pick(len(frames), gen)])


class VideoFolder(FileDataset):
    """Video files (UCF-101 .avi, .mp4, ...), decoded with PyAV. The clip is chosen from the frame
    count in the container's header, decoding stops after its last frame and only its frames are
    converted to RGB, so a clip costs less CPU time than decoding the whole file. Files whose
    header gives no count are decoded to the end."""

    def load(self, i, gen):
        import av
        with av.open(self.items[i]) as container:
            stream = container.streams.video[0]
            want = self.pick(stream.frames, gen) if stream.frames > 0 else None
            decoded = {}
            for k, frame in enumerate(container.decode(stream)):
                if want is None or k in want:
                    decoded[k] = frame  # kept as decoded; converted to RGB only if chosen
                if want is not None and k >= want[-1]:
                    break
        if not decoded:
            raise ValueError("no decodable video frames")
        if want is None:
            want = self.pick(len(decoded), gen)
        # A header that over-counts: the clip repeats its last frame, as a short clip does.
        last = max(decoded)
        clip = np.stack([decoded[min(k, last)].to_ndarray(format="rgb24")
                         for k in want])  # [T,h,w,3] uint8
        return torch.from_numpy(clip).permute(0, 3, 1, 2)  # [T,3,h,w] uint8


class Procedural(torch.utils.data.Dataset):
    """Drawn, not read: sample `index` is the same image (or clip) every time, from a generator
    seeded by the index, and the eval split draws from another stream than train. Training adds
    the same augmentation as real data, drawn from the key's seed (keys as for folders), so
    sharding and exact resume hold as for files."""

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
            frames = transform(frames, self.size, torch.Generator().manual_seed(seed),
                               square=self.num_frames > 1)
        x = frames * 2 - 1
        return (x[0] if self.num_frames == 1 else x.transpose(0, 1)).contiguous(), label


class Synthetic(Procedural):
    """Class-labelled shapes (10 classes). Class = shape (disc, square, triangle, ring, cross,
    striped square, striped disc, checker, diamond, two discs) and hue; position, size, background,
    texture and motion vary within a class."""

    num_classes = 10

    def render(self, index, gen):
        label = index % self.num_classes
        return draw(label, self.size, self.num_frames, gen), label


def draw(label, size, num_frames, gen):
    """One synthetic clip [T,3,S,S] in [0,1]: a textured two-colour gradient background and a
    class shape moving linearly. Vectorised over pixels and frames."""
    r = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    t = torch.arange(num_frames, dtype=torch.float32)[:, None, None]  # [T,1,1]
    center, velocity, radius = r(2) * 0.8 - 0.4, (r(2) - 0.5) * 0.15, 0.3 + 0.25 * r(1)
    dx, dy = xx - center[0] - velocity[0] * t, yy - center[1] - velocity[1] * t  # [T,S,S]
    dist, rad = (dx ** 2 + dy ** 2).sqrt(), radius.item()
    square = torch.maximum(dx.abs(), dy.abs()) < rad
    freq = 3 * math.pi / rad
    masks = [
        dist < rad,
        square,
        (dy > -rad) & (dy < 0.6 * rad) & (dx.abs() < (dy + rad) * 0.6),
        (dist < rad) & (dist > 0.55 * rad),
        ((dx.abs() < rad / 3) & (dy.abs() < rad)) | ((dy.abs() < rad / 3) & (dx.abs() < rad)),
        square & (torch.sin(dy * freq) > 0),
        (dist < rad) & (torch.sin(dx * freq) > 0),
        square & (torch.sin(dx * freq) * torch.sin(dy * freq) > 0),
        dx.abs() + dy.abs() < rad,
        ((dx - rad / 2) ** 2 + dy ** 2 < (rad / 2.2) ** 2)
        | ((dx + rad / 2) ** 2 + dy ** 2 < (rad / 2.2) ** 2),
    ]
    hue = (label / 10 + 0.03 * (r(1).item() - 0.5)) % 1.0
    colour = torch.tensor([abs(hue * 6 - 3) - 1, 2 - abs(hue * 6 - 2),
                           2 - abs(hue * 6 - 4)]).clamp(0, 1)
    colour = (0.15 + 0.8 * colour)[:, None, None, None]  # [3,1,1,1] class hue
    angle = r(1).item() * 2 * math.pi
    ramp = (math.cos(angle) * xx + math.sin(angle) * yy + 1) / 2  # [S,S] gradient direction
    c0, c1 = 0.2 + 0.6 * r(3, 1, 1), 0.2 + 0.6 * r(3, 1, 1)
    texture = 0.04 * torch.sin(xx * 8 * r(1) * math.pi + yy * 8 * r(1) * math.pi + r(1) * 6)
    # [3,S,S], darkened so the shape stands out
    background = (c0 * (1 - ramp) + c1 * ramp + texture) * 0.7
    frames = torch.where(masks[label][None], colour, background[:, None])  # [3,T,S,S]
    return frames.transpose(0, 1).clamp(0, 1)  # [T,3,S,S]


class DeadLeaves(Procedural):
    """The dead-leaves model (Matheron; Lee, Mumford and Huang 2001, "Occlusion models for natural
    images"): images with the power spectrum and edges of photographs, for tokenizer experiments
    without a download. Unlabelled (0 classes, label -1), like a flat folder of photos: the model
    has no classes, and invented ones would not mean anything to a class-conditional DiT."""

    num_classes = 0

    def render(self, index, gen):
        return dead_leaves(self.size, self.num_frames, gen), -1


def dead_leaves(size, num_frames, gen, rmin=1.0, rmax=None, cover=3.0):
    """One dead-leaves clip [T,3,S,S] in [0,1]. Discs and rotated rectangles fall one on another in
    random order; radii have density r^-3 between rmin pixels and the image size, the
    scale-invariant law that gives a 1/f^2 power spectrum. Each leaf has a colour (a luminance and
    a weaker tint), a linear shading and, on half of them, a grating; leaves drift by up to half a
    pixel per frame (at 64^2). Enough leaves fall to cover the image `cover` times on average; leaf
    0, under all others, covers it all. Vectorised: each leaf tests a square of pixels of
    half-width the power of two above its radius; with r^-3 radii every octave of sizes costs
    about the same."""
    S, T = size, num_frames
    rmax = float(rmax or S)
    # E[r^2] under r^-3
    mean_r2 = 2 * rmin ** 2 * rmax ** 2 * math.log(rmax / rmin) / (rmax ** 2 - rmin ** 2)
    n = int(cover * S * S / (math.pi * mean_r2))
    u = torch.rand(n + 1, 19, generator=gen).numpy()  # leaf i's numbers; higher i lies on top
    # The inverse CDF of r^-3 on [rmin, rmax].
    radius = (rmin ** -2 - u[:, 0] * (rmin ** -2 - rmax ** -2)) ** -0.5
    radius[0] = 2 * S
    t = np.arange(T)[:, None]
    cy, cx = (u[:, 1] * S + (u[:, 3] - 0.5) * t * S / 64,
              u[:, 2] * S + (u[:, 4] - 0.5) * t * S / 64)  # [T,n+1]
    cos, sin = np.cos(u[:, 5] * math.pi), np.sin(u[:, 5] * math.pi)
    rect, aspect = u[:, 6] < 0.5, math.pi / 8 + u[:, 7] * math.pi / 8
    # A rectangle's half sides (its half diagonal is r).
    half_a, half_b = radius * np.sin(aspect), radius * np.cos(aspect)
    # Leaves in groups of one shape and one octave of radius; a group's pixels are indices into a
    # canvas padded by P on each side, wide enough for any square that fits, so that no pixel
    # needs a bounds test.
    octave = np.maximum(np.ceil(np.log2(radius)), 0).astype(np.int64)
    group = 2 * octave + rect
    P = S // 2 + math.ceil(T * S / 128) + 2
    W = S + 2 * P
    order, lo, flats, ids = np.argsort(group, kind="stable"), 0, [], []
    for g, m in enumerate(np.bincount(group).tolist()):
        sel, lo = order[lo:lo + m], lo + m
        if not m:
            continue
        b = g // 2
        if 2 ** (b + 1) + 1 >= S:  # a square larger than the image: the image's pixels
            offsets, y0, x0 = (np.arange(S), np.zeros((T, m, 1), dtype=np.int64),
                               np.zeros((T, m, 1), dtype=np.int64))
        else:
            offsets = np.arange(-2 ** b, 2 ** b + 1)
            y0, x0 = (np.floor(cy[:, sel, None]).astype(np.int64),
                      np.floor(cx[:, sel, None]).astype(np.int64))
        # [Q] the square's pixels
        oy, ox = np.repeat(offsets, len(offsets)), np.tile(offsets, len(offsets))
        # [T,m,Q] from the centre
        dy = (y0 + 0.5 - cy[:, sel, None]).astype(np.float32) + oy.astype(np.float32)
        dx = (x0 + 0.5 - cx[:, sel, None]).astype(np.float32) + ox.astype(np.float32)
        if g % 2:  # rectangles, in their own axes
            c, s = cos[sel, None], sin[sel, None]
            inside = ((abs(c * dx + s * dy) < half_a[sel, None])
                      & (abs(c * dy - s * dx) < half_b[sel, None]))
        else:
            inside = dx * dx + dy * dy < radius[sel, None] ** 2
        # [T,m,Q] in the padded canvas
        flat = ((t[:, :, None] * W + y0 + P) * W + x0 + P) + (oy * W + ox)
        flats.append(flat[inside])
        ids.append(np.broadcast_to(sel[:, None], inside.shape)[inside])
    top = np.zeros(T * W * W, dtype=np.int64)
    # The last leaf to fall on each pixel.
    np.maximum.at(top, np.concatenate(flats), np.concatenate(ids))
    top = top.reshape(T, W, W)[:, P:P + S, P:P + S]
    k = top.reshape(T, S * S)  # [T,S*S] the leaf seen at each pixel
    # Texture, per leaf: a shading ramp of up to +-0.2 across its radius, and on half the leaves a
    # grating of wavelength 2 px to about its radius and amplitude up to 0.1; a colour = a
    # luminance and a weaker tint.
    ramp = (u[:, 13:14] - 0.5) * 0.4 / radius[:, None] * np.stack(
        [np.cos(u[:, 14] * 2 * math.pi), np.sin(u[:, 14] * 2 * math.pi)], 1)
    wavenumber = 2 * math.pi / np.exp(math.log(2)
                                      + u[:, 16] * np.log(np.maximum(radius, 2) / 2 + 1))
    wave = wavenumber[:, None] * np.stack([np.cos(u[:, 17] * math.pi),
                                           np.sin(u[:, 17] * math.pi)], 1)
    amplitude = np.maximum(u[:, 15] - 0.5, 0) * 0.2
    colour = u[:, 8:9] + (u[:, 9:12] - 0.5) * 0.6 * u[:, 12:13]
    table = np.concatenate([colour, ramp, wave, amplitude[:, None],
                            u[:, 18:19] * 2 * math.pi], 1).astype(np.float32)
    leaf = table[k]  # [T,S*S,9]
    yy, xx = np.divmod(np.arange(S * S), S)
    # [T,S*S] from the leaf's centre
    dy = (yy + 0.5 - np.take_along_axis(cy, k, 1)).astype(np.float32)
    dx = (xx + 0.5 - np.take_along_axis(cx, k, 1)).astype(np.float32)
    texture = (leaf[..., 3] * dy + leaf[..., 4] * dx
               + leaf[..., 7] * np.sin(leaf[..., 5] * dy + leaf[..., 6] * dx + leaf[..., 8]))
    image = np.clip(leaf[..., :3] + texture[..., None], 0, 1)  # [T,S*S,3]
    return torch.from_numpy(image).view(T, S, S, 3).permute(0, 3, 1, 2)


def build_dataset(source, image_size, num_frames=1, train=False, frame_stride=3, split_file=None,
                  length=None):
    """The entry point: a folder, "synthetic" or "deadleaves" -> Dataset of (x, label).
    frame_stride: the step between a clip's frames (3: the paper's 8 fps on UCF-101's 25 fps).
    split_file: a list of the files to use, paths relative to `source` (UCF-101's
    trainlist01.txt); a bare name ("trainlist01") is looked for in the official layout's
    ucfTrainTestlist folder, inside or beside `source`. length: the size of a procedural
    source."""
    if source in ("synthetic", "deadleaves"):
        if split_file is not None:
            raise UserError(f"split_file selects files of a folder; {source} has none")
        return (Synthetic if source == "synthetic" else DeadLeaves)(
            image_size, num_frames, train, length)
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
    return reader(items, labels, num_classes, size=image_size, num_frames=num_frames, train=train,
                  source=source, stride=frame_stride)


def _find(source, num_frames):
    """The layout of a folder -> (dataset class, items, labels, number of classes)."""
    files, dirs = _scan(source, IMAGE_EXTS | VIDEO_EXTS)
    if num_frames == 1:
        images = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
        if images:  # a flat folder (COCO val2017): unlabelled
            return ImageFolder, images, [-1] * len(images), 0
        items, labels = [], []
        for label, d in enumerate(dirs):  # ImageNet: class sub-folders in sorted order
            found = _scan(d, IMAGE_EXTS)[0]
            items += found
            labels += [label] * len(found)
        if items:
            return ImageFolder, items, labels, len(dirs)
        raise UserError(f"no images found in {source}: "
                        "expected image files, or class sub-folders of images")
    videos = [f for f in files if os.path.splitext(f)[1].lower() in VIDEO_EXTS]
    if videos:
        return VideoFolder, videos, [-1] * len(videos), 0
    # Class folders; a folder with neither media nor sub-folders (UCF-101's ucfTrainTestlist of
    # .txt) is no class.
    scans = [(d, *_scan(d, IMAGE_EXTS | VIDEO_EXTS)) for d in dirs]
    scans = [(d, sub_files, sub_dirs) for d, sub_files, sub_dirs in scans if sub_files or sub_dirs]
    items, labels, reader = [], [], None
    for label, (d, sub_files, sub_dirs) in enumerate(scans):
        if any(os.path.splitext(f)[1].lower() in VIDEO_EXTS for f in sub_files):
            # UCF-101: class/video.avi
            found, reader = [f for f in sub_files
                             if os.path.splitext(f)[1].lower() in VIDEO_EXTS], VideoFolder
        elif sub_files:  # root/clip/frames: unlabelled clips
            found, reader, label = [d], FrameFolder, -1
        else:  # root/class/clip/frames
            found, reader = sub_dirs, FrameFolder
        items += found
        labels += [label] * len(found)
    if not items:
        raise UserError(f"no videos found in {source}: expected class folders of video files "
                         f"({', '.join(sorted(VIDEO_EXTS))}), or folders of frames")
    return reader, items, labels, 0 if all(label < 0 for label in labels) else len(scans)


def _listed(source, split_file, items):
    """Indices of the items that split_file lists. Lines are "Class/v_x.avi 1" or "Class/v_x.avi":
    UCF-101's label column is ignored, as labels come from the sorted class folders (the same for
    every split; UCF-101's own numbering sorts case-blind and differs from it in places). Every
    listed file must exist."""
    path = split_file
    if not os.path.isfile(path):
        name = os.path.basename(path) if path.endswith(".txt") else os.path.basename(path) + ".txt"
        places = [os.path.join(source, "ucfTrainTestlist", name),
                  os.path.join(os.path.dirname(os.path.abspath(source)), "ucfTrainTestlist", name),
                  os.path.join(source, name)]
        path = next((p for p in places if os.path.isfile(p)), None)
        if path is None:
            raise UserError(f"split file {split_file} not found, nor at {', '.join(places)}")
    listed = []
    with open(path) as f:
        for line in f:
            parts = line.strip().rsplit(maxsplit=1)
            if parts:
                rel = parts[0] if len(parts) == 2 and parts[1].isdigit() else line.strip()
                listed.append(os.path.normpath(rel.replace("\\", "/")))
    where = {os.path.normpath(os.path.relpath(item, source)): i for i, item in enumerate(items)}
    missing = [rel for rel in listed if rel not in where]
    if missing:
        raise UserError(f"{len(missing)} of the {len(listed)} files listed in {path} "
                        f"are not in {source}: "
                        + ", ".join(os.path.join(source, rel) for rel in missing[:3])
                        + (", ..." if len(missing) > 3 else ""))
    return sorted({where[rel] for rel in listed})


def index_seed(index, seed=0, epoch=0):
    """The augmentation seed of one sample in one epoch of one run."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2 ** 62


def infinite_loader(dataset, batch_size, rank=0, world_size=1, seed=0, start_step=0, num_workers=2):
    """Batches (x, y) of batch_size per rank, forever. Each epoch is one permutation (seeded by seed
    and epoch) shared by all ranks; rank r takes every world_size-th entry, so global batch k is the
    same set of samples for any number of ranks. Step k's batch depends only on (seed, k, rank,
    world_size): resuming at start_step skips whole epochs and the batches before it without
    decoding them."""
    per_rank = len(dataset) // world_size
    steps_per_epoch = per_rank // batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} samples do not fill one batch of {batch_size} "
                        f"on {world_size} rank(s)")
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        perm = torch.randperm(len(dataset),
                              generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        mine = (perm[:per_rank * world_size][rank::world_size]
                [skip * batch_size:steps_per_epoch * batch_size])
        keys = [(i, index_seed(i, seed, epoch)) for i in mine.tolist()]
        yield from torch.utils.data.DataLoader(dataset, batch_size, sampler=keys,
                                               num_workers=num_workers, drop_last=True,
                                               pin_memory=torch.cuda.is_available())
        epoch, skip = epoch + 1, 0
