"""One training step (forward, every loss term, backward, optimizer step, running sums), run eagerly or captured
whole in one CUDA graph and replayed. On a GPU a small student's step is bound by the host issuing its kernels,
and torch.compile's CUDA graphs leave the optimizer, the autograd engine and the statistics outside (docs/gpu.md):
a replay issues the whole step in one call."""
import contextlib

import torch

from kd.data.tensors import Batch
from kd.device import autocast
from kd.errors import ConfigError, first_line
from kd.log import info

WARMUP = 3  # eager steps before capture: cuDNN's autotuning, lazy initialisation and the optimizer's state


class TrainStep:
    """`step(batch, progress)` trains on one Batch. Its running sums (correct predictions, then each loss term
    times the batch size, in `terms` order) accumulate on the device in `sums` until `reset()`; reading them is
    the only host sync. With `graph`, the first `WARMUP` steps run eagerly on a side stream, the next is captured
    and every later full batch replays it: the batch is copied into the graph's own tensors, training progress
    and the learning rate are device tensors filled in place, and anything a method keeps between steps must live
    in tensors."""

    def __init__(self, model, optimizer, scaler, recipe, name):
        self.model, self.optimizer, self.scaler, self.recipe, self.name = model, optimizer, scaler, recipe, name
        self.cfg, self.device = recipe.cfg, recipe.device
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.progress = torch.zeros((), device=self.device)  # fractional epoch, a tensor so a replay sees each value
        self.sums, self.terms, self.steps = None, None, 0
        self.captured, self.static = None, None
        self.stream = torch.cuda.Stream(self.device) if recipe.graph else None  # set while the step is (to be) a graph

    def reset(self):
        if self.sums is not None:
            self.sums.zero_()

    def __call__(self, batch, progress):
        self.progress.fill_(progress)
        if self.stream is not None and self.captured is None and self.steps >= WARMUP:
            self.capture(batch)
        if self.captured is not None and batch.images.shape == self.static.images.shape:
            for static, new in zip(self.static, batch):
                if static is not None:
                    static.copy_(new, non_blocking=True)
            self.captured.replay()
        else:  # eager: warm-up, a last smaller batch, or no graph
            with self.side_stream():
                self.run(batch)
        self.steps += 1

    @contextlib.contextmanager
    def side_stream(self):
        """Eager steps of a graphed trainer run on a side stream, as CUDA graph capture requires of warm-up."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def run(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.recipe.amp, cache=self.stream is None):
            logits, terms = self.model(batch, self.progress)
        self.scaler.scale(terms["loss"]).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        n = len(batch.labels)
        counts = torch.stack([(logits.argmax(1) == batch.labels).sum().float(),
                              *(v.detach().float() * n for v in terms.values())])
        if self.sums is None:
            self.sums, self.terms = torch.zeros_like(counts), list(terms)
        self.sums.add_(counts)

    def capture(self, batch):
        """Record one step on copies of `batch` (recording runs nothing: the replay that follows trains on it).
        The learning rate becomes a tensor on the device, which the scheduler fills in place every step. A step
        that cannot be captured (a method that reads a value on the host, a cache on the CPU) fails with one
        line under `graph: on`; under `auto` training goes on eagerly."""
        for group in self.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=self.device)
        self.static = Batch(*(None if t is None else t.clone() for t in batch))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.run(self.static)
        except RuntimeError as e:
            if self.cfg.graph == "on":
                raise ConfigError(f"{self.recipe.key}.graph", f"the training step of {self.name} cannot be captured in "
                                  f"a CUDA graph: {first_line(e)}; set it to off") from None
            info(f"[graph] {self.name}: the step cannot be captured in a CUDA graph ({first_line(e)}); "
                 "training eagerly")
            for group in self.optimizer.param_groups:
                group["lr"] = float(group["lr"])
            self.stream = None
            return
        self.captured = graph
