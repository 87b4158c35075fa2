"""Device choice and mixed precision, shared by training and evaluation."""
import contextlib

import torch

from .registry import KDError


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KDError(f"device: '{name}' was asked for but CUDA is not available here; use --device cpu")
    return torch.device(name)


def autocast(device, amp):
    """bf16 or fp16 autocast, or nothing; fp16 without CUDA is refused since CPUs gain nothing from it."""
    if amp == "off":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise KDError("train.amp: fp16 needs a CUDA device; use bf16 or off on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
