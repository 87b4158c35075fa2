"""Teacher outputs computed once for K augmented views of every training image, replayed by every student.

Correct under random augmentation by construction: the tensor pipeline's crop and flip for a sample are a pure
function of (seed, view, index), so student epoch e replays view e mod K with exactly the pixels the teacher saw.
A per-index cache without views (as in torchdistill) would pair outputs with the wrong crops.
"""
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from kd.config import human_bytes, to_dict
from kd.device import autocast
from kd.errors import ConfigError, KDError
from kd.log import Progress, info
from kd.store import canonical, content_digest, differences, file_digest, fingerprint, free_bytes, read_json, write_json

FORMAT = 5


class CachePlan(NamedTuple):
    """Where a cache lies, its arrays (name -> (shape, dtype)), and what it is made from: the teacher's weights, the
    images and their augmentation, the precision, the cache's settings, recorded in its manifest and checked on
    every open, so outputs copied in from another study's cache are never replayed."""
    folder: Path
    arrays: dict
    made_from: dict


class TeacherCache:
    """Memory-mapped fp16 arrays under `<dir>/<key>/`: logits (K, N, classes), or when classes are many the top-k
    values, their class indices and the mean of the other logits (which the other classes share on replay), and one
    array per cached feature layer. `manifest.json`, written last, holds each array file's digest, checked at every
    open: a cache without it (a build that was killed), with a damaged manifest, or with an array of the wrong size
    or content is rebuilt, with a message."""

    def __init__(self, folder, manifest, device):
        self.folder, self.manifest, self.device = folder, manifest, device
        self.arrays = {name: place(np.load(folder / f"{name}.npy", mmap_mode="c"), device)
                       for name in manifest["arrays"]}

    @property
    def layers(self):
        """The tap keys of the teacher layers it holds."""
        return {name.split(".", 1)[1] for name in self.arrays if name.startswith("feature.")}

    @staticmethod
    def locate(cfg, identity, feature_shapes, n, num_classes):
        """The cache's CachePlan: its folder keyed by everything that shapes the stored outputs. `identity`: what
        comes from outside (the training images' content, augmentation and its seed, the teacher's weights digest,
        the precision); the cache adds its own settings and the recorded layers' shapes."""
        made_from = canonical({"format": FORMAT, "identity": identity, "cache": to_dict(cfg, "results"),
                               "layers": feature_shapes})
        key = fingerprint(FORMAT, identity, to_dict(cfg, "results"), feature_shapes)
        arrays = {}
        if cfg.topk and cfg.topk < num_classes:
            arrays["topk_values"] = ((cfg.views, n, cfg.topk), np.float16)
            arrays["topk_indices"] = ((cfg.views, n, cfg.topk), np.int16 if num_classes <= 2 ** 15 else np.int32)
            arrays["topk_rest"] = ((cfg.views, n), np.float16)  # the mean of the other logits
        else:
            arrays["logits"] = ((cfg.views, n, num_classes), np.float16)
        for layer, shape in feature_shapes.items():
            arrays[f"feature.{layer}"] = ((cfg.views, n, *shape), np.float16)
        return CachePlan(Path(cfg.dir) / key, arrays, made_from)

    @staticmethod
    def nbytes(plan):
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in plan.values())

    @classmethod
    def ensure_room(cls, plan):
        """Refuse, before anything is written, a cache that is not on disk yet and would not fit."""
        folder = plan.folder
        if (folder / "manifest.json").exists():
            return
        need, free = cls.nbytes(plan.arrays), free_bytes(folder)
        if need > free:
            raise ConfigError("cache.dir", f"the teacher cache needs {human_bytes(need)} but {folder.parent} has "
                              f"{human_bytes(free)} free; free space, point cache.dir elsewhere, lower cache.views "
                              "or use cache: logits")

    @classmethod
    def open_or_build(cls, plan, teacher, taps, loader, num_classes, recipe):
        """Reuse the intact cache of `plan`, build it otherwise. `loader` is the students' training loader,
        unshuffled: the cache records the very pixels they train on."""
        manifest = cls.read_valid_manifest(plan)
        if manifest is None:
            manifest = cls.build(plan, teacher, taps, loader, num_classes, recipe)
        return cls(plan.folder, manifest, recipe.device)

    @staticmethod
    def read_valid_manifest(plan):
        """The manifest of a complete, intact cache made from what `plan` says, or None (with the reason) to
        rebuild it."""
        folder = plan.folder
        path = folder / "manifest.json"
        if not path.exists():
            if folder.exists():
                info(f"[cache] {folder} is incomplete (no manifest: a build that stopped); building it")
            return None
        try:
            manifest = read_json(path, "")
        except KDError:
            info(f"[cache] {path} is damaged; rebuilding")
            return None
        if manifest.get("made_from") != plan.made_from:
            changed = "; ".join(differences(manifest.get("made_from") or {}, plan.made_from, most=2))
            info(f"[cache] {folder} holds outputs made from something else ({changed}); rebuilding")
            return None
        start, total = time.perf_counter(), 0
        for name, (shape, _) in plan.arrays.items():
            file, entry = folder / f"{name}.npy", manifest["arrays"].get(name, {})
            if not file.exists() or file.stat().st_size != entry.get("bytes") or entry.get("shape") != list(shape):
                info(f"[cache] {file} is missing, truncated or of another shape; rebuilding")
                return None
            if file_digest(file) != entry.get("digest"):
                info(f"[cache] {file} does not match its digest (damaged); rebuilding")
                return None
            total += entry["bytes"]
        info(f"[cache] reusing {folder} ({total / 2**20:.1f} MiB verified in {time.perf_counter() - start:.2f} s)")
        return manifest

    @classmethod
    def build(cls, plan, teacher, taps, loader, num_classes, recipe):
        """One teacher pass per view over `loader`, in inference mode, in the students' precision and memory
        format (`recipe`), as a live teacher would run inside their training step. Each finished view is recorded
        in `progress.json` with its arrays' digests, so a build that was killed resumes after its last intact view
        (what it was made from checked, as for a finished cache)."""
        cls.ensure_room(plan)
        folder, views = plan.folder, next(iter(plan.arrays.values()))[0][0]
        progress = folder / "progress.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "manifest.json").unlink(missing_ok=True)
            arrays, done = cls.resume(plan), {}
            if arrays is None:
                progress.unlink(missing_ok=True)
                arrays = {name: np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype,
                                                          shape=shape) for name, (shape, dtype) in plan.arrays.items()}
            else:
                arrays, done = arrays
        except OSError as e:
            raise ConfigError("cache.dir", f"cannot write the teacher cache in {folder} ({e.strerror or e})") from None
        info(f"[cache] building {cls.nbytes(plan.arrays) / 2**20:.1f} MiB of teacher outputs in {folder} "
             f"({views} views" + (f"; views 1-{len(done)} kept from a build that stopped)" if done else ")"))
        layers = [name.split(".", 1)[1] for name in plan.arrays if name.startswith("feature.")]
        teacher.eval()
        taps.take()
        for view in range(len(done), views):
            loader.set_epoch(view)
            for batch in Progress(loader, f"[cache] view {view + 1}/{views}"):
                batch = batch.to(recipe.device, recipe.memory_format)  # streamed batches come from the CPU
                rows = batch.index.cpu().numpy()
                with torch.inference_mode(), autocast(recipe.device, recipe.amp):
                    logits = teacher(batch.images).float()
                features = taps.take()
                if "logits" in arrays:
                    arrays["logits"][view, rows] = logits.cpu().numpy()
                else:
                    k = arrays["topk_values"].shape[-1]
                    values, classes = logits.topk(k, dim=1)
                    arrays["topk_values"][view, rows] = values.cpu().numpy()
                    arrays["topk_indices"][view, rows] = classes.cpu().numpy()
                    rest = (logits.sum(1) - values.sum(1)) / (num_classes - k)
                    arrays["topk_rest"][view, rows] = rest.cpu().numpy()
                for layer in layers:
                    arrays[f"feature.{layer}"][view, rows] = features[layer].float().cpu().numpy()
            for array in arrays.values():
                array.flush()
            done[str(view)] = {name: content_digest(np.asarray(array[view])) for name, array in arrays.items()}
            write_json(progress, {"made_from": plan.made_from, "views": done})
        for array in arrays.values():
            array.flush()
        files = {name: folder / f"{name}.npy" for name in plan.arrays}
        manifest = {"format": FORMAT, "views": views, "size": loader.dataset_size, "num_classes": num_classes,
                    "made_from": plan.made_from,
                    "arrays": {name: {"shape": list(shape), "bytes": files[name].stat().st_size,
                                      "digest": file_digest(files[name])}
                               for name, (shape, _) in plan.arrays.items()}}
        write_json(folder / "manifest.json", manifest)
        progress.unlink(missing_ok=True)
        return manifest

    @staticmethod
    def resume(plan):
        """(the arrays, opened for writing, and the finished views' digests) of a build of `plan` that stopped,
        its finished views intact; None to start afresh."""
        folder = plan.folder
        try:
            progress = read_json(folder / "progress.json", "")
            arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r+") for name in plan.arrays}
        except (KDError, OSError, ValueError):
            return None
        if progress.get("made_from") != plan.made_from or any(
                (a.shape, a.dtype) != (plan.arrays[n][0], np.dtype(plan.arrays[n][1])) for n, a in arrays.items()):
            return None
        done = {}
        for view in range(len(progress.get("views", {}))):
            digests = progress["views"].get(str(view))
            if digests != {name: content_digest(np.asarray(a[view])) for name, a in arrays.items()}:
                break
            done[str(view)] = digests
        return arrays, done

    def lookup(self, view, idx):
        """Teacher logits (and features) for the samples `idx` as seen in `view`, on the training device. With the
        arrays on that device (see `place`) this is a gather there: no host sync, and a graph torch.compile sees.
        `view`: an int, or a tensor on idx's device (then a compiled step does not recompile for each view)."""
        rows = idx + view * self.manifest["size"]  # into the arrays flattened over (view, sample)
        if "logits" in self.arrays:
            logits = self._fetch("logits", rows).float()
        else:
            values, classes = self._fetch("topk_values", rows).float(), self._fetch("topk_indices", rows)
            # Classes outside the top k share the mean of their logits, so the tail keeps its share of the
            # softened probability at any temperature (FKD spreads the rest evenly too); a floor of -inf would
            # give the teacher's top k all of it and lose the dark knowledge KD transfers.
            rest = self._fetch("topk_rest", rows).float()
            logits = rest[:, None].expand(len(rows), self.manifest["num_classes"]).clone()
            logits.scatter_(1, classes.long(), values)
        features = {layer: self._fetch(f"feature.{layer}", rows).float() for layer in self.layers}
        return {"logits": logits, "features": features}

    def _fetch(self, name, rows):
        array = self.arrays[name]
        return array.flatten(0, 1).index_select(0, rows.to(array.device)).to(self.device, non_blocking=True)


def place(array, device):
    """A cache array as a tensor where lookups are cheapest: the memory-mapped file itself for a CPU run (only the
    rows a batch uses are read), a copy in the accelerator's memory when it takes at most half of what is free
    there, else the mapped file, whose rows are gathered on the CPU and copied over every step."""
    mapped = torch.from_numpy(array)  # copy-on-write map: writable for torch, the file is never changed
    if device.type == "cpu" or device.type == "cuda" and mapped.nbytes > torch.cuda.mem_get_info(device)[0] // 2:
        return mapped
    return mapped.to(device)
