"""Where a training step's time goes: torch.profiler over one epoch, its busiest operators written to a file."""
import contextlib
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

ROWS = 25


@contextlib.contextmanager
def profiled(path, device, steps):
    """Profile what runs inside (`steps` training steps) on the host and, on a GPU, the device; write to `path` a
    header line (wall, and device-busy, milliseconds per step) and the operators that cost most on each."""
    cuda = device.type == "cuda"
    with torch.profiler.profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as p:
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    ops = p.key_averages()
    header = f"{steps} steps in {wall:.2f} s: {1000 * wall / steps:.2f} ms per step on the wall clock"
    tables = [f"host (self CPU time):\n{ops.table(sort_by='self_cpu_time_total', row_limit=ROWS)}"]
    if cuda:
        busy = sum(op.self_device_time_total for op in ops if op.device_type.name == "CUDA") / 1000  # us -> ms
        header += f", the GPU busy {busy / steps:.2f} ms of them"
        tables.append(f"device (self CUDA time):\n{ops.table(sort_by='self_device_time_total', row_limit=ROWS)}")
    Path(path).write_text("\n\n".join([header, *tables]) + "\n")
