"""In-memory datasets (CIFAR-10, Fashion-MNIST) as one uint8 tensor on the training device, batched and augmented
with tensor ops: no per-image PIL work and no worker processes. A sample's crop and flip are a pure function of
(seed, view, index), so the augmentation any sample saw can be replayed exactly, in any batch, order or subset."""
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

_M32 = 0xFFFFFFFF
_AUG, _ORDER, _RESIZED = 1, 2, 3  # domain tags: padded crops, epoch order and resized crops never share a key


def _mul32(x, c):
    """x * c mod 2**32 for 32-bit x and a constant c, multiplied by c's 16-bit halves: no int64 product can
    overflow (torch leaves signed overflow to the hardware), so every device gives the same bits."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """lowbias32 (C. Wellons): a bijective 32-bit hash with near-ideal avalanche, on Python ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(*words):
    """Hash a sequence of words (each taken mod 2**32; ints or broadcastable int64 tensors) into 32 bits."""
    k = 0
    for w in words:
        k = _mix32(k ^ (w & _M32))
    return k


def aug_params(indices, seed, view, crop_padding, hflip):
    """Crop offsets dy, dx in [0, 2 * crop_padding] and flips for dataset `indices` in augmentation `view`,
    hashed from (seed, view, index) alone -- counter-based, so no RNG state and no dependence on the batch."""
    streams = torch.arange(3, device=indices.device)
    h = _key(_AUG, seed, view, indices.long()[:, None], streams)  # (B, 3): one hash per sample and draw
    span = 2 * crop_padding + 1
    flip = (h[:, 2] & 1).bool() if hflip else torch.zeros_like(indices, dtype=torch.bool)
    return h[:, 0] % span, h[:, 1] % span, flip


def resized_crop_params(indices, seed, view, scale, hflip, height, width):
    """Random-resized crops as torchvision draws them (area a uniform fraction in `scale` of the image's, aspect
    ratio log-uniform in 3/4-4/3, position uniform), with one draw per sample hashed from (seed, view, index), so
    a crop is replayable like the padded one; a crop larger than the image is clamped to it. Returns top, left,
    crop height and width, and flips."""
    u = _key(_RESIZED, seed, view, indices.long()[:, None], torch.arange(5, device=indices.device)).double() / 2**32
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    ratio = torch.exp(math.log(3 / 4) + math.log(16 / 9) * u[:, 1])
    h = torch.sqrt(area / ratio).round().clamp(1, height)
    w = torch.sqrt(area * ratio).round().clamp(1, width)
    top, left = (u[:, 2] * (height - h + 1)).floor(), (u[:, 3] * (width - w + 1)).floor()
    flip = u[:, 4] < 0.5 if hflip else torch.zeros_like(indices, dtype=torch.bool)
    return top, left, h, w, flip


def resized_crop(images_u8, top, left, h, w, flip, mean, std):
    """Each image's crop (rows top..top+h, columns left..left+w, mirrored where `flip`) resized bilinearly back to
    the image's size, then ToTensor + Normalize: one affine resampling of the whole batch."""
    b, c, height, width = images_u8.shape
    theta = torch.zeros(b, 2, 3, dtype=torch.float32, device=images_u8.device)
    theta[:, 0, 0] = (w / width * torch.where(flip, -1.0, 1.0)).float()  # half-extents in [-1, 1] coordinates
    theta[:, 1, 1] = (h / height).float()
    theta[:, 0, 2] = ((2 * left + w) / width - 1).float()  # the crop's centre
    theta[:, 1, 2] = ((2 * top + h) / height - 1).float()
    grid = F.affine_grid(theta, [b, c, height, width], align_corners=False)
    x = F.grid_sample(images_u8.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    return x.div_(255).sub_(mean).div_(std)


def normalize(images_u8, mean, std):
    """uint8 (B, C, H, W) -> float32, computed as ToTensor + Normalize compute it (same operations in the same
    order) so the values match torchvision's. mean/std: per-channel sequences, or float32 tensors on the device."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images_u8.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images_u8.device).view(-1, 1, 1)
    return images_u8.float().div_(255).sub_(mean).div_(std)


def augment(images_u8, dy, dx, flip, crop_padding, mean, std):
    """RandomCrop(padding=crop_padding) at the given offsets, then RandomHorizontalFlip where `flip`, then
    ToTensor + Normalize, for the whole batch at once. Zero padding, as torchvision pads before normalising."""
    b, c, h, w = images_u8.shape
    padded = F.pad(images_u8, (crop_padding,) * 4)
    rows = dy[:, None] + torch.arange(h, device=images_u8.device)  # (B, H): rows of the padded image to keep
    cols = dx[:, None] + torch.arange(w, device=images_u8.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads its columns right to left
    crops = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))
    crops = crops.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    return normalize(crops, mean, std)


class Batch(NamedTuple):
    """What a training loader yields: images, labels, their dataset indices (methods with per-sample state, and
    the teacher cache, need them), and the augmentation view (the tensor pipeline's, a 0-d tensor on the device;
    None from a DataLoader)."""
    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    view: torch.Tensor | None = None

    def to(self, device, memory_format=torch.preserve_format):
        return Batch(self.images.to(device, non_blocking=True, memory_format=memory_format),
                     self.labels.to(device, non_blocking=True), self.index.to(device, non_blocking=True),
                     None if self.view is None else self.view.to(device, non_blocking=True))


class TensorLoader:
    """Yields Batch: normalised (and, given augment_cfg, augmented) float32 images, labels and dataset indices,
    all on `device`, and the view. The order is a function of (seed, epoch) and the augmentation of (aug_seed, view,
    index), with view = epoch, or epoch % views to cycle through a fixed number of augmented views of the data.
    aug_seed defaults to seed; a separate one lets students of several seeds replay one teacher cache."""

    def __init__(self, images_u8, labels, batch_size, *, shuffle, drop_last, seed, augment_cfg=None, mean, std,
                 device, views=None, aug_seed=None):
        if views is not None and views < 1:
            raise ValueError(f"views must be >= 1 or None, got {views}")
        self.images, self.labels = images_u8.to(device), labels.to(device)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.aug_seed = seed if aug_seed is None else aug_seed
        self.augment_cfg, self.views, self.device = augment_cfg, views, torch.device(device)
        self.generator = None  # stateless: nothing for a checkpoint to restore
        # on the device once, not copied from the host every batch
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.set_epoch(0)

    @property
    def dataset_size(self):
        return len(self.labels)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.view = epoch if self.views is None else epoch % self.views

    def __len__(self):
        n, bs = self.dataset_size, self.batch_size
        return n // bs if self.drop_last else math.ceil(n / bs)

    def order(self):
        """This epoch's sample order. A CPU generator seeds from only the low 32 bits, so (seed, epoch) is hashed
        into 32 bits rather than packed into 64."""
        if not self.shuffle:
            return torch.arange(self.dataset_size, device=self.device)
        g = torch.Generator().manual_seed(_key(_ORDER, self.seed, self.epoch))
        return torch.randperm(self.dataset_size, generator=g).to(self.device)

    def __iter__(self):
        order, bs, cfg = self.order(), self.batch_size, self.augment_cfg
        view = torch.tensor(self.view, device=self.device)  # a tensor, so a compiled step takes every view alike
        if cfg is not None and cfg.resized_crop:  # the epoch's crops and flips, in its order, at once
            params = resized_crop_params(order, self.aug_seed, self.view, cfg.resized_crop, cfg.hflip,
                                         *self.images.shape[2:])
        elif cfg is not None:
            params = aug_params(order, self.aug_seed, self.view, cfg.crop_padding, cfg.hflip)
        for start in range(0, len(self) * bs, bs):
            idx = order[start:start + bs]
            x = self.images[idx]
            if cfg is None:
                x = normalize(x, self.mean, self.std)
            elif cfg.resized_crop:
                x = resized_crop(x, *(p[start:start + bs] for p in params), self.mean, self.std)
            else:
                x = augment(x, *(p[start:start + bs] for p in params), cfg.crop_padding, self.mean, self.std)
            yield Batch(x, self.labels[idx], idx, view)


def from_subset(subset):
    """(images (N, C, H, W) uint8, labels int64) on the CPU, in subset order, from a Subset of (or a whole)
    torchvision dataset that holds its images in memory as `.data`: (N, H, W) tensors (Fashion-MNIST) or (N, H, W, C)
    arrays (CIFAR-10). The dataset's own transforms are not applied. TypeError for datasets read from files
    (ImageFolder, ...), so callers can fall back to a DataLoader."""
    base, indices = (subset.dataset, subset.indices) if isinstance(subset, Subset) else (subset, range(len(subset)))
    data = getattr(base, "data", None)
    data = torch.as_tensor(data) if isinstance(data, (torch.Tensor, np.ndarray)) else None
    if data is None or data.dtype != torch.uint8 or data.ndim not in (3, 4):
        raise TypeError(f"{type(base).__name__} holds no uint8 images in memory (.data); use a DataLoader")
    idx = torch.as_tensor(indices, dtype=torch.long)
    images = data[idx]
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return images.contiguous(), torch.as_tensor(base.targets, dtype=torch.long)[idx]
