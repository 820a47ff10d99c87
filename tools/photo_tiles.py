"""Tiles of real photographs for the tokenizer's CPU demo: training tiles from some photos, test tiles from others.

    pip install scikit-image                                 # its bundled photos; matplotlib adds grace_hopper.jpg
    python tools/photo_tiles.py photos                       # -> photos/train/*.png, photos/test/*.png
    python tools/photo_tiles.py photos --photos DIR          # any folder of photos: every 4th file is held out
    python train_ae.py --preset tiny --data photos/train && python evaluate.py --ckpt ae.pt --data photos/test

Each photo is downscaled so that its short side is 64, 96, 128, 192 and 256 pixels, and cut into tiles on a grid:
the 64^2 model then sees whole photos and parts of them at the scales of a down-scaled ImageNet image. Training tiles
are 72^2 with half-tile overlap (train_ae.py's random 80-100% crop resizes them to 64^2); test tiles are 64^2 without
overlap, so evaluate.py scores them as they are. No photo gives tiles to both folders, and tiles that are almost flat
(pixel std under 2/255, e.g. the black sky of the Hubble deep field) are left out of both, as they say nothing about
a codec. Grayscale photos (scikit-image's camera, grass, gravel, ...) join the training set with --gray.
"""
import argparse
import os

import numpy as np
from PIL import Image

# scikit-image's colour photographs (file names in skimage/data) and matplotlib's sample photo. The held-out three are
# the everyday scenes (a person, a cat, a cup); the rest train (the stereo pair motorcycle_left/right stays together).
TRAIN = ["rocket.jpg", "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg",
         "ihc.png", "grace_hopper.jpg"]
TEST = ["astronaut.png", "chelsea.png", "coffee.png"]
GRAY = ["camera.png", "grass.png", "gravel.png", "brick.png", "coins.png", "moon.png"]  # --gray: training only
SHORT_SIDES = (64, 96, 128, 192, 256)
EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def bundled_photos(gray=False):
    """(train, test) lists of paths to the photos that scikit-image and matplotlib install."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("photo_tiles.py: the bundled photos come with scikit-image: pip install scikit-image "
                         "(or pass --photos DIR)") from None
    folders = [os.path.dirname(skimage.data.__file__)]
    try:
        import matplotlib
        folders.append(os.path.join(matplotlib.get_data_path(), "sample_data"))
    except ImportError:
        pass

    def find(names):
        paths = [os.path.join(d, n) for n in names for d in folders if os.path.exists(os.path.join(d, n))]
        missing = set(names) - {os.path.basename(p) for p in paths}
        if missing:
            print(f"photo_tiles.py: not found, skipped: {', '.join(sorted(missing))}")
        return paths

    return find(TRAIN + (GRAY if gray else [])), find(TEST)


def folder_photos(folder, test_every=4):
    """(train, test) from a folder of photos (sorted by name): every test_every-th file is held out."""
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(EXTS))
    if len(files) < 2:
        raise SystemExit(f"photo_tiles.py: {folder} holds {len(files)} photos; need at least 2 (one to hold out)")
    test = files[test_every - 1::test_every] or files[-1:]
    return [f for f in files if f not in test], test


def tiles(path, tile, stride, short_sides=SHORT_SIDES, min_std=2.0):
    """(name, uint8 HxWx3 tile) of one photo at each short side it can be downscaled to, on a grid of the given
    stride, centred so the margins are even; tiles with a pixel std under min_std (in 0..255) are skipped."""
    with Image.open(path) as img:
        img = img.convert("RGB")  # grayscale -> three equal channels
    w, h = img.size
    stem = os.path.splitext(os.path.basename(path))[0]
    for short in short_sides:
        if short < tile or short > min(w, h):  # never upscale a photo: that would invent its detail
            continue
        scale = short / min(w, h)
        size = (max(tile, round(w * scale)), max(tile, round(h * scale)))
        arr = np.asarray(img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0))  # [H,W,3], antialiased
        H, W = arr.shape[:2]
        ny, nx = (H - tile) // stride + 1, (W - tile) // stride + 1
        y0, x0 = (H - tile - (ny - 1) * stride) // 2, (W - tile - (nx - 1) * stride) // 2
        for i in range(ny):
            for j in range(nx):
                y, x = y0 + i * stride, x0 + j * stride
                crop = arr[y:y + tile, x:x + tile]
                if crop.std() >= min_std:
                    yield f"{stem}_s{short}_{y:04d}_{x:04d}", crop


def write(paths, out, tile, stride):
    os.makedirs(out, exist_ok=True)
    count = 0
    for path in paths:
        for name, crop in tiles(path, tile, stride):
            Image.fromarray(crop).save(os.path.join(out, name + ".png"))
            count += 1
    return count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder: OUT/train and OUT/test are written")
    p.add_argument("--photos", help="a folder of photos (default: scikit-image's and matplotlib's bundled photos)")
    p.add_argument("--test-every", type=int, default=4, help="--photos: hold out every n-th photo (by name)")
    p.add_argument("--gray", action="store_true", help="bundled photos: add the grayscale ones to training")
    p.add_argument("--train-tile", type=int, default=72, help="training tile side (stride: half of it)")
    p.add_argument("--test-tile", type=int, default=64, help="test tile side (stride: the tile, no overlap)")
    args = p.parse_args(argv)
    train, test = folder_photos(args.photos, args.test_every) if args.photos else bundled_photos(args.gray)
    assert not set(map(os.path.realpath, train)) & set(map(os.path.realpath, test))
    n_train = write(train, os.path.join(args.out, "train"), args.train_tile, args.train_tile // 2)
    n_test = write(test, os.path.join(args.out, "test"), args.test_tile, args.test_tile)
    print(f"{n_train} training tiles of {len(train)} photos ({', '.join(os.path.basename(f) for f in train)}) in "
          f"{args.out}/train; {n_test} test tiles of {len(test)} other photos "
          f"({', '.join(os.path.basename(f) for f in test)}) in {args.out}/test")


if __name__ == "__main__":
    main()
