"""The study's teacher: the one place that knows its checkpoint, whether it is there, and where its weights came
from (that checkpoint, verified; or trained now, from teacher.weights or from scratch, and saved there)."""
import time
from pathlib import Path

from kd.config import to_dict
from kd.deploy import card as cards
from kd.device import barrier
from kd.errors import ConfigError, first_line
from kd.log import info
from kd.store import LAST, canonical, content_digest, differences, fingerprint, load, save, writable_folder
from kd.train.distiller import Distiller, Taps, feature_layers
from kd.train.models import load_weights
from kd.train.preflight import dry_step
from kd.train.trainer import Run

# The way out when the checkpoint cannot be used. Never 'delete it': the file may be anyone's (a download, a
# colleague's teacher, a file named by mistake), and the project only removes what it wrote.
RETRAIN = "point teacher.checkpoint at a new path to train the teacher this config describes there"


class Teacher:
    def __init__(self, setting):
        self.setting, self.cfg = setting, setting.cfg.teacher
        self.path = Path(self.cfg.checkpoint)
        self.stored = self.path.exists()  # decided once: load it, or train and save the teacher there
        self.model = setting.new_model(self.cfg, "teacher").to(setting.device)
        # every stage's teacher layers, recorded without their graph (the teacher is trained with them in place)
        self.taps = Taps(self.model, feature_layers(setting.cfg.stages, "teacher"), detach=True)
        self.note = None  # what differs, when teacher.accept_checkpoint let a mismatching checkpoint in
        self.digest = None  # its weights' digest, once loaded or trained: its identity however it was saved
        self.training = {}  # the facts of its training, as its checkpoint records them

    def check(self):
        """Before any long work: a checkpoint there is loaded now, so a damaged or foreign one stops the run at
        once; a teacher to train has somewhere to go, something to start from, and takes one training step."""
        if self.stored:
            if not self.path.is_file():
                raise ConfigError("teacher.checkpoint", f"{self.path} is not a file")
            self.load()
            return
        writable_folder(self.path.parent, "teacher.checkpoint")
        uses_teacher = any(s.uses_teacher for s in self.setting.cfg.stages)
        if not self.cfg.weights and self.cfg.train.epochs == 0 and uses_teacher:
            raise ConfigError("teacher.train.epochs", f"0, with no checkpoint at {self.path} and no "
                              "teacher.weights, leaves the teacher at its random initialisation: the students "
                              "would distil from noise; give it epochs, weights or a checkpoint")
        dry_step(self.distiller(), self.setting.sample, self.setting.runtime.teacher, "teacher", student_key="teacher")

    def distiller(self):
        """The teacher trained on labels alone."""
        return Distiller(self.model, label_smoothing=self.cfg.train.label_smoothing)

    def identity(self):
        """What makes the teacher: the data it learns from, its model, starting weights and recipe, the seed."""
        return canonical({"data": self.setting.data_identity("training"), "teacher": to_dict(self.cfg, "training"),
                          "seed": self.setting.cfg.seed})

    def obtain(self):
        """The teacher's Result: its checkpoint loaded (by `check`, or now), or the teacher trained and saved
        there for later studies; its test accuracy measured once per checkpoint and data."""
        s = self.setting
        if not self.stored:
            self.train()
        elif self.digest is None:
            self.load()
        measured = fingerprint(s.data_identity(), self.digest)  # these weights on this data
        done = s.folder.result("teacher")
        result = done if done and done.fingerprint == measured else \
            s.evaluate("teacher", self.model, measured, str(self.path), self.training)
        self.model.requires_grad_(False)
        return result

    def train(self):
        s = self.setting
        if self.cfg.weights:
            fresh = load_weights(self.model, self.cfg.name, self.cfg.weights, "teacher.weights")
            info(f"[teacher] initialised from {self.cfg.weights}" + (f"; new: {', '.join(fresh)}" if fresh else ""))
            if fresh and self.cfg.train.epochs == 0:
                raise ConfigError("teacher.train.epochs", f"0 leaves tensors that {self.cfg.weights} does not fit "
                                  f"untrained ({', '.join(fresh)}): the students would learn from an untrained "
                                  "classifier; set teacher.train.epochs to fine-tune them")
        identity = self.identity()
        made = fingerprint(identity)
        run = Run("teacher", s.folder.model("teacher"), made, s.cfg.seed, self.card(made))
        self.training = s.train(self.distiller(), s.runtime.teacher, run)
        weights = self.model.state_dict()
        if s.main:
            save({"model": weights, "name": self.cfg.name, "train": self.training, "identity": identity,
                  "card": run.card}, self.path)
            (s.folder.model("teacher") / LAST).unlink(missing_ok=True)  # later runs use the checkpoint
            info(f"[teacher] saved {self.path}")
        barrier()
        self.digest = content_digest(weights)

    def load(self):
        """Load the checkpoint into the teacher: its digest checked (one made elsewhere may have none), its
        provenance compared with this config's teacher; the teacher is then identified by its weights."""
        start = time.perf_counter()
        ckpt = load(self.path, RETRAIN, unsigned_ok=True)
        info(f"[teacher] loaded {self.path} ({self.path.stat().st_size / 2**20:.1f} MiB, its digest checked where "
             f"it has one) in {time.perf_counter() - start:.2f} s")
        try:
            self.model.load_state_dict(ckpt["model"])
        except (RuntimeError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError("teacher.checkpoint", f"{self.path} does not hold a '{self.cfg.name}' for this data "
                              f"({first_line(e)}); {RETRAIN}") from None
        changed = cards.mismatch(ckpt["card"], self.card(None)) if "card" in ckpt else []
        self.note = self.provenance(ckpt.get("identity"), changed)
        self.digest, self.training = content_digest(ckpt["model"]), ckpt.get("train", {})

    def provenance(self, recorded, card_changes=()):
        """None when the checkpoint was made under this config (and its card, if any, expects this data's input and
        classes); what differs when teacher.accept_checkpoint takes it anyway; a one-line error otherwise."""
        identity = self.identity()
        if recorded == identity and not card_changes:
            return None
        if recorded is None:
            what = "records no provenance (the data and recipe that made it)"
        elif recorded != identity:
            what = "was made under another config (" + "; ".join(differences(recorded, identity)) + ")"
        else:
            what = "expects other input (" + "; ".join(card_changes) + ")"
        if not self.cfg.accept_checkpoint:
            raise ConfigError("teacher.checkpoint", f"{self.path} {what}; {RETRAIN}, or set "
                              "teacher.accept_checkpoint: true to use it as it is")
        info(f"[teacher] using {self.path} although it {what}, as teacher.accept_checkpoint says")
        return what

    def deployable(self, row):
        """A fresh, hook-free teacher with its weights, its checkpoint, its folder in the run and its card."""
        model = self.setting.new_model(self.cfg, "teacher")
        model.load_state_dict(self.model.state_dict())
        return model, self.path, "teacher", self.card(row["fingerprint"])

    def card(self, fingerprint):
        return self.setting.card(self.cfg, "teacher", fingerprint)
