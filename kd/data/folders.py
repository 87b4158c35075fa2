"""Class folders of small images (`train/<class>/*`, `test/<class>/*`, or one .tar/.tar.gz of them), decoded once.

Small images (CIFAR-10, Tiny-ImageNet at 64 px, a user's own 32-96 px data) are cheaper to hold in memory than to
decode every epoch: decoding 60,000 JPEGs is the slow part, so the decoded arrays are stored beside the data
(`decoded-<key>.npz`, keyed by the files' names, sizes and times) and the next run starts at once. In memory
they look like torchvision's CIFAR10 (`.data` uint8, `.targets`), so the tensor pipeline and the teacher cache
serve them exactly as they serve CIFAR-10's python batches.
"""
import hashlib
import io
import multiprocessing
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from kd.errors import ConfigError
from kd.log import Progress, info
from kd.store import atomic, free_bytes

SPLITS = ("train", "test")
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ARCHIVES = (".tar", ".tar.gz", ".tgz")
FORMAT = "2"  # of the decoded file: a change decodes again
CHUNK = 2048  # images per task of the decoding processes; fewer images than two chunks decode in this process


class InMemory(Dataset):
    """Decoded images as torchvision's CIFAR10 holds them: `.data` (N, H, W[, 3]) uint8, `.targets`; an item is
    (transform(PIL image), label), for the DataLoader path."""

    def __init__(self, data, targets, classes, transform):
        self.data, self.targets, self.classes, self.transform = data, targets, classes, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


def find_source(root):
    """`root` itself when it holds train/ and test/ class folders, else the one archive in it; None if neither."""
    root = Path(root)
    if all((root / split).is_dir() for split in SPLITS):
        return root
    archives = sorted(p for p in root.glob("*") if p.name.endswith(ARCHIVES)) if root.is_dir() else []
    if len(archives) > 1:
        raise ConfigError("data.root", f"{root} holds {len(archives)} archives ({', '.join(p.name for p in archives)});"
                          " keep one, or extract it into train/<class>/ and test/<class>/")
    return archives[0] if archives else None


def _entries(source):
    """(split, class, name, size, mtime, read) for every image file under the source, folders in sorted order, an
    archive in its own order (a compressed archive reads forwards only)."""
    if source.is_dir():
        for path in sorted(source.glob("*/*/*")):
            split, cls = path.parts[-3], path.parts[-2]
            if split in SPLITS and path.suffix.lower() in SUFFIXES:
                st = path.stat()
                yield split, cls, path.relative_to(source).as_posix(), st.st_size, st.st_mtime_ns, path.read_bytes
        return
    with tarfile.open(source, "r|*") as tar:  # a stream: forwards only, each member read as it comes
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 3 and parts[-3] in SPLITS and Path(m.name).suffix.lower() in SUFFIXES:
                yield parts[-3], parts[-2], m.name, m.size, m.mtime, tar.extractfile(m).read


def _key(source):
    """Changes when any image file changes: names, sizes and times (of the archive itself, for an archive)."""
    h = hashlib.sha256(FORMAT.encode())
    if source.is_dir():
        for split, _, name, size, mtime, _ in _entries(source):
            h.update(f"{name}\t{size}\t{mtime}\n".encode())
    else:
        st = source.stat()
        h.update(f"{source.name}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _digest(arrays):
    h = hashlib.sha256()
    for name in sorted(arrays):
        if name != "digest":
            h.update(name.encode())
            h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()[:16]


def _image(data, mode):
    """One image file's pixels in `mode` (None: 'L' for a greyscale file, else 'RGB')."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert(mode or ("L" if img.mode in ("L", "I;16", "1") else "RGB")))


def _decode_chunk(files, mode):
    """In a worker process: the pixels of (name, bytes) pairs, or (name, reason) for the first unreadable one (a
    ConfigError does not cross processes)."""
    pixels = []
    for name, data in files:
        try:
            pixels.append(_image(data, mode))
        except OSError as e:
            return name, str(e)
    return pixels


def _decode_all(files, mode):
    """Pixels of every (name, bytes) pair, in order, by one process per CPU where there are enough images; an
    unreadable file is one line."""
    chunks = [files[i:i + CHUNK] for i in range(0, len(files), CHUNK)]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # Linux: ours
    workers = min(cpus, len(chunks)) if "fork" in multiprocessing.get_all_start_methods() else 1
    if workers > 1:  # fork: the workers only run Pillow, and start without importing anything again
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_decode_chunk, chunks, repeat(mode)))
    else:
        results = [_decode_chunk(chunk, mode) for chunk in chunks]
    pixels = []
    for result in results:
        if isinstance(result, tuple):
            raise ConfigError("data.root", f"{result[0]} is not an image Pillow can read ({result[1]})")
        pixels += result
    return pixels


def decode(source):
    """Every image of the source as uint8 arrays per split, in a fixed order; labels by sorted class name. The
    files are read in this process (an archive as a stream) and decoded by one process per CPU, the fastest of
    the ways measured (docs/cifar10.md)."""
    files = [(split, cls, name, read()) for split, cls, name, _, _, read in
             Progress(_entries(source), f"[data] reading {source}")]
    first = _decode_chunk([f[2:] for f in files[:1]], None)  # the first image's mode is every image's
    mode = "L" if isinstance(first, list) and first and first[0].ndim == 2 else "RGB"
    decoded, shape = [], None
    for (split, cls, name, _), pixels in zip(files, _decode_all([f[2:] for f in files], mode)):
        if shape is None:
            shape = pixels.shape
        elif pixels.shape != shape:
            raise ConfigError("data.root", f"{source}: {name} is {pixels.shape[1]}x{pixels.shape[0]} where the first "
                              f"image is {shape[1]}x{shape[0]}; a folder dataset of small images needs one size (for "
                              "large or mixed images use dataset: imagenet)")
        decoded.append((name, split, cls, pixels))
    decoded.sort(key=lambda d: d[0])  # then a fixed shuffle, as CIFAR-10's batches: any first N cover every class
    decoded = [decoded[i] for i in np.random.default_rng(0).permutation(len(decoded))]
    classes = {split: sorted({cls for _, s, cls, _ in decoded if s == split}) for split in SPLITS}
    if not classes["train"] or not classes["test"]:
        raise ConfigError("data.root", f"{source} holds no images under train/<class>/ and test/<class>/")
    if classes["train"] != classes["test"]:
        raise ConfigError("data.root", f"{source}: train/ and test/ have different class folders")
    label = {cls: i for i, cls in enumerate(classes["train"])}
    arrays = {"classes": np.array(classes["train"])}
    for split in SPLITS:
        mine = [d for d in decoded if d[1] == split]
        arrays[f"{split}_images"] = np.stack([pixels for *_, pixels in mine])
        arrays[f"{split}_labels"] = np.array([label[cls] for _, _, cls, _ in mine], dtype=np.int64)
    return arrays


def load_decoded(root):
    """The decoded arrays of the folders or archive under `root` (see find_source), from `decoded-<key>.npz` beside
    them when it matches the files and is intact, else decoded now and stored there."""
    source = find_source(root)
    if source is None:
        return None
    path = Path(root) / f"decoded-{_key(source)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = dict(f)
            if str(arrays.pop("digest")) == _digest(arrays):
                return arrays
        except Exception:  # a damaged zip fails in many ways; the file is derived, so decode again
            pass
        info(f"[data] {path} is damaged; decoding again")
    arrays = decode(source)
    need, free = sum(a.nbytes for a in arrays.values()), free_bytes(path)
    if need > free:
        raise ConfigError("data.root", f"storing the decoded images needs {need / 2**20:.0f} MiB but {root} has "
                          f"{free / 2**20:.0f} MiB free; free space there")
    with atomic(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, digest=np.array(_digest(arrays)), **arrays)
    for old in Path(root).glob("decoded-*.npz"):
        if old != path:
            old.unlink()
    decoded = sum(len(arrays[f"{s}_labels"]) for s in SPLITS)
    info(f"[data] decoded {decoded} images into {path} ({need / 2**20:.0f} MiB)")
    return arrays


def splits(root, train_tf, eval_tf):
    """(train, train_plain, test) InMemory datasets and the class names, or None when `root` holds no folders."""
    arrays = load_decoded(root)
    if arrays is None:
        return None
    classes = [str(c) for c in arrays["classes"]]
    train = (InMemory(arrays["train_images"], arrays["train_labels"], classes, tf) for tf in (train_tf, eval_tf))
    return *train, InMemory(arrays["test_images"], arrays["test_labels"], classes, eval_tf), classes


def mean_std(images, chunk=4096):
    """Per-channel mean and std of uint8 images (N, H, W[, C]) scaled to [0, 1], in chunks (no float copy of all)."""
    channels = images.shape[3] if images.ndim == 4 else 1
    total, squares, n = np.zeros(channels), np.zeros(channels), 0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].reshape(-1, channels).astype(np.float64) / 255
        total, squares, n = total + x.sum(0), squares + (x * x).sum(0), n + len(x)
    mean = total / n
    return tuple(float(m) for m in mean), tuple(float(v) for v in np.sqrt(squares / n - mean ** 2))
