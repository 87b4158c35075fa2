"""The benchmark command: trains every variant and reports ratios computed from its own measurements."""
import csv
import json
import math
import re

import pytest
import torch
import yaml

import bench


@pytest.mark.slow
def test_bench_trains_all_variants_and_reports_ratios(make_study, make_config, tmp_path, capsys):
    make_study()  # trains and saves the teacher the benchmark needs
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(make_config(cache={"mode": "off"})))
    assert bench.main(["--config", str(path), "--epochs", "1", "--seeds", "0", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "runs" / "c_bench" / "bench.json").read_text())
    assert [(r["variant"], r["seed"]) for r in rows] == [
        ("alone", 0), ("alone_loader", 0), ("live", 0), ("cached", 0), ("live", 1), ("cached", 1)]
    assert all(r["images_per_s"] > 0 and r["epoch_seconds"] > 0 for r in rows)
    alone = rows[0]["epoch_seconds"]
    live = (rows[2]["epoch_seconds"] + rows[4]["epoch_seconds"]) / 2
    assert f"live / alone (b/a): {live / alone:.2f}x" in out
    assert "| cached |" in out and "+-" in out and "cache build" in out


@pytest.mark.slow
def test_bench_times_the_chosen_variants_in_each_compile_mode(make_study, make_config, tmp_path, capsys):
    make_study()
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(make_config()))
    assert bench.main(["--config", str(path), "--epochs", "2", "--variants", "alone", "cached", "--modes", "off",
                       "default", "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "runs" / "c_bench" / "bench.json").read_text())
    assert [(r["variant"], r["compile"]) for r in rows] == [("alone", "off"), ("cached", "off"), ("alone", "default"),
                                                            ("cached", "default")]
    assert all(r["last_images_per_s"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| cached | default |" in out and "- compile default: cached / alone (c/a)" in out


@pytest.mark.slow
def test_bench_trains_a_fresh_teacher_on_its_recipe_when_asked(make_study, make_config, tmp_path, capsys):
    make_study()
    path = tmp_path / "bench.yaml"
    # a recipe of its own (the students': lr 0.05, cosine); accept_checkpoint lets the study's teacher load
    path.write_text(yaml.safe_dump(make_config(teacher={"train": {"lr": 0.02, "schedule": "constant"}})))
    assert bench.main(["--config", str(path), "--epochs", "1", "--variants", "teacher", "alone", "--modes", "off",
                       "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "runs" / "c_bench" / "bench.json").read_text())
    assert [r["variant"] for r in rows] == ["teacher", "alone"] and rows[0]["images_per_s"] > 0
    folder = tmp_path / "runs" / "c_bench"
    teacher = torch.load(folder / "teacher_off_s0" / "best.pt", weights_only=True)["model"]
    student = torch.load(folder / "alone_off_s0" / "best.pt", weights_only=True)["model"]
    # the teacher's model, not the student's
    assert sum(t.numel() for t in teacher.values()) > 2 * sum(t.numel() for t in student.values())
    with open(folder / "teacher_off_s0" / "metrics.csv") as f:
        assert float(next(csv.DictReader(f))["lr"]) == pytest.approx(0.02)
    assert "| teacher | off |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_replays_the_configs_cache_mode_and_everything_with_the_cache_off(make_study, make_config, tmp_path,
                                                                               capsys):
    """Under `logits` the feature stage's cached variant takes the cached logits and cuts its teacher."""
    make_study()
    for mode, replayed in (("logits", "logits"), ("off", "logits+features")):
        path = tmp_path / "bench.yaml"
        path.write_text(yaml.safe_dump(make_config(cache={"mode": mode})))
        assert bench.main(["--config", str(path), "--epochs", "1", "--variants", "cached", "--device", "cpu"]) == 0
        assert f"views, mode {replayed}):" in capsys.readouterr().out
        arrays = {p.name for p in (tmp_path / "runs" / "c_bench" / "cache").glob("*/*.npy")}
        assert arrays == {"logits.npy"} | ({"feature.stages.1.npy"} if mode == "off" else set()), arrays


def test_bench_needs_the_teacher_checkpoint(make_config, tmp_path, one_error_line):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(make_config()))
    assert "run the study first" in one_error_line.cli("--config", path, "--device", "cpu", main=bench.main)


def test_bench_formats_times_every_precision_and_memory_format(make_config, tmp_path, capsys):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(make_config()))
    assert bench.main(["--config", str(path), "--formats", "--repeats", "1", "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "runs" / "c_bench" / "formats.json").read_text())
    assert [(r["amp"], r["channels_last"]) for r in rows] == [("off", False), ("off", True), ("bf16", False),
                                                              ("bf16", True)]
    assert all(r["teacher_infer_images_per_s"] > 0 and r["student_train_images_per_s"] > 0
               and r["student_train_fused_images_per_s"] > 0 for r in rows)
    assert "| bf16 | True | False |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_profiles_each_runs_last_epoch(make_study, make_config, tmp_path, capsys):
    make_study()
    path = tmp_path / "bench.yaml"
    cfg = make_config()
    path.write_text(yaml.safe_dump(cfg))
    assert bench.main(["--config", str(path), "--epochs", "2", "--variants", "alone", "cached", "--profile",
                       "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    images = int(re.search(r"epochs, (\d+) training images", out).group(1))
    for run in ("alone_off_s0", "cached_off_s0"):
        text = (tmp_path / "runs" / "c_bench" / run / "profile.txt").read_text()
        header = text.splitlines()[0]
        assert header.startswith(f"{math.ceil(images / cfg['data']['batch_size'])} steps in ")  # one epoch's
        assert " ms per step on the wall clock" in header and "aten::convolution" in text, text[:500]
        assert f"- profile {run}/profile.txt: {header}" in out


def test_bench_times_the_tensor_pipeline_on_the_device_and_on_meta(make_config, tmp_path, capsys):
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(make_config()))
    assert bench.main(["--config", str(path), "--loader", "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "runs" / "c_bench" / "loader.json").read_text())
    assert [r["device"] for r in rows] == ["cpu", "meta"]
    assert all(r["ms_per_batch"] > 0 and r["operator_calls_per_batch"] > 10 for r in rows), rows
    assert "| meta (dispatch, no arithmetic) |" in capsys.readouterr().out


def imagenet_like(tmp_path, **changes):
    """A bench config over a few generated ImageNet-sized JPEGs (kd/data/synthetic.py), streamed at 96 px, with an
    untrained teacher (teacher.train.epochs 0: no checkpoint needed)."""
    from kd.data.synthetic import generate
    generate(tmp_path / "data", images=24, classes=3, val=6, workers=1)
    raw = {"name": "s", "output_dir": str(tmp_path / "runs"), "device": "cpu",
           "data": {"dataset": "imagenet", "root": str(tmp_path / "data"), "image_size": 96, "val_size": 4,
                    "batch_size": 5, "eval_batch_size": 6, "num_workers": 1},
           "teacher": {"name": "resnet18", "checkpoint": str(tmp_path / "teacher.pt"), "train": {"epochs": 0}},
           "student": {"name": "cnn", "kwargs": {"channels": [8, 16], "blocks": 1, "stem_stride": 2}},
           "train": {"epochs": 1, "lr": 0.01, "warmup_epochs": 0}, "cache": {"views": 2},
           "eval": {"batch_size": 2, "warmup": 0, "repeats": 1},
           "stages": [{"name": "kd", "logit": {"name": "kd"}}], **changes}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_bench_times_streamed_decoding_per_worker(tmp_path, capsys):
    assert bench.main(["--config", str(imagenet_like(tmp_path)), "--loader"]) == 0
    (row,) = json.loads((tmp_path / "runs" / "s_bench" / "loader.json").read_text())
    assert row["workers"] == 1 and row["images_per_s"] > 0 and row["images_per_s_per_worker"] == row["images_per_s"]
    assert "DataLoader pipeline, 20 training images read from files (imagenet, 96 px crops)" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_distils_streamed_data_from_the_cache_with_an_untrained_teacher(tmp_path, capsys):
    assert bench.main(["--config", str(imagenet_like(tmp_path)), "--variants", "alone", "live", "cached"]) == 0
    out = capsys.readouterr().out
    assert "cached / alone (c/a):" in out and "live / cached (b/c):" in out and "cache build (one-off, 2 views" in out
    rows = json.loads((tmp_path / "runs" / "s_bench" / "bench.json").read_text())
    assert [r["variant"] for r in rows] == ["alone", "live", "cached"]
