"""ImageNet-sized stand-in data for benchmarks: a folder of JPEGs in ImageNet's layout (train/<class>/, val/<class>/)
whose sizes follow ImageNet's (about 400x350 on average, most 500 px on their long side, a few small or large ones)
and whose content is smooth, photo-like noise that compresses as photos do. Decoding, cropping and every model's
cost depend on the pixel counts, not on what the pictures show: it measures the streamed path without ImageNet.

    python -m kd.data.synthetic data/imagenet_like --images 20000 --classes 1000 [--val 2000] [--seed 0]
"""
import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# (long side, short side) of ImageNet's most common shapes, and a share drawn from a log-normal around them
COMMON = ((500, 375), (500, 333), (500, 500), (500, 400), (400, 300))
SPREAD = 0.35  # share of images of other sizes: log-normal around 400x350, clipped to [64, 1200] px


def image_size(rng):
    """(width, height): a common ImageNet shape, landscape or portrait, or a spread one."""
    if rng.random() < SPREAD:
        w, h = np.exp(rng.normal(np.log([400, 350]), 0.35)).clip(64, 1200).astype(int)
        return int(w), int(h)
    long, short = COMMON[rng.integers(len(COMMON))]
    return (long, short) if rng.random() < 0.75 else (short, long)


def picture(rng, width, height):
    """Smooth random colour fields with some fine grain: JPEG-compressible like a photo."""
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    x = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    x += rng.integers(-12, 13, x.shape, dtype=np.int16)
    return Image.fromarray(x.clip(0, 255).astype(np.uint8))


def write_share(args):
    """One process's share of the files: (folder, [(class, index)], seed)."""
    root, items, seed = args
    for split, cls, i in items:
        rng = np.random.default_rng([seed, cls, i, split == "val"])
        path = Path(root) / split / f"n{cls:05d}" / f"{i:06d}.jpg"
        picture(rng, *image_size(rng)).save(path, quality=90)
    return len(items)


def generate(root, images, classes, val, seed=0, workers=None):
    """`images` training and `val` validation JPEGs spread evenly over `classes` classes under `root`."""
    root = Path(root)
    items = [("train", i % classes, i) for i in range(images)] + [("val", i % classes, i) for i in range(val)]
    for split in ("train", "val"):
        for cls in range(classes):
            (root / split / f"n{cls:05d}").mkdir(parents=True, exist_ok=True)
    workers = workers or len(os.sched_getaffinity(0))
    shares = [(str(root), items[k::workers], seed) for k in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(write_share, shares))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="the folder to fill (train/ and val/ are made in it)")
    p.add_argument("--images", type=int, default=20000, help="training images")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--val", type=int, default=2000, help="validation (test split) images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.images, args.classes, args.val) < 1 or args.classes > min(args.images, args.val):
        print("error: --images, --classes and --val must be >= 1, with at least one image of each class in each "
              "split", file=sys.stderr)
        return 2
    n = generate(args.root, args.images, args.classes, args.val, args.seed)
    print(f"wrote {n} JPEGs under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
