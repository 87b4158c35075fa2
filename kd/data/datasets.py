"""Datasets by name, a validation split held out of the training set, and the loaders."""
import dataclasses
import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from kd.config import CacheConfig
from kd.data import folders
from kd.data.tensors import Batch, TensorLoader, from_subset, normalize, resized_crop_params
from kd.errors import ConfigError
from kd.registry import Registry

DATASETS = Registry("dataset", context=("cfg", "cache"))  # cache: a folder for what is derived from read-only data
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


@dataclass
class Splits:
    """What a dataset constructor returns: the training images twice (augmented, and plain for the held-out
    validation part), the test split, the shape facts models are built from, and the normalisation."""
    train: Dataset
    train_plain: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple
    std: tuple
    resize: int | None = None  # evaluation: shorter side resized to this, then centre-cropped (None: image_size)


@dataclass
class Data:
    train: Subset
    val: Subset
    test: Subset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple
    std: tuple
    resize: int
    classes: list[str]
    tensors: dict | None = None  # split -> (uint8 images, labels) when the tensor pipeline is used
    content: str = ""  # digest of the training and validation images and labels: what the models learn from

    @property
    def pipeline(self):
        return "tensor" if self.tensors else "loader"

    @property
    def replayable(self):
        """Whether every training sample's augmentation is a function of (seed, view, index), as the teacher cache
        needs: the tensor pipeline's, and streamed crops (StreamedCrops)."""
        return bool(self.tensors) or isinstance(self.train.dataset, StreamedCrops)

    def first(self, n):
        """The same data with only its first `n` training images (None: all), as a recipe's `subset` asks. The
        training split's order is fixed (data.split_seed), so a subset is a prefix of every larger one: the
        students of a smaller subset see a part of what their teacher saw, at the same indices."""
        if n is None or n >= len(self.train):
            return self
        tensors = self.tensors and {**self.tensors, "train": tuple(t[:n] for t in self.tensors["train"])}
        return dataclasses.replace(self, train=Subset(self.train.dataset, self.train.indices[:n]), tensors=tensors)


def small_image_transforms(cfg, size, mean, std):
    """The training and evaluation transforms of images that already have the model's size (the DataLoader's
    equivalent of the tensor pipeline's augmentation)."""
    aug = []
    if cfg.augment.resized_crop:
        aug.append(T.RandomResizedCrop(size, scale=tuple(cfg.augment.resized_crop)))
    elif cfg.augment.crop_padding:
        aug.append(T.RandomCrop(size, padding=cfg.augment.crop_padding))
    if cfg.augment.hflip:
        aug.append(T.RandomHorizontalFlip())
    plain = [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(aug + plain), T.Compose(plain)


def eval_transform(size, resize, mean, std):
    """A PIL image as every model sees it at evaluation: shorter side resized to `resize`, centre crop of `size`,
    normalised. The imagenet test split and `run.py predict` (from a model's card) both use it; on small-image
    datasets, whose images already have the size, it is the plain ToTensor + Normalize."""
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


def normalisation(cfg, channels, default):
    """data.mean/data.std where given (one value per channel), else the dataset's `default()` (mean, std)."""
    stats = default() if not (cfg.mean and cfg.std) else None
    mean, std = tuple(cfg.mean or stats[0]), tuple(cfg.std or stats[1])
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) != channels:
            raise ConfigError(key, f"{list(values)} has {len(values)} values for images of {channels} channel(s)")
    return mean, std


def _missing(name, root, expected, error):
    error = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ConfigError("data.root", f"{name} not found in {root} and not downloadable here ({error}); "
                       f"put {expected} there, or set data.download: true where the network allows")


@DATASETS.register("cifar10")
def cifar10(cfg, cache=None):
    """CIFAR-10, 32x32 colour, 10 classes: torchvision's python batches under data.root (downloaded if allowed),
    or class folders of its images (train/<class>/, test/<class>/, or a .tar.gz of them; see kd/data/folders.py)."""
    mean, std = normalisation(cfg, 3, lambda: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
    train_tf, eval_tf = small_image_transforms(cfg, 32, mean, std)
    if not (Path(cfg.root) / "cifar-10-batches-py").exists() and (found := folders.splits(cfg.root, train_tf, eval_tf,
                                                                                           cache)):
        train, plain, test, classes = found
        if len(classes) != 10 or train.data.shape[1:] != (32, 32, 3):
            raise ConfigError("data.root", f"{cfg.root} holds {len(classes)} classes of {train.data.shape[1:]} images, "
                              "not CIFAR-10's 10 of 32x32x3; use dataset: folders for other image folders")
        return Splits(train, plain, test, 10, 3, 32, mean, std)
    try:
        train, test = (torchvision.datasets.CIFAR10(cfg.root, train=t, transform=tf, download=cfg.download)
                       for t, tf in ((True, train_tf), (False, eval_tf)))
    except (RuntimeError, OSError) as e:
        raise _missing("CIFAR-10", cfg.root, "the extracted python batches (cifar-10-batches-py/), or class folders "
                       "train/<class>/ and test/<class>/ (or one .tar.gz of them)", e) from None
    plain = torchvision.datasets.CIFAR10(cfg.root, train=True, transform=eval_tf)
    return Splits(train, plain, test, 10, 3, 32, mean, std)


@DATASETS.register("folders")
def image_folders(cfg, cache=None):
    """Class folders of small images of one size (train/<class>/*, test/<class>/*, or one .tar/.tar.gz of them)
    under data.root: decoded once (kept beside them, or under cache.dir where they are read-only), trained in memory
    with the small-image recipe (pad-crop, flip) like CIFAR-10. Mean and std from the training images unless
    data.mean/data.std give them."""
    identity = T.Compose([])
    found = folders.splits(cfg.root, identity, identity, cache)
    if found is None:
        raise ConfigError("data.root", f"no image folders in {cfg.root}; expected train/<class>/* and test/<class>/*, "
                          "or one .tar/.tar.gz of them")
    train, plain, test, classes = found
    channels, size = (3 if train.data.ndim == 4 else 1), train.data.shape[1]
    mean, std = normalisation(cfg, channels, lambda: folders.mean_std(train.data))
    train.transform, eval_tf = small_image_transforms(cfg, size, mean, std)
    plain.transform = test.transform = eval_tf
    return Splits(train, plain, test, len(classes), channels, size, mean, std)


def stage_debian_fashion_mnist(raw_folder):
    """Decompress the Debian package's IDX files where torchvision looks, so no download is needed."""
    for gz in DEBIAN_FASHION_MNIST.glob("*-ubyte.gz"):
        target = raw_folder / gz.name[:-3]
        if not target.exists():
            raw_folder.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".part")
            with gzip.open(gz) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(target)


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg):
    """Fashion-MNIST, 28x28 grey, 10 classes: torchvision's files, or Debian's dataset-fashion-mnist package."""
    mean, std = normalisation(cfg, 1, lambda: ((0.2860,), (0.3530,)))
    train_tf, eval_tf = small_image_transforms(cfg, 28, mean, std)
    try:
        stage_debian_fashion_mnist(Path(cfg.root) / "FashionMNIST" / "raw")
        train, test = (torchvision.datasets.FashionMNIST(cfg.root, train=t, transform=tf, download=cfg.download)
                       for t, tf in ((True, train_tf), (False, eval_tf)))
    except (RuntimeError, OSError) as e:
        raise _missing("Fashion-MNIST", cfg.root, "the IDX files (FashionMNIST/raw/, or apt-get install "
                       "dataset-fashion-mnist)", e) from None
    plain = torchvision.datasets.FashionMNIST(cfg.root, train=True, transform=eval_tf)
    return Splits(train, plain, test, 10, 1, 28, mean, std)


SMALL = 64  # images up to this size are decoded once and held in memory (kd/data/folders.py)


class ImageRefused(ConfigError):
    """An image the streamed path cannot use, one line naming it. A DataLoader worker's error reaches the main
    process rebuilt from one string, the worker's traceback, whose last line is this error's; it keeps only that."""

    def __init__(self, message):
        super().__init__("data.root", message.strip().splitlines()[-1].rpartition("data.root: ")[2])


def load_image(path):
    """torchvision's loader (an RGB PIL image), with an image Pillow refuses (damaged, a decompression bomb) one
    line naming it, from a DataLoader worker too."""
    try:
        with open(path, "rb") as f, Image.open(f) as img:
            return img.convert("RGB")
    except folders.REFUSED as e:
        raise ImageRefused(f"{path} {folders.refusal(e)}") from None


class ImageFiles(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder, whose listing refuses what is named like an image but is no regular file (a
    folder, a FIFO, a link to nothing) before anything is opened. Files are told apart by the type the directory
    listing already holds, so a regular file costs no stat; the order is ImageFolder's."""

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        extensions = tuple(extensions or torchvision.datasets.folder.IMG_EXTENSIONS)
        samples = []
        for cls, index in sorted(class_to_idx.items()):
            found, pending = [], [os.path.join(directory, cls)]
            while pending:  # every folder under the class folder, symbolic links followed as ImageFolder does
                folder, files = pending.pop(), []
                with os.scandir(folder) as entries:
                    for entry in entries:
                        named = entry.name.lower().endswith(extensions)
                        if named and not entry.is_file():
                            folders.file_stat(entry.path)  # raises, saying what it is
                        if entry.is_dir():
                            pending.append(entry.path)
                        elif named:
                            files.append(entry.path)
                found.append((folder, sorted(files)))
            if not any(files for _, files in found) and not allow_empty:
                raise FileNotFoundError(f"no image files in {os.path.join(directory, cls)}")
            samples += [(path, index) for _, files in sorted(found) for path in files]
        return samples


class StreamedCrops(Dataset):
    """Training images read from files, each cut by the random-resized crop and flip that `resized_crop_params`
    draws for (seed, view, index): as in the tensor pipeline, the augmentation any sample saw is a function of those
    three alone, not of a worker's random state, so the teacher cache replays streamed crops exactly and a resumed
    run sees the crops it would have. The training loader sets `seed` and `view` (EpochLoader)."""

    def __init__(self, files, size, scale, hflip, mean, std):
        self.files, self.size, self.scale, self.hflip, self.mean, self.std = files, size, scale, hflip, mean, std
        self.seed, self.view = 0, 0
        self.samples, self.targets, self.classes, self.root = files.samples, files.targets, files.classes, files.root

    def __len__(self):
        return len(self.files)

    def crop(self, i, height, width):
        """(top, left, height, width, flip) of sample `i`'s crop in the current view, for an image of that size."""
        top, left, h, w, flip = resized_crop_params(torch.tensor([i]), self.seed, self.view, self.scale, self.hflip,
                                                    height, width)
        return int(top), int(left), int(h), int(w), bool(flip)

    def __getitem__(self, i):
        image, label = self.files[i]
        top, left, h, w, flip = self.crop(i, image.height, image.width)
        image = TF.resized_crop(image, top, left, h, w, [self.size, self.size], antialias=True)
        if flip:
            image = TF.hflip(image)
        return normalize(TF.pil_to_tensor(image)[None], self.mean, self.std)[0], label


@DATASETS.register("imagenet")
def imagenet(cfg, cache=None):
    """ImageNet-style data: train/<class>/* and val/<class>/* (val is the test split), as folders or as .tar(.gz)
    shards of them. Images that already have data.image_size, 64 px or less (Tiny-ImageNet), are decoded once and
    trained in memory like CIFAR-10; others are read from the folders by a DataLoader and resized."""
    size = cfg.image_size
    mean, std = normalisation(cfg, 3, lambda: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    if size <= SMALL and folders.first_image_size(cfg.root) == (size, size):
        train, plain, test, classes = folders.splits(cfg.root, *small_image_transforms(cfg, size, mean, std), cache)
        if train.data.ndim != 4:
            raise ConfigError("data.root", f"the images in {cfg.root} are all greyscale; dataset: imagenet takes "
                              "colour images (dataset: folders takes greyscale ones)")
        return Splits(train, plain, test, len(classes), 3, size, mean, std)
    scale = tuple(cfg.augment.resized_crop or (0.08, 1.0))  # torchvision's default, ImageNet's usual one
    resize = int(size * 256 / 224)
    eval_tf = eval_transform(size, resize, mean, std)
    root = Path(cfg.root)
    try:
        files = ImageFiles(root / "train", loader=load_image)
        train = StreamedCrops(files, size, scale, cfg.augment.hflip, mean, std)
        test = ImageFiles(root / "val", transform=eval_tf, loader=load_image)
    except (FileNotFoundError, OSError) as e:
        raise ConfigError("data.root", f"no ImageNet-style folders in {root} ({e}); expected train/<class>/*.jpg "
                          "and val/<class>/*.jpg, as folders, or as .tar/.tar.gz shards of images of data.image_size "
                          "(64 px or less)") from None
    if train.classes != test.classes:
        raise ConfigError("data.root", f"{root}/train and {root}/val have different class folders")
    plain = ImageFiles(root / "train", transform=eval_tf, loader=load_image)
    return Splits(train, plain, test, len(train.classes), 3, size, mean, std, resize)


@DATASETS.register("fake")
def fake(cfg):
    """torchvision's FakeData (random images and labels): exercises the whole pipeline with no files at all."""
    shape = (3, cfg.image_size, cfg.image_size)
    mean, std = normalisation(cfg, 3, lambda: ((0.5,) * 3, (0.25,) * 3))
    train_tf, eval_tf = small_image_transforms(cfg, cfg.image_size, mean, std)
    train, plain, test = (torchvision.datasets.FakeData(size, shape, 10, tf, random_offset=offset)
                          for size, tf, offset in ((1000, train_tf, 0), (1000, eval_tf, 0), (500, eval_tf, 10_000)))
    return Splits(train, plain, test, 10, 3, cfg.image_size, mean, std)


def build_data(cfg, device=torch.device("cpu"), distributed=False, cache=Path(CacheConfig.dir)):
    """Hold out `val_size` training images (fixed by split_seed) for checkpoint selection; for the tensor
    pipeline, gather each split into one uint8 tensor, placed on `device` once for every loader of the study.
    `cache` (the study's cache.dir) keeps what is decoded from a read-only data folder."""
    if Path(cfg.root).exists() and not Path(cfg.root).is_dir():
        raise ConfigError("data.root", f"{cfg.root} is a file; it names the folder that holds the dataset")
    s = DATASETS.call(cfg.dataset, "data.dataset", cfg, cache=cache)
    classes = [str(c) for c in getattr(s.train, "classes", None) or range(s.num_classes)]  # FakeData has none
    kept, test_kept, num_classes = class_subset(cfg, s, classes)
    n = len(kept)
    if cfg.val_size >= n:
        raise ConfigError("data.val_size", f"{cfg.val_size} leaves no training images (the training split has {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
    val_idx, train_idx = [kept[i] for i in order[:cfg.val_size]], [kept[i] for i in order[cfg.val_size:]]
    for key, asked, there, what in (("data.train_subset", cfg.train_subset, len(train_idx),
                                     "training images left after data.val_size"),
                                    ("data.test_subset", cfg.test_subset, len(test_kept), "test images")):
        if asked and asked > there:
            raise ConfigError(key, f"{asked} is more than the {there} {what}; lower it, or set null for all of them")
    if cfg.train_subset:
        train_idx = train_idx[:cfg.train_subset]
    test = Subset(s.test, test_kept[:cfg.test_subset or len(test_kept)])
    data = Data(Subset(s.train, train_idx), Subset(s.train_plain, val_idx), test, num_classes, s.in_channels,
                s.image_size, s.mean, s.std, s.resize or s.image_size, classes[:num_classes])
    if pipeline(cfg, s.train, distributed) == "tensor":
        data.tensors = {name: from_subset(getattr(data, name)) for name in ("train", "val", "test")}
    data.content = content_digest(data)
    if data.tensors:
        data.tensors = {k: (x.to(device), y.to(device)) for k, (x, y) in data.tensors.items()}
    return data


def class_subset(cfg, s, classes):
    """The training and test indices of the first data.classes classes (all, without it), and how many classes."""
    if not cfg.classes:
        return list(range(len(s.train))), list(range(len(s.test))), s.num_classes
    if cfg.classes > s.num_classes or not hasattr(s.train, "targets"):
        raise ConfigError("data.classes", f"{cfg.classes}, but {cfg.dataset} has {s.num_classes} classes"
                          if hasattr(s.train, "targets") else f"{cfg.dataset} has no labels to select classes by")
    keep = lambda targets: [i for i, y in enumerate(torch.as_tensor(targets).tolist()) if y < cfg.classes]
    return keep(s.train.targets), keep(s.test.targets), cfg.classes


def content_digest(data):
    """What the training and validation splits hold, not where they lie: the uint8 images and labels of in-memory
    datasets, the files' paths (relative to their folder) and labels of folder datasets."""
    h = hashlib.sha256()
    for name in ("train", "val"):
        split = getattr(data, name)
        if hasattr(split.dataset, "data"):
            images, labels = data.tensors[name] if data.tensors else from_subset(split)
            h.update(images.numpy().tobytes())
            h.update(labels.numpy().tobytes())
        elif hasattr(split.dataset, "samples"):  # ImageFolder
            root = Path(split.dataset.root)
            for i in split.indices:
                path, label = split.dataset.samples[i]
                h.update(f"{Path(path).relative_to(root)}\t{label}\n".encode())
        else:
            h.update(f"{type(split.dataset).__name__}:{len(split)}".encode())
    return h.hexdigest()[:16]


def pipeline(cfg, dataset, distributed):
    """`auto` takes the tensor pipeline for datasets held in memory, in a single process."""
    in_memory = hasattr(dataset, "data")
    if cfg.pipeline == "tensor" and not in_memory:
        raise ConfigError("data.pipeline", f"'{cfg.dataset}' is not held in memory; use pipeline: loader or auto")
    if cfg.pipeline == "tensor" and distributed:
        raise ConfigError("data.pipeline", "the tensor pipeline runs in one process; use pipeline: loader or "
                                           "auto under torchrun")
    return "tensor" if cfg.pipeline == "tensor" or (cfg.pipeline == "auto" and in_memory and not distributed) \
        else "loader"


class Indexed(Dataset):
    """(image, label, index) items, so methods with per-sample state (CRD's memory bank) work on any dataset."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


class EpochLoader:
    """A torch DataLoader as a training loader, like TensorLoader: yields Batch, `set_epoch` reshuffles a
    DistributedSampler's shares, and `generator` (the order and the workers' random state) is the state a
    checkpoint restores for exact resume. Over streamed crops (StreamedCrops) it also sets, before each pass, the
    augmentation seed and view (the epoch, or epoch % views), as TensorLoader does, and yields the view with each
    batch for the teacher cache."""

    def __init__(self, loader, crops=None, seed=0, views=None):
        self.loader, self.generator, self.crops, self.seed, self.views = loader, loader.generator, crops, seed, views
        self.view = 0

    @property
    def dataset_size(self):
        return len(self.loader.dataset)

    def set_epoch(self, epoch):
        self.view = epoch if self.views is None else epoch % self.views
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.crops is None:
            return (Batch(x, y, index) for x, y, index in self.loader)
        self.crops.seed, self.crops.view = self.seed, self.view  # the workers copy the dataset as it is now
        view = torch.tensor(self.view)
        return (Batch(x, y, index, view) for x, y, index in self.loader)


def train_loader(data, cfg, device, seed, *, views=None, aug_seed=None, shuffle=True, batch_size=None, rank=0,
                 world=1):
    """Tensor pipeline: order and augmentation are functions of (seed, epoch) and (aug_seed or seed, view, index),
    `views` cycles the augmentations as the teacher cache records them, and `shuffle=False` (every image once, in
    order) is how the cache is built, from the very pixels the students train on. DataLoader: order (and the
    workers' random state) come from a generator seeded with `seed`; streamed crops are drawn from (aug_seed or
    seed, view, index) as in the tensor pipeline; under torchrun each of the `world` processes takes its share of
    every epoch and of the batch."""
    batch_size = batch_size or cfg.batch_size
    drop = shuffle and len(data.train) > batch_size
    if data.tensors:
        return TensorLoader(*data.tensors["train"], batch_size, shuffle=shuffle, drop_last=drop, seed=seed,
                            augment_cfg=cfg.augment, mean=data.mean, std=data.std, device=device, views=views,
                            aug_seed=aug_seed)
    generator = torch.Generator().manual_seed(seed)
    common = dict(num_workers=cfg.num_workers, pin_memory=device.type == "cuda", generator=generator)
    crops = data.train.dataset if isinstance(data.train.dataset, StreamedCrops) else None
    replay = dict(crops=crops, seed=seed if aug_seed is None else aug_seed, views=views)
    if world > 1:
        sampler = DistributedSampler(data.train, world, rank, shuffle=shuffle, seed=seed, drop_last=True)
        return EpochLoader(DataLoader(Indexed(data.train), batch_size // world, sampler=sampler, drop_last=True,
                                      **common), **replay)
    return EpochLoader(DataLoader(Indexed(data.train), batch_size, shuffle=shuffle, drop_last=drop, **common),
                       **replay)


def eval_loaders(data, cfg, device):
    """Validation and test loaders: every image once, in order, unaugmented."""
    if data.tensors:
        return tuple(TensorLoader(*data.tensors[split], cfg.eval_batch_size, shuffle=False, drop_last=False, seed=0,
                                  mean=data.mean, std=data.std, device=device) for split in ("val", "test"))
    return tuple(DataLoader(split, cfg.eval_batch_size, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda") for split in (data.val, data.test))


def plain_train_images(data, n):
    """The first `n` training images (in the split's fixed shuffled order) as evaluation sees images: unaugmented,
    normalised, on the CPU. They calibrate the int8 models."""
    if data.tensors:
        return normalize(data.tensors["train"][0][:n].cpu(), data.mean, data.std)
    plain = Subset(data.val.dataset, data.train.indices[:n])  # the training images with the evaluation transform
    return torch.stack([plain[i][0] for i in range(len(plain))])


def sample_batch(data, n=4):
    """A few real validation images and their labels, for the dry passes that size connectors and check every
    model and method before the long work."""
    items = [data.val[i] for i in range(min(n, len(data.val)))]
    return torch.stack([x for x, *_ in items]), torch.tensor([int(y) for _, y, *_ in items])
