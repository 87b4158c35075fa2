"""What a run writes and when it may be reused: identities, the run folder's layout, atomic writes.

An identity is a plain dict built from `to_dict(cfg, "results")` (every config field not marked NOT_RESULT;
"training" also leaves out the EVALUATION ones, for what made a teacher) plus digests of the inputs' content
(tensors, images), never of file bytes; it is stored beside what it identifies (checkpoint, result, cache), so a
mismatch can say what differs. Every file is written to a temporary name and renamed, so a run killed mid-write
never leaves a broken one, and every file the run reads back (checkpoints, results, the cache's manifest) carries
the digest of its content, checked when read: nothing damaged is ever used.
"""
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd.errors import ConfigError, KDError, first_line


def canonical(parts):
    """An identity as stored and compared: its JSON form (tuples are lists, other objects their str)."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def fingerprint(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_digest(obj):
    """A digest of what `obj` holds, the same wherever its tensors live: tensors and arrays by dtype, shape and
    bytes, containers by their items, anything else by repr. A checkpoint's digest, and a model's identity."""
    h = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(x, np.ndarray):
            h.update(f"A{x.dtype}{x.shape}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
        elif isinstance(x, dict):
            h.update(b"D%d" % len(x))
            for k in sorted(x, key=repr):
                feed(k)
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(b"L%d" % len(x))
            for item in x:
                feed(item)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())
    feed(obj)
    return h.hexdigest()[:16]


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
               if k not in a or k not in b or a[k] != b[k]]
    return changed[:most] + ([f"and {len(changed) - most} more"] if len(changed) > most else [])


def file_problem(path):
    """Why `path` cannot be read as a file, or None, by its stat alone: nothing is opened, since reading a FIFO
    named like a checkpoint or an image would wait forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return f"a link to {os.readlink(path)}, which does not exist" if os.path.islink(path) else "no such file"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    return ("a folder, not a file" if stat.S_ISDIR(mode) else "a FIFO (named pipe), not a file"
            if stat.S_ISFIFO(mode) else "a socket or device, not a file")


def damaged(path, reason, remedy):
    return KDError(f"{path} is damaged ({reason}); {remedy}")


@contextlib.contextmanager
def atomic(path):
    """Yields a temporary path beside `path` to write; renamed onto `path` only if the block finishes. A file
    system that refuses (full disk, a file where a folder should be, no permission) is one line naming the path,
    and no temporary file is left behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise KDError(f"{path}: cannot write it ({e.strerror or e}); free space there or choose another folder") \
            from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text):
    with atomic(path) as tmp:
        tmp.write_text(text)


def save(obj, path):
    """torch.save of the dict `obj` with its content digest added, atomically. Serialised in memory first, so a
    full disk is an OSError (one line) rather than an error deep in torch's writer."""
    buffer = io.BytesIO()
    torch.save({**obj, "digest": content_digest(obj)}, buffer)
    with atomic(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def load(path, remedy, unsigned_ok=False):
    """A dict written by `save`, on the CPU, its digest checked: a file that cannot be read, or whose content no
    longer matches its digest, is one line naming it and `remedy`. Always `weights_only`: tensors and plain
    containers, nothing that runs code on unpickling, since a run folder or checkpoint may come from anyone.
    `unsigned_ok`: files made elsewhere (a downloaded teacher) may carry no digest; they are read as they are."""
    if problem := file_problem(path):
        raise KDError(f"{path}: {problem}; {remedy}")
    with open(path, "rb") as f:  # torch.save's zip archive, or its legacy pickle
        if unsigned_ok and not f.read(4).startswith((b"PK\x03\x04", b"\x80")):  # a file named by the user
            raise KDError(f"{path}: not a PyTorch checkpoint (a file of another kind); {remedy}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise damaged(path, "it holds objects other than tensors and plain values, refused unread: loading "
                                "them could run code", remedy) from None
        raise damaged(path, f"unreadable: {first_line(e)}", remedy) from None
    except Exception as e:  # a damaged file fails in many ways: zip, storage, permission
        raise damaged(path, f"unreadable: {first_line(e)}", remedy) from None
    if not isinstance(obj, dict):
        raise damaged(path, f"holds a {type(obj).__name__}, not a checkpoint", remedy)
    digest = obj.pop("digest", None)
    if digest is None and not unsigned_ok:
        raise damaged(path, "it carries no digest: written by another tool or an earlier version", remedy)
    if digest is not None and digest != content_digest(obj):
        raise damaged(path, "its content does not match its digest", remedy)
    return obj


def write_json(path, obj):
    """JSON with a digest of the rest, checked by `read_json`."""
    write_text(path, json.dumps({**obj, "digest": fingerprint(obj)}, indent=2) + "\n")


def read_json(path, remedy):
    try:
        obj = json.loads(Path(path).read_bytes())
        digest = obj.pop("digest", None)
    except (ValueError, AttributeError, TypeError, OSError) as e:
        raise damaged(path, f"not the JSON this run wrote: {type(e).__name__}", remedy) from None
    if digest is None:
        raise damaged(path, "it carries no digest: written by another tool or an earlier version", remedy)
    if digest != fingerprint(obj):
        raise damaged(path, "its content does not match its digest", remedy)
    return obj


def writable_folder(path, key, inside=()):
    """Check before any long work that `path` is a folder this process can write in, or can be made one, and so
    are its subfolders named `inside` (a run folder's models: one made read-only, or a file in its place, would
    fail only when that model is saved); creates nothing, so a run stopped by a later check leaves no trace."""
    for folder in (Path(path), *(Path(path) / name for name in inside)):
        existing = nearest_existing(folder)
        if not existing.is_dir():
            raise ConfigError(key, f"{folder} cannot be a folder: {existing} is a file")
        try:
            tempfile.TemporaryFile(dir=existing).close()
        except OSError as e:
            raise ConfigError(key, f"{folder} is not writable ({existing}: {e.strerror or e})") from None


def nearest_existing(path):
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path):
    """Free space on the file system that holds `path` (or would, once it is created)."""
    return shutil.disk_usage(nearest_existing(path)).free


@dataclass
class Result:
    """A finished model as its result.json holds it: held-out accuracy, and the facts of its training (fit's
    `training` dict: best_epoch, epochs, train_images_per_s, epoch_seconds, method_params, method_state_bytes)."""
    fingerprint: str
    checkpoint: str  # the file a user deploys: a stage's best.pt relative to the run folder, or the teacher's
    val_top1: float
    test_top1: float
    test_top5: float | None  # None with 5 classes or fewer
    test_loss: float
    training: dict
    identity: dict | None = None  # what made it (students), so a mismatch can say what changed


BEST, LAST, METRICS, RESULT = "best.pt", "last.pt", "metrics.csv", "result.json"  # in each model's folder


class RunFolder:
    """<output_dir>/<name>/: config.yaml, report.json, report.md, and one folder per model (teacher, each stage,
    each stage's seed) holding best.pt (deployable weights), last.pt (resume state), metrics.csv, result.json.
    Nothing inside names the folder itself, so a run folder can be moved."""

    def __init__(self, root):
        self.root = Path(root)

    def model(self, name):
        return self.root / name

    def best(self, name):
        """The deployable weights of a trained model."""
        return self.model(name) / BEST

    def result(self, name):
        """The model's stored Result, or None; a damaged one is an error, never a silent retrain."""
        path = self.model(name) / RESULT
        if not path.exists():
            return None
        remedy = f"delete {self.model(name)} to train that model again"
        fields = read_json(path, remedy)
        try:
            return Result(**fields)
        except TypeError as e:
            raise damaged(path, str(e), remedy) from None

    def reuse(self, name, fingerprint, identity):
        """The stored result of a finished model, if it was made under `fingerprint` and its best.pt is intact and its
        own; one finished under another config is never overwritten (the error says what changed)."""
        result = self.result(name)
        if result is None:
            return None
        if result.fingerprint != fingerprint:
            changed = "; ".join(differences(result.identity, identity)) if result.identity \
                else "data, model, recipe, method or teacher changed"
            raise KDError(f"{self.model(name)}: finished under a different config ({changed}); rename the stage or "
                          "the study, or delete that folder to retrain it")
        self.load_best(name, fingerprint)
        return result

    def load_best(self, name, fingerprint):
        """The model's best.pt, checked: intact, and written by the training its result describes."""
        remedy = f"delete {self.model(name)} to train that model again"
        ckpt = load(self.best(name), remedy) if self.best(name).exists() else None
        if ckpt is None or ckpt.get("fingerprint") != fingerprint:
            what = "missing" if ckpt is None else "not the one its result.json describes"
            raise KDError(f"{self.best(name)} is {what}; {remedy}")
        return ckpt

    def store(self, name, result):
        write_json(self.model(name) / RESULT, dataclasses.asdict(result))
