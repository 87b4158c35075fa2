"""Typed study configuration: YAML -> dataclasses, validated before any work starts."""
import dataclasses
import hashlib
import importlib
import importlib.util
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kd.errors import ConfigError, KDError, did_you_mean, short
from kd.registry import coerce


class YAMLLoader(yaml.SafeLoader):
    """YAML 1.2 booleans and floats: only true/false are booleans, so `amp: off` or `--set cache.mode=off` stay
    the string 'off', and `lr: 1e-3` is a number (PyYAML's YAML 1.1 rules read it as a string)."""


YAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                 list("-+0123456789."))


def _unique_keys(loader, node, deep=False):
    """A mapping whose keys are unique: YAML allows a repeated key (the last one wins), which hides a mistake."""
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


YAMLLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_keys)


MAX_VALUES = 100_000  # a config holds a few hundred values; aliases that expand past this are refused


def load_yaml(text):
    """The document, refused when its aliases expand it past MAX_VALUES values (an alias bomb: a few lines that
    stand for billions of values, which printing or copying would try to build)."""
    data = yaml.load(text, Loader=YAMLLoader)
    if expanded_size(data) > MAX_VALUES:
        raise yaml.YAMLError(f"its aliases (*name) expand it to more than {MAX_VALUES:,} values; write the values "
                             "out, or use fewer nested aliases")
    return data


def expanded_size(data):
    """How many values `data` holds once every alias is written out: each shared node counted once per use, in
    time linear in the distinct nodes."""
    sizes = {}

    def size(node):
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a node that contains itself (a recursive alias) ends here
            items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            sizes[id(node)] = min(1 + sum(size(item) for item in items), MAX_VALUES + 1)
        return sizes[id(node)]
    return size(data)


# Bounds far past any sensible study, so a slip (an extra zero, 1e30) is caught at start-up rather than as an
# overflow or an allocation failure hours in.
MAX_EPOCHS, MAX_LR, MAX_IMAGE_SIZE, MAX_NAME = 100_000, 100.0, 4096, 100

# off, auto (per device: kd/device.py resolve_compile) or one of torch.compile's modes
COMPILE_MODES = ("off", "auto", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")

# Marks a field that never changes a result (paths, workers, evaluation batch sizes). Run identity
# (`to_dict(cfg, "results")`) is every other field, so a new setting changes identity unless marked here.
NOT_RESULT = {"result": False}
# Marks a field that changes a reported result but not what a model learns (the test split): a teacher made
# under another one is the same teacher (`to_dict(cfg, "training")`).
EVALUATION = {"result": "evaluation"}


def _setting(default):
    return field(default=default, metadata=NOT_RESULT)


def _added(default):
    """A result-changing field added after identities were first recorded: at this default it is left out of
    identity, so the checkpoints, results and caches made before it existed stay valid; any other value is part of
    identity like every field."""
    return field(default=default, metadata={"added": default})


@dataclass
class AugmentConfig:
    crop_padding: int = 4  # random crop after zero padding (small images); 0 turns it off
    hflip: bool = True  # random horizontal flip; turn off where mirrored images change the class
    # [min, max] area scale of a random-resized crop (aspect 3/4-4/3, resized back to the image size) instead of the
    # padded crop, in memory and from files alike; null: the padded crop (ImageNet read from files: [0.08, 1])
    resized_crop: list[float] | None = _added(None)

    def validate(self, key):
        _check(self.crop_padding >= 0, f"{key}.crop_padding", "must be >= 0", self.crop_padding)
        scale = self.resized_crop
        _check(scale is None or len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, f"{key}.resized_crop",
               "must be [min, max] area scales with 0 < min <= max <= 1", scale)


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    root: str = _setting("data")  # the images' content is part of identity; where they lie is not
    download: bool = _setting(True)
    image_size: int = 224  # folder datasets (imagenet) and fake data; fixed datasets know their own size
    val_size: int = 5000  # held out from the training split to pick checkpoints; the test split is only reported
    train_subset: int | None = None  # train on only this many images (quick runs); None = all
    classes: int | None = _added(None)  # only the first N classes (sorted order), in training and test; None = all
    test_subset: int | None = field(default=None, metadata=EVALUATION)
    split_seed: int = 0  # fixed apart from the training seed so repeated seeds share one split
    batch_size: int = 128
    eval_batch_size: int = _setting(512)
    num_workers: int = _setting(2)
    # tensor: in-memory uint8 tensor, batched augmentation on the device; loader: DataLoader. The pipeline actually
    # used is part of identity (Study.data_identity), not this request.
    pipeline: str = _setting("auto")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # per-channel normalisation; None: the dataset's own (folders: its training images')
    mean: list[float] | None = None
    std: list[float] | None = None

    def validate(self, key):
        _check(8 <= self.image_size <= MAX_IMAGE_SIZE, f"{key}.image_size", f"must be in [8, {MAX_IMAGE_SIZE}]",
               self.image_size)
        _check(self.val_size >= 1, f"{key}.val_size", "must be >= 1", self.val_size)
        for name in ("train_subset", "test_subset", "classes"):
            v = getattr(self, name)
            _check(v is None or v >= 1, f"{key}.{name}", "must be >= 1 or null", v)
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        _check(self.eval_batch_size >= 1, f"{key}.eval_batch_size", "must be >= 1", self.eval_batch_size)
        _check(0 <= self.num_workers <= 256, f"{key}.num_workers", "must be in [0, 256]", self.num_workers)
        _choice(self.pipeline, ("auto", "tensor", "loader"), f"{key}.pipeline")
        for name in ("mean", "std"):
            _check(getattr(self, name) != [], f"{key}.{name}", "must list one value per channel, or be null", [])
        _check(not self.std or min(self.std) > 0, f"{key}.std", "must be > 0", self.std)
        self.augment.validate(f"{key}.augment")


@dataclass
class TrainConfig:
    epochs: int = 10
    # learn from only the first this-many training images (a prefix of the fixed training split, so students with
    # fewer labelled images than their teacher see a part of what it saw); None: all of them
    subset: int | None = None
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=list)  # step schedule: epochs at which lr *= gamma
    gamma: float = 0.1
    label_smoothing: float = 0.0
    grad_clip: float | None = None  # max global gradient norm; None = no clipping
    amp: str = "auto"  # auto (bf16 where the hardware runs it natively, else off) | off | bf16 | fp16 (CUDA only)
    channels_last: bool = False
    compile: str = "off"  # off | auto (off, as measured: kd/device.py) | torch.compile's mode: default | ...
    # auto | on | off: the whole step (optimizer included) captured in one CUDA graph (kd/train/step.py); the same
    # kernels replayed, so not part of the run's identity
    graph: str = _setting("auto")
    # last.pt and best.pt are written after the final epoch and after any epoch this many seconds or more after
    # the previous write (0: every epoch): on a GPU an epoch can take a second, and the teacher's files ~130 MB
    checkpoint_seconds: float = _setting(60.0)

    def validate(self, key):
        _check(0 <= self.epochs <= MAX_EPOCHS, f"{key}.epochs", f"must be in [0, {MAX_EPOCHS}]", self.epochs)
        _check(self.subset is None or self.subset >= 1, f"{key}.subset", "must be >= 1 or null", self.subset)
        _choice(self.optimizer, ("sgd", "adamw"), f"{key}.optimizer")
        _check(0 < self.lr <= MAX_LR, f"{key}.lr", f"must be in (0, {MAX_LR}]", self.lr)
        _check(0 <= self.momentum < 1, f"{key}.momentum", "must be in [0, 1)", self.momentum)
        _check(0 <= self.weight_decay <= 10, f"{key}.weight_decay", "must be in [0, 10]", self.weight_decay)
        _choice(self.schedule, ("cosine", "onecycle", "step", "constant"), f"{key}.schedule")
        _check(0 <= self.warmup_epochs <= max(self.epochs, 0), f"{key}.warmup_epochs",
               f"must be in [0, epochs={self.epochs}]", self.warmup_epochs)
        _check(all(0 < m <= self.epochs for m in self.milestones), f"{key}.milestones",
               f"must lie in (0, epochs={self.epochs}]", self.milestones)
        _check(0 < self.gamma <= 1, f"{key}.gamma", "must be in (0, 1]", self.gamma)
        _check(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", "must be in [0, 1)", self.label_smoothing)
        _check(self.grad_clip is None or self.grad_clip > 0, f"{key}.grad_clip", "must be > 0 or null", self.grad_clip)
        _choice(self.amp, ("auto", "off", "bf16", "fp16"), f"{key}.amp")
        _choice(self.compile, COMPILE_MODES, f"{key}.compile")
        _choice(self.graph, ("auto", "on", "off"), f"{key}.graph")
        _check(self.checkpoint_seconds >= 0, f"{key}.checkpoint_seconds", "must be >= 0", self.checkpoint_seconds)


@dataclass
class ModelConfig:
    name: str = "cnn"
    kwargs: dict = field(default_factory=dict)  # constructor arguments, checked against its signature


@dataclass
class TeacherConfig(ModelConfig):
    name: str = "resnet18"
    checkpoint: str = _setting("checkpoints/teacher.pt")  # loaded when it exists, else trained and saved here
    # use an existing checkpoint even when it was made under another data/recipe, or records none (report says so)
    accept_checkpoint: bool = _setting(False)
    weights: str | None = None  # 'torchvision' (its pretrained weights) or a path to a state dict to start from
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class LossConfig:
    """A distillation method: its registered name plus its own parameters."""
    name: str
    params: dict = field(default_factory=dict)

    @classmethod
    def keys(cls):
        """The keys of a method's entry besides its parameters."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "params"]


@dataclass
class FeatureConfig(LossConfig):
    """Module names (as in model.named_modules()) whose outputs (or, with io: input, inputs) the method matches:
    one name, or a list for methods that take several layers (reviewkd, at)."""
    student: str | list[str] = ""
    teacher: str | list[str] = ""
    weight: float = 1.0
    io: str = "output"

    def __post_init__(self):
        self.student, self.teacher = ([v] if isinstance(v, str) else list(v) for v in (self.student, self.teacher))


@dataclass
class StageConfig:
    """One student variant: labels only (no logit, no features) or any logit method plus feature methods."""
    name: str
    logit: LossConfig | None = None
    features: list[FeatureConfig] = field(default_factory=list)

    @property
    def uses_teacher(self):
        return self.logit is not None or bool(self.features)


@dataclass
class CacheConfig:
    """Teacher outputs computed once per (view, image) and replayed, instead of a teacher pass every step."""
    # off | logits (a feature stage then runs its teacher cut after its layers) | logits+features (the teacher
    # layers that feature methods match, cached too)
    mode: str = "off"
    views: int = 4  # augmented views per image; student epoch e replays view e mod views
    dir: str = _setting("cache")
    topk: int | None = None  # keep only the k largest logits per image (for many classes, as ImageNet's 1000)
    batch_size: int = _setting(1024)  # teacher batch while building

    def validate(self, key):
        _choice(self.mode, ("off", "logits", "logits+features"), f"{key}.mode")
        _check(self.views >= 1, f"{key}.views", "must be >= 1", self.views)
        _check(self.topk is None or self.topk >= 1, f"{key}.topk", "must be >= 1 or null", self.topk)
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)


@dataclass
class EvalConfig:
    batch_size: int = _setting(256)  # batch for throughput and memory; latency is also measured at batch 1
    warmup: int = _setting(5)
    repeats: int = _setting(20)

    def validate(self, key):
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        _check(1 <= self.repeats <= 10_000, f"{key}.repeats", "must be in [1, 10000]", self.repeats)
        _check(0 <= self.warmup <= 10_000, f"{key}.warmup", "must be in [0, 10000]", self.warmup)


@dataclass
class DeployConfig:
    """Every model of the study exported to ONNX (with an int8 copy) and measured as a CPU deployment runs it:
    PyTorch eager, onnxruntime fp32 and int8 (kd/deploy/runtimes.py). The files go beside each model's checkpoint."""
    onnx: bool = _setting(False)
    int8: bool = _setting(True)  # with onnx: post-training static int8, calibrated on training images
    calibration_images: int = _setting(512)

    def validate(self, key):
        _check(self.calibration_images >= 1, f"{key}.calibration_images", "must be >= 1", self.calibration_images)


@dataclass
class Config:
    name: str = field(metadata=NOT_RESULT)
    stages: list[StageConfig]
    output_dir: str = _setting("runs")
    seed: int = 0  # the teacher's, the data augmentation's and the teacher cache's seed
    seeds: list[int] | None = None  # train every student stage once per seed (mean and std reported); None = [seed]
    # modules or .py files imported first: your own methods/models
    plugins: list[str] = field(default_factory=list, metadata=NOT_RESULT)
    device: str = _setting("auto")  # auto | cpu | cuda | cuda:N
    deterministic: bool = _setting(False)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)

    @property
    def run_dir(self):
        return Path(self.output_dir) / self.name

    @property
    def student_seeds(self):
        return self.seeds or [self.seed]

    def validate(self):
        _check(_folder_name(self.name), "name", f"must be a plain folder name (no '/', not '.' or '..', printable, "
               f"at most {MAX_NAME} bytes)", self.name)
        for key, seed in [("seed", self.seed), ("data.split_seed", self.data.split_seed),
                          *((f"seeds[{i}]", s) for i, s in enumerate(self.seeds or []))]:
            _check(0 <= seed < 2 ** 32, key, "must be in [0, 2**32)", seed)
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device), "device", "must be auto, cpu, cuda or cuda:N",
               self.device)
        self.data.validate("data")
        self.teacher.train.validate("teacher.train")
        self.train.validate("train")
        self.eval.validate("eval")
        self.cache.validate("cache")
        self.deploy.validate("deploy")
        _check(self.seeds is None or (self.seeds and len(set(self.seeds)) == len(self.seeds)), "seeds",
               "must be a non-empty list of distinct seeds, or null", self.seeds)
        _check(len(self.stages) > 0, "stages", "must list at least one student stage", self.stages)
        names = [s.name for s in self.stages]
        for i, s in enumerate(self.stages):
            _check(_folder_name(s.name) and s.name != "teacher" and names.count(s.name) == 1,
                   f"stages[{i}].name", "must be a unique plain folder name other than 'teacher' "
                   f"(printable, at most {MAX_NAME} bytes)", s.name)
            for j, f in enumerate(s.features):
                _check(all(f.student) and all(f.teacher) and f.student and f.teacher, f"stages[{i}].features[{j}]",
                       "needs both 'student' and 'teacher' layer names", f"{f.student!r}/{f.teacher!r}")
                _check(f.weight >= 0, f"stages[{i}].features[{j}].weight", "must be >= 0", f.weight)
                _choice(f.io, ("output", "input"), f"stages[{i}].features[{j}].io")


def validate_runtime(cfg, device, world, data, memory):
    """The checks that need the machine or the data, run as soon as both are known, before any work. `data`: the
    study's kd.data.datasets.Data; `memory`: bytes free for tensors on `device`."""
    train_images = len(data.train)
    for key, train_cfg in (("teacher.train.subset", cfg.teacher.train), ("train.subset", cfg.train)):
        if train_cfg.subset and train_cfg.subset > train_images:
            raise ConfigError(key, f"{train_cfg.subset} is more than the {train_images} training images "
                                   "(data.train_subset, less data.val_size)")
    fewest = min(train_cfg.subset or train_images for train_cfg in (cfg.teacher.train, cfg.train))
    if cfg.data.batch_size > fewest:
        raise ConfigError("data.batch_size", f"{cfg.data.batch_size} is more than the {fewest} images a model "
                          "trains on, so no full batch could be drawn; lower it")
    if cfg.data.batch_size % world:
        raise ConfigError("data.batch_size", f"{cfg.data.batch_size} does not split evenly over {world} processes")
    image_bytes = 4 * data.in_channels * data.image_size ** 2  # one fp32 input image
    for key, batch in (("data.batch_size", cfg.data.batch_size), ("data.eval_batch_size", cfg.data.eval_batch_size),
                       ("eval.batch_size", cfg.eval.batch_size)):
        if batch * image_bytes > memory / 2:
            raise ConfigError(key, f"{batch} images of {data.in_channels}x{data.image_size}x{data.image_size} take "
                              f"{human_bytes(batch * image_bytes)} before any activation, more than half of the "
                              f"{human_bytes(memory)} free on {device}; lower it")
    if cfg.cache.mode != "off" and cfg.cache.topk and cfg.cache.topk > data.num_classes:
        raise ConfigError("cache.topk", f"{cfg.cache.topk} is more than the {data.num_classes} classes; lower it, "
                          "or set null to keep every logit")
    for key, train_cfg in (("teacher.train.amp", cfg.teacher.train), ("train.amp", cfg.train)):
        if train_cfg.amp == "fp16" and device.type != "cuda":
            raise ConfigError(key, "fp16 needs a CUDA device; use auto, bf16 or off on a CPU")
    if cfg.cache.mode != "off" and (not data.replayable or world > 1):
        raise ConfigError("cache.mode", "the teacher cache replays augmentations drawn from (seed, view, index); it "
                                        "needs an in-memory dataset (cifar10, fashion_mnist, small folders) or "
                                        "streamed imagenet crops, in one process")


def human_bytes(n):
    """Bytes as a person reads them: never '0.00 GiB' for a few MiB."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _folder_name(name):
    """A name that stays one folder inside its parent on any file system: nothing that climbs out or nests, no
    control characters (a NUL, a newline), text that encodes (no lone surrogate), and short enough for a path."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return (0 < len(encoded) <= MAX_NAME and name not in (".", "..") and not set("/\\") & set(name)
            and name.isprintable())


def _check(ok, key, message, value):
    if not ok:
        raise ConfigError(key, f"{message}, got {short(value)}")


def _choice(value, choices, key):
    if value not in choices:
        raise ConfigError(key, f"unknown value {short(value)} ({did_you_mean(value, choices)})")


def from_dict(cls, raw, key=""):
    """Build a dataclass from a YAML mapping, rejecting unknown keys (with a did-you-mean) and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(key, f"expected a mapping, got {short(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    raw = dict(raw)
    if issubclass(cls, LossConfig):  # a method's own parameters sit beside its name
        raw["params"] = {k: raw.pop(k) for k in list(raw) if k not in fields}
    kwargs = {}
    for k, v in raw.items():
        sub = f"{key}.{k}" if key else k
        if k not in fields:
            raise ConfigError(sub, f"unknown key ({did_you_mean(k, fields)})")
        kwargs[k] = _convert(v, hints[k], sub)
    missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and n not in kwargs]
    if missing:
        raise ConfigError(key or "config", f"missing required key(s): {', '.join(missing)}")
    return cls(**kwargs)


def _convert(value, hint, key):
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if inner and dataclasses.is_dataclass(inner[0]):
        if value is None and type(None) in typing.get_args(hint):
            return None
        if typing.get_origin(hint) is list:
            if not isinstance(value, list):
                raise ConfigError(key, f"expected a list, got {short(value)}")
            return [from_dict(inner[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return from_dict(inner[0], value, key)
    return coerce(value, hint, key)


def apply_override(raw, assignment):
    """Apply one --set a.b.c=value (value parsed as YAML; list items by index: stages.1.name=x)."""
    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise ConfigError("--set", f"expected key=value, got {assignment!r}")
    try:
        value = load_yaml(text) if text else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {path}", f"value is not valid YAML: {text!r}") from None
    node, parts = raw, path.split(".")
    for i, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[:i + 1]), create=True)
    last = parts[-1]
    if isinstance(node, list):
        _child(node, last, path, create=False)
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"--set {path}", f"'{'.'.join(parts[:-1])}' is not a mapping")


def _child(node, part, path, create):
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise ConfigError(f"--set {path}", f"no list item {part} (the list has {len(node)})")
        return node[int(part)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {path}", f"'{path.rpartition('.')[0]}' is not a mapping")
    if create and node.get(part) is None:
        node[part] = {}
    return node.get(part)


def load_plugin(name, folder, key):
    """Import a module by dotted name, or a .py file (relative to the config's folder), once per process: its
    registrations (methods, models, datasets) become usable by name in the config."""
    try:
        if not name.endswith(".py"):
            return importlib.import_module(name)
        file = (folder / name).resolve()
        module_name = f"kd_plugin_{hashlib.sha256(str(file).encode()).hexdigest()[:12]}"
        if module_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(module_name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
        return sys.modules[module_name]
    except Exception as e:  # the user's own code: any failure is reported as this key's problem
        raise ConfigError(key, f"cannot import plugin '{name}' ({type(e).__name__}: {e})") from None


def load_config(path, overrides=()):
    path = Path(path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise KDError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError:
        raise KDError(f"{path}: not a UTF-8 text file") from None
    except RecursionError:
        raise KDError(f"{path}: invalid YAML (nested too deeply to read: a config is a few levels deep)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise KDError(f"{path}: invalid YAML ({where}{problem})") from None
    raw = {} if raw is None else raw
    try:
        for o in overrides:
            apply_override(raw, o)
        cfg = from_dict(Config, raw)
        cfg.validate()
        for i, plugin in enumerate(cfg.plugins):
            load_plugin(plugin, path.parent, f"plugins[{i}]")
    except ConfigError as e:
        raise KDError(f"{path}: {e}") from None
    return cfg


def to_dict(cfg, scope="all"):
    """Plain-data view of a config, with each method's parameters back beside its name (as written in YAML).
    `scope`: "all" fields; "results", those that change a result (not marked NOT_RESULT): the run's identity;
    "training", those that change what a model learns (neither NOT_RESULT nor EVALUATION)."""
    hidden = {"all": (), "results": (False,), "training": (False, "evaluation")}[scope]

    def flat(obj):
        if isinstance(obj, LossConfig):
            d = {k: flat(v) for k, v in dataclasses.asdict(obj).items() if k != "params"}
            return {**d, **obj.params}
        if dataclasses.is_dataclass(obj):
            return {f.name: flat(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if f.metadata.get("result", True) not in hidden
                    and not (hidden and "added" in f.metadata and getattr(obj, f.name) == f.metadata["added"])}
        if isinstance(obj, list):
            return [flat(v) for v in obj]
        return obj
    return flat(cfg)
