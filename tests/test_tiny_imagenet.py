"""ImageNet-style data from tar shards: train/<class>/ and val/<class>/ members merged from any number of shards, class
names from words.txt, decoded once into the tensor pipeline; bad shards are one line. The real Tiny-ImageNet-200
shards (../shared/data) where present."""
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import run
from kd.data import folders

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT.parent / "shared" / "data" / "tiny-imagenet-200"
WORDS = "n01\tgoldfish, Carassius auratus\nn02\tbullfrog, Rana catesbeiana\nn09\tnot in this data\n"


def png(value, size=8):
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def shard(path, members):
    """A .tar.gz of {member name: bytes}."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tiny_shards(root, classes=("n01", "n02"), per_shard=3, shards=2, words=WORDS, val_classes=None):
    """Training shards train-<k>.tar.gz and a val.tar.gz (with words.txt), ImageNet's layout, of 8x8 PNGs whose
    value encodes (class, image)."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        shard(root / f"train-{k}.tar.gz", {f"train/{c}/{c}_{k * per_shard + i}.png": png(40 * j + k * per_shard + i)
                                           for j, c in enumerate(classes) for i in range(per_shard)})
    val = {f"val/{c}/val_{i}.png": png(40 * j + 30 + i) for j, c in enumerate(val_classes or classes) for i in range(2)}
    shard(root / "val.tar.gz", {**val, **({"words.txt": words.encode()} if words else {})})
    return root


def test_shards_merge_into_one_dataset_labelled_by_folder_and_named_by_words(tmp_path):
    arrays = folders.load_decoded(tiny_shards(tmp_path / "data"))
    assert list(arrays["classes"]) == ["n01", "n02"]
    assert list(arrays["names"]) == ["goldfish, Carassius auratus", "bullfrog, Rana catesbeiana"]
    assert len(arrays["train_labels"]) == 12 and len(arrays["test_labels"]) == 4
    values = arrays["train_images"][:, 0, 0, 0]
    assert sorted(values.tolist()) == [0, 1, 2, 3, 4, 5, 40, 41, 42, 43, 44, 45]  # every image of both shards
    assert np.array_equal(arrays["train_labels"], (values >= 40).astype(np.int64))
    assert np.array_equal(arrays["test_labels"], (arrays["test_images"][:, 0, 0, 0] >= 40).astype(np.int64))
    decoded = list((tmp_path / "data").glob("decoded-*.npz"))
    assert len(decoded) == 1
    again = folders.load_decoded(tmp_path / "data")  # read back, not decoded again
    assert all(np.array_equal(again[k], arrays[k]) for k in arrays)
    assert list((tmp_path / "data").glob("decoded-*.npz")) == decoded


def test_the_decoded_file_records_its_shards_and_their_bytes_whichever_processes_read_them(tmp_path, monkeypatch):
    root = tiny_shards(tmp_path / "data")
    recorded = []
    for cpus in (1, 2):  # read here, then one process per shard
        monkeypatch.setattr(folders, "_cpus", lambda: cpus)
        recorded.append(str(folders.decode(folders.find_sources(root))["source_bytes"]))
    assert recorded[0] == recorded[1]
    arrays = folders.load_decoded(root)
    assert list(arrays["sources"]) == ["train-0.tar.gz", "train-1.tar.gz", "val.tar.gz"]
    assert str(arrays["source_bytes"]) == recorded[0]
    shard(root / "train-1.tar.gz", {"train/n01/n01_3.png": png(99), "train/n02/n02_3.png": png(98)})
    again = folders.load_decoded(root)
    assert str(again["key"]) != str(arrays["key"]) and str(again["source_bytes"]) != recorded[0]


def test_without_words_the_folder_names_name_the_classes(tmp_path):
    arrays = folders.load_decoded(tiny_shards(tmp_path / "data", words=None))
    assert list(arrays["names"]) == ["n01", "n02"]


@pytest.mark.parametrize("fault, expected", [
    ("missing", "shard train-1.tar.gz is missing (found train-0.tar.gz, train-2.tar.gz)"),
    ("truncated", "train-1.tar.gz cannot be read to its end"),
    ("duplicated", "is in two of the archives"),
    ("class", "class n02 has no images in test/ (or val/)"),
    ("layout", "no ImageNet-style folders in "),
])
def test_a_bad_shard_is_one_line_naming_it(tmp_path, one_error_line, fault, expected):
    root = tiny_shards(tmp_path / "data", shards=3, val_classes=("n01",) if fault == "class" else None)
    if fault == "missing":
        (root / "train-1.tar.gz").unlink()
    elif fault == "truncated":
        data = (root / "train-1.tar.gz").read_bytes()
        (root / "train-1.tar.gz").write_bytes(data[:len(data) // 2])
    elif fault == "duplicated":
        shutil.copy(root / "train-0.tar.gz", root / "train-3.tar.gz")
    elif fault == "layout":
        for path in root.glob("*.tar.gz"):
            path.unlink()
        shard(root / "images.tar.gz", {f"images/{i}.png": png(i) for i in range(4)})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "output_dir": str(tmp_path / "runs"),
                                      "data": {"dataset": "imagenet", "root": str(root), "image_size": 8,
                                               "val_size": 2},
                                      "teacher": {"checkpoint": str(tmp_path / "t.pt")},
                                      "stages": [{"name": "baseline"}]}))
    err = one_error_line.study(config)
    assert "data.root: " in err and expected in err, err


# --- the real Tiny-ImageNet-200 shards --------------------------------------------------------------------------------

needs_tiny = pytest.mark.skipif(not (TINY / "val.tar.gz").exists(),
                                reason="needs ../shared/data/tiny-imagenet-200 (the real shards)")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """The real shards linked into a writable folder and decoded once for the module."""
    root = tmp_path_factory.mktemp("tiny-imagenet")
    for path in TINY.glob("*.tar.gz"):
        (root / path.name).symlink_to(path)
    return root, folders.load_decoded(root)


@pytest.mark.slow
@needs_tiny
def test_the_real_shards_decode_to_tiny_imagenet(tiny_root):
    root, arrays = tiny_root
    assert arrays["train_images"].shape == (100_000, 64, 64, 3) and arrays["test_images"].shape == (10_000, 64, 64, 3)
    assert np.bincount(arrays["train_labels"]).tolist() == [500] * 200
    assert np.bincount(arrays["test_labels"]).tolist() == [50] * 200
    assert arrays["classes"][0] == "n01443537" and arrays["names"][0] == "goldfish, Carassius auratus"
    with tarfile.open(TINY / "train-2.tar.gz") as tar:  # one image, found among the decoded ones with its label
        member = next(m for m in tar if m.name.endswith(".JPEG") and "/n02124075/" in m.name)
        pixels = np.asarray(Image.open(tar.extractfile(member)).convert("RGB"))
    label = list(arrays["classes"]).index("n02124075")
    mine = arrays["train_images"][arrays["train_labels"] == label]
    assert any(np.array_equal(pixels, image) for image in mine)


@pytest.mark.slow
@needs_tiny
def test_a_class_subset_study_reports_and_predicts_with_the_words(tiny_root, tmp_path, capsys):
    root, _ = tiny_root
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "imagenet", "root": str(root), "image_size": 64, "classes": 4, "val_size": 100,
                 "train_subset": 400, "test_subset": 100, "batch_size": 50,
                 "augment": {"resized_crop": [0.35, 1.0]}},
        "teacher": {"name": "resnet18", "kwargs": {"stem": "imagenet"}, "checkpoint": str(tmp_path / "teacher.pt"),
                    "train": {"epochs": 1, "lr": 0.05}},
        "student": {"name": "cnn", "kwargs": {"channels": [8, 16, 32], "blocks": 1, "stem_stride": 2}},
        "train": {"epochs": 1, "lr": 0.05},
        "cache": {"mode": "logits", "views": 1},
        "stages": [{"name": "baseline"}, {"name": "kd", "logit": {"name": "kd", "temperature": 1.0}}],
        "eval": {"batch_size": 16, "warmup": 1, "repeats": 2}}))
    assert run.main(["--config", str(config), "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "runs" / "tiny" / "report.json").read_text())
    assert report["meta"]["classes"][:2] == ["goldfish, Carassius auratus", "European fire salamander, "
                                             "Salamandra salamandra"]
    assert report["meta"]["train_images"] == 400 and report["meta"]["test_images"] == 100
    assert "4 classes: goldfish, Carassius auratus; " in (tmp_path / "runs" / "tiny" / "report.md").read_text()
    with tarfile.open(TINY / "val.tar.gz") as tar:
        member = next(m for m in tar if m.name.startswith("val/n01443537/") and m.name.endswith(".JPEG"))
        (tmp_path / "fish.jpg").write_bytes(tar.extractfile(member).read())
    capsys.readouterr()
    assert run.main(["predict", str(tmp_path / "runs" / "tiny" / "kd" / "best.pt"), str(tmp_path / "fish.jpg")]) == 0
    line = capsys.readouterr().out
    assert "goldfish, Carassius auratus" in line and "n01443537" not in line, line


def test_resized_crops_replay_by_seed_view_and_index_and_stay_in_range():
    import torch

    from kd.data.tensors import resized_crop, resized_crop_params
    idx = torch.arange(2000)
    top, left, h, w, flip = resized_crop_params(idx, 3, 1, [0.35, 1.0], True, 64, 64)
    again = resized_crop_params(idx.flip(0), 3, 1, [0.35, 1.0], True, 64, 64)  # another order, the same crops
    assert all(torch.equal(a, b.flip(0)) for a, b in zip((top, left, h, w, flip), again))
    other = resized_crop_params(idx, 3, 2, [0.35, 1.0], True, 64, 64)
    assert not torch.equal(top, other[0])  # another view, other crops
    area = h * w / 64 ** 2
    assert area.min() > 0.3 and area.max() <= 1 and (top + h).max() <= 64 and (left + w).max() <= 64
    assert 0.45 < flip.float().mean() < 0.55
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    whole = [torch.zeros(2), torch.zeros(2), torch.full((2,), 64.0), torch.full((2,), 64.0)]
    out = resized_crop(images, *whole, torch.tensor([False, True]), (0, 0, 0), (1, 1, 1))
    assert torch.allclose(out[0] * 255, images[0].float(), atol=1e-3)  # the whole image: itself
    assert torch.allclose(out[1] * 255, images[1].float().flip(-1), atol=1e-3)  # and mirrored


def test_settings_added_later_leave_identity_alone_at_their_default():
    from kd.config import Config, from_dict, to_dict
    from kd.store import fingerprint
    cfg = from_dict(Config, {"name": "s", "stages": [{"name": "baseline"}]})
    identity = to_dict(cfg, "results")
    assert "classes" not in identity["data"] and "resized_crop" not in identity["data"]["augment"]
    assert "classes" in to_dict(cfg)["data"]  # the full config still shows them
    cfg.data.classes, cfg.data.augment.resized_crop = 10, [0.35, 1.0]
    assert fingerprint(to_dict(cfg, "results")) != fingerprint(identity)
    assert to_dict(cfg, "results")["data"]["classes"] == 10
