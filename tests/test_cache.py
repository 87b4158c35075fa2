"""Teacher-output cache: replay equals the live teacher, and every change that alters outputs rebuilds it."""
import shutil

import numpy as np
import pytest
import torch
import yaml

import kd.store
import run
from kd.data.cache import TeacherCache
from kd.data.datasets import train_loader
from kd.device import autocast
from kd.errors import KDError
from kd.train.distiller import Distiller


def live_teacher(study, x):
    with torch.no_grad():
        logits = study.teacher.model.eval()(x)
    return logits, study.teacher.taps.take()["stages.1"]


def students_loader(study, views=2):
    """The loader the students of `study` train from, cycling `views` augmentations as the cache does."""
    setting = study.setting
    return train_loader(setting.data, setting.cfg.data, setting.device, setting.cfg.seed, views=views)


def test_cached_outputs_are_the_teacher_outputs_of_the_replayed_batches(make_study):
    study = make_study()
    cache = study.students.cache()
    loader = students_loader(study)
    for epoch in range(3):
        loader.set_epoch(epoch)
        assert loader.view == epoch % 2
        for x, _, idx, _ in loader:
            logits, feature = live_teacher(study, x)
            out = cache.lookup(loader.view, idx)
            assert torch.allclose(out["logits"], logits, rtol=1e-2, atol=1e-2)
            assert torch.allclose(out["features"]["stages.1"], feature, rtol=1e-2, atol=1e-2)


def test_other_view_would_not_match(make_study):
    """The check above can fail: outputs recorded for another augmentation differ from the live teacher's."""
    study = make_study()
    cache = study.students.cache()
    loader = students_loader(study)
    loader.set_epoch(0)
    x, _, idx, _ = next(iter(loader))
    assert not torch.allclose(cache.lookup(1, idx)["features"]["stages.1"], live_teacher(study, x)[1], atol=1e-2)


@pytest.mark.parametrize("topk", [None, 3])
def test_lookups_stay_on_the_training_device(make_study, topk):
    """A cache opened for an accelerator is copied there and gathered there: no index goes back to the host (a
    sync every step on a GPU). `meta` stands in for the accelerator: a tensor on it cannot be copied to the CPU."""
    study = make_study(cache={"mode": "logits+features", "views": 2, "topk": topk})
    cache = study.students.cache()
    on_meta = TeacherCache(cache.folder, cache.manifest, torch.device("meta"))
    idx = torch.arange(5)
    out = on_meta.lookup(1, idx.to("meta"))
    expected = cache.lookup(1, idx)
    assert out["logits"].device.type == "meta" and out["logits"].shape == expected["logits"].shape
    assert out["features"]["stages.1"].shape == expected["features"]["stages.1"].shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_on_a_gpu_the_cache_is_copied_there_when_it_fits_and_read_from_its_file_when_not(make_study, monkeypatch):
    study = make_study()
    cache = study.students.cache()
    assert {a.device.type for a in cache.arrays.values()} == {"cuda"}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 0))
    mapped = TeacherCache(cache.folder, cache.manifest, study.setting.device)
    assert {a.device.type for a in mapped.arrays.values()} == {"cpu"}
    idx = torch.arange(5, device=study.setting.device)
    resident, read = cache.lookup(1, idx), mapped.lookup(1, idx)
    assert read["logits"].device == study.setting.device and torch.equal(resident["logits"], read["logits"])


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_distillation_loss_from_cache_equals_live_teacher(make_study, amp):
    study = make_study(train={"amp": amp})  # the cache is built in the precision the students train in
    cfg = study.setting.cfg
    cache, distiller = study.students.cache(), study.students.distiller(cfg.stages[0], cfg.seed).train()
    loader = students_loader(study)
    loader.set_epoch(1)
    batch = next(iter(loader))
    torch.manual_seed(0)
    with autocast(study.setting.device, study.setting.runtime.student.amp):
        _, live = distiller(batch)
        distiller.cache = cache
        _, cached = distiller(batch)
    assert set(live) == set(cached) == {"ce", "logit", "feat0", "loss"}
    for term in live:
        assert cached[term].item() == pytest.approx(live[term].item(), rel=1e-3, abs=1e-4), term


def test_a_feature_stage_takes_cached_logits_and_runs_its_teacher_only_as_far_as_its_layers(make_study):
    """cache.mode logits, a FitNets stage: the logits come from the cache and the teacher's layers the cache lacks
    from the teacher cut after them (its pooling and classifier never run), with the live teacher's loss terms."""
    study = make_study(cache={"mode": "logits", "views": 2})
    stage = study.setting.cfg.stages[0]
    assert study.students.replays(stage)
    cache = study.students.cache()
    assert cache.layers == set()
    live, replayed = (study.students.distiller(stage, study.setting.cfg.seed, c).train() for c in (None, cache))
    assert replayed.teacher_prefix is not None and replayed.teacher_prefix is not study.teacher.model
    calls = []
    for name in ("pool", "fc"):
        getattr(study.teacher.model, name).register_forward_hook(lambda *_, name=name: calls.append(name))
    loader = students_loader(study)
    loader.set_epoch(1)
    batch = next(iter(loader))
    _, cached = replayed(batch)
    assert calls == []  # the classifier's logits came from the cache
    _, reference = live(batch)
    assert calls == ["pool", "fc"]
    assert set(cached) == set(reference) == {"ce", "logit", "feat0", "loss"}
    assert cached["feat0"].item() == pytest.approx(reference["feat0"].item(), rel=1e-6)  # the same teacher maps
    assert cached["logit"].item() == pytest.approx(reference["logit"].item(), rel=1e-3, abs=1e-4)  # fp16 logits


def test_a_teacher_that_torch_fx_cannot_trace_runs_whole_for_the_layers_the_cache_lacks(make_study, monkeypatch,
                                                                                       capsys):
    study = make_study(cache={"mode": "logits", "views": 2})
    forward = type(study.teacher.model).forward
    monkeypatch.setattr(type(study.teacher.model), "forward",  # a branch on the input's values
                        lambda self, x: forward(self, x) if x.sum() != 0 else forward(self, x))
    cfg = study.setting.cfg
    distiller = study.students.distiller(cfg.stages[0], cfg.seed, study.students.cache()).train()
    assert distiller.teacher_prefix is study.teacher.model
    assert "torch.fx cannot trace the teacher" in capsys.readouterr().out
    loader = students_loader(study)
    loader.set_epoch(0)
    _, terms = distiller(next(iter(loader)))
    assert torch.isfinite(terms["feat0"])


def cache_folder(study):
    return study.students.cache().folder


def test_unchanged_settings_reuse_the_cache(make_study, capsys):
    first = cache_folder(make_study())
    assert "[cache] building" in capsys.readouterr().out
    assert cache_folder(make_study()) == first
    assert "[cache] reusing" in capsys.readouterr().out


@pytest.mark.parametrize("changes", [
    {"data": {"augment": {"crop_padding": 1}}},
    {"data": {"augment": {"hflip": False}}},
    {"cache": {"views": 3}},
    {"seed": 1},
    {"data": {"train_subset": 40}},
    {"data": {"split_seed": 1}},
    {"train": {"amp": "bf16"}},
], ids=["crop", "flip", "views", "seed", "subset", "split", "amp"])
def test_changes_that_alter_teacher_outputs_rebuild(make_study, changes, capsys):
    first = cache_folder(make_study())
    capsys.readouterr()
    assert cache_folder(make_study(**changes)) != first
    assert "[cache] building" in capsys.readouterr().out


def test_students_of_a_subset_replay_a_cache_of_their_images_only(make_study):
    study = make_study(train={"subset": 40})
    assert study.students.cache_plan().arrays["logits"][0] == (2, 40, 10)
    # another subset, another cache
    assert study.students.cache_plan().folder != make_study().students.cache_plan().folder
    cache = study.students.cache()
    setting = study.setting
    loader = train_loader(setting.student_data, setting.cfg.data, setting.device, setting.cfg.seed, views=2)
    batch = next(iter(loader))
    assert loader.dataset_size == 40 and int(batch.index.max()) < 40
    logits, _ = live_teacher(study, batch.images)
    assert torch.allclose(cache.lookup(loader.view, batch.index)["logits"], logits, rtol=1e-2, atol=1e-2)


def test_another_teacher_checkpoint_rebuilds(make_study, tmp_path):
    first = cache_folder(make_study())
    other = make_study(name="other", teacher={"checkpoint": str(tmp_path / "other.pt"), "train": {"lr": 0.01}})
    assert cache_folder(other) != first


def test_changed_data_files_rebuild(make_study, tmp_path):
    first = cache_folder(make_study())
    images = tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    content = bytearray(images.read_bytes())
    content[-1] ^= 0xFF
    images.write_bytes(bytes(content))
    assert cache_folder(make_study()) != first


def test_truncated_or_incomplete_cache_is_detected_and_rebuilt(make_study, capsys):
    folder = cache_folder(make_study())
    logits = folder / "logits.npy"
    size = logits.stat().st_size
    logits.write_bytes(logits.read_bytes()[:size // 2])
    capsys.readouterr()
    study = make_study()
    assert cache_folder(study) == folder
    out = capsys.readouterr().out
    assert "truncated" in out and "[cache] building" in out
    assert logits.stat().st_size == size
    (folder / "manifest.json").unlink()
    make_study().students.cache()
    assert "incomplete" in capsys.readouterr().out and (folder / "manifest.json").exists()


def test_cache_that_would_not_fit_is_refused(make_study, monkeypatch):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(kd.store.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    study = make_study()
    need = TeacherCache.nbytes(study.students.cache_plan().arrays)
    assert 2 ** 10 < need < 2 ** 20  # the sizes say so in KiB and bytes, not as '0.00 GiB'
    with pytest.raises(KDError, match=rf"cache.dir: the teacher cache needs {need / 2 ** 10:.2f} KiB but .* has "
                                      r"1000 bytes free"):
        study.students.cache()


def test_top_k_cache_keeps_the_largest_logits(make_study):
    study = make_study(cache={"mode": "logits", "topk": 3})
    cache = study.students.cache()
    loader = students_loader(study)
    loader.set_epoch(0)
    x, _, idx, _ = next(iter(loader))
    logits = live_teacher(study, x)[0]
    replay = cache.lookup(0, idx)["logits"]
    top = logits.topk(3, dim=1).indices
    assert torch.equal(replay.topk(3, dim=1).indices.sort(1).values, top.sort(1).values)
    assert torch.allclose(replay.gather(1, top), logits.gather(1, top), rtol=1e-2, atol=1e-2)
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top, False)  # the classes outside the top 3
    others = logits.masked_fill(~rest, 0).sum(1) / rest.sum(1)  # the mean of their logits
    assert torch.allclose(replay[rest], others[:, None].expand_as(logits)[rest], rtol=1e-2, atol=1e-2)
    assert cache.arrays["topk_indices"].dtype == torch.int16  # 10 classes: 2 bytes a class index, not 4


@pytest.mark.slow
def test_interrupted_cached_distillation_resumes_to_the_uninterrupted_result(make_config, tmp_path, monkeypatch,
                                                                             assert_same_training):
    """The tensor pipeline + cache path: order and augmentation are functions of (seed, epoch, index)."""
    def config(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(make_config(name=name, train={"epochs": 3, "checkpoint_seconds": 0})))
        return path
    assert run.main(["--config", str(config("full")), "--device", "cpu"]) == 0
    calls, forward = [0], Distiller.forward

    def dies_in_second_epoch(self, batch, epoch=0.0):
        calls[0] += self.cache is not None
        if self.cache is not None and calls[0] == 6:  # 4 batches of 16 per epoch: mid-way through epoch 2
            raise KeyboardInterrupt
        return forward(self, batch, epoch)
    monkeypatch.setattr(Distiller, "forward", dies_in_second_epoch)
    assert run.main(["--config", str(config("resumed")), "--device", "cpu"]) == 130
    assert not (tmp_path / "runs" / "resumed" / "kdf" / "result.json").exists()  # stopped mid-stage
    monkeypatch.setattr(Distiller, "forward", forward)
    assert run.main(["--config", str(config("resumed")), "--device", "cpu", "--resume"]) == 0
    assert_same_training(tmp_path / "runs" / "full" / "kdf", tmp_path / "runs" / "resumed" / "kdf")


def test_a_build_that_stopped_resumes_after_its_last_intact_view(make_study, tmp_path, monkeypatch, capsys):
    """A build killed in its third view keeps its first two (their digests checked) and ends with the bytes of a
    build that never stopped; a damaged finished view is built again."""
    import kd.data.cache
    clean = make_study(cache={"views": 3, "dir": str(tmp_path / "clean")}).students.cache().folder
    progress_bar = kd.data.cache.Progress

    def stop_at_third_view(items, label):
        if label.endswith("view 3/3"):
            raise KeyboardInterrupt  # as a kill would stop it: views 1 and 2 written, the third not
        return progress_bar(items, label)
    monkeypatch.setattr(kd.data.cache, "Progress", stop_at_third_view)
    with pytest.raises(KeyboardInterrupt):
        make_study(cache={"views": 3}).students.cache()
    monkeypatch.setattr(kd.data.cache, "Progress", progress_bar)
    folder = clean.parent.parent / "cache" / clean.name
    damaged = np.load(folder / "logits.npy", mmap_mode="r+")
    damaged[1, 0, 0] += 1  # the second finished view no longer matches its recorded digest
    damaged.flush()
    del damaged
    capsys.readouterr()
    assert make_study(cache={"views": 3}).students.cache().folder == folder
    assert "views 1-1 kept from a build that stopped" in capsys.readouterr().out
    assert (folder / "logits.npy").read_bytes() == (clean / "logits.npy").read_bytes()
    assert not (folder / "progress.json").exists() and (folder / "manifest.json").exists()
