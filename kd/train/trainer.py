"""One training loop for the teacher, the baseline and every distilled student, with exact resume."""
import contextlib
import csv
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from kd.device import Recipe, barrier, is_main
from kd.errors import ConfigError, KDError, first_line
from kd.log import Progress, info
from kd.measure.evaluate import accuracy
from kd.store import BEST, LAST, METRICS, atomic, load, save
from kd.train.profiler import profiled
from kd.train.step import TrainStep

SYNC_EVERY = 50


def make_optimizer(params, cfg, fused=False, capturable=False):
    """`capturable`: AdamW's step counts kept on the device, as a step captured in a CUDA graph needs."""
    fused = fused or None  # None: torch's default implementation
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused, capturable=capturable)


def make_scheduler(optimizer, cfg, steps_per_epoch):
    """Stepped every batch; linear warm-up then the named shape (one-cycle brings its own warm-up)."""
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        pct_start = cfg.warmup_epochs / cfg.epochs if cfg.warmup_epochs else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=max(total, 1),
                                                   pct_start=pct_start)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
        if cfg.schedule == "step":
            return cfg.gamma ** sum(step >= m * steps_per_epoch for m in cfg.milestones)
        return 1.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state(generator):
    """Every generator's state as tensors and plain values, so last.pt loads with weights_only: NumPy's MT19937
    keys go in as a tensor, not as the array its state tuple holds."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
             "gauss": float(gauss)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}
    if generator is not None:
        state["loader"] = generator.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if generator is not None:
        generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Run:
    """One model's training: its name in the study (and its folder), what makes it, and its seed."""
    name: str  # 'teacher', a stage, or a stage's 'seed<N>' folder: names it in the log and the report
    folder: Path  # holds metrics.csv, last.pt and best.pt
    fingerprint: str  # what makes the model (kd/store.py): a last.pt made under another is never resumed
    seed: int  # batch order and the initial state of the methods' randomness
    card: dict | None = None  # what deploying the model needs (kd/deploy/card.py), saved in best.pt
    profile: Path | None = None  # a file: the last epoch is profiled into it (kd/train/profiler.py)


class Trainer:
    """Trains `distiller.learnable()` on `recipe`; writes `metrics.csv` every epoch, and `last.pt` (everything needed
    to resume) with `best.pt` (student weights of the best validation epoch, with the model's card) at every
    checkpoint (`cfg.checkpoint_seconds`), all in the run's folder."""

    def __init__(self, distiller, recipe: Recipe, loaders, run: Run, clock):
        self.distiller, self.recipe, self.run, self.cfg, self.device = distiller, recipe, run, recipe.cfg, \
            recipe.device
        self.name = run.name
        self.clock = clock  # the study's (kd/log.py): epochs, validation and checkpoints timed as parts of its phase
        self.main = is_main()  # the one process that writes files
        self.model = distiller
        if dist.is_initialized():  # gradients of the student and the methods' modules are averaged across processes
            self.model = DistributedDataParallel(distiller, device_ids=[self.device.index]
                                                 if self.device.type == "cuda" else None)
        if recipe.compile != "off":  # forward, loss and backward as compiled graphs; the optimizer step stays eager
            self.model = torch.compile(self.model, mode=None if recipe.compile == "default" else recipe.compile)
        self.train_loader, self.val_loader = loaders
        self.out_dir, self.fingerprint = Path(run.folder), run.fingerprint
        self.generator = self.train_loader.generator  # the loader's RNG state, if any, for exact resume
        self.learnable = distiller.learnable()
        self.optimizer = make_optimizer([p for p in self.learnable.parameters() if p.requires_grad], self.cfg,
                                        recipe.fused, capturable=recipe.graph)
        self.scheduler = make_scheduler(self.optimizer, self.cfg, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=recipe.amp == "fp16")
        self.step = TrainStep(self.model, self.optimizer, self.scaler, recipe, run.name)
        self.epoch, self.best, self.history = 0, {"val_top1": -1.0, "epoch": 0}, []
        self.best_state = None  # the best epoch's weights until a checkpoint writes them to best.pt
        self.saved_at = time.perf_counter()  # the last checkpoint, or the start
        seed_everything(run.seed)

    @property
    def last_path(self):
        return self.out_dir / LAST

    def state(self):
        """Everything needed to resume. Learning rates are saved as numbers, also where a CUDA graph holds them in
        device tensors (kd/train/step.py), so a run resumes with or without the graph, on any device."""
        optimizer, scheduler = self.optimizer.state_dict(), self.scheduler.state_dict()
        for group in optimizer["param_groups"]:
            group["lr"] = float(group["lr"])
        scheduler["_last_lr"] = [float(lr) for lr in scheduler["_last_lr"]]
        return {"fingerprint": self.fingerprint, "epoch": self.epoch, "best": self.best, "history": self.history,
                "learnable": self.learnable.state_dict(), "optimizer": optimizer, "scheduler": scheduler,
                "scaler": self.scaler.state_dict(), "rng": rng_state(self.generator)}

    def resume(self):
        ckpt = load(self.last_path, f"delete {self.out_dir} to train {self.name} from its start")
        if ckpt["fingerprint"] != self.fingerprint:
            raise KDError(f"{self.last_path}: this unfinished stage was started with a different config; "
                          "delete it or restore the config to resume")
        self.learnable.load_state_dict(ckpt["learnable"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], self.generator)
        self.epoch, self.best, self.history = ckpt["epoch"], ckpt["best"], ckpt["history"]
        info(f"[{self.name}] resuming after epoch {self.epoch} of {self.cfg.epochs}")

    def fit(self):
        """Train the remaining epochs; return the best validation result and the mean training throughput."""
        if self.epoch == 0 and self.cfg.epochs == 0:
            self.keep_best(self.validate()["top1"])
            with self.clock.part("checkpoints"):
                self.write_best()
        while self.epoch < self.cfg.epochs:
            with self.clock.part("epochs"), profiled(self.run.profile, self.device, len(self.train_loader)) \
                    if self.run.profile and self.epoch == self.cfg.epochs - 1 else contextlib.nullcontext():
                train = self.train_epoch()
            val = self.validate()
            self.epoch += 1
            if val["top1"] > self.best["val_top1"]:
                self.keep_best(val["top1"])
            self.log({"epoch": self.epoch, "lr": float(self.optimizer.param_groups[0]["lr"]), **train,
                      **{f"val_{k}": v for k, v in val.items()}})
            if self.epoch == self.cfg.epochs or time.perf_counter() - self.saved_at >= self.cfg.checkpoint_seconds:
                self.checkpoint()
        barrier()  # every process reads best.pt next
        return self.best

    def facts(self):
        """What the training of this model records in its Result: its best epoch and mean throughput, the size of
        the methods' own modules (connectors, heads, memory banks), trained and saved with it, never deployed, and
        its curve (per epoch: training loss, validation top-1), which the pictures draw: covered by the result's
        digest, unlike metrics.csv, which is for reading."""
        mean = lambda key: statistics.fmean(r[key] for r in self.history) if self.history else None
        methods = [m for m in (self.distiller.features, self.distiller.logit) if m is not None]
        curve = {key: [row[key] for row in self.history] for key in ("epoch", "train_loss", "val_top1")}
        return {"best_epoch": self.best["epoch"], "epochs": self.cfg.epochs, "curve": curve,
                "train_images_per_s": mean("train_images_per_s"), "epoch_seconds": mean("epoch_seconds"),
                "method_params": sum(p.numel() for m in methods for p in m.parameters()),
                "method_state_bytes": sum(t.numel() * t.element_size()
                                          for m in methods for t in m.state_dict().values())}

    def keep_best(self, val_top1):
        """Note the current epoch as the best so far, and copy its weights (on their device) for best.pt."""
        self.best = {"val_top1": val_top1, "epoch": self.epoch}
        if self.main:
            self.best_state = {k: v.detach().clone() for k, v in self.distiller.student.state_dict().items()}

    def write_best(self):
        if self.best_state is not None:
            save({"model": self.best_state, "fingerprint": self.fingerprint, "card": self.run.card},
                 self.out_dir / BEST)
            self.best_state = None

    def checkpoint(self):
        """best.pt (if a better epoch came since it was written), then last.pt, which records that epoch as the
        best: a run resumes from a pair that agree, having lost at most the epochs since."""
        if self.main:
            with self.clock.part("checkpoints"):
                self.write_best()
                save(self.state(), self.last_path)
        self.saved_at = time.perf_counter()

    def train_epoch(self):
        """One pass over the training split. The step's running sums stay on the device and are read (a GPU
        sync) only every `SYNC_EVERY` steps, for the progress bar and the finite-loss check."""
        self.distiller.train()
        self.train_loader.set_epoch(self.epoch)  # order, augmentation view and shard are functions of the epoch
        self.step.reset()
        seen, start = 0, time.perf_counter()
        bar = Progress(self.train_loader, f"[{self.name}] epoch {self.epoch + 1}/{self.cfg.epochs}")
        for i, batch in enumerate(bar, 1):
            with self.compiler_errors():
                progress = self.epoch + (i - 1) / len(self.train_loader)
                self.step(batch.to(self.device, self.recipe.memory_format), progress)
            self.scheduler.step()
            seen += len(batch.labels)  # known on the host: counted there, as a tensor it would cost a sync
            if i % SYNC_EVERY == 0 or i == len(self.train_loader):
                correct, total_loss = self.step.sums[[0, 1 + self.step.terms.index("loss")]].tolist()
                if not math.isfinite(total_loss):
                    raise KDError(f"[{self.name}] the loss became {total_loss / seen} in epoch {self.epoch + 1}; "
                                  "lower the learning rate or set train.grad_clip")
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
        sums = torch.cat([self.step.sums.new_tensor([seen]), self.step.sums])
        if dist.is_initialized():
            dist.all_reduce(sums)
        elapsed = time.perf_counter() - start
        seen, correct, *totals = sums.tolist()
        return {**{f"train_{k}": v / seen for k, v in zip(self.step.terms, totals)}, "train_top1": correct / seen,
                "train_images_per_s": seen / elapsed, "epoch_seconds": elapsed}

    @contextlib.contextmanager
    def compiler_errors(self):
        """A failure of torch.compile (no C++ compiler, an operator it cannot lower) as one line naming the key."""
        try:
            yield
        except torch._dynamo.exc.TorchDynamoException as e:
            raise ConfigError(f"{self.recipe.key}.compile", f"torch.compile (mode '{self.recipe.compile}') failed in "
                              f"{self.name}: {first_line(e)}; set it to off") from None

    def validate(self):
        """The student's validation figures, the same on every rank. Under torchrun each rank's student has the
        same parameters but its own batch-norm statistics: DistributedDataParallel sends rank 0's buffers before each
        forward, and each rank's last forward then updated its own. Rank 0's, whose weights best.pt keeps, are sent
        first, so every rank's share is evaluated with the weights of that checkpoint."""
        with self.clock.part("validation"):
            if dist.is_initialized():
                for buffer in self.distiller.student.buffers():
                    dist.broadcast(buffer, 0)
            result = accuracy(self.distiller.student, self.val_loader, self.device, self.recipe.amp,
                              self.recipe.memory_format)
        self.distiller.student_taps.take()  # drop what validation recorded: a compiled step guards on the taps
        return result

    def log(self, row):
        """Rewrite the CSV from the checkpointed history, so a resumed run never repeats or loses a row."""
        self.history.append(row)
        if not self.main:
            return
        with atomic(self.out_dir / METRICS) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in self.history)
        info(f"[{self.name}] epoch {self.epoch}/{self.cfg.epochs} loss {row['train_loss']:.4f} "
              f"train {row['train_top1']:.4f} val {row['val_top1']:.4f} ({row['train_images_per_s']:.0f} img/s)")
