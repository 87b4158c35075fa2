"""Device choice and mixed precision, shared by training and evaluation."""
import contextlib

import torch

from .registry import ConfigError


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"'{name}' was asked for but CUDA is not available here; use --device cpu")
    return torch.device(name)


def autocast(device, amp):
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
