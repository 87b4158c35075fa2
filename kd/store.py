"""What a run writes and when it may be reused: identities, the run folder's layout, atomic writes.

An identity is a plain dict built from `to_dict(cfg, "results")` (every config field not marked NOT_RESULT;
"training" also leaves out the EVALUATION ones, for what made a teacher) plus digests of the inputs; it is stored beside what it identifies (checkpoint, result, cache), so a
mismatch can say what differs. Every file is written to a temporary name and renamed, so a run killed mid-write
never leaves a broken one.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import KDError


def canonical(parts):
    """An identity as stored and compared: its JSON form (tuples are lists, other objects their str)."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def fingerprint(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def flatten(tree, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for k, v in tree.items():
        flat.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return flat


def differences(old, new, most=4):
    """What changed from identity `old` to `new`, as 'key: old -> new' phrases (the first `most` of them)."""
    a, b = flatten(old), flatten(new)
    changed = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(a.keys() | b.keys())
               if a.get(k) != b.get(k)]
    return changed[:most] + ([f"and {len(changed) - most} more"] if len(changed) > most else [])


@contextlib.contextmanager
def atomic(path):
    """Yields a temporary path beside `path` to write; renamed onto `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    with atomic(path) as tmp:
        tmp.write_text(text)


def save(obj, path):
    """torch.save, atomically."""
    with atomic(path) as tmp:
        torch.save(obj, tmp)


@dataclass
class Result:
    """A finished model as its result.json holds it: held-out accuracy, and the facts of its training (fit's
    `training` dict: best_epoch, epochs, train_images_per_s, epoch_seconds, method_params, method_state_bytes)."""
    fingerprint: str
    checkpoint: str  # the file a user deploys: the stage's best.pt, or the teacher checkpoint
    val_top1: float
    test_top1: float
    test_top5: float | None  # None with 5 classes or fewer
    test_loss: float
    training: dict
    identity: dict | None = None  # what made it (students), so a mismatch can say what changed


BEST, LAST, METRICS, RESULT = "best.pt", "last.pt", "metrics.csv", "result.json"  # in each model's folder


class RunFolder:
    """<output_dir>/<name>/: config.yaml, report.json, report.md, and one folder per model (teacher, each stage,
    each stage's seed) holding best.pt (deployable weights), last.pt (resume state), metrics.csv, result.json."""

    def __init__(self, root):
        self.root = Path(root)

    def model(self, name):
        return self.root / name

    def best(self, name):
        """The deployable weights of a trained model."""
        return self.model(name) / BEST

    def reuse(self, name, key, identity=None, stale_ok=False):
        """The stored result of a finished model, if it was made under `key`; one finished under another config
        is never overwritten (the error says what changed). `stale_ok`: the result only evaluates a checkpoint
        kept elsewhere (the teacher's), so it is simply measured again."""
        path = self.model(name) / RESULT
        if not path.exists():
            return None
        result = json.loads(path.read_text())
        if result["fingerprint"] == key:
            return Result(**result)
        if stale_ok:
            return None
        changed = "; ".join(differences(result["identity"], identity)) if result.get("identity") and identity \
            else "data, model, recipe, method or teacher changed"
        raise KDError(f"{self.model(name)}: finished under a different config ({changed}); rename the stage or the "
                      "study, or delete that folder to retrain it")

    def store(self, name, result):
        write_text(self.model(name) / RESULT, json.dumps(dataclasses.asdict(result), indent=2) + "\n")
