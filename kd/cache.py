"""Teacher outputs computed once for K augmented views of every training image, replayed by every student.

Correct under random augmentation by construction: the tensor pipeline's crop and flip for a sample are a pure
function of (seed, view, index), so student epoch e replays view e mod K with exactly the pixels the teacher saw.
A per-index cache without views (as in torchdistill) would pair outputs with the wrong crops.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import to_dict
from .device import autocast
from .errors import KDError
from .log import Progress, info
from .store import fingerprint, write_text

FORMAT = 2


class TeacherCache:
    """Memory-mapped fp16 arrays under `<dir>/<key>/`: logits (K, N, classes), or the top-k values and class
    indices when classes are many, and one array per cached feature layer; `manifest.json` is written last,
    so a cache without it (a build that was killed) or with a file of the wrong size (truncated) is rebuilt."""

    def __init__(self, folder, manifest, device):
        self.folder, self.manifest, self.device = folder, manifest, device
        self.arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in manifest["arrays"]}

    @staticmethod
    def plan(n, views, num_classes, topk, feature_shapes):
        """Array name -> (shape, dtype) for everything the cache stores."""
        arrays = {}
        if topk and topk < num_classes:
            arrays["topk_values"] = ((views, n, topk), np.float16)
            arrays["topk_indices"] = ((views, n, topk), np.int32)
        else:
            arrays["logits"] = ((views, n, num_classes), np.float16)
        for layer, shape in feature_shapes.items():
            arrays[f"feature.{layer}"] = ((views, n, *shape), np.float16)
        return arrays

    @classmethod
    def open_or_build(cls, cfg, identity, feature_shapes, teacher, taps, loader, num_classes, device, amp):
        """Reuse the cache whose key matches everything that shapes the stored outputs, build it otherwise.
        `identity`: what comes from outside (the training images, augmentation and its seed, the teacher's
        weights, the precision); the cache adds its own settings and the recorded layers' shapes. `loader` is
        the students' training loader, unshuffled: the cache records the very pixels they train on."""
        key = fingerprint(FORMAT, identity, to_dict(cfg, "results"), feature_shapes)
        folder = Path(cfg.dir) / key
        plan = cls.plan(loader.dataset_size, cfg.views, num_classes, cfg.topk, feature_shapes)
        manifest = cls.read_valid_manifest(folder, plan)
        if manifest is None:
            manifest = cls.build(folder, plan, teacher, taps, loader, cfg.views, num_classes, device, amp)
        else:
            info(f"[cache] reusing {folder}")
        return cls(folder, manifest, device)

    @staticmethod
    def read_valid_manifest(folder, plan):
        path = folder / "manifest.json"
        if not path.exists():
            if folder.exists():
                info(f"[cache] {folder} is incomplete (no manifest); rebuilding")
            return None
        manifest = json.loads(path.read_text())
        for name, (shape, dtype) in plan.items():
            file = folder / f"{name}.npy"
            expected = manifest["arrays"].get(name, {}).get("bytes")
            if not file.exists() or file.stat().st_size != expected or manifest["arrays"][name]["shape"] != list(shape):
                info(f"[cache] {file} is missing, truncated or of another shape; rebuilding")
                return None
        return manifest

    @staticmethod
    def build(folder, plan, teacher, taps, loader, views, num_classes, device, amp):
        """One teacher pass per view over `loader`, in inference mode and in the students' precision (`amp`), as
        a live teacher would run inside their training step."""
        need = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in plan.values())
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        info(f"[cache] building {need / 2**20:.1f} MiB of teacher outputs in {folder} ({views} views)")
        if need > free:
            raise KDError(f"cache.dir: the teacher cache needs {need / 2**30:.2f} GiB but {folder} has "
                          f"{free / 2**30:.2f} GiB free; free space, point cache.dir elsewhere, lower cache.views "
                          "or use cache: logits")
        (folder / "manifest.json").unlink(missing_ok=True)
        arrays = {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
                  for name, (shape, dtype) in plan.items()}
        layers = [name.split(".", 1)[1] for name in plan if name.startswith("feature.")]
        teacher.eval()
        taps.take()
        for view in range(views):
            loader.set_epoch(view)
            for batch in Progress(loader, f"[cache] view {view + 1}/{views}"):
                rows = batch.index.cpu().numpy()
                with torch.inference_mode(), autocast(device, amp):
                    logits = teacher(batch.images).float()
                features = taps.take()
                if "logits" in arrays:
                    arrays["logits"][view, rows] = logits.cpu().numpy()
                else:
                    k = arrays["topk_values"].shape[-1]
                    values, classes = logits.topk(k, dim=1)
                    arrays["topk_values"][view, rows] = values.cpu().numpy()
                    arrays["topk_indices"][view, rows] = classes.cpu().numpy()
                for layer in layers:
                    arrays[f"feature.{layer}"][view, rows] = features[layer].float().cpu().numpy()
        for array in arrays.values():
            array.flush()
        manifest = {"format": FORMAT, "views": views, "size": loader.dataset_size, "num_classes": num_classes,
                    "arrays": {name: {"shape": list(shape), "bytes": (folder / f"{name}.npy").stat().st_size}
                               for name, (shape, _) in plan.items()}}
        write_text(folder / "manifest.json", json.dumps(manifest, indent=2))
        return manifest

    def lookup(self, view, idx):
        """Teacher logits (and features) for the samples `idx` as seen in `view`, on the training device."""
        rows = np.asarray(idx.cpu())
        if "logits" in self.arrays:
            logits = self._fetch("logits", view, rows).float()
        else:
            values, classes = self._fetch("topk_values", view, rows).float(), self._fetch("topk_indices", view, rows)
            # Classes outside the top-k get a logit far below any kept one: ~zero probability, and no NaN.
            logits = torch.full((len(rows), self.manifest["num_classes"]), -1e4, device=self.device)
            logits.scatter_(1, classes.long(), values)
        features = {name.split(".", 1)[1]: self._fetch(name, view, rows).float()
                    for name in self.arrays if name.startswith("feature.")}
        return {"logits": logits, "features": features}

    def _fetch(self, name, view, rows):
        return torch.from_numpy(np.ascontiguousarray(self.arrays[name][view][rows])).to(self.device)
