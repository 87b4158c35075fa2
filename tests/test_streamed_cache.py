"""Streamed ImageNet-style data (images read from files and cropped in DataLoader workers) with a crop-exact
teacher cache: each sample's random-resized crop and flip are a function of (seed, view, index), so the teacher's
outputs stored for a view are those of the very crops the students train on, and training never runs the teacher."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import functional as TF

import run
from kd.config import Config, DataConfig, from_dict
from kd.data.datasets import StreamedCrops, build_data, train_loader
from kd.data.tensors import normalize
from kd.device import autocast
from kd.study.study import Study

CPU = torch.device("cpu")


def write_imagenet(root, n_train=6, n_val=2, classes=("ant", "bee", "cat")):
    """train/<class>/ and val/<class>/ of JPEGs of several sizes, as ImageNet's are (none square, none of 72 px)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                h, w = 80 + 7 * i, 100 - 5 * i + 3 * c
                smooth = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
                image = Image.fromarray(smooth).resize((w, h), Image.BILINEAR)  # JPEG-friendly, like photos
                image.save(root / split / cls / f"{i}.jpg", quality=90)
    return root


def data_config(root, **changes):
    return DataConfig(**{"dataset": "imagenet", "root": str(root), "image_size": 72, "val_size": 3, "batch_size": 5,
                         "num_workers": 0, **changes})


def test_a_streamed_crop_is_a_function_of_seed_view_and_index(tmp_path):
    data = build_data(data_config(write_imagenet(tmp_path)))
    crops = data.train.dataset
    assert isinstance(crops, StreamedCrops) and data.replayable and data.pipeline == "loader"
    crops.seed, crops.view = 7, 1
    x, label = crops[4]
    again, _ = crops[4]
    assert x.shape == (3, 72, 72) and torch.equal(x, again)  # no hidden random state
    image, same_label = crops.files[4]
    top, left, h, w, flip = crops.crop(4, image.height, image.width)
    expected = TF.resized_crop(image, top, left, h, w, [72, 72], antialias=True)
    expected = normalize(TF.pil_to_tensor(TF.hflip(expected) if flip else expected)[None], crops.mean, crops.std)[0]
    assert label == same_label and torch.equal(x, expected)
    crops.view = 2
    assert not torch.equal(crops[4][0], x)  # another view, another crop
    crops.seed, crops.view = 8, 1
    assert not torch.equal(crops[4][0], x)  # another seed, another crop


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_replays_each_views_crops_in_any_order_and_any_worker(tmp_path, workers):
    data = build_data(data_config(write_imagenet(tmp_path), num_workers=workers))
    cfg = data_config(tmp_path, num_workers=workers)

    def images_by_index(seed, epoch, views):
        loader = train_loader(data, cfg, CPU, seed, views=views, aug_seed=3)
        loader.set_epoch(epoch)
        seen = {}
        for batch in loader:
            assert int(batch.view) == (epoch % views if views else epoch)
            seen.update({int(i): x for i, x in zip(batch.index, batch.images)})
        return seen

    a, b = images_by_index(seed=0, epoch=1, views=2), images_by_index(seed=1, epoch=3, views=2)  # view 1 twice
    assert a.keys() == b.keys() and all(torch.equal(a[i], b[i]) for i in a)
    c = images_by_index(seed=0, epoch=2, views=2)  # view 0
    assert not all(torch.equal(a[i], c[i]) for i in a)


def study_config(root, tmp_path, **changes):
    raw = {"name": "streamed", "output_dir": str(tmp_path / "runs"), "device": "cpu",
           "data": {"dataset": "imagenet", "root": str(root), "image_size": 72, "val_size": 3, "batch_size": 5,
                    "eval_batch_size": 8, "num_workers": 0},
           "teacher": {"name": "resnet18", "checkpoint": str(tmp_path / "teacher.pt"),
                       "train": {"epochs": 1, "lr": 0.01, "warmup_epochs": 0}},
           "student": {"name": "cnn", "kwargs": {"channels": [8, 16], "blocks": 1}},
           "train": {"epochs": 2, "lr": 0.01, "warmup_epochs": 0},
           "cache": {"mode": "logits", "views": 2, "dir": str(tmp_path / "cache")},
           "eval": {"batch_size": 4, "warmup": 0, "repeats": 1},
           "stages": [{"name": "baseline"}, {"name": "kd", "logit": {"name": "kd", "temperature": 2.0}}]}
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return raw


def test_the_cache_holds_the_teachers_outputs_on_the_very_crops_students_train_on(tmp_path):
    root = write_imagenet(tmp_path / "data")
    cfg = from_dict(Config, study_config(root, tmp_path))
    cfg.validate()
    study = Study(cfg)
    study.teacher.obtain()
    cache, s = study.students.cache(), study.setting
    teacher, recipe = study.teacher.model.eval(), s.runtime.student
    for epoch in range(3):  # views 0, 1, 0: each replayed, in a student's own order
        loader = train_loader(s.student_data, cfg.data, CPU, seed=11, views=cfg.cache.views, aug_seed=cfg.seed)
        loader.set_epoch(epoch)
        for batch in loader:
            with torch.inference_mode(), autocast(CPU, recipe.amp):
                live = teacher(batch.images).float()
            cached = cache.lookup(batch.view, batch.index)["logits"]
            assert torch.allclose(cached, live, atol=2e-2, rtol=2e-3), (epoch, (cached - live).abs().max())


def test_a_streamed_study_distils_from_its_cache_end_to_end(tmp_path, capsys):
    root = write_imagenet(tmp_path / "data")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study_config(root, tmp_path)))
    assert run.main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[cache] building" in out and "(2 views)" in out
    assert (tmp_path / "runs" / "streamed" / "kd" / "result.json").exists()


def test_generated_imagenet_like_data_has_imagenets_layout_and_sizes(tmp_path, capsys):
    from kd.data import synthetic
    assert synthetic.main([str(tmp_path / "d"), "--images", "60", "--classes", "4", "--val", "8"]) == 0
    assert "wrote 68 JPEGs" in capsys.readouterr().out
    sizes = np.array([Image.open(p).size for p in sorted((tmp_path / "d" / "train").glob("*/*.jpg"))])
    assert len(sizes) == 60 and len({tuple(s) for s in sizes}) > 5  # many shapes, landscape and portrait
    assert 300 < sizes.mean() < 500 and sizes.min() >= 64 and sizes.max() <= 1200
    data = build_data(data_config(tmp_path / "d", image_size=224, val_size=8))
    assert data.num_classes == 4 and len(data.test) == 8 and data.train.dataset[0][0].shape == (3, 224, 224)
    assert synthetic.main([str(tmp_path / "e"), "--images", "3", "--classes", "5"]) == 2  # a class with no image
