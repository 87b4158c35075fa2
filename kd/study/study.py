"""The study: obtain a teacher, train (or reuse) every student stage for every seed, measure all models, report."""
import dataclasses
import os
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from kd.deploy import card as cards
from kd.data.cache import TeacherCache
from kd.config import StageConfig, to_dict, validate_runtime
from kd.data.datasets import build_data, eval_loaders, plain_train_images, sample_batch, train_loader
from kd.device import barrier, memory_format, resolve_amp, setup
from kd.train.distiller import Distiller, Taps, feature_layers
from kd.errors import ConfigError, KDError
from kd.measure.evaluate import accuracy, profile
from kd.log import Clock, describe_time, info
from kd.train.models import count_parameters, create_model, load_weights
from kd.train.preflight import dry_step
from kd.measure.report import write_report
from kd.store import (BEST, LAST, Result, RunFolder, canonical, content_digest, differences, fingerprint, load, save,
                    writable_folder, write_text)
from kd.train.trainer import Trainer, seed_everything


SEED_STATS = ("val_top1", "test_top1", "test_top5", "test_loss", "train_images_per_s", "epoch_seconds")


def row(result):
    """A Result as one flat report row (training facts beside the accuracy), without its identity."""
    return {k: v for k, v in {**dataclasses.asdict(result), **result.training}.items() if k not in ("training",
                                                                                                    "identity")}


def over_seeds(results, seeds):
    """One stage's report row over its seeds: the first seed's (its checkpoint is the one profiled), with mean
    and sample standard deviation of the accuracy and throughput figures, and every seed's own figures."""
    rows = [row(r) for r in results]
    summary = dict(rows[0])
    for k in SEED_STATS:
        values = [r[k] for r in rows if r.get(k) is not None]
        if values:
            summary[k] = statistics.fmean(values)
            summary[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    summary["seeds"] = {seed: {k: r.get(k) for k in ("val_top1", "test_top1", "best_epoch")}
                        for seed, r in zip(seeds, rows)}
    return summary


def deploy_module():
    """kd/deploy/runtimes.py, imported only for deploy.onnx: onnx and onnxruntime are not needed to train and measure."""
    try:
        from kd.deploy import runtimes as deploy
    except ImportError as e:
        raise ConfigError("deploy.onnx", f"needs onnx, onnxscript and onnxruntime (Pipfile.lock pins them): {e}; "
                          "install them, or set deploy.onnx: false") from None
    return deploy


class Job(NamedTuple):
    """One student to train or reuse: a stage for one seed, its folder name, what makes it and its stored Result."""
    stage: StageConfig
    seed: int
    name: str
    identity: dict
    key: str
    done: Result | None


class Study:
    def __init__(self, cfg, resume=False):
        self.cfg, self.resume = cfg, resume
        self.rt = setup(cfg)
        for decision in self.rt.decisions:
            info(decision)
        self.device, self.main = self.rt.device, self.rt.main
        self.clock = Clock()  # wall time per phase of the run (and part of a phase), printed at its end
        if not self.main:
            barrier()  # rank 0 downloads or unpacks the data first
        with self.clock.phase("data"):
            self.data = build_data(cfg.data, self.device, distributed=self.rt.world > 1)
        if self.main:
            barrier()
        validate_runtime(cfg, self.device, self.rt.world, in_memory=bool(self.data.tensors),
                         train_images=len(self.data.train))
        self.student_data = self.data.first(cfg.train.subset)  # what every student (and the teacher cache) sees
        self.folder = RunFolder(cfg.run_dir)
        self.sample = sample_batch(self.data)  # (images, labels) on the CPU, for dry passes
        self.image_shape = tuple(self.sample[0].shape[1:])
        self.teacher = self.new_model(cfg.teacher, "teacher").to(self.device)
        # every stage's teacher layers, recorded without their graph (the teacher is trained with them in place)
        self.teacher_taps = Taps(self.teacher, feature_layers(cfg.stages, "teacher"), detach=True)
        self.teacher_note = None  # what differs, when teacher.accept_checkpoint let a mismatching teacher in
        self.teacher_digest = None  # the loaded teacher's weights: its identity wherever and however it was saved
        self.teacher_train = {}  # the facts of its training, as its checkpoint records them
        self._cache = None

    def run(self):
        with self.clock.phase("check"):
            self.check()
        if self.main:
            write_text(self.folder.root / "config.yaml", yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        with self.clock.phase("teacher"):
            results = {"teacher": row(self.obtain_teacher())}
        self.teacher.requires_grad_(False)
        jobs = [self.student_job(stage, seed) for stage in self.cfg.stages for seed in self.cfg.student_seeds]
        if any(job.done is None and self.replays(job.stage) for job in jobs):
            with self.clock.phase("cache"):
                self.teacher_cache()  # before any student trains: a cache that cannot be built stops the run here
        for stage in self.cfg.stages:
            with self.clock.phase(f"stage {stage.name}"):
                results[stage.name] = over_seeds([self.train_student(job) for job in jobs if job.stage is stage],
                                                 self.cfg.student_seeds)
        if self.main:
            with self.clock.phase("profiles"):
                rows = self.profile_all(results)
                deployed = deploy_module().facts(self.cfg.deploy, len(self.data.train)) if self.cfg.deploy.onnx \
                    else None
            with self.clock.phase("report"):
                report = write_report(self.folder.root, self.cfg, self.data, self.device, rows,
                                      {"precision": self.rt.precision, "compile": self.rt.compile,
                                       "graph": self.rt.graph, "teacher_note": self.teacher_note, "deploy": deployed,
                                       "seconds": self.clock.phases, "seconds_within": self.clock.parts})
                self.plot(report)
            info(f"[time] {describe_time(self.clock.phases, self.clock.parts)} "
                 f"(total {sum(self.clock.phases.values()):.1f} s)")
            return report

    def plot(self, report):
        try:
            from kd.measure.plots import write_plots  # matplotlib: a picture is not worth failing a finished study for
        except ImportError as e:
            info(f"[plots] skipped: {e} (Pipfile.lock pins matplotlib)")
            return
        for path in write_plots(self.folder.root, report):
            info(f"[plots] {path}")

    def new_model(self, model_cfg, key, seed=None):
        """Seeded per model: a stage's initial weights (and its methods' modules, built next) do not depend on
        how many models were built before it, and every student of one seed starts from the same weights."""
        seed_everything(self.cfg.seed if seed is None else seed)
        return create_model(model_cfg.name, key, model_cfg.kwargs, self.data.in_channels, self.data.num_classes,
                            self.data.image_size)

    def new_distiller(self, stage, seed, cache=None):
        student = self.new_model(self.cfg.student, "student", seed).to(self.device)
        return Distiller.build(stage, student, self.teacher, self.sample[0], self.cfg.train.label_smoothing,
                               f"stages[{self.cfg.stages.index(stage)}]", num_samples=len(self.student_data.train),
                               cache=cache, teacher_taps=self.teacher_taps)

    def check(self):
        """Before any long work: the files (see check_files), then every model and method of the study (each stage,
        each seed, the teacher if it is to be trained) runs one real training step on a few validation images, on
        the training device; with deploy.onnx, the untrained teacher and student export to ONNX (and int8)."""
        self.check_files()
        tcfg = self.cfg.teacher
        to_train = not Path(tcfg.checkpoint).exists()
        if to_train and not tcfg.weights and tcfg.train.epochs == 0 and any(s.uses_teacher for s in self.cfg.stages):
            raise ConfigError("teacher.train.epochs", f"0, with no checkpoint at {tcfg.checkpoint} and no "
                              "teacher.weights, leaves the teacher at its random initialisation: the students "
                              "would distil from noise; give it epochs, weights or a checkpoint")
        if to_train:
            dry_step(Distiller(self.teacher, label_smoothing=tcfg.train.label_smoothing), self.sample, self.device,
                     tcfg.train, "teacher", student_key="teacher")
        for i, stage in enumerate(self.cfg.stages):
            for seed in self.cfg.student_seeds:
                dry_step(self.new_distiller(stage, seed), self.sample, self.device, self.cfg.train, f"stages[{i}]")
        info(f"[check] one training step on {self.device} passed for {'the teacher and ' if to_train else ''}"
             f"{len(self.cfg.stages)} stage(s) x {len(self.cfg.student_seeds)} seed(s)")
        if self.cfg.deploy.onnx:
            deploy_module().check({key: (self.new_model(getattr(self.cfg, key), key), self.model_card(key, None))
                                   for key in ("teacher", "student")}, self.cfg.deploy.int8)
            info(f"[check] the teacher and the student export to ONNX{' and int8' if self.cfg.deploy.int8 else ''}")

    def check_files(self):
        """The folders this run writes in are writable, a teacher checkpoint already there is intact and made for
        this study (it is loaded now), and a teacher cache still to build fits on its disk."""
        writable_folder(self.folder.root, "output_dir")
        if self.cfg.deploy.onnx:
            deploy_module()
        path = Path(self.cfg.teacher.checkpoint)
        if path.exists():
            if not path.is_file():
                raise ConfigError("teacher.checkpoint", f"{path} is not a file")
            self.load_teacher()
        else:
            writable_folder(path.parent, "teacher.checkpoint")
        if any(self.replays(stage) for stage in self.cfg.stages):
            writable_folder(self.cfg.cache.dir, "cache.dir")
            TeacherCache.ensure_room(*self.cache_plan()[1:])

    def data_identity(self, scope="results"):
        """What the models learn from (and, in scope "results", are tested on): the data settings of `scope`, the
        pipeline used, and the images' content."""
        return canonical({**to_dict(self.cfg.data, scope), "pipeline": self.data.pipeline,
                          "content": self.data.content})

    def teacher_identity(self):
        """What makes the teacher: the data it learns from, its model, starting weights and recipe, the seed."""
        return canonical({"data": self.data_identity("training"), "teacher": to_dict(self.cfg.teacher, "training"),
                          "seed": self.cfg.seed})

    def obtain_teacher(self):
        """Load the configured teacher checkpoint, or train the teacher and save it there for later studies; then
        its test accuracy, measured once per checkpoint and data."""
        tcfg, path = self.cfg.teacher, Path(self.cfg.teacher.checkpoint)
        if not path.exists():
            if tcfg.weights:
                fresh = load_weights(self.teacher, tcfg.name, tcfg.weights, "teacher.weights")
                info(f"[teacher] initialised from {tcfg.weights}" + (f"; new: {', '.join(fresh)}" if fresh else ""))
                if fresh and tcfg.train.epochs == 0:
                    raise ConfigError("teacher.train.epochs", f"0 leaves tensors that {tcfg.weights} does not fit "
                                      f"untrained ({', '.join(fresh)}): the students would learn from an untrained "
                                      "classifier; set teacher.train.epochs to fine-tune them")
            identity = self.teacher_identity()
            key = fingerprint(identity)
            card = self.model_card("teacher", key)
            trained = self.fit("teacher", Distiller(self.teacher, label_smoothing=tcfg.train.label_smoothing),
                               tcfg.train, key, self.cfg.seed, card=card)
            if self.main:
                save({"model": self.teacher.state_dict(), "name": tcfg.name, "train": trained, "identity": identity,
                      "card": card}, path)
                (self.folder.model("teacher") / LAST).unlink(missing_ok=True)  # later runs use the checkpoint
                info(f"[teacher] saved {path}")
            barrier()
        if self.teacher_digest is None:
            self.load_teacher()
        key = fingerprint(self.data_identity(), self.teacher_digest)
        done = self.folder.result("teacher")
        return done if done and done.fingerprint == key else \
            self.finish("teacher", self.teacher, key, str(path), self.teacher_train)

    def load_teacher(self):
        """Load the checkpoint into the teacher: its digest checked (one made elsewhere may have none), its
        provenance compared with this config's teacher; the teacher is then identified by its weights."""
        tcfg, path, start = self.cfg.teacher, Path(self.cfg.teacher.checkpoint), time.perf_counter()
        ckpt = load(path, "delete it to train the teacher again, or point teacher.checkpoint elsewhere",
                    unsigned_ok=True)
        info(f"[teacher] loaded {path} ({path.stat().st_size / 2**20:.1f} MiB, its digest checked where it has one) "
             f"in {time.perf_counter() - start:.2f} s")
        try:
            self.teacher.load_state_dict(ckpt["model"])
        except (RuntimeError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError("teacher.checkpoint", f"{path} does not hold a '{tcfg.name}' for this data "
                              f"({(str(e).splitlines() or [type(e).__name__])[0]}); point it elsewhere or delete it "
                              "to retrain") from None
        changed = cards.mismatch(ckpt["card"], self.model_card("teacher", None)) if "card" in ckpt else []
        self.teacher_note = self.check_provenance(ckpt.get("identity"), self.teacher_identity(), path, changed)
        self.teacher_digest, self.teacher_train = content_digest(ckpt["model"]), ckpt.get("train", {})

    def check_provenance(self, recorded, identity, path, card_changes=()):
        """None when the checkpoint was made under this config (and its card, if any, expects this data's input and
        classes); what differs when teacher.accept_checkpoint takes it anyway; a one-line error otherwise."""
        if recorded == identity and not card_changes:
            return None
        if recorded is None:
            what = "records no provenance (the data and recipe that made it)"
        elif recorded != identity:
            what = "was made under another config (" + "; ".join(differences(recorded, identity)) + ")"
        else:
            what = "expects other input (" + "; ".join(card_changes) + ")"
        if not self.cfg.teacher.accept_checkpoint:
            raise ConfigError("teacher.checkpoint", f"{path} {what}; delete it or point teacher.checkpoint elsewhere "
                              "to train the teacher this config describes, or set teacher.accept_checkpoint: true "
                              "to use it as it is")
        info(f"[teacher] using {path} although it {what}, as teacher.accept_checkpoint says")
        return what

    def replays(self, stage):
        """Whether `stage` distills from the teacher cache: its logits, and the feature maps of `logits+features`;
        under `logits` a feature stage runs its teacher only as far as the layers it matches."""
        return stage.uses_teacher and self.cfg.cache.mode != "off"

    def student_job(self, stage, seed):
        """What makes a stage's student for one seed, and its Result if it finished under exactly that."""
        identity = canonical({
            "data": self.data_identity(), "student": to_dict(self.cfg.student, "results"),
            "train": to_dict(self.cfg.train, "results"), "stage": to_dict(stage, "results"),
            "seed": self.cfg.seed, "student_seed": seed,
            "teacher": self.teacher_digest if stage.uses_teacher else None,
            "cache": to_dict(self.cfg.cache, "results") if self.replays(stage) else None})
        key, name = fingerprint(identity), stage.name if self.cfg.seeds is None else f"{stage.name}/seed{seed}"
        return Job(stage, seed, name, identity, key, self.folder.reuse(name, key, identity))

    def train_student(self, job):
        """The job's stored Result, or its student trained now."""
        if job.done:
            info(f"[{job.name}] finished earlier; reusing {self.folder.model(job.name) / 'result.json'}")
            best = self.folder.load_best(job.name, job.key)
            if best.get("card") is None and self.main:  # written before checkpoints carried their card
                save({**best, "card": self.model_card(job.name, job.key)}, self.folder.best(job.name))
                info(f"[{job.name}] added its card to {self.folder.best(job.name)}")
            return job.done
        replay = self.replays(job.stage)
        distiller = self.new_distiller(job.stage, job.seed, self.teacher_cache() if replay else None)
        trained = self.fit(job.name, distiller, self.cfg.train, job.key, job.seed,
                           views=self.cfg.cache.views if replay else None,
                           card=self.model_card(job.name, job.key))
        return self.finish(job.name, distiller.student, job.key, f"{job.name}/{BEST}", trained, job.identity)

    def cache_plan(self, mode=None):
        """The teacher cache's settings (`mode` overrides cache.mode, for bench.py), folder and plan: it holds the
        teacher layers of every stage's feature pairs, so all students of the study share it."""
        c = dataclasses.replace(self.cfg.cache, mode=mode or self.cfg.cache.mode)
        layers = self.teacher_taps.keys if c.mode == "logits+features" else []
        with torch.no_grad():
            self.teacher.eval()(self.sample[0].to(self.device))
        shapes = {k: tuple(v.shape[1:]) for k, v in self.teacher_taps.take().items() if k in layers}
        # the students' batch size changes their training, not the images the teacher sees
        data = {k: v for k, v in self.data_identity("training").items() if k != "batch_size"}
        n = len(self.student_data.train)
        identity = {"data": data, "images": n, "teacher": self.teacher_digest, "seed": self.cfg.seed,
                    "amp": resolve_amp(self.cfg.train.amp, self.device)}
        return c, *TeacherCache.locate(c, identity, shapes, n, self.data.num_classes)

    def teacher_cache(self, mode=None):
        """Built (or found on disk and verified) once, at the first stage that replays it."""
        if self._cache is None:
            c, folder, plan = self.cache_plan(mode)
            loader = train_loader(self.student_data, self.cfg.data, self.device, self.cfg.seed, views=c.views,
                                  shuffle=False, batch_size=c.batch_size)
            self._cache = TeacherCache.open_or_build(folder, plan, self.teacher, self.teacher_taps, loader,
                                                     self.data.num_classes, self.device, self.cfg.train)
        return self._cache

    def model_card(self, name, key):
        """What `name` (the teacher or a stage's student) needs to be deployed alone: kd/deploy/card.py."""
        model_cfg = self.cfg.teacher if name == "teacher" else self.cfg.student
        return cards.make(model_cfg, self.data, {"study": self.cfg.name, "model": name, "fingerprint": key,
                                                "data": self.data.content})

    def fit(self, name, distiller, train_cfg, key, seed, views=None, card=None, profile=None, recipe=None):
        """Train (or resume) one model; leaves its best validation weights loaded and returns training facts.
        Batch order follows `seed`; augmentation always the study's seed, the one the teacher cache replays.
        `profile`: a file to profile the last epoch into (bench.py --profile). `recipe`: the config key of
        `train_cfg`, named by its errors (default: the teacher's for `name` "teacher", else the students')."""
        loaders = (train_loader(self.data.first(train_cfg.subset), self.cfg.data, self.device, seed, views=views,
                                aug_seed=self.cfg.seed, rank=self.rt.rank, world=self.rt.world),
                   eval_loaders(self.data, self.cfg.data, self.device)[0])
        trainer = Trainer(distiller.to(self.device), train_cfg, loaders, self.device, self.folder.model(name), seed,
                          key, name, self.clock, card, recipe or ("teacher.train" if name == "teacher" else "train"),
                          profile)
        if trainer.last_path.exists():
            if not self.resume:
                raise KDError(f"{trainer.last_path}: an unfinished run is there; pass --resume to continue it, "
                              "or delete that folder to start over")
            trainer.resume()
        best = trainer.fit()
        distiller.student.load_state_dict(self.folder.load_best(name, key)["model"])
        mean = lambda key: statistics.fmean(r[key] for r in trainer.history) if trainer.history else None
        methods = [m for m in (distiller.features, distiller.logit) if m is not None]
        return {"best_epoch": best["epoch"], "epochs": train_cfg.epochs,
                "train_images_per_s": mean("train_images_per_s"), "epoch_seconds": mean("epoch_seconds"),
                "method_params": sum(count_parameters(m) for m in methods),  # trained, saved, never deployed
                "method_state_bytes": sum(t.numel() * t.element_size()
                                          for m in methods for t in m.state_dict().values())}

    def finish(self, name, model, key, checkpoint, training, identity=None):
        """Validation and test accuracy, computed once per finished model and stored beside it as its Result: in
        fp32, as deployed, and in the memory layout every model's inference is measured in (profile_all), the
        students' (faster: README, What a study does)."""
        val_loader, test_loader = eval_loaders(self.data, self.cfg.data, self.device)
        layout = memory_format(self.cfg.train)
        with self.clock.part("evaluation"):
            val = accuracy(model.to(self.device), val_loader, self.device, memory_format=layout)
            test = accuracy(model, test_loader, self.device, memory_format=layout)
        result = Result(key, checkpoint, val["top1"], test["top1"], test["top5"], test["loss"], training, identity)
        if self.main:
            self.folder.store(name, result)
            info(f"[{name}] test top-1 {test['top1']:.4f}" + (f", top-5 {test['top5']:.4f}" if test["top5"] else ""))
        return result

    def profile_all(self, results):
        """Teacher and students measured in one process, one after another, on the same inputs and settings; with
        deploy.onnx, each also exported and measured in every CPU runtime (kd/deploy/runtimes.py)."""
        d = self.cfg.deploy
        deploy = deploy_module() if d.onnx else None
        calibration = plain_train_images(self.data, d.calibration_images) if d.onnx and d.int8 else None
        test = eval_loaders(self.data, self.cfg.data, deploy.CPU)[1] if d.onnx else None  # one loader for all
        rows = {}
        for name, summary in results.items():
            # Fresh, hook-free models with the weights a user would deploy: the teacher's checkpoint (loaded and
            # checked at the start), a stage's first seed's best.pt (checked again now).
            model = self.new_model(self.cfg.teacher if name == "teacher" else self.cfg.student, name)
            if name == "teacher":
                path, folder = Path(self.cfg.teacher.checkpoint), "teacher"
                model.load_state_dict(self.teacher.state_dict())
            else:
                path, folder = self.folder.root / summary["checkpoint"], Path(summary["checkpoint"]).parent.as_posix()
                model.load_state_dict(self.folder.load_best(folder, summary["fingerprint"])["model"])
            info(f"[{name}] measuring inference cost on {self.device}")
            cost = profile(model, self.image_shape, self.device, self.cfg.eval, memory_format(self.cfg.train))
            rows[name] = {**summary, **cost, "checkpoint_bytes": os.path.getsize(path)}
            if d.onnx:
                rows[name]["deploy"] = deploy.measure(name, model, self.model_card(folder, summary["fingerprint"]),
                                                      self.folder.model(folder), os.path.getsize(path), test,
                                                      calibration, self.cfg.eval)
        return rows
