"""Class folders of small images, decoded once: `train/<class>/*` and `test/<class>/*` (or `val/<class>/*`, the
ImageNet layout), as folders or as any number of .tar/.tar.gz shards whose members are laid out so (read as streams,
one process per shard where the machine has cores, and merged). A `words.txt` (ImageNet's `<id>\t<names>` lines) or
`classes.txt` beside them names the classes.

Small images (CIFAR-10, Tiny-ImageNet at 64 px, a user's own 32-96 px data) are cheaper to hold in memory than to
decode every epoch: decoding 60,000 JPEGs is the slow part, so the decoded arrays are stored beside the data
(`decoded-<key>.npz`, keyed by the files' names, sizes and times; in the study's cache folder where the data's is
read-only) and the next run starts at once. The decoded file records what it was made from (the key, the sources'
names, a digest of their bytes), so one copied from another dataset is never used. In memory
they look like torchvision's CIFAR10 (`.data` uint8, `.targets`), so the tensor pipeline and the teacher cache
serve them exactly as they serve CIFAR-10's python batches.
"""
import hashlib
import io
import multiprocessing
import os
import re
import tarfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from kd.config import human_bytes
from kd.errors import ConfigError, first_line
from kd.log import Progress, info
from kd.store import atomic, file_problem, free_bytes

SPLITS = ("train", "test")
HELD_OUT = ("test", "val")  # the folder of the split models are tested on: test/, or val/ as ImageNet names it
NAMES = ("words.txt", "classes.txt")  # class names: '<folder>\t<name>' lines (ImageNet's words.txt)
SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ARCHIVES = (".tar", ".tar.gz", ".tgz")
FORMAT = "3"  # of the decoded file: a change decodes again
MAX_FILE_BYTES = 64 << 20  # an image or class-names file, read whole: far past any image decoded into memory
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


def find_sources(root):
    """[`root`] when it holds train/ and test/ (or val/) class folders, else the archives in it (shards, merged);
    [] if neither. Numbered shards (`train-0.tar.gz`, `train-1.tar.gz`, ...) must all be there."""
    root = Path(root)
    if (root / "train").is_dir() and any((root / split).is_dir() for split in HELD_OUT):
        return [root]
    archives = sorted(p for p in root.glob("*") if p.name.endswith(ARCHIVES) and p.is_file()) if root.is_dir() else []
    numbered = {}
    for path in archives:
        if m := re.fullmatch(r"(.+)-(\d+)\.(tar|tar\.gz|tgz)", path.name):
            numbered.setdefault((m[1], m[3]), set()).add(int(m[2]))
    for (stem, ext), found in numbered.items():
        if missing := sorted(set(range(max(found) + 1)) - found):
            raise ConfigError("data.root", f"{root}: shard {stem}-{missing[0]}.{ext} is missing (found "
                              f"{', '.join(f'{stem}-{k}.{ext}' for k in sorted(found))})")
    return archives


def _split(name):
    """'train' or 'test' for a member's split folder (val/ is the test split), else None."""
    return "test" if name in HELD_OUT else name if name == "train" else None


def file_stat(path):
    """os.stat of what is named like an image, or one line saying what else it is (kd/store.py file_problem)."""
    if problem := file_problem(path):
        raise ConfigError("data.root", f"{path}: {problem}; an image folder holds image files under image names: "
                          f"rename it, or move it out of {Path(path).parent}")
    return Path(path).stat()


def _entries(source):
    """(split, class, name, size, mtime, read) for every image file under the source, folders in sorted order, an
    archive in its own order (a compressed archive reads forwards only). Anything in a class folder named like an
    image but not a regular file, or larger than MAX_FILE_BYTES, is refused before it is read."""
    if source.is_dir():
        for path in sorted(source.glob("*/*/*")):
            split, cls = _split(path.parts[-3]), path.parts[-2]
            if split and path.suffix.lower() in SUFFIXES:
                st = file_stat(path)
                _check_size(path, st.st_size)
                yield split, cls, path.relative_to(source).as_posix(), st.st_size, st.st_mtime_ns, path.read_bytes
        return
    with tarfile.open(source, "r|*") as tar:  # a stream: forwards only, each member read as it comes
        for m in tar:
            parts = Path(m.name).parts
            image = len(parts) >= 3 and _split(parts[-3]) and Path(m.name).suffix.lower() in SUFFIXES
            if m.isfile() and (image or Path(m.name).name in NAMES):
                _check_size(f"{m.name} in {source}", m.size)
                split, cls = (_split(parts[-3]), parts[-2]) if image else (None, None)
                yield split, cls, m.name, m.size, m.mtime, tar.extractfile(m).read


def _check_size(name, size):
    """A file read whole into memory is refused when no image of a small-image dataset could be that large (an
    archive member can declare gigabytes that its few compressed bytes expand to)."""
    if size > MAX_FILE_BYTES:
        raise ConfigError("data.root", f"{name} is {human_bytes(size)}, more than the {human_bytes(MAX_FILE_BYTES)} "
                          "an image file here may hold; move it out of the dataset")


def _key(sources):
    """Changes when any image file changes: names, sizes and times (of the archives themselves, for shards)."""
    h = hashlib.sha256(FORMAT.encode())
    for source in sources:
        if source.is_dir():
            for split, _, name, size, mtime, _ in _entries(source):
                h.update(f"{name}\t{size}\t{mtime}\n".encode())
            for names in (source / n for n in NAMES if (source / n).is_file()):
                h.update(f"{names.name}\t{names.stat().st_size}\t{names.stat().st_mtime_ns}\n".encode())
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


def _image(data):
    """One image file's pixels: (H, W) for a greyscale file, else (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("L" if img.mode in ("L", "I;16", "1") else "RGB"))


REFUSED = (OSError, Image.DecompressionBombError)  # what Pillow raises for a file it will not decode


def refusal(error):
    """Why Pillow would not decode an image, as the end of a sentence that starts with the file's name."""
    if isinstance(error, Image.DecompressionBombError):
        return f"is too large to decode safely, a decompression bomb? ({first_line(error)})"
    return f"is not an image Pillow can read ({first_line(error)})"


def _decode_chunk(files):
    """In a worker process: the pixels of (name, bytes) pairs, or (name, why) for the first one Pillow refuses (a
    ConfigError does not cross processes)."""
    pixels = []
    for name, data in files:
        try:
            pixels.append(_image(data))
        except REFUSED as e:
            return name, refusal(e)
    return pixels


def _cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # Linux: ours


def _pool(n):
    """Worker processes for `n` tasks, one per CPU (fork: they only run Pillow and start without importing anything
    again), or None where one process will do."""
    workers = min(_cpus(), n) if "fork" in multiprocessing.get_all_start_methods() else 1
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) if workers > 1 else None


def _decode_all(files):
    """Pixels of every (name, bytes) pair, in order, by one process per CPU where there are enough images; an
    unreadable file is one line."""
    chunks = [files[i:i + CHUNK] for i in range(0, len(files), CHUNK)]
    pool = _pool(len(chunks))
    if pool:
        with pool:
            results = list(pool.map(_decode_chunk, chunks))
    else:
        results = [_decode_chunk(chunk) for chunk in chunks]
    pixels = []
    for result in results:
        if isinstance(result, tuple):
            raise ConfigError("data.root", f"{result[0]} {result[1]}")
        pixels += result
    return pixels


def _read(source):
    """(split, class, name, bytes) of every image of one source, the text of its class-names file or None, and a
    digest of the bytes read (the decoded file's record of what it was made from); a shard that ends early or is
    damaged is one line naming it."""
    files, names, h = [], None, hashlib.sha256()
    try:
        for split, cls, name, _, _, read in Progress(_entries(source), f"[data] reading {source}"):
            data = read()
            h.update(f"{name}\t{len(data)}\n".encode())
            h.update(data)
            if split is None:
                names = data.decode("utf-8", "replace")
            else:
                files.append((split, cls, name, data))
        if source.is_dir() and (found := next((source / n for n in NAMES if (source / n).is_file()), None)):
            data = found.read_bytes()
            h.update(f"{found.name}\t{len(data)}\n".encode())
            h.update(data)
            names = data.decode("utf-8", "replace")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if source.is_dir() and isinstance(e, OSError):  # an image file of a folder
            raise ConfigError("data.root", f"{e.filename or source} cannot be read ({e.strerror or e})") from None
        raise ConfigError("data.root", f"{source} cannot be read to its end ({first_line(e)}): a truncated or "
                          "damaged archive; replace it") from None
    return files, names, h.hexdigest()[:16]


def _read_and_decode(source):
    """In a worker process, for one shard: (split, class, name, pixels) of its images, its class-names text and the
    digest of its bytes, or the one-line reason it cannot be used."""
    try:
        files, names, digest = _read(source)
    except ConfigError as e:
        return str(e)
    pixels = _decode_chunk([f[2:] for f in files])
    if isinstance(pixels, tuple):
        return f"data.root: {pixels[0]} in {source} {pixels[1]}"
    return [(*f[:3], p) for f, p in zip(files, pixels)], names, digest


def _gather(sources):
    """(split, class, name, pixels) of every image of the sources, the class-names text, and a digest of the bytes
    read, source by source: with at least as many shards as CPUs, each shard read and decoded by its own process;
    else read here and decoded in chunks by one process per CPU."""
    if len(sources) > 1 and len(sources) >= _cpus() and (pool := _pool(len(sources))):
        with pool:
            results = list(pool.map(_read_and_decode, sources))
        if errors := [r for r in results if isinstance(r, str)]:
            key, _, message = errors[0].partition(": ")
            raise ConfigError(key, message)
        decoded = [item for items, _, _ in results for item in items]
        return decoded, next((n for _, n, _ in results if n), None), _combine(sources, [d for *_, d in results])
    files, names, digests = [], None, []
    for source in sources:
        found, text, digest = _read(source)
        files += found
        names = names or text
        digests.append(digest)
    decoded = [(*f[:3], p) for f, p in zip(files, _decode_all([f[2:] for f in files]))]
    return decoded, names, _combine(sources, digests)


def _combine(sources, digests):
    """One digest of the sources' bytes from each source's, whichever process read it."""
    return hashlib.sha256("".join(f"{s.name}\t{d}\n" for s, d in zip(sources, digests)).encode()).hexdigest()[:16]


def first_image_size(root):
    """(height, width) of the first image of the folders or shards under `root`, read alone; None without any."""
    sources = find_sources(root)
    try:
        for _, _, name, _, _, read in (entry for source in sources for entry in _entries(source) if entry[0]):
            with Image.open(io.BytesIO(read())) as img:
                return img.height, img.width
    except Image.DecompressionBombError as e:
        raise ConfigError("data.root", f"{name} in {root} {refusal(e)}") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        return None  # decoding names the damaged file or shard
    return None


def class_names(text, folders):
    """Each class folder's name from a words.txt / classes.txt text ('<folder>\t<name>' lines): the folder's own
    name where the file has none."""
    names = dict(line.split("\t", 1) for line in (text or "").splitlines() if "\t" in line)
    return [names.get(folder, folder).strip() for folder in folders]


def decode(sources):
    """Every image of the sources as uint8 arrays per split, in a fixed order; labels by sorted class folder, names
    from words.txt / classes.txt where present. Greyscale if every image is, else RGB. `source_bytes`: a digest of
    the files as read, what the arrays were decoded from."""
    decoded, names, source_bytes = _gather(sources)
    seen = {}
    for split, cls, name, _ in decoded:
        if name in seen:
            raise ConfigError("data.root", f"{name} is in two of the archives in {sources[0].parent}: a duplicated "
                              "shard? keep one copy of each")
        seen[name] = True
    rgb = any(pixels.ndim == 3 for *_, pixels in decoded)
    shape = None
    for i, (split, cls, name, pixels) in enumerate(decoded):
        if rgb and pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)  # as Pillow converts L to RGB
            decoded[i] = (split, cls, name, pixels)
        if shape is None:
            shape = pixels.shape
        elif pixels.shape != shape:
            raise ConfigError("data.root", f"{name} is {pixels.shape[1]}x{pixels.shape[0]} where the first image is "
                              f"{shape[1]}x{shape[0]}; a folder dataset of small images needs one size (for large or "
                              "mixed images use dataset: imagenet at a size above 64)")
    decoded.sort(key=lambda d: d[2])  # then a fixed shuffle, as CIFAR-10's batches: any first N cover every class
    decoded = [decoded[i] for i in np.random.default_rng(0).permutation(len(decoded))]
    classes = {split: sorted({cls for s, cls, _, _ in decoded if s == split}) for split in SPLITS}
    where = ", ".join(str(s) for s in sources)
    if not classes["train"] or not classes["test"]:
        raise ConfigError("data.root", f"{where} holds no images under train/<class>/ and test/<class>/ (or "
                          "val/<class>/)")
    if classes["train"] != classes["test"]:
        odd = sorted(set(classes["train"]) ^ set(classes["test"]))
        lacking = "test/ (or val/)" if odd[0] in classes["train"] else "train/"
        raise ConfigError("data.root", f"class {odd[0]} has no images in {lacking} of {where} ({len(odd)} class(es) "
                          "are in one split only); every class needs training and test images")
    label = {cls: i for i, cls in enumerate(classes["train"])}
    arrays = {"classes": np.array(classes["train"]), "names": np.array(class_names(names, classes["train"])),
              "source_bytes": np.array(source_bytes)}
    for split in SPLITS:
        mine = [d for d in decoded if d[0] == split]
        arrays[f"{split}_images"] = np.stack([pixels for *_, pixels in mine])
        arrays[f"{split}_labels"] = np.array([label[cls] for _, cls, _, _ in mine], dtype=np.int64)
    return arrays


def _writable(folder):
    """Whether this process may create files in `folder`: False on a read-only mount."""
    return os.access(folder, os.W_OK)


def decoded_folder(root, cache):
    """Where the decoded file of `root` is written: beside the data, or where that folder is not writable (a
    read-only mount), `<cache>/decoded/<digest of the data folder's path>/`."""
    root = Path(root)
    if _writable(root):
        return root
    if cache is None:
        raise ConfigError("data.root", f"{root} is not writable and no cache folder was given to keep its decoded "
                          "images in; make it writable or set cache.dir")
    return Path(cache) / "decoded" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]


def _stored(path, key):
    """The arrays of a decoded file if they are intact and were made from the files of `key`, else None, with a
    line saying why it is decoded again."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = dict(f)
        intact = str(arrays.pop("digest")) == _digest(arrays)
    except Exception:  # a damaged zip fails in many ways; the file is derived, so decode again
        intact = False
    if not intact:
        info(f"[data] {path} is damaged; decoding again")
    elif (stored := str(arrays.get("key", ""))) != key:
        made = ", ".join(str(s) for s in arrays.get("sources", [])) or "files it does not name"
        info(f"[data] {path} was made from other files ({made}, key {stored or 'none'}) than these (key {key}); "
             "decoding again")
    else:
        return arrays
    return None


def load_decoded(root, cache=None):
    """The decoded arrays of the folders or archives under `root` (see find_sources), from `decoded-<key>.npz`
    beside them (or, for a read-only `root`, under the folder `cache`) when it is intact and was made from these
    files, else decoded now and stored there. Besides the images it holds the key, the sources' names and a digest
    of their bytes: what it was made from."""
    sources = find_sources(root)
    if not sources:
        return None
    key, root = _key(sources), Path(root)
    folder = decoded_folder(root, cache)
    name = f"decoded-{key}.npz"
    beside, path = root / name, folder / name
    if beside != path and beside.exists() and (arrays := _stored(beside, key)) is not None:
        return arrays  # decoded before its folder was made read-only
    if beside != path:
        info(f"[data] {root} is not writable; its decoded images are kept in {folder}")
    if path.exists() and (arrays := _stored(path, key)) is not None:
        return arrays
    start = time.perf_counter()
    arrays = decode(sources)
    arrays.update(key=np.array(key), sources=np.array([s.name for s in sources]))
    need, free = sum(a.nbytes for a in arrays.values()), free_bytes(path)
    if need > free:
        raise ConfigError("data.root", f"storing the decoded images needs {human_bytes(need)} but {folder} has "
                          f"{human_bytes(free)} free; free space there")
    with atomic(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, digest=np.array(_digest(arrays)), **arrays)
    for old in folder.glob("decoded-*.npz"):
        if old != path:
            old.unlink()
    decoded = sum(len(arrays[f"{s}_labels"]) for s in SPLITS)
    info(f"[data] decoded {decoded} images into {path} ({need / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
    return arrays


def splits(root, train_tf, eval_tf, cache=None):
    """(train, train_plain, test) InMemory datasets and the class names, or None when `root` holds no folders;
    `cache`: the folder for the decoded file when `root` is read-only."""
    arrays = load_decoded(root, cache)
    if arrays is None:
        return None
    classes = [str(c) for c in arrays.get("names", arrays["classes"])]
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
