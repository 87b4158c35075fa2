"""Distillation methods, one file each. Every module in this package is imported here, so a method is added by
dropping in a file with one registered class; methods kept outside the package are loaded with `plugins:`."""
import importlib
import pkgutil

from kd.train.losses.base import FEATURE_LOSSES, LOGIT_LOSSES, Probe, Step

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["FEATURE_LOSSES", "LOGIT_LOSSES", "Probe", "Step"]
