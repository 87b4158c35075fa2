"""Teacher and student architectures by name; the dataset supplies in_channels, num_classes and image_size."""
from pathlib import Path

import torch
import torchvision
from torch import nn

from kd.errors import ConfigError, did_you_mean, first_line
from kd.registry import Registry, check_kwargs, keyword_params
from kd.store import file_problem

MODELS = Registry("model", context=("in_channels", "num_classes", "image_size"))
SMALL_IMAGE = 64  # at or below this size, ResNets keep full resolution in the stem (CIFAR-style)


def resnet(builder, in_channels, num_classes, image_size, stem_stride, stem):
    """A torchvision ResNet by `builder`, its stem fitted to the images; parameter names stay torchvision's, so
    torchvision's pretrained state dicts load into it."""
    small = stem == "small" or stem == "auto" and image_size <= SMALL_IMAGE
    if stem not in ("auto", "small", "imagenet") or stem == "small" and image_size > SMALL_IMAGE:
        raise ValueError(f"stem must be auto, small (images of {SMALL_IMAGE} px or less) or imagenet, got {stem!r} "
                         f"for {image_size} px")
    if stem_stride not in (1, 2, 4) or (stem_stride != 1 and not small):
        raise ValueError(f"stem_stride must be 1, 2 or 4 and applies to the small-image stem, got {stem_stride}")
    model = builder(num_classes=num_classes)
    if small:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stem_stride, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


@MODELS.register("resnet18")
def resnet18(in_channels, num_classes, image_size, stem_stride: int = 1, stem: str = "auto"):
    """torchvision's ResNet-18; for small images a 3x3 stem without max-pool, of stride 1 as is standard for CIFAR
    (`stem_stride: 2` halves the resolution of every stage: a quarter of the compute, for quick teachers).
    `stem: imagenet` keeps ImageNet's 7x7 stride-2 stem and max-pool at any size (at 64 px a 16th of the small
    stem's compute); `small` and `auto` (small at 64 px or less) the small-image one."""
    return resnet(torchvision.models.resnet18, in_channels, num_classes, image_size, stem_stride, stem)


@MODELS.register("resnet34")
def resnet34(in_channels, num_classes, image_size, stem_stride: int = 1, stem: str = "auto"):
    """torchvision's ResNet-34, the usual ImageNet teacher of a ResNet-18, with resnet18's stem options; its
    pretrained weights (`teacher.weights`) load as they are with ImageNet's stem, the one `auto` gives above 64 px."""
    return resnet(torchvision.models.resnet34, in_channels, num_classes, image_size, stem_stride, stem)


def conv_bn_relu(c_in, c_out, stride):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@MODELS.register("cnn")
class CNN(nn.Module):
    """Lightweight student: stages of conv-BN-ReLU blocks, each stage after the first halving the resolution.

    Feature maps for hint losses are the stage outputs, named `stages.0`, `stages.1`, ...
    """

    def __init__(self, in_channels, num_classes, image_size, channels: list[int] = (32, 64, 128),
                 blocks: int = 2, stem_stride: int = 1):
        super().__init__()
        if not channels or min(channels) < 1 or blocks < 1 or stem_stride < 1:
            raise ValueError("channels must be a non-empty list of positive widths; blocks and stem_stride >= 1")
        stages, c_in = [], in_channels
        for i, width in enumerate(channels):
            first_stride = stem_stride if i == 0 else 2
            stages.append(nn.Sequential(*[conv_bn_relu(c_in if b == 0 else width, width, first_stride if b == 0 else 1)
                                          for b in range(blocks)]))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(x)), 1))


def _torchvision_classifiers():
    return set(torchvision.models.list_models(module=torchvision.models))


def create_model(name, key, kwargs, in_channels, num_classes, image_size):
    """Our registry first, then any torchvision classifier by name (3-channel input only)."""
    if name in MODELS.names():
        return MODELS.build(name, f"{key}.kwargs", dict(kwargs), in_channels=in_channels,
                            num_classes=num_classes, image_size=image_size)
    if name in _torchvision_classifiers():
        if in_channels != 3:
            raise ConfigError(f"{key}.name", f"torchvision model '{name}' needs 3-channel images; this data has "
                              f"{in_channels}")
        return torchvision_model(name, f"{key}.kwargs", dict(kwargs), num_classes)
    raise ConfigError(f"{key}.name", f"unknown model '{name}' ({did_you_mean(name, MODELS.names())}, "
                                     "or any torchvision classifier name)")


def torchvision_model(name, key, kwargs, num_classes):
    """A torchvision classifier, its kwargs checked like ours: the builder passes unknown ones to the model class,
    which ignores them (`**kwargs`), so the names a config may set are the builder's own and the class's
    optional ones (the required ones, as ResNet's `layers`, the builder supplies)."""
    builder = torchvision.models.get_model_builder(name)
    model = builder(num_classes=num_classes)
    if not kwargs:
        return model
    params, hints = keyword_params(builder, skip=("weights", "progress", "num_classes"))
    own, own_hints = keyword_params(type(model), skip=("num_classes",))
    params.update({n: p for n, p in own.items() if p.default is not p.empty})
    check_kwargs(kwargs, key, params, {**own_hints, **hints})
    try:
        return builder(num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(key, f"torchvision model '{name}': {e}") from None


def load_weights(model, name, weights, key):
    """Initialise from torchvision's pretrained weights or a saved state dict.

    Tensors whose shapes differ (a new classifier head, a 1-channel stem) keep their fresh initialisation;
    the returned list names them so the run can say what is trained from scratch.
    """
    if weights == "torchvision":
        try:
            state = torchvision.models.get_model_weights(name).DEFAULT.get_state_dict(progress=True)
        except ValueError:
            raise ConfigError(key, f"torchvision has no pretrained weights for '{name}'") from None
        except OSError as e:
            raise ConfigError(key, f"could not fetch torchvision weights for '{name}' ({e}); "
                                   "save a state dict locally and give its path instead") from None
    else:
        path = Path(weights)
        if problem := file_problem(path):
            raise ConfigError(key, f"{path}: {problem}")
        try:  # weights_only: a state dict from anywhere is read as tensors, never run as code
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConfigError(key, f"{path} is not a state dict this project can read ({first_line(e)})") from None
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ConfigError(key, f"{path} holds a {type(state).__name__}, not a state dict")
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise ConfigError(key, f"weights do not fit model '{name}': unexpected tensors {', '.join(unknown[:3])}")
    kept = {k: v for k, v in state.items() if v.shape == own[k].shape}
    model.load_state_dict(kept, strict=False)
    return sorted(k for k in own if k not in kept)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())
