import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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
