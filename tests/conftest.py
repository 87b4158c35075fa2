import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


class Payload:
    """Unpickled, this creates a file: what a planted checkpoint's object could do with any command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def one_error_line(capsys, cfg, *args):
    """run.main exits 2 with exactly one 'error:' line on stderr and no traceback; returns that line."""
    import run
    assert run.main(["--config", str(cfg), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture
def fashion_files(tmp_path, monkeypatch):
    """Random images in Fashion-MNIST's file format under tmp_path/data, Debian's copy hidden: a small in-memory
    dataset (tensor pipeline, teacher cache) on any machine. Call with the training and test image counts."""
    import kd.data.datasets
    from test_data import idx_bytes
    monkeypatch.setattr(kd.data.datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-files")

    def write(n_train, n_test):
        raw = tmp_path / "data" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for split, n in (("train", n_train), ("t10k", n_test)):
            (raw / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(rng.integers(0, 256, (n, 28, 28))))
            (raw / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(rng.integers(0, 10, n)))
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
