"""Device choice, torchrun processes and mixed precision, shared by training and evaluation."""
import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kd.errors import ConfigError


def init_distributed(device):
    """Join the process group torchrun describes in the environment (NCCL for GPUs, gloo for CPUs, whatever the
    machine has); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def is_main():
    """The process that writes files and prints: rank 0 under torchrun, the only one otherwise."""
    return not dist.is_initialized() or dist.get_rank() == 0


def resolve_device(name):
    """Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"'{name}' was asked for but CUDA is not available here; use --device cpu")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


@functools.lru_cache
def native_bf16(device):
    """Whether `device` computes bf16 in hardware: CUDA GPUs that support it; CPUs with AVX512-BF16 or AMX. On
    other CPUs bf16 is emulated: on an AVX2-only AMD EPYC (Zen 3) bf16 autocast ran ResNet-18 26x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_amp(amp, device):
    """The precision `amp` means on `device`: 'auto' is bf16 where it runs natively, else off (fp32). Cheap enough
    for every step (the hardware answer is cached)."""
    return amp if amp != "auto" else "bf16" if native_bf16(device) else "off"


def amp_reason(amp, device):
    """Why `amp` resolves as it does on `device`, for the line the run prints."""
    if amp != "auto":
        return "as configured"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"this CPU ({torch.backends.cpu.get_cpu_capability()})" if device.type == "cpu" else device.type
    if native_bf16(device):
        return f"{where} runs bf16 natively"
    return f"{where} has no native bf16 (CUDA bf16, AVX512-BF16 or AMX), where emulated bf16 is slower than fp32"


def autocast(device, amp, cache=True):
    """`cache=False` for a step captured in a CUDA graph, which must not reuse casts made outside it."""
    amp = resolve_amp(amp, device)
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, cache_enabled=cache)


def resolve_compile(mode, device):
    """The torch.compile mode `mode` means on `device`. 'auto' is off: on the AVX2 CPU it was measured on, compiled
    steps ran slower, and on an H100, where train.graph already replays the step in one CUDA graph, compiling
    (default mode) made the CIFAR-10 student's epochs 1.3-1.5x faster but cost 10-21 s per student, repaid only
    after 100 (live teacher and FitNets) to 280 (student alone) epochs (README: Speed on a GPU)."""
    return "off" if mode == "auto" else mode


GRAPHED_COMPILE = ("reduce-overhead", "max-autotune")  # torch.compile modes that make CUDA graphs of their own


def graph_obstacle(train_cfg, device):
    """Why the recipe's training step cannot be captured whole in a CUDA graph on `device`, or None."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if dist.is_initialized():
        return "under torchrun gradients are reduced by DistributedDataParallel outside any graph"
    if resolve_amp(train_cfg.amp, device) == "fp16":
        return "fp16 loss scaling reads its overflow check on the host every step"
    if resolve_compile(train_cfg.compile, device) in GRAPHED_COMPILE:
        return f"compile '{resolve_compile(train_cfg.compile, device)}' captures CUDA graphs of its own"
    if train_cfg.schedule == "onecycle":
        return "one-cycle changes the momentum every step, which a captured optimizer step would not see"
    return None


def resolve_graph(train_cfg, device, key):
    """Whether the training step is captured whole in one CUDA graph: 'auto' where nothing stands in the way,
    'on' or a one-line error naming `key`.graph and what stands in the way, 'off'."""
    if train_cfg.graph == "off":
        return False
    obstacle = graph_obstacle(train_cfg, device)
    if obstacle and train_cfg.graph == "on":
        raise ConfigError(f"{key}.graph", f"'on', but {obstacle}; set it to auto or off")
    return obstacle is None


def memory_format(train_cfg):
    """The layout a recipe trains and is measured in: NHWC with `channels_last`, else the tensor's own."""
    return torch.channels_last if train_cfg.channels_last else torch.preserve_format


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runtime:
    """Where this process runs: its device, torchrun rank and world size, the precision each recipe trains in
    (config key -> 'fp32', 'bf16' or 'fp16'), its compile mode (config key -> mode) and whether its step is a
    CUDA graph (config key -> bool), with the reasons, to be printed."""
    device: torch.device
    rank: int
    world: int
    precision: dict
    compile: dict
    graph: dict
    decisions: list

    @property
    def main(self):
        return self.rank == 0


def setup(cfg):
    """The runtime a config asks for: device, process group, precision and compile mode per recipe, determinism."""
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    precision, compiled, graph, decisions = {}, {}, {}, {}
    for key, train_cfg in (("teacher.train", cfg.teacher.train), ("train", cfg.train)):
        amp = resolve_amp(train_cfg.amp, device)
        precision[f"{key}.amp"] = "fp32" if amp == "off" else amp
        decisions.setdefault(("precision", f"{train_cfg.amp} -> {precision[f'{key}.amp']} "
                              f"({amp_reason(train_cfg.amp, device)})"), []).append(f"{key}.amp")
        compiled[f"{key}.compile"] = resolve_compile(train_cfg.compile, device)
        if train_cfg.compile == "auto":
            decisions.setdefault(("compile", f"auto -> {compiled[f'{key}.compile']} (on {device.type})"),
                                 []).append(f"{key}.compile")
        graph[f"{key}.graph"] = resolve_graph(train_cfg, device, key)
        if train_cfg.graph == "auto":
            why = graph_obstacle(train_cfg, device) or "the whole step replayed in one call"
            decisions.setdefault(("graph", f"auto -> {'on' if graph[f'{key}.graph'] else 'off'} ({why})"),
                                 []).append(f"{key}.graph")
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    return Runtime(device, rank, world, precision, compiled, graph,
                   [f"[{tag}] {' and '.join(keys)}: {d}" for (tag, d), keys in decisions.items()])
