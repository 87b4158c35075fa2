"""What the teacher, the students and the measurements of a study share: the config, the runtime decided at
start-up, the data, the run folder and the clock; and the one way a model is built, trained and evaluated."""
import dataclasses
from pathlib import Path

from kd.config import to_dict, validate_runtime
from kd.data.datasets import build_data, eval_loaders, sample_batch, train_loader
from kd.deploy import card as cards
from kd.device import barrier, free_memory, setup
from kd.errors import KDError
from kd.log import Clock, info
from kd.measure.evaluate import accuracy
from kd.store import Result, RunFolder, canonical
from kd.train.models import create_model
from kd.train.trainer import Run, Trainer, seed_everything


class Setting:
    def __init__(self, cfg, resume=False, profile=False):
        """`resume`: continue unfinished models from their last.pt. `profile`: profile each model's last training
        epoch into profile.txt in its folder (kd/train/profiler.py)."""
        self.cfg, self.resume, self.profile = cfg, resume, profile
        self.runtime = setup(cfg)
        for line in self.runtime.decisions():
            info(line)
        self.device, self.main = self.runtime.device, self.runtime.main
        self.clock = Clock()  # wall time per phase of the run (and part of a phase), printed at its end
        if not self.main:
            barrier()  # rank 0 downloads or unpacks the data first
        with self.clock.phase("data"):
            self.data = build_data(cfg.data, self.device, distributed=self.runtime.world > 1, cache=Path(cfg.cache.dir))
        if self.main:
            barrier()
        validate_runtime(cfg, self.device, self.runtime.world, self.data, free_memory(self.device))
        self.student_data = self.data.first(cfg.train.subset)  # what every student (and the teacher cache) sees
        self.folder = RunFolder(cfg.run_dir)
        self.sample = sample_batch(self.data)  # (images, labels) on the CPU, for dry passes
        self.image_shape = tuple(self.sample[0].shape[1:])

    def new_model(self, model_cfg, config_key, seed=None):
        """Seeded per model: a stage's initial weights (and its methods' modules, built next) do not depend on
        how many models were built before it, and every student of one seed starts from the same weights."""
        seed_everything(self.cfg.seed if seed is None else seed)
        return create_model(model_cfg.name, config_key, model_cfg.kwargs, self.data.in_channels,
                            self.data.num_classes, self.data.image_size)

    def card(self, model_cfg, name, fingerprint):
        """What the model `name` needs to be deployed alone (kd/deploy/card.py)."""
        return cards.make(model_cfg, self.data, {"study": self.cfg.name, "model": name, "fingerprint": fingerprint,
                                                "data": self.data.content})

    def data_identity(self, scope="results"):
        """What the models learn from (and, in scope "results", are tested on): the data settings of `scope`, the
        pipeline used, and the images' content."""
        return canonical({**to_dict(self.cfg.data, scope), "pipeline": self.data.pipeline,
                          "content": self.data.content})

    def train(self, distiller, recipe, run: Run, views=None):
        """Train (or resume) one model on `recipe` (a kd/device.py Recipe); leaves its best validation weights
        loaded and returns the facts of its training. Batch order follows the run's seed; augmentation always the
        study's seed, the one the teacher cache replays (`views` of it)."""
        if self.profile:
            run = dataclasses.replace(run, profile=Path(run.folder) / "profile.txt")
        loaders = (train_loader(self.data.first(recipe.cfg.subset), self.cfg.data, self.device, run.seed,
                                views=views, aug_seed=self.cfg.seed, rank=self.runtime.rank,
                                world=self.runtime.world),
                   eval_loaders(self.data, self.cfg.data, self.device)[0])
        trainer = Trainer(distiller.to(self.device), recipe, loaders, run, self.clock)
        if trainer.last_path.exists():
            if not self.resume:
                raise KDError(f"{trainer.last_path}: an unfinished run is there; pass --resume to continue it, "
                              "or delete that folder to start over")
            trainer.resume()
        trainer.fit()
        distiller.student.load_state_dict(self.folder.load_best(run.name, run.fingerprint)["model"])
        return trainer.facts()

    def evaluate(self, name, model, fingerprint, checkpoint, training, identity=None):
        """Validation and test accuracy, computed once per finished model and stored beside it as its Result: in
        fp32, as deployed, and in the memory layout every model's inference is measured in, the students'."""
        val_loader, test_loader = eval_loaders(self.data, self.cfg.data, self.device)
        layout = self.runtime.student.memory_format
        with self.clock.part("evaluation"):
            val = accuracy(model.to(self.device), val_loader, self.device, memory_format=layout)
            test = accuracy(model, test_loader, self.device, memory_format=layout)
        result = Result(fingerprint, checkpoint, val["top1"], test["top1"], test["top5"], test["loss"], training,
                        identity)
        if self.main:
            self.folder.store(name, result)
            info(f"[{name}] test top-1 {test['top1']:.4f}" + (f", top-5 {test['top5']:.4f}" if test["top5"] else ""))
        return result
