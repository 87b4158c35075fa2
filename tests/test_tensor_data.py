"""kd/data/tensors.py: the hash behind the augmentation, its equality with torchvision's transforms, the loader's
order and replayable augmentation, and from_subset, on small synthetic tensors."""
import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Subset

from kd.config import AugmentConfig
from kd.data.tensors import TensorLoader, _mix32, aug_params, augment, from_subset, normalize

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
FMNIST_STATS = ((0.2860,), (0.3530,))


def reference_mix32(x):
    """lowbias32 on Python's unbounded ints: the arithmetic the int64 tensor version must reproduce exactly."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def params(indices, seed=0, view=0, crop_padding=2, hflip=True):
    return torch.stack([t.long() for t in aug_params(indices, seed, view, crop_padding, hflip)], 1)  # (B, 3)


def random_images(n, channels, size=28, seed=0):
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# --- aug_params -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_hash_is_exact_32bit_arithmetic(device):
    edge = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]
    values = edge + torch.randint(0, 2**32, (2000,), generator=torch.Generator().manual_seed(0)).tolist()
    mixed = _mix32(torch.tensor(values, device=device))
    assert mixed.dtype == torch.int64
    assert mixed.tolist() == [reference_mix32(v) for v in values]
    assert [_mix32(v) for v in values[:50]] == [reference_mix32(v) for v in values[:50]]  # the Python-int path too


@pytest.mark.parametrize("device", DEVICES)
def test_aug_params_are_a_function_of_seed_view_and_index(device):
    n = 1000
    full = params(torch.arange(n, device=device), seed=3, view=5)
    assert full.device.type == device
    for i in (0, 1, 417, n - 1):
        assert torch.equal(params(torch.tensor([i], device=device), seed=3, view=5)[0], full[i])
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(1)).to(device)
    assert torch.equal(params(shuffled, seed=3, view=5), full[shuffled])
    subset = torch.arange(500, 700, 3, device=device)
    assert torch.equal(params(subset, seed=3, view=5), full[subset])
    assert torch.equal(params(torch.arange(n), seed=3, view=5), full.cpu())  # the same on every device


def test_aug_params_differ_across_views_and_seeds():
    idx = torch.arange(2000)
    reference = params(idx, seed=0, view=0)
    for other in (params(idx, seed=0, view=1), params(idx, seed=1, view=0), params(idx, seed=0, view=2**20)):
        same = (other == reference).all(1).float().mean().item()
        assert same < 0.1  # chance agreement is 1/25 * 1/2 = 2%


def test_aug_params_cover_the_range_uniformly():
    n, p = 20_000, 3
    dy, dx, flip = aug_params(torch.arange(n), seed=7, view=0, crop_padding=p, hflip=True)
    assert dy.dtype == dx.dtype == torch.int64 and flip.dtype == torch.bool
    for offsets in (dy, dx):
        counts = torch.bincount(offsets, minlength=2 * p + 1)
        assert len(counts) == 2 * p + 1
        assert ((counts > 0.8 * n / (2 * p + 1)) & (counts < 1.2 * n / (2 * p + 1))).all()
    assert 0.45 < flip.float().mean().item() < 0.55
    assert (dy == dx).float().mean().item() < 0.25  # the two offsets are not one draw (chance: 1/7)


def test_no_padding_means_no_offsets_and_no_hflip_means_no_flips():
    idx = torch.arange(500)
    dy, dx, flip = aug_params(idx, seed=0, view=0, crop_padding=0, hflip=True)
    assert not dy.any() and not dx.any() and flip.any()
    dy, dx, flip = aug_params(idx, seed=0, view=0, crop_padding=4, hflip=False)
    assert not flip.any() and dy.max() == 8


# --- augment and normalize against torchvision ------------------------------------------------------------------------

def torchvision_reference(image_u8, dy, dx, flip, p, mean, std):
    """RandomCrop(padding=p) + RandomHorizontalFlip + ToTensor + Normalize on a PIL image, with the draws given."""
    c, h, w = image_u8.shape
    array = image_u8.permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if c == 1 else array)
    if p:
        img = TF.pad(img, p, fill=0)
    img = TF.crop(img, dy, dx, h, w)
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), mean, std)


@pytest.mark.parametrize("channels, size, stats", [(1, 28, FMNIST_STATS), (3, 32, CIFAR_STATS)], ids=["grey", "rgb"])
@pytest.mark.parametrize("p", [0, 2, 4])
def test_augment_matches_torchvision(channels, size, stats, p):
    images = random_images(8, channels, size)
    dy, dx, _ = aug_params(torch.arange(8), seed=0, view=0, crop_padding=p, hflip=True)
    dy[0], dx[0], dy[1], dx[1] = 0, 0, 2 * p, 2 * p  # both extreme corners
    flip = torch.arange(8) % 2 == 0
    out = augment(images, dy, dx, flip, p, *stats)
    assert out.shape == images.shape and out.dtype == torch.float32
    for k in range(8):
        expected = torchvision_reference(images[k], int(dy[k]), int(dx[k]), bool(flip[k]), p, *stats)
        torch.testing.assert_close(out[k], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("channels, stats", [(1, FMNIST_STATS), (3, CIFAR_STATS)], ids=["grey", "rgb"])
def test_normalize_matches_to_tensor_and_normalize(channels, stats):
    images = random_images(4, channels)
    out = normalize(images, *stats)
    for k in range(4):
        array = images[k].permute(1, 2, 0).numpy()
        img = Image.fromarray(array[..., 0] if channels == 1 else array)
        torch.testing.assert_close(out[k], TF.normalize(TF.to_tensor(img), *stats), atol=1e-6, rtol=0)


# --- TensorLoader -----------------------------------------------------------------------------------------------------

N, BATCH, SEED = 50, 8, 11
AUG = AugmentConfig(crop_padding=2, hflip=True)


def make_loader(device="cpu", channels=1, **overrides):
    images = random_images(N, channels, size=12)
    labels = torch.arange(N) % 10
    kwargs = dict(shuffle=True, drop_last=False, seed=SEED, augment_cfg=AUG, mean=(0.5,) * channels,
                  std=(0.25,) * channels, device=device)
    return TensorLoader(images, labels, BATCH, **{**kwargs, **overrides}), images, labels


def epoch_order(loader, epoch):
    loader.set_epoch(epoch)
    return torch.cat([idx for _, _, idx, _ in loader]).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_loader_covers_every_index_once_in_a_seeded_order(device):
    loader, _, labels = make_loader(device)
    assert len(loader) == 7 and loader.dataset_size == N
    batches = list(loader)
    assert len(batches) == 7
    for x, y, idx, _ in batches:
        assert x.shape == (len(idx), 1, 12, 12) and x.dtype == torch.float32 and x.device.type == device
        assert idx.dtype == torch.int64 and idx.device.type == device
        assert torch.equal(labels.to(device)[idx], y)
    order = torch.cat([idx for _, _, idx, _ in batches]).tolist()
    assert sorted(order) == list(range(N)) and order != list(range(N))
    assert epoch_order(make_loader(device)[0], 0) == order  # a new loader, same (seed, epoch)
    assert epoch_order(loader, 1) != order
    assert epoch_order(loader, 1) == epoch_order(make_loader(device)[0], 1)
    assert epoch_order(make_loader(device, seed=SEED + 1)[0], 0) != order


def test_loader_drop_last_and_unshuffled_plain_order():
    loader, images, labels = make_loader(drop_last=True)
    assert len(loader) == N // BATCH == len(list(loader))
    assert all(len(idx) == BATCH for _, _, idx, _ in loader)

    plain, _, _ = make_loader(shuffle=False, augment_cfg=None)
    assert epoch_order(plain, 3) == list(range(N))
    x = torch.cat([x for x, *_ in plain])
    assert torch.equal(x, normalize(images, (0.5,), (0.25,)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
def test_loader_pixels_replay_from_seed_view_and_index_alone(device, channels):
    loader, images, _ = make_loader(device, channels)
    loader.set_epoch(3)
    assert loader.view == 3
    stats = ((0.5,) * channels, (0.25,) * channels)
    for x, _, idx, _ in loader:
        for k, i in enumerate(idx.tolist()):  # on the loader's device: float rounding may differ between devices
            one = torch.tensor([i], device=device)
            replay = augment(images[i:i + 1].to(device), *aug_params(one, SEED, 3, AUG.crop_padding, AUG.hflip),
                             AUG.crop_padding, *stats)[0]
            assert torch.equal(x[k], replay)


def by_index(loader, epoch):
    loader.set_epoch(epoch)
    pixels = torch.empty(N, *loader.images.shape[1:])
    for x, _, idx, _ in loader:
        pixels[idx.cpu()] = x.cpu()
    return pixels


def test_views_cycle_the_augmentation():
    loader, _, _ = make_loader(views=2)
    x0, x1, x2 = (by_index(loader, e) for e in range(3))
    assert loader.view == 0
    assert epoch_order(loader, 0) != epoch_order(loader, 2)  # a new order every epoch...
    assert torch.equal(x0, x2)  # ...but epoch e and e + 2 see the same crops and flips
    assert (x0 != x1).flatten(1).any(1).float().mean() > 0.8
    with pytest.raises(ValueError, match="views"):
        make_loader(views=0)


# --- from_subset ------------------------------------------------------------------------------------------------------

class InMemory(torch.utils.data.Dataset):
    """What from_subset reads of torchvision's FashionMNIST (.data a uint8 tensor, .targets a tensor) and CIFAR10
    (.data a uint8 numpy array (N, H, W, C), .targets a list)."""

    def __init__(self, data, targets):
        self.data, self.targets = data, targets

    def __len__(self):
        return len(self.data)


def test_from_subset_fashion_mnist_layout():
    data = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    targets = torch.arange(10) % 7
    indices = [7, 2, 9, 2]
    images, labels = from_subset(Subset(InMemory(data, targets), indices))
    assert images.shape == (4, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images[:, 0], data[indices])
    assert labels.dtype == torch.int64 and labels.tolist() == targets[indices].tolist()


def test_from_subset_cifar_layout():
    data = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    targets = [int(t) for t in np.arange(10) % 3]
    indices = [4, 0, 8]
    images, labels = from_subset(Subset(InMemory(data, targets), indices))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8 and images.is_contiguous()
    assert torch.equal(images, torch.from_numpy(data[indices]).permute(0, 3, 1, 2))
    assert labels.dtype == torch.int64 and labels.tolist() == [targets[i] for i in indices]
    whole, all_labels = from_subset(InMemory(data, targets))  # a whole dataset (the test split without test_subset)
    assert torch.equal(whole, torch.from_numpy(data).permute(0, 3, 1, 2)) and all_labels.tolist() == targets


def test_from_subset_rejects_datasets_without_images_in_memory():
    with pytest.raises(TypeError, match="FakeData"):
        from_subset(Subset(torchvision.datasets.FakeData(4, (3, 8, 8)), [0, 1]))
    with pytest.raises(TypeError):
        from_subset(Subset(InMemory(np.zeros((2, 4, 4), np.float32), [0, 1]), [0]))
