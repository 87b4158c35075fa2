"""What a run prints: one process speaks (rank 0 under torchrun), and progress shows in a terminal and in a log."""
import contextlib
import sys
import time

from tqdm import tqdm

from kd.device import is_main


def info(message):
    if is_main():
        print(message, flush=True)


class Progress:
    """A tqdm bar on a terminal. Where output goes to a file (a log, CI), where a bar draws nothing, one line
    every `every` seconds instead, so an epoch of many minutes still shows that it moves and how fast."""

    def __init__(self, iterable, desc, every=30.0):
        self.iterable, self.desc, self.every = iterable, desc, every
        self.terminal = sys.stderr.isatty()
        self.bar = tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=not is_main()) \
            if self.terminal else None
        self.postfix, self.step, self.last = {}, 0, time.perf_counter()

    def __iter__(self):
        if self.bar is not None:
            yield from self.bar
            return
        total = len(self.iterable) if hasattr(self.iterable, "__len__") else "?"
        start = time.perf_counter()
        for item in self.iterable:
            yield item
            self.step += 1
            now = time.perf_counter()
            if now - self.last >= self.every:
                self.last = now
                info(f"{self.desc}: {self.step}/{total} in {now - start:.0f} s ({self.step / (now - start):.2f} it/s) "
                     + " ".join(f"{k}={v}" for k, v in self.postfix.items()))

    def set_postfix(self, **values):
        if self.bar is not None:
            self.bar.set_postfix(**values)
        self.postfix = values


class Clock:
    """Wall seconds by phase of a run and, within a phase, by part (training epochs, validation, checkpoints,
    evaluation): where the time goes that is not training, the larger share once a GPU trains fast. Parts end at
    a host sync (the epoch's and validation's sums are read), so they include the GPU's work."""

    def __init__(self):
        self.phases, self.parts, self.current = {}, {}, None

    @contextlib.contextmanager
    def phase(self, name):
        outer, self.current, start = self.current, name, time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start
            self.current = outer

    @contextlib.contextmanager
    def part(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.current is not None:
                within = self.parts.setdefault(self.current, {})
                within[name] = within.get(name, 0.0) + time.perf_counter() - start


def describe_time(phases, parts):
    """'data 1.2 s, stage kd 11.0 s (epochs 9.1, validation 0.8, ..., other 0.4), ...': a phase's parts, and what
    none of them covered (building models, loading weights)."""
    def one(name, seconds):
        within = parts.get(name, {})
        if not within:
            return f"{name} {seconds:.1f} s"
        split = {**within, "other": seconds - sum(within.values())}
        return f"{name} {seconds:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in split.items()) + ")"
    return ", ".join(one(name, seconds) for name, seconds in phases.items())
