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
    other CPUs bf16 is emulated, and far slower than fp32 (docs/performance.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_amp(amp, device):
    """The precision `amp` means on `device`: 'auto' is bf16 where it runs natively, else off (fp32)."""
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
    """`amp`: a resolved precision ('off', 'bf16', 'fp16': a Recipe's). `cache=False` for a step captured in a CUDA
    graph, which must not reuse casts made outside it."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16, cache_enabled=cache)


def resolve_compile(mode, device):
    """The torch.compile mode `mode` means on `device`. 'auto' is off: on a CPU compiled steps ran slower, and on a
    GPU, where train.graph already replays the step in one CUDA graph, compiling repays its start-up cost only over
    hundreds of epochs (docs/gpu.md)."""
    return "off" if mode == "auto" else mode


GRAPHED_COMPILE = ("reduce-overhead", "max-autotune")  # torch.compile modes that make CUDA graphs of their own


def graph_obstacle(train_cfg, device, amp, compile_mode, distributed):
    """Why the recipe's training step cannot be captured whole in a CUDA graph on `device`, or None."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if distributed:
        return "under torchrun gradients are reduced by DistributedDataParallel outside any graph"
    if amp == "fp16":
        return "fp16 loss scaling reads its overflow check on the host every step"
    if compile_mode in GRAPHED_COMPILE:
        return f"compile '{compile_mode}' captures CUDA graphs of its own"
    if train_cfg.schedule == "onecycle":
        return "one-cycle changes the momentum every step, which a captured optimizer step would not see"
    return None


def fused_optimizer(device):
    """Fused optimizers (one kernel for every parameter) on CUDA, where PyTorch documents them as its fastest
    implementation; the default (foreach) on the CPU, where fused measured no faster (docs/gpu.md)."""
    return device.type == "cuda"


def free_memory(device):
    """Bytes free for tensors on `device`: the GPU's free memory, or the memory the operating system can give
    (MemAvailable on Linux, else the free physical pages)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Recipe:
    """How one training recipe (`teacher.train` or `train`) runs in this process, decided once at start-up by
    `resolve_recipe` and read by the trainer, the teacher cache, the report, bench.py and the log."""
    key: str  # the config key that names the recipe in errors: 'teacher.train' or 'train'
    cfg: object  # its TrainConfig
    device: torch.device
    amp: str  # what autocast runs: 'off', 'bf16' or 'fp16'
    memory_format: torch.memory_format  # NHWC with channels_last, else the tensor's own
    compile: str  # torch.compile mode, or 'off'
    graph: bool  # the whole step captured in one CUDA graph
    fused: bool  # fused optimizer
    decisions: tuple = ()  # (tag, what 'auto' became and why), for the log

    @property
    def precision(self):
        return "fp32" if self.amp == "off" else self.amp


def resolve_recipe(key, train_cfg, device, distributed=False):
    """Every runtime decision of one recipe on `device`; the one place each is made. `graph: on` where something
    stands in the way is a one-line error naming `key`.graph."""
    amp = resolve_amp(train_cfg.amp, device)
    compile_mode = resolve_compile(train_cfg.compile, device)
    obstacle = graph_obstacle(train_cfg, device, amp, compile_mode, distributed)
    if obstacle and train_cfg.graph == "on":
        raise ConfigError(f"{key}.graph", f"'on', but {obstacle}; set it to auto or off")
    graph = train_cfg.graph != "off" and obstacle is None
    decisions = [("precision", f"{train_cfg.amp} -> {'fp32' if amp == 'off' else amp} "
                  f"({amp_reason(train_cfg.amp, device)})")]
    if train_cfg.compile == "auto":
        decisions.append(("compile", f"auto -> {compile_mode} (on {device.type})"))
    if train_cfg.graph == "auto":
        decisions.append(("graph", f"auto -> {'on' if graph else 'off'} "
                          f"({obstacle or 'the whole step replayed in one call'})"))
    return Recipe(key, train_cfg, device, amp, torch.channels_last if train_cfg.channels_last else
                  torch.preserve_format, compile_mode, graph, fused_optimizer(device), tuple(decisions))


@dataclass
class Runtime:
    """Where this process runs: its device, torchrun rank and world size, and each recipe's Recipe."""
    device: torch.device
    rank: int
    world: int
    teacher: Recipe  # teacher.train
    student: Recipe  # train: every student's, the teacher cache's, and the layout every model is measured in

    @property
    def main(self):
        return self.rank == 0

    def decisions(self):
        """One line per decision, the recipes that share it named together."""
        lines = {}
        for recipe in (self.teacher, self.student):
            for tag, what in recipe.decisions:
                lines.setdefault((tag, what), []).append(f"{recipe.key}.{'amp' if tag == 'precision' else tag}")
        return [f"[{tag}] {' and '.join(keys)}: {what}" for (tag, what), keys in lines.items()]

    def facts(self):
        """What the report records of the decisions: config key -> precision, compile mode, graph."""
        recipes = (self.teacher, self.student)
        return {"precision": {f"{r.key}.amp": r.precision for r in recipes},
                "compile": {f"{r.key}.compile": r.compile for r in recipes},
                "graph": {f"{r.key}.graph": r.graph for r in recipes}}


def setup(cfg):
    """The runtime a config asks for: device, process group, each recipe's decisions, determinism."""
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    return Runtime(device, rank, world, resolve_recipe("teacher.train", cfg.teacher.train, device, world > 1),
                   resolve_recipe("train", cfg.train, device, world > 1))
