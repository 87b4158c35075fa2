"""Shared fixtures. Test modules never import each other or this file: what they share is here, reached through
fixtures (pytest's `pythonpath` setting puts the repository root on sys.path for `import run`, `import kd`)."""
import copy
import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def root():
    """The repository root: run.py, bench.py, configs/."""
    return ROOT


# --- the checks several modules make --------------------------------------------------------------------------------

class OneErrorLine:
    """How every refusal ends: exit status 2, exactly one line on stderr, starting 'error: ', and no traceback.
    Each method runs (or takes) a command and returns that line."""

    def __init__(self, capsys):
        self.capsys = capsys

    @staticmethod
    def check(err):
        lines = err.splitlines()
        assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
        return lines[0]

    def cli(self, *argv, main=None):
        """`main` (run.main unless given, e.g. bench.main) on `argv`, in this process."""
        if main is None:
            import run
            main = run.main
        assert main([str(a) for a in argv]) == 2
        return self.check(self.capsys.readouterr().err)

    def study(self, config, *args):
        """run.py --config `config` --device cpu `args`."""
        return self.cli("--config", config, "--device", "cpu", *args)

    def process(self, proc):
        """A finished subprocess.run(..., capture_output=True, text=True)."""
        assert proc.returncode == 2, (proc.returncode, proc.stderr)
        return self.check(proc.stderr)


@pytest.fixture
def one_error_line(capsys):
    """The one-error-line check (OneErrorLine): `.study(cfg, *args)`, `.cli(*argv)`, `.process(proc)`."""
    return OneErrorLine(capsys)


_TIMINGS = ("train_images_per_s", "epoch_seconds")  # metrics.csv columns that measure the machine, not the training


def _weights(path):
    """The trained tensors of a best.pt (`model`) or last.pt (`learnable`: student and method modules), its digest
    checked."""
    import kd.store
    ckpt = kd.store.load(path, "")
    return ckpt.get("learnable", ckpt.get("model"))


def _assert_same_training(reference, other, results=True):
    """Two model folders hold the same training: best.pt and last.pt bit-identical, metrics.csv the same but for
    its timings, and (with `results`) the same held-out figures in result.json."""
    for name in ("best.pt", "last.pt"):
        a, b = _weights(Path(reference) / name), _weights(Path(other) / name)
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    rows = []
    for folder in (reference, other):
        with open(Path(folder) / "metrics.csv") as f:
            rows.append([{k: v for k, v in row.items() if k not in _TIMINGS} for row in csv.DictReader(f)])
    assert rows[0] and rows[0] == rows[1], rows
    if results:
        a, b = (json.loads((Path(folder) / "result.json").read_text()) for folder in (reference, other))
        for key in ("val_top1", "test_top1", "test_top5", "test_loss"):
            assert a[key] == b[key], (key, a[key], b[key])
        assert a["training"]["best_epoch"] == b["training"]["best_epoch"]


@pytest.fixture(scope="session")
def assert_same_training():
    """assert_same_training(reference_folder, other_folder, results=True): a training run another way (interrupted
    and resumed, killed and resumed, checkpointed less often) ended exactly where the plain one did."""
    return _assert_same_training


# --- small things to test with ---------------------------------------------------------------------------------------

class Payload:
    """Unpickled, this creates a file: what a planted checkpoint's object could do with any command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="session")
def payload():
    """Payload(marker): an object whose unpickling creates the file `marker`."""
    return Payload


def _idx_bytes(array):
    """IDX: big-endian magic (0x08 = uint8 in the third byte, the number of dimensions in the fourth), the sizes,
    the data."""
    magic = 0x0800 | array.ndim  # 2051 for (N, 28, 28) images, 2049 for (N,) labels
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="session")
def idx_bytes():
    """idx_bytes(array): an array as Fashion-MNIST's files store it."""
    return _idx_bytes


# (in_channels, image_size, num_classes) of each dataset the shipped configs name.
_DATASET_SHAPES = {"fashion_mnist": (1, 28, 10), "cifar10": (3, 32, 10), "imagenet": (3, 224, 1000),
                   "fake": (3, 16, 10)}


@pytest.fixture(scope="session")
def dataset_shapes():
    return _DATASET_SHAPES


@pytest.fixture
def teacher_student():
    """A ResNet-18 teacher and a three-stage CNN student for 28x28 grey images of 10 classes, seeded."""
    from kd.train.models import create_model
    torch.manual_seed(0)
    teacher = create_model("resnet18", "teacher", {}, 1, 10, 28)
    student = create_model("cnn", "student", {"channels": [8, 16, 32]}, 1, 10, 28)
    return teacher, student


@pytest.fixture
def fashion_files(tmp_path, monkeypatch):
    """Random images in Fashion-MNIST's file format under tmp_path/data, Debian's copy hidden: a small in-memory
    dataset (tensor pipeline, teacher cache) on any machine. Call with the training and test image counts."""
    import kd.data.datasets
    monkeypatch.setattr(kd.data.datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-files")

    def write(n_train, n_test):
        raw = tmp_path / "data" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for split, n in (("train", n_train), ("t10k", n_test)):
            (raw / f"{split}-images-idx3-ubyte").write_bytes(_idx_bytes(rng.integers(0, 256, (n, 28, 28))))
            (raw / f"{split}-labels-idx1-ubyte").write_bytes(_idx_bytes(rng.integers(0, 10, n)))
        return str(tmp_path / "data")
    return write


@pytest.fixture
def smoke_config(tmp_path):
    """Write configs/smoke.yaml with outputs under tmp_path and the given top-level sections replaced."""
    def write(**changes):
        raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
        raw["output_dir"] = str(tmp_path / "runs")
        raw["teacher"]["checkpoint"] = str(tmp_path / "teacher.pt")
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key].update(value)
            else:
                raw[key] = value
        path = tmp_path / f"config{len(list(tmp_path.glob('config*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path
    return write


# --- a small cached-distillation study (the teacher cache, bench, compile, deploy) ------------------------------------

_CACHED_STUDY = {
    "name": "c",
    "data": {"dataset": "fashion_mnist", "download": False, "val_size": 16, "batch_size": 16, "eval_batch_size": 32,
             "num_workers": 0, "augment": {"crop_padding": 2, "hflip": True}},
    # one teacher, trained once, for every variation of the data below: the cache key is what is tested with it
    "teacher": {"name": "cnn", "kwargs": {"channels": [8, 16], "blocks": 1}, "train": {"epochs": 1},
                "accept_checkpoint": True},
    "student": {"name": "cnn", "kwargs": {"channels": [4, 8], "blocks": 1}},
    "train": {"epochs": 2, "amp": "off"},  # explicit, so a change to `amp` changes the precision on any device
    "cache": {"mode": "logits+features", "views": 2},
    "stages": [{"name": "kdf", "logit": {"name": "kd"},
                "features": [{"name": "fitnets", "student": "stages.1", "teacher": "stages.1"}]}],
}


def _merge(base, changes):
    out = copy.deepcopy(base)
    for key, value in changes.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.fixture
def make_config(tmp_path, fashion_files):
    """Configs (dicts) of a small cached-distillation study over Fashion-MNIST-format files written in tmp_path
    (outputs there too), `changes` merged in."""
    root = fashion_files(80, 32)

    def make(**changes):
        paths = {"output_dir": str(tmp_path / "runs"), "data": {"root": root},
                 "teacher": {"checkpoint": str(tmp_path / "teacher.pt")}, "cache": {"dir": str(tmp_path / "cache")}}
        return _merge(_merge(_CACHED_STUDY, paths), changes)
    return make


@pytest.fixture
def make_study(make_config):
    """Studies of make_config's configs whose teacher is trained once and saved in tmp_path."""
    from kd.config import Config, from_dict
    from kd.study.study import Study

    def make(**changes):
        cfg = from_dict(Config, make_config(**changes))
        cfg.validate()
        study = Study(cfg, resume=False)
        study.teacher.obtain()
        return study
    return make
