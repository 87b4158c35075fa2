"""Before any long work, every model and method is tried for real: one training step on a few validation images.

A user's model or method that fails (a plugin whose forward raises, a loss of the wrong shape, a parameter of the
wrong type) then stops the run in seconds with one line naming the config key, instead of a traceback after hours
of teacher training.
"""
import copy

import torch

from kd.data.tensors import Batch
from kd.device import autocast
from kd.errors import ConfigError, blame


def dry_step(distiller, sample, recipe, key, student_key="student"):
    """Forward, loss and backward of `distiller` on `sample` (images, labels), on `recipe`'s device, in its
    precision and memory format, without an update. `key`: the config key of the model's stage, named by errors.
    The learnable state (batch-norm statistics, memory banks) is restored afterwards, so the run that follows is
    unchanged."""
    parts = distiller.parts(key, student_key)
    learnable = distiller.learnable()
    saved = copy.deepcopy(learnable.state_dict())
    x, y = sample
    try:
        with blame([(m, k) for m, _, k in parts], key, f"a training step on {len(y)} validation images failed"):
            distiller.to(recipe.device).train()
            batch = Batch(x, y, torch.arange(len(y))).to(recipe.device, recipe.memory_format)
            with autocast(recipe.device, recipe.amp):
                _, terms = distiller(batch)
            for _, term, part_key in parts:
                value = terms.get(term) if term else None
                if term and not (isinstance(value, torch.Tensor) and value.ndim == 0):
                    got = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
                    raise ConfigError(part_key, "the loss must be one scalar tensor (see kd/train/losses/base.py), "
                                      f"got {got}")
            terms["loss"].backward()
    finally:
        learnable.load_state_dict(saved)
        learnable.zero_grad(set_to_none=True)
