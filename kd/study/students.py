"""The students: every stage for every seed, each a Job trained now, resumed, or reused from an earlier run,
all distilling from one teacher and sharing one teacher cache."""
from pathlib import Path
from typing import NamedTuple

import torch

from kd.config import StageConfig, to_dict
from kd.data.cache import FORMAT as CACHE_FORMAT
from kd.data.cache import TeacherCache
from kd.data.datasets import train_loader
from kd.log import info
from kd.store import BEST, Result, canonical, fingerprint, save, writable_folder
from kd.train.distiller import Distiller
from kd.train.preflight import dry_step
from kd.train.trainer import Run


class Job(NamedTuple):
    """One student to train or reuse: a stage for one seed, its folder name, what makes it and its stored Result."""
    stage: StageConfig
    seed: int
    name: str
    identity: dict
    fingerprint: str
    done: Result | None


class Students:
    def __init__(self, setting, teacher):
        self.setting, self.teacher, self.cfg = setting, teacher, setting.cfg
        self._cache = None

    def check(self):
        """Before any long work: every stage for every seed takes one real training step on the training device,
        and a teacher cache still to build fits on its disk."""
        for i, stage in enumerate(self.cfg.stages):
            for seed in self.cfg.student_seeds:
                dry_step(self.distiller(stage, seed), self.setting.sample, self.setting.runtime.student,
                         f"stages[{i}]")
        if any(self.replays(stage) for stage in self.cfg.stages):
            writable_folder(self.cfg.cache.dir, "cache.dir")
            TeacherCache.ensure_room(self.cache_plan())

    def distiller(self, stage, seed, cache=None):
        """A fresh student of `seed` with the stage's methods, distilling from the teacher (or its `cache`)."""
        s = self.setting
        student = s.new_model(self.cfg.student, "student", seed).to(s.device)
        return Distiller.build(stage, student, self.teacher.model, s.sample[0], self.cfg.train.label_smoothing,
                               f"stages[{self.cfg.stages.index(stage)}]", num_samples=len(s.student_data.train),
                               cache=cache, teacher_taps=self.teacher.taps)

    def replays(self, stage):
        """Whether `stage` distills from the teacher cache: its logits, and the feature maps of `logits+features`;
        under `logits` a feature stage runs its teacher only as far as the layers it matches."""
        return stage.uses_teacher and self.cfg.cache.mode != "off"

    def jobs(self):
        return [self.job(stage, seed) for stage in self.cfg.stages for seed in self.cfg.student_seeds]

    def job(self, stage, seed):
        """What makes a stage's student for one seed, and its Result if it finished under exactly that."""
        identity = canonical({
            "data": self.setting.data_identity(), "student": to_dict(self.cfg.student, "results"),
            # the precision that trains it, not the request: `amp: auto` is bf16 on one machine and fp32 on another
            "train": {**to_dict(self.cfg.train, "results"), "amp": self.setting.runtime.student.precision},
            "stage": to_dict(stage, "results"),
            "seed": self.cfg.seed, "student_seed": seed,
            "teacher": self.teacher.digest if stage.uses_teacher else None,
            "cache": {"format": CACHE_FORMAT, **to_dict(self.cfg.cache, "results")} if self.replays(stage) else None})
        made, name = fingerprint(identity), self.folder_name(stage, seed)
        return Job(stage, seed, name, identity, made, self.setting.folder.reuse(name, made, identity))

    def folder_name(self, stage, seed):
        """The student's folder in the run folder: the stage's name, and a folder per seed when there are seeds."""
        return stage.name if self.cfg.seeds is None else f"{stage.name}/seed{seed}"

    def folder_names(self):
        return [self.folder_name(stage, seed) for stage in self.cfg.stages for seed in self.cfg.student_seeds]

    def run(self):
        """{stage name: [its seeds' Results]}, each job trained or reused in turn."""
        jobs, clock = self.jobs(), self.setting.clock
        if any(job.done is None and self.replays(job.stage) for job in jobs):
            with clock.phase("cache"):
                self.cache()  # before any student trains: a cache that cannot be built stops the run here
        results = {}
        for stage in self.cfg.stages:
            with clock.phase(f"stage {stage.name}"):
                results[stage.name] = [self.train(job) for job in jobs if job.stage is stage]
        return results

    def train(self, job):
        """The job's stored Result, or its student trained now."""
        s = self.setting
        if job.done:
            info(f"[{job.name}] finished earlier; reusing {s.folder.model(job.name) / 'result.json'}")
            best = s.folder.load_best(job.name, job.fingerprint)
            if best.get("card") is None and s.main:  # written before checkpoints carried their card
                save({**best, "card": self.card(job.name, job.fingerprint)}, s.folder.best(job.name))
                info(f"[{job.name}] added its card to {s.folder.best(job.name)}")
            return job.done
        replay = self.replays(job.stage)
        distiller = self.distiller(job.stage, job.seed, self.cache() if replay else None)
        run = Run(job.name, s.folder.model(job.name), job.fingerprint, job.seed, self.card(job.name, job.fingerprint))
        trained = s.train(distiller, s.runtime.student, run, views=self.cfg.cache.views if replay else None)
        return s.evaluate(job.name, distiller.student, job.fingerprint, f"{job.name}/{BEST}", trained, job.identity)

    def deployable(self, row):
        """A stage's fresh, hook-free student with its first seed's best.pt (checked again now), that file, its folder
        in the run and its card."""
        s, folder = self.setting, Path(row["checkpoint"]).parent.as_posix()
        model = s.new_model(self.cfg.student, folder)
        model.load_state_dict(s.folder.load_best(folder, row["fingerprint"])["model"])
        return model, s.folder.root / row["checkpoint"], folder, self.card(folder, row["fingerprint"])

    def card(self, name, fingerprint):
        return self.setting.card(self.cfg.student, name, fingerprint)

    def cache_plan(self):
        """The teacher cache's CachePlan (kd/data/cache.py): it holds the teacher layers of every stage's feature
        pairs, so all students of the study share it."""
        s, c = self.setting, self.cfg.cache
        layers = self.teacher.taps.keys if c.mode == "logits+features" else []
        with torch.no_grad():
            self.teacher.model.eval()(s.sample[0].to(s.device))
        shapes = {k: tuple(v.shape[1:]) for k, v in self.teacher.taps.take().items() if k in layers}
        # the students' batch size changes their training, not the images the teacher sees
        data = {k: v for k, v in s.data_identity("training").items() if k != "batch_size"}
        n = len(s.student_data.train)
        identity = {"data": data, "images": n, "teacher": self.teacher.digest, "seed": self.cfg.seed,
                    "amp": s.runtime.student.amp}
        return TeacherCache.locate(c, identity, shapes, n, s.data.num_classes)

    def cache(self):
        """Built (or found on disk and verified) once, at the first stage that replays it."""
        if self._cache is None:
            s = self.setting
            c = self.cfg.cache
            loader = train_loader(s.student_data, self.cfg.data, s.device, self.cfg.seed, views=c.views,
                                  shuffle=False, batch_size=c.batch_size)
            self._cache = TeacherCache.open_or_build(self.cache_plan(), self.teacher.model, self.teacher.taps, loader,
                                                     s.data.num_classes, s.runtime.student)
        return self._cache
