"""Run identity: digests that decide whether a checkpoint, a finished stage or a cache is the one a config asks for.

Identities are plain dicts built from `to_dict(cfg, results_only=True)` (every config field not marked NOT_RESULT)
plus digests of the inputs; they are stored beside what they identify, so a mismatch can say what differs.
"""
import hashlib
import json


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
