"""The study: obtain a teacher, train every student stage, evaluate all models, write the report."""
import hashlib
import json
import os
import pickle
import statistics
from pathlib import Path

import torch
import yaml

from .cache import FORMAT as CACHE_FORMAT, TeacherCache
from .config import to_dict
from .data import build_data, make_loaders, sample_batch
from .device import barrier, init_distributed, is_main, resolve_amp, resolve_device
from .distiller import Distiller, FeatureHooks
from .evaluate import accuracy, profile
from .identity import canonical, differences, file_digest, fingerprint
from .log import info
from .models import count_parameters, create_model, load_weights
from .preflight import dry_step
from .registry import ConfigError, KDError
from .report import write_report, write_text_atomic
from .train import Trainer, save_atomic, seed_everything


def load_model_file(model, path):
    """Load {"model": state_dict, ...} files (best.pt, teacher checkpoints); returns the whole dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    return ckpt


SEED_STATS = ("val_top1", "test_top1", "test_top5", "test_loss", "train_images_per_s", "epoch_seconds")


def over_seeds(results, seeds):
    """One stage's result over its seeds: the first seed's (its checkpoint is the one profiled), with mean and
    sample standard deviation of the accuracy and throughput figures, and every seed's own figures."""
    row = dict(results[0])
    for k in SEED_STATS:
        values = [r[k] for r in results if r.get(k) is not None]
        if values:
            row[k] = statistics.fmean(values)
            row[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["seeds"] = {seed: {k: r.get(k) for k in ("val_top1", "test_top1", "best_epoch")}
                    for seed, r in zip(seeds, results)}
    return row


class Study:
    def __init__(self, cfg, resume=False):
        self.cfg, self.resume = cfg, resume
        self.device = resolve_device(cfg.device)
        self.rank, self.world = init_distributed(self.device)
        self.main = is_main()  # under torchrun only rank 0 writes files, prints and measures inference
        if cfg.data.batch_size % self.world:
            raise ConfigError("data.batch_size", f"{cfg.data.batch_size} does not split evenly over {self.world} processes")
        self.precision, decisions = {}, {}
        for key, train_cfg in (("teacher.train.amp", cfg.teacher.train), ("train.amp", cfg.train)):
            if train_cfg.amp == "fp16" and self.device.type != "cuda":
                raise ConfigError(key, "fp16 needs a CUDA device; use auto, bf16 or off on a CPU")
            amp, why = resolve_amp(train_cfg.amp, self.device)
            self.precision[key] = "fp32" if amp == "off" else amp
            decisions.setdefault(f"{train_cfg.amp} -> {self.precision[key]} ({why})", []).append(key)
        for decision, keys in decisions.items():
            info(f"[precision] {' and '.join(keys)}: {decision}")
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        self.run_dir = cfg.run_dir
        if not self.main:
            barrier()  # rank 0 downloads or unpacks the data first
        self.data = build_data(cfg.data, distributed=self.world > 1)
        if self.main:
            barrier()
        if self.data.tensors:  # moved to the training device once, for every loader of the study
            self.data.tensors = {k: (x.to(self.device), y.to(self.device)) for k, (x, y) in self.data.tensors.items()}
        self._cache = None
        self.sample = sample_batch(self.data)  # (images, labels) on the CPU, for dry passes
        self.image_shape = tuple(self.sample[0].shape[1:])
        # What the models learn from: every result-changing data setting, the pipeline used, the images' content.
        self.data_identity = canonical({**to_dict(cfg.data, results_only=True), "pipeline": self.data.pipeline,
                                        "content": self.data.content})
        self.teacher = self.new_model(cfg.teacher, "teacher").to(self.device)
        self.teacher_note = None  # what differs, when teacher.accept_checkpoint let a mismatching teacher in

    def new_model(self, model_cfg, key, seed=None):
        """Seeded per model: a stage's initial weights (and its methods' modules, built next) do not depend on
        how many models were built before it, and every student of one seed starts from the same weights."""
        seed_everything(self.cfg.seed if seed is None else seed)
        return create_model(model_cfg.name, key, model_cfg.kwargs, self.data.in_channels, self.data.num_classes,
                            self.data.image_size)

    def new_distiller(self, stage, seed):
        i = self.cfg.stages.index(stage)
        student = self.new_model(self.cfg.student, "student", seed).to(self.device)
        return Distiller.build(stage, student, self.teacher, self.sample[0], self.cfg.train.label_smoothing,
                               f"stages[{i}]", num_samples=len(self.data.train))

    def check(self):
        """Every model and method of the study (each stage, each seed, the teacher if it is to be trained) runs
        one real training step on a few validation images, on the training device, before any long work."""
        if self.cfg.cache.mode != "off" and not self.data.tensors:
            raise ConfigError("cache.mode", "the teacher cache replays the tensor pipeline's augmentations; it needs "
                                            "an in-memory dataset (cifar10, fashion_mnist) in one process")
        tcfg = self.cfg.teacher
        to_train = not Path(tcfg.checkpoint).exists()
        if to_train:
            dry_step(Distiller(self.teacher, label_smoothing=tcfg.train.label_smoothing), self.sample, self.device,
                     tcfg.train, "teacher", student_key="teacher")
        for i, stage in enumerate(self.cfg.stages):
            for seed in self.cfg.student_seeds:
                dry_step(self.new_distiller(stage, seed), self.sample, self.device, self.cfg.train, f"stages[{i}]")
        info(f"[check] one training step on {self.device} passed for {'the teacher and ' if to_train else ''}"
             f"{len(self.cfg.stages)} stage(s) x {len(self.cfg.student_seeds)} seed(s)")

    def stage_name(self, stage, seed):
        """The stage's folder under the run folder: one per seed when the study repeats seeds."""
        return stage.name if self.cfg.seeds is None else f"{stage.name}/seed{seed}"

    def run(self):
        self.check()
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        results = {"teacher": self.obtain_teacher()}
        self.teacher.requires_grad_(False)
        for stage in self.cfg.stages:
            results[stage.name] = over_seeds([self.train_student(stage, seed) for seed in self.cfg.student_seeds],
                                             self.cfg.student_seeds)
        if self.main:
            return write_report(self.run_dir, self.cfg, self.data, self.device, self.profile_all(results),
                                {"precision": self.precision, "teacher_note": self.teacher_note})

    def teacher_identity(self):
        """What makes the teacher: the data it learns from, its model, starting weights and recipe, the seed."""
        return canonical({"data": self.data_identity, "teacher": to_dict(self.cfg.teacher, results_only=True),
                          "seed": self.cfg.seed})

    def obtain_teacher(self):
        """Load the configured teacher checkpoint, or train the teacher and save it there for later studies. A
        checkpoint records the identity that made it; one made under another config is refused."""
        tcfg, path, identity = self.cfg.teacher, Path(self.cfg.teacher.checkpoint), self.teacher_identity()
        if not path.exists():
            if tcfg.weights:
                fresh = load_weights(self.teacher, tcfg.name, tcfg.weights, "teacher.weights")
                info(f"[teacher] initialised from {tcfg.weights}" + (f"; new: {', '.join(fresh)}" if fresh else ""))
                if fresh and tcfg.train.epochs == 0:
                    raise ConfigError("teacher.train.epochs", f"0 leaves tensors that {tcfg.weights} does not fit "
                                      f"untrained ({', '.join(fresh)}): the students would learn from an untrained "
                                      "classifier; set teacher.train.epochs to fine-tune them")
            trained = self.fit("teacher", Distiller(self.teacher, label_smoothing=tcfg.train.label_smoothing),
                               tcfg.train, fingerprint(identity), self.cfg.seed)
            if self.main:
                save_atomic({"model": self.teacher.state_dict(), "name": tcfg.name, "train": trained,
                             "identity": identity}, path)
                (self.run_dir / "teacher" / "last.pt").unlink(missing_ok=True)  # later runs use the checkpoint
                info(f"[teacher] saved {path}")
            barrier()
        info(f"[teacher] loading {path}")
        try:
            ckpt = load_model_file(self.teacher, path)
        except (RuntimeError, KeyError, OSError, pickle.UnpicklingError) as e:
            raise ConfigError("teacher.checkpoint", f"{path} does not hold a '{tcfg.name}' for this data "
                              f"({str(e).splitlines()[0]}); point it elsewhere or delete it to retrain") from None
        self.teacher_note = self.check_provenance(ckpt.get("identity"), identity, path)
        key = fingerprint(self.data_identity, file_digest(path))
        return self.cached_result(self.run_dir / "teacher", key, stale_ok=True) or self.finish(
            "teacher", self.teacher, key, {**ckpt.get("train", {}), "checkpoint": str(path)})

    def check_provenance(self, recorded, identity, path):
        """None when the checkpoint was made under this config; what differs when teacher.accept_checkpoint takes
        it anyway; a one-line error otherwise."""
        if recorded == identity:
            return None
        what = "records no provenance (the data and recipe that made it)" if recorded is None else \
            "was made under another config (" + "; ".join(differences(recorded, identity)) + ")"
        if not self.cfg.teacher.accept_checkpoint:
            raise ConfigError("teacher.checkpoint", f"{path} {what}; delete it or point teacher.checkpoint elsewhere "
                              "to train the teacher this config describes, or set teacher.accept_checkpoint: true "
                              "to use it as it is")
        info(f"[teacher] using {path} although it {what}, as teacher.accept_checkpoint says")
        return what

    def train_student(self, stage, seed):
        replay = self.uses_cache(stage)
        identity = canonical({
            "data": self.data_identity, "student": to_dict(self.cfg.student, results_only=True),
            "train": to_dict(self.cfg.train, results_only=True), "stage": to_dict(stage, results_only=True),
            "seed": self.cfg.seed, "student_seed": seed,
            "teacher": file_digest(self.cfg.teacher.checkpoint) if stage.uses_teacher else None,
            "cache": to_dict(self.cfg.cache, results_only=True) if replay else None})
        key = fingerprint(identity)
        name = self.stage_name(stage, seed)
        cached = self.cached_result(self.run_dir / name, key, identity=identity)
        if cached:
            return cached
        distiller = self.new_distiller(stage, seed)
        trained = self.fit(name, distiller, self.cfg.train, key, seed, self.teacher_cache() if replay else None)
        trained["checkpoint"] = str(self.run_dir / name / "best.pt")
        return self.finish(name, distiller.student, key, {**trained, "identity": identity})

    def cached_result(self, stage_dir, key, stale_ok=False, identity=None):
        """A finished stage is reused; one finished under another config is never overwritten (the error says what
        changed). `stale_ok`: the result only evaluates a checkpoint kept elsewhere (the teacher's), so it is
        simply measured again."""
        path = stage_dir / "result.json"
        if not path.exists():
            return None
        result = json.loads(path.read_text())
        if result["fingerprint"] != key and stale_ok:
            return None
        if result["fingerprint"] != key:
            changed = "; ".join(differences(result["identity"], identity)) if "identity" in result and identity \
                else "data, model, recipe, method or teacher changed"
            raise KDError(f"{stage_dir}: finished under a different config ({changed}); rename the stage or the "
                          "study, or delete that folder to retrain it")
        info(f"[{stage_dir.relative_to(self.run_dir)}] finished earlier; reusing {path}")
        return result

    def uses_cache(self, stage):
        mode = self.cfg.cache.mode
        return stage.uses_teacher and mode != "off" and (mode == "logits+features" or not stage.features)

    def teacher_cache(self):
        """Built (or found on disk) once, at the first stage that replays it; holds the teacher layers of every
        stage's feature pairs, so all students of the study share it."""
        if self._cache is None:
            c, d = self.cfg.cache, self.data
            layers = sorted({n for s in self.cfg.stages for f in s.features for n in f.teacher}) \
                if c.mode == "logits+features" else []
            with torch.no_grad(), FeatureHooks(self.teacher, layers, layers) as out:
                self.teacher.eval()(self.sample[0].to(self.device))
            shapes = {layer: tuple(out[layer].shape[1:]) for layer in layers}
            images = d.tensors["train"][0]
            key_parts = {"format": CACHE_FORMAT, "images": hashlib.sha256(images.cpu().numpy().tobytes()).hexdigest(),
                         "teacher": file_digest(self.cfg.teacher.checkpoint), "augment": to_dict(self.cfg.data.augment),
                         "normalize": [d.mean, d.std], "views": c.views, "seed": self.cfg.seed, "topk": c.topk,
                         "features": shapes, "amp": resolve_amp(self.cfg.train.amp, self.device)[0]}
            self._cache = TeacherCache.open_or_build(
                c.dir, key_parts, self.teacher, images, (self.cfg.data.augment.crop_padding, self.cfg.data.augment.hflip),
                (d.mean, d.std), self.cfg.seed, c.views, d.num_classes, c.topk, shapes, c.batch_size, self.device,
                self.cfg.train.amp)
        return self._cache

    def fit(self, name, distiller, train_cfg, key, seed, cache=None):
        """Train (or resume) one model; leaves its best validation weights loaded and returns training facts."""
        out_dir = self.run_dir / name
        views = self.cfg.cache.views if cache else None
        trainer = Trainer(distiller.to(self.device), train_cfg, self.loaders(views, seed)[:2], self.device, out_dir,
                          seed, key, name, cache)
        if trainer.last_path.exists():
            if not self.resume:
                raise KDError(f"{trainer.last_path}: an unfinished run is there; pass --resume to continue it, "
                              "or delete that folder to start over")
            trainer.resume()
        best = trainer.fit()
        load_model_file(distiller.student, out_dir / "best.pt")
        mean = lambda key: statistics.fmean(r[key] for r in trainer.history) if trainer.history else None
        methods = [m for m in (distiller.features, distiller.logit) if m is not None]
        return {"best_epoch": best["epoch"], "epochs": train_cfg.epochs,
                "train_images_per_s": mean("train_images_per_s"), "epoch_seconds": mean("epoch_seconds"),
                "method_params": sum(count_parameters(m) for m in methods),  # trained, saved, never deployed
                "method_state_bytes": sum(t.numel() * t.element_size()
                                          for m in methods for t in m.state_dict().values())}

    def finish(self, name, model, key, facts):
        """Validation and test accuracy, computed once per finished model and stored beside it."""
        _, val_loader, test_loader = self.loaders()
        val = accuracy(model.to(self.device), val_loader, self.device)
        test = accuracy(model, test_loader, self.device)
        result = {"fingerprint": key, **facts, "val_top1": val["top1"], "test_top1": test["top1"],
                  "test_top5": test["top5"], "test_loss": test["loss"]}
        if self.main:
            (self.run_dir / name).mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / name / "result.json", json.dumps(result, indent=2) + "\n")
            info(f"[{name}] test top-1 {test['top1']:.4f}" + (f", top-5 {test['top5']:.4f}" if test["top5"] else ""))
        return result

    def loaders(self, views=None, seed=None):
        """Order from `seed`; augmentation always from the study's seed, the one the teacher cache replays."""
        return make_loaders(self.data, self.cfg.data, self.device, torch.Generator(),
                            self.cfg.seed if seed is None else seed, self.rank, self.world, views, aug_seed=self.cfg.seed)

    def profile_all(self, results):
        """Teacher and students measured in one process, one after another, on the same inputs and settings."""
        memory_format = torch.channels_last if self.cfg.train.channels_last else torch.preserve_format
        rows = {}
        for name, result in results.items():
            # Fresh, hook-free models loaded from the saved files (a stage's first seed): what a user would deploy.
            model = self.new_model(self.cfg.teacher if name == "teacher" else self.cfg.student, name)
            load_model_file(model, result["checkpoint"])
            info(f"[{name}] measuring inference cost on {self.device}")
            cost = profile(model, self.image_shape, self.device, self.cfg.eval, memory_format)
            rows[name] = {**result, **cost, "checkpoint_bytes": os.path.getsize(result["checkpoint"])}
        return rows
