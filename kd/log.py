"""What a run prints: one process speaks (rank 0 under torchrun), and progress shows in a terminal and in a log."""
import sys
import time

from tqdm import tqdm

from .device import is_main


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
