"""Data (SPEC §6): image and video folders, a built-in synthetic source, and a deterministic distributed loader.

    build_dataset(source, image_size, num_frames=1, train=False) -> Dataset of (x, label)
        x in [-1,1], [3,H,W] for images or [3,T,H,W] for clips; label -1 for unlabelled folders.

Layouts: ImageNet (class sub-folders of images, labels in sorted folder order), a flat folder of images (COCO),
UCF-101 (class folders of video files, decoded with PyAV: `pip install av`), folders of frames (a clip is a folder of
images, under class folders or not), and "synthetic": drawn shapes, no download.
Transforms (SPEC §3): train = RandomResizedCrop(scale 0.8-1, ratio 3/4-4/3) + horizontal flip, the same for every
frame of a clip; eval = resize the short side + centre crop.
"""
import contextlib
import math
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.utils import save_image

from vitok import frames_to_batch

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".jfif"}
VIDEO_EXTS = {".avi", ".mp4", ".mkv", ".webm", ".mov"}


def _scan(folder, exts):
    """Sorted files of folder with one of exts, and its sorted sub-folders (os.scandir: fast on ImageNet)."""
    files, dirs = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.is_dir():
                dirs.append(e.path)
            elif os.path.splitext(e.name)[1].lower() in exts:
                files.append(e.path)
    return sorted(files), sorted(dirs)


def load_rgb(path):
    """Any image file -> float [3,H,W] in [0,1]. 16-bit images are scaled (not clipped) to [0,1]; transparency is
    composited on white; grayscale, palette and CMYK are converted to RGB."""
    with Image.open(path) as img:
        img.load()  # a truncated or non-image file fails here, inside the caller's error handling
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32) / (65535.0 if img.mode != "I" or np.asarray(img).max() > 255
                                                       else 255.0)
            return torch.from_numpy(arr.copy()).clamp(0, 1).expand(3, -1, -1).clone()
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def transform(frames, size, gen=None):
    """frames [T,3,h,w] in [0,1] -> [T,3,size,size]. With a generator: RandomResizedCrop (scale 0.8-1, log-uniform
    aspect 3/4-4/3, ten tries, as torchvision) and a flip, drawn once for the whole clip;
    without: resize the short side to `size` and crop the centre."""
    h, w = frames.shape[-2:]
    if gen is None:
        frames = TF.resize(frames, size, antialias=True)
        return TF.center_crop(frames, size)
    for scale, aspect in torch.rand(10, 2, generator=gen).tolist():
        area, ratio = h * w * (0.8 + 0.2 * scale), math.exp(math.log(3 / 4) + aspect * math.log(16 / 9))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:  # no try fitted: the largest square
        ch = cw = min(h, w)
    top, left = (int(u * (n + 1)) for u, n in zip(torch.rand(2, generator=gen).tolist(), (h - ch, w - cw)))
    frames = TF.resized_crop(frames, top, left, ch, cw, [size, size], antialias=True)
    return frames.flip(-1) if torch.rand(1, generator=gen).item() < 0.5 else frames


class _Base(torch.utils.data.Dataset):
    """Keys are an index, or (index, seed) from infinite_loader: the seed draws the training augmentation, so a
    sample's crop is a function of (run seed, epoch, index) alone and a resumed run sees the same batches."""

    def __init__(self, items, labels, num_classes, size, num_frames, train, source, stride=2):
        self.items, self.labels, self.num_classes = items, labels, num_classes
        self.size, self.num_frames, self.train, self.source, self.stride = size, num_frames, train, source, stride
        self._warned = set()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, index_seed(key))
        for attempt in range(len(self.items)):  # a bad file is replaced by the next good one, with a warning
            i = (index + attempt) % len(self.items)
            gen = torch.Generator().manual_seed(seed)
            try:
                frames = self.load(i, gen)  # [T,3,h,w] in [0,1]
            except Exception as err:  # PIL and PyAV raise many types for broken files; we name the file, then skip
                if self.items[i] not in self._warned:
                    self._warned.add(self.items[i])
                    warnings.warn(f"skipping unreadable file {self.items[i]}: {type(err).__name__}: {err}")
                continue
            frames = transform(frames, self.size, gen if self.train else None) * 2 - 1  # [T,3,S,S] in [-1,1]
            x = frames[0] if self.num_frames == 1 else frames.transpose(0, 1)  # [3,S,S] or [3,T,S,S]
            return x.contiguous(), self.labels[i]
        raise RuntimeError(f"no readable file in {self.source}")

    def pick(self, n, gen):
        """Indices of num_frames frames at the fixed stride out of n; a random start when training, else the middle.
        A clip too short for the span repeats its last frame."""
        span = (self.num_frames - 1) * self.stride + 1
        start = int(torch.randint(0, max(1, n - span + 1), (1,), generator=gen)) if self.train else max(0, n - span) // 2
        return [min(start + k * self.stride, n - 1) for k in range(self.num_frames)]


class ImageFolder(_Base):
    def load(self, i, gen):
        return load_rgb(self.items[i])[None]


class FrameFolder(_Base):
    """Clips stored as folders of frames (sorted by file name)."""

    def load(self, i, gen):
        frames, _ = _scan(self.items[i], IMAGE_EXTS)
        if not frames:
            raise ValueError("no frames")
        return torch.stack([load_rgb(frames[k]) for k in self.pick(len(frames), gen)])


class VideoFolder(_Base):
    """Video files (UCF-101 .avi, .mp4, ...), decoded with PyAV."""

    def load(self, i, gen):
        import av
        with av.open(self.items[i]) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        if not frames:
            raise ValueError("no decodable video frames")
        clip = np.stack([frames[k] for k in self.pick(len(frames), gen)])  # [T,h,w,3] uint8
        return torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255.0


class Synthetic(torch.utils.data.Dataset):
    """Procedural, class-labelled images and clips (10 classes), deterministic per index; eval indices draw from a
    different stream than train. Class = shape (disc, square, triangle, ring, cross, striped square, striped disc,
    checker, diamond, two discs) and hue; position, size, background, texture and motion vary within a class."""

    num_classes = 10
    source = "synthetic"

    def __init__(self, size, num_frames=1, train=False, length=None):
        self.size, self.num_frames, self.train = size, num_frames, train
        self.length = length or (10_000 if train else 1_000)

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, index_seed(key))
        gen = torch.Generator().manual_seed(index + (0 if self.train else 10 ** 9))
        label = index % self.num_classes
        frames = draw(label, self.size, self.num_frames, gen)  # [T,3,S,S] in [0,1]
        if self.train:  # same augmentation as real data
            frames = transform(frames, self.size, torch.Generator().manual_seed(seed))
        x = frames * 2 - 1
        return (x[0] if self.num_frames == 1 else x.transpose(0, 1)).contiguous(), label


def draw(label, size, num_frames, gen):
    """One synthetic clip [T,3,S,S] in [0,1]: a textured two-colour gradient background and a class shape moving
    linearly. Vectorised over pixels and frames."""
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
        ((dx - rad / 2) ** 2 + dy ** 2 < (rad / 2.2) ** 2) | ((dx + rad / 2) ** 2 + dy ** 2 < (rad / 2.2) ** 2),
    ]
    hue = (label / 10 + 0.03 * (r(1).item() - 0.5)) % 1.0
    colour = torch.tensor([abs(hue * 6 - 3) - 1, 2 - abs(hue * 6 - 2), 2 - abs(hue * 6 - 4)]).clamp(0, 1)
    colour = (0.15 + 0.8 * colour)[:, None, None, None]  # [3,1,1,1] class hue
    angle = r(1).item() * 2 * math.pi
    ramp = (math.cos(angle) * xx + math.sin(angle) * yy + 1) / 2  # [S,S] gradient direction
    c0, c1 = 0.2 + 0.6 * r(3, 1, 1), 0.2 + 0.6 * r(3, 1, 1)
    texture = 0.04 * torch.sin(xx * 8 * r(1) * math.pi + yy * 8 * r(1) * math.pi + r(1) * 6)
    background = (c0 * (1 - ramp) + c1 * ramp + texture) * 0.7  # [3,S,S], darkened so the shape stands out
    frames = torch.where(masks[label][None], colour, background[:, None])  # [3,T,S,S]
    return frames.transpose(0, 1).clamp(0, 1)  # [T,3,S,S]


def build_dataset(source, image_size, num_frames=1, train=False, frame_stride=2, length=None):
    """The entry point (SPEC §8): a folder or "synthetic" -> Dataset of (x, label)."""
    if source == "synthetic":
        return Synthetic(image_size, num_frames, train, length)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"dataset folder {source} does not exist (or pass 'synthetic')")
    args = dict(size=image_size, num_frames=num_frames, train=train, source=source, stride=frame_stride)
    files, dirs = _scan(source, IMAGE_EXTS | VIDEO_EXTS)
    if num_frames == 1:
        images = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTS]
        if images:  # a flat folder (COCO val2017): unlabelled
            return ImageFolder(images, [-1] * len(images), 0, **args)
        items, labels = [], []
        for label, d in enumerate(dirs):  # ImageNet: class sub-folders in sorted order
            found = _scan(d, IMAGE_EXTS)[0]
            items += found
            labels += [label] * len(found)
        if items:
            return ImageFolder(items, labels, len(dirs), **args)
        raise ValueError(f"no images found in {source}: expected image files, or class sub-folders of images")
    videos = [f for f in files if os.path.splitext(f)[1].lower() in VIDEO_EXTS]
    if videos:
        return VideoFolder(videos, [-1] * len(videos), 0, **args)
    items, labels, kind = [], [], None
    for label, d in enumerate(dirs):
        sub_files, sub_dirs = _scan(d, IMAGE_EXTS | VIDEO_EXTS)
        if any(os.path.splitext(f)[1].lower() in VIDEO_EXTS for f in sub_files):  # UCF-101: class/video.avi
            found, kind = [f for f in sub_files if os.path.splitext(f)[1].lower() in VIDEO_EXTS], VideoFolder
        elif sub_files:  # root/clip/frames: unlabelled clips
            found, kind, label = [d], FrameFolder, -1
        else:  # root/class/clip/frames
            found, kind = sub_dirs, FrameFolder
        items += found
        labels += [label] * len(found)
    if not items:
        raise ValueError(f"no videos found in {source}: expected class folders of video files "
                         f"({', '.join(sorted(VIDEO_EXTS))}), or folders of frames")
    if kind is VideoFolder:
        try:
            import av  # noqa: F401
        except ImportError:
            raise ImportError(f"reading the videos in {source} needs PyAV: pip install av") from None
    num_classes = 0 if all(label < 0 for label in labels) else len(dirs)
    return kind(items, labels, num_classes, **args)


def index_seed(index, seed=0, epoch=0):
    """The augmentation seed of one sample in one epoch of one run."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2 ** 62


def infinite_loader(dataset, batch_size, rank=0, world_size=1, seed=0, start_step=0, num_workers=2):
    """Batches (x, y) of batch_size per rank, forever. Each epoch is one permutation (seeded by seed and epoch)
    shared by all ranks; rank r takes every world_size-th entry, so global batch k is the same set of samples for any
    number of ranks. Step k's batch depends only on (seed, k, rank, world_size): resuming at start_step skips
    whole epochs and the batches before it without decoding them."""
    per_rank = len(dataset) // world_size
    steps_per_epoch = per_rank // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(dataset)} samples do not fill one batch of {batch_size} on {world_size} rank(s)")
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        mine = perm[:per_rank * world_size][rank::world_size][skip * batch_size:steps_per_epoch * batch_size]
        keys = [(i, index_seed(i, seed, epoch)) for i in mine.tolist()]
        yield from torch.utils.data.DataLoader(dataset, batch_size, sampler=keys, num_workers=num_workers,
                                               drop_last=True, pin_memory=torch.cuda.is_available())
        epoch, skip = epoch + 1, 0


# --------------------------------------------------------------------------------------------------------------
# Ranks, devices and images: what every script needs to run on 1..N processes and to show its outputs
# --------------------------------------------------------------------------------------------------------------
def setup_distributed():
    """One code path for 1..N ranks: under torchrun (RANK/WORLD_SIZE set) join the group, NCCL on GPU and gloo on
    CPU; alone, rank 0 of 1. TF32 matmuls on GPU (App. A trains with them). Returns (rank, world_size, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def autocast(device, precision):
    """The one precision context of every script: bf16 autocast on GPU around forward passes; fp32 (a null context)
    on CPU or with --precision fp32. The paper found bf16 and fp32 tokenizers equally good (App. A)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_generator(seed, step, device):
    """A training step's random numbers come from a generator seeded by (seed, step) and are drawn for the whole
    GLOBAL batch; rank r takes rows r, r + world, ..., the samples that infinite_loader gives it. A run is then the
    same for any number of ranks and resumes exactly without replaying random streams."""
    return torch.Generator(device).manual_seed(seed * 1_000_003 + step)


def save_grid(path, x, x_hat, max_items=8):
    """A PNG of originals (top) above reconstructions or samples (bottom); videos show each clip's frames in a row."""
    if x.dim() == 5:  # [B,3,T,H,W] -> two clips, frames side by side
        nrow = x.shape[2]
        x, x_hat = frames_to_batch(x[:2]), frames_to_batch(x_hat[:2])  # [2T,3,H,W]
    else:
        nrow = min(max_items, x.shape[0])
        x, x_hat = x[:nrow], x_hat[:nrow]
    save_image(torch.cat([x, x_hat]).float().clamp(-1, 1) * 0.5 + 0.5, path, nrow=nrow, padding=1)
