"""Datasets by name, a validation split held out of the training set, and the loaders."""
import gzip
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import transforms as T

from .registry import ConfigError, Registry

DATASETS = Registry("dataset")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


@dataclass
class Splits:
    """What a dataset constructor returns: the training images twice (augmented, and plain for the held-out
    validation part), the test split, and the shape facts models are built from."""
    train: Dataset
    train_plain: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


@dataclass
class Data:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int


def small_image_transforms(cfg, size, mean, std):
    aug = []
    if cfg.augment.crop_padding:
        aug.append(T.RandomCrop(size, padding=cfg.augment.crop_padding))
    if cfg.augment.hflip:
        aug.append(T.RandomHorizontalFlip())
    plain = [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(aug + plain), T.Compose(plain)


def _missing(name, root, expected, error):
    return ConfigError("data.root", f"{name} not found in {root} and not downloadable here ({error}); "
                       f"put {expected} there, or set data.download: true where the network allows")


@DATASETS.register("cifar10")
def cifar10(cfg):
    train_tf, eval_tf = small_image_transforms(cfg, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    try:
        train, test = (torchvision.datasets.CIFAR10(cfg.root, train=t, transform=tf, download=cfg.download)
                       for t, tf in ((True, train_tf), (False, eval_tf)))
    except (RuntimeError, OSError) as e:
        raise _missing("CIFAR-10", cfg.root, "the extracted python batches (cifar-10-batches-py/)", e) from None
    plain = torchvision.datasets.CIFAR10(cfg.root, train=True, transform=eval_tf)
    return Splits(train, plain, test, 10, 3, 32)


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
    stage_debian_fashion_mnist(Path(cfg.root) / "FashionMNIST" / "raw")
    train_tf, eval_tf = small_image_transforms(cfg, 28, (0.2860,), (0.3530,))
    try:
        train, test = (torchvision.datasets.FashionMNIST(cfg.root, train=t, transform=tf, download=cfg.download)
                       for t, tf in ((True, train_tf), (False, eval_tf)))
    except (RuntimeError, OSError) as e:
        raise _missing("Fashion-MNIST", cfg.root, "the IDX files (FashionMNIST/raw/, or apt-get install "
                       "dataset-fashion-mnist)", e) from None
    plain = torchvision.datasets.FashionMNIST(cfg.root, train=True, transform=eval_tf)
    return Splits(train, plain, test, 10, 1, 28)


@DATASETS.register("imagenet")
def imagenet(cfg):
    """ImageNet-style folders: root/train/<class>/*.jpg and root/val/<class>/*.jpg (val is the test split)."""
    size = cfg.image_size
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(size)] + ([T.RandomHorizontalFlip()] if cfg.augment.hflip else [])
                         + [T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
    root = Path(cfg.root)
    try:
        train = torchvision.datasets.ImageFolder(root / "train", transform=train_tf)
        test = torchvision.datasets.ImageFolder(root / "val", transform=eval_tf)
    except (FileNotFoundError, OSError) as e:
        raise ConfigError("data.root", f"no ImageNet-style folders in {root} ({e}); expected train/<class>/*.jpg "
                          "and val/<class>/*.jpg") from None
    if train.classes != test.classes:
        raise ConfigError("data.root", f"{root}/train and {root}/val have different class folders")
    plain = torchvision.datasets.ImageFolder(root / "train", transform=eval_tf)
    return Splits(train, plain, test, len(train.classes), 3, size)


@DATASETS.register("fake")
def fake(cfg):
    """torchvision's FakeData (random images and labels): exercises the whole pipeline with no files at all."""
    shape = (3, cfg.image_size, cfg.image_size)
    train_tf, eval_tf = small_image_transforms(cfg, cfg.image_size, (0.5,) * 3, (0.25,) * 3)
    train, plain, test = (torchvision.datasets.FakeData(size, shape, 10, tf, random_offset=offset)
                          for size, tf, offset in ((1000, train_tf, 0), (1000, eval_tf, 0), (500, eval_tf, 10_000)))
    return Splits(train, plain, test, 10, 3, cfg.image_size)


def build_data(cfg):
    """Hold out `val_size` training images (fixed by split_seed) for checkpoint selection."""
    s = DATASETS.get(cfg.dataset, "data.dataset")(cfg)
    n = len(s.train)
    if cfg.val_size >= n:
        raise ConfigError("data.val_size", f"{cfg.val_size} leaves no training images (the training split has {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
    val_idx, train_idx = order[:cfg.val_size], order[cfg.val_size:]
    if cfg.train_subset:
        train_idx = train_idx[:cfg.train_subset]
    test = s.test
    if cfg.test_subset and cfg.test_subset < len(test):
        test = Subset(test, range(cfg.test_subset))
    return Data(Subset(s.train, train_idx), Subset(s.train_plain, val_idx), test,
                s.num_classes, s.in_channels, s.image_size)


def make_loaders(data, cfg, device, generator, seed=0, rank=0, world=1):
    """The training loader draws its order (and its workers' augmentation seeds) from `generator`, so a resumed
    run that restores the generator's state sees the same batches. Under torchrun each of the `world`
    processes takes its share of every epoch and of `batch_size`."""
    pin = device.type == "cuda"
    common = dict(num_workers=cfg.num_workers, pin_memory=pin, persistent_workers=False)
    if world > 1:
        sampler = DistributedSampler(data.train, world, rank, shuffle=True, seed=seed, drop_last=True)
        train = DataLoader(data.train, cfg.batch_size // world, sampler=sampler, drop_last=True, generator=generator,
                           **common)
    else:
        train = DataLoader(data.train, cfg.batch_size, shuffle=True, drop_last=len(data.train) > cfg.batch_size,
                           generator=generator, **common)
    val = DataLoader(data.val, cfg.eval_batch_size, **common)
    test = DataLoader(data.test, cfg.eval_batch_size, **common)
    return train, val, test


def sample_batch(data, n=2):
    """A few real validation images, for dry forward passes that size connectors and count MACs."""
    return torch.stack([data.val[i][0] for i in range(min(n, len(data.val)))])
