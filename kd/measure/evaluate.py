"""Accuracy on held-out data, and the cost of inference: parameters, MACs, latency and peak memory."""
import statistics
import time
import weakref

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from kd.device import autocast, synchronize


def rank_share(loader):
    """This process's contiguous share of the loader's images under torchrun, or None in a single process. Shares
    differ in size by at most one image (a rank may have none) and hold every image once, with no sampler padding,
    so the ranks' summed figures are the whole split's. The tensor pipeline is single-process, so a loader other than
    a DataLoader is None too, and every rank runs it whole."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not isinstance(loader, DataLoader):
        return None
    rank, world, n = dist.get_rank(), dist.get_world_size(), len(loader.dataset)
    return DataLoader(Subset(loader.dataset, range(rank * n // world, (rank + 1) * n // world)), loader.batch_size,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, collate_fn=loader.collate_fn)


@torch.inference_mode()
def accuracy(model, loader, device, amp="off", memory_format=torch.preserve_format):
    """Top-1, top-5 and mean cross-entropy over a loader. Top-5 is None with 5 classes or fewer, where it would be
    a trivial 100%. The sums stay on the device and are read once, at the end: no GPU sync per batch. Under
    torchrun each rank evaluates its share (`rank_share`) and the sums are added up across ranks, so every rank
    gets the same figures, each image counted once."""
    model.eval()
    share = rank_share(loader)
    sums, n, classes = torch.zeros(3, dtype=torch.float64, device=device), 0, None
    for x, y, *_ in loader if share is None else share:  # the tensor pipeline also yields sample indices
        x, y = x.to(device, non_blocking=True, memory_format=memory_format), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x).float()
        classes = logits.shape[1]
        ranked = logits.topk(min(5, classes), dim=1).indices
        sums += torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), (ranked[:, 0] == y).sum().double(),
                             (ranked == y[:, None]).any(1).sum().double()])
        n += y.numel()  # known on the host: a tensor made from it would be a copy to the device, and a sync
    wide = classes is not None and classes > 5  # top-5 means something; unknown on a rank that had no images
    if share is None:
        loss, top1, top5 = sums.tolist()
    else:  # in float64 every count is exact; `wide` becomes the number of ranks that saw more than 5 classes
        sums = torch.cat([sums, sums.new_tensor([n, wide])])
        dist.all_reduce(sums)
        loss, top1, top5, n, wide = sums.tolist()
    return {"top1": top1 / n, "top5": top5 / n if wide else None, "loss": loss / n}


def macs_per_image(model, image_shape, device):
    """Multiply-accumulates of one image's forward pass (torch's FLOP counter counts 2 FLOPs per MAC)."""
    x = torch.zeros(1, *image_shape, device=device)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.eval()(x)
    return counter.get_total_flops() // 2


def timed(fn, device, warmup, repeats):
    """Sorted seconds per call of `fn` after `warmup` calls; on CUDA each timing waits for the GPU's work."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)


@torch.inference_mode()
def latency(model, x, warmup, repeats):
    """Seconds per forward pass of `model` (in eval mode, or any callable, as an ONNX model) on an input already
    on the device: median and 90th percentile over repeats."""
    times = timed(lambda: model(x), x.device, warmup, repeats)
    return {"median": statistics.median(times), "p90": times[min(len(times) - 1, int(0.9 * len(times)))]}


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage alive at once, tracked at the ATen operator level.

    The CPU has no allocator statistics like CUDA's max_memory_allocated, and process RSS mixes in allocator
    caching and the Python heap. Every operator output's storage is counted when it appears and released when
    the last tensor using it is freed; views and in-place results share their storage's count. Scratch space
    that a kernel allocates and frees inside one operator is not seen.
    """

    def __init__(self):
        super().__init__()
        self.refs, self.current, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.refs:
            self.refs[key] = [storage.nbytes(), 0]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        self.refs[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.refs[key]


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.inference_mode()
def peak_memory(model, x):
    """Peak bytes for one forward pass: weights, buffers and input included.

    CUDA: the caching allocator's max_memory_allocated. CPU: weights + input + peak live activations
    (LiveTensorBytes).
    """
    model.eval()
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        model(x)
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device)
    tracker = LiveTensorBytes()
    with tracker:
        model(x)
    resident = tensor_bytes(model.parameters()) + tensor_bytes(model.buffers()) + tensor_bytes([x])
    return resident + tracker.peak


def profile(model, image_shape, device, cfg, memory_format=torch.preserve_format):
    """Inference cost at batch 1 and at cfg.batch_size, measured the same way for every model."""
    model = model.to(device, memory_format=memory_format).eval()
    params = list(model.parameters())
    out = {"params": sum(p.numel() for p in params), "param_bytes": tensor_bytes(params),
           "macs": macs_per_image(model, image_shape, device)}
    for batch in (1, cfg.batch_size):
        x = torch.randn(batch, *image_shape, device=device).contiguous(memory_format=memory_format)
        t = latency(model, x, cfg.warmup, cfg.repeats)
        out[f"latency_b{batch}_ms"] = 1000 * t["median"]
        out[f"latency_b{batch}_p90_ms"] = 1000 * t["p90"]
        out[f"images_per_s_b{batch}"] = batch / t["median"]
    out["peak_memory_bytes"] = peak_memory(model, torch.randn(cfg.batch_size, *image_shape, device=device)
                                           .contiguous(memory_format=memory_format))
    return out
