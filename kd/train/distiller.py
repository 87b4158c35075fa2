"""The Distiller: a student, an optional frozen teacher, and the distillation methods that tie them together."""
import functools

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from kd.errors import ConfigError, blame
from kd.log import info
from kd.train.losses import FEATURE_LOSSES, LOGIT_LOSSES, Probe, Step


def tap_key(name, io="output"):
    """How a recorded feature is named: the module's name for its output, `name:input` for its input."""
    return name if io == "output" else f"{name}:{io}"


class Taps:
    """Records the outputs (or inputs) of named modules on every forward pass, through forward hooks registered
    once, when the model is built: no per-step hook bookkeeping, and a graph that torch.compile can trace.
    `take()` hands over what the last forward pass recorded. `layers`: (name, io, config key) triples. `detach`:
    record without the autograd graph, for a teacher's taps: while the teacher itself trains, a map recorded and
    never taken would keep the last step's graph alive into the next (on a GPU, across CUDA streams)."""

    def __init__(self, model, layers=(), detach=False):
        modules = dict(model.named_modules())
        self.outputs, self.detach = {}, detach
        for name, io, key in layers:
            if name not in modules:
                raise ConfigError(key, f"no layer '{name}' in this model; layers: {layer_names(model)}")
        self.keys = list(dict.fromkeys(tap_key(name, io) for name, io, _ in layers))
        for name, io in dict.fromkeys((name, io) for name, io, _ in layers):
            modules[name].register_forward_hook(functools.partial(self._record, tap_key(name, io), io == "input"))

    def _record(self, key, take_input, module, inputs, output):
        value = inputs[0] if take_input else output
        self.outputs[key] = value.detach() if self.detach else value

    def take(self):
        outputs, self.outputs = self.outputs, {}
        return outputs


def layer_names(model, depth=2):
    """The hookable module names, shallow ones only so an error message stays one readable line."""
    return ", ".join(n for n, _ in model.named_modules() if n and n.count(".") < depth)


def feature_layers(stages, side, key=None):
    """(name, io, config key) of every layer that feature methods match on `side` ('student' or 'teacher'), over
    `stages` (the stage's config key given as `key` when there is one stage)."""
    return [(name, f.io, f"{key or f'stages[{i}]'}.features[{j}].{side}")
            for i, stage in enumerate(stages) for j, f in enumerate(stage.features) for name in getattr(f, side)]


def truncated(model, names):
    """`model` computing only what its modules `names` need, for their hooks to record: traced by torch.fx with
    those modules kept as calls, everything after them dropped (the teacher's deeper layers and classifier, when
    the cache holds its logits). None where the model cannot be traced (Python control flow on its input)."""
    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return name in names or super().is_leaf_module(module, name)
    try:
        graph = Tracer().trace(model)
    except Exception:  # tracing fails in many ways (data-dependent branches, unsupported calls)
        return None
    calls = [node for node in graph.nodes if node.op == "call_module" and node.target in names]
    if {node.target for node in calls} != set(names):  # a module the model does not call as one
        return None
    next(node for node in graph.nodes if node.op == "output").args = (tuple(calls),)
    prefix = torch.fx.GraphModule(model, graph)  # holds the model's own modules, hooks included, not copies
    prefix.graph.eliminate_dead_code()
    prefix.recompile()
    prefix.delete_all_unused_submodules()
    return prefix


def device_of(model):
    return next(iter(model.parameters()), torch.empty(0)).device


class Distiller(nn.Module):
    """Trains `student`; the teacher stays in eval mode, runs without autograd and is not in `learnable()`.

    The loss is ce_weight * CE + the logit method's term + sum of weight * feature term. With no methods it is
    plain cross-entropy, which is how the baseline student and the teacher itself are trained. The teacher's
    outputs come from one place, `teacher_outputs`: replayed from `cache` when there is one, else computed; the
    layers a cache lacks are computed by `teacher_prefix`, the teacher cut after them (see `truncated`).
    """

    def __init__(self, student, teacher=None, logit=None, features=(), label_smoothing=0.0, student_taps=None,
                 teacher_taps=None, cache=None, teacher_prefix=None):
        super().__init__()
        self.student, self.teacher, self.teacher_prefix = student, teacher, teacher_prefix
        self.logit = logit
        self.features = nn.ModuleList(method for method, *_ in features)
        self.pairs = [(s, t, w) for _, s, t, w in features]  # tap keys on each side, and the term's weight
        self.label_smoothing = label_smoothing
        self.student_taps = student_taps or Taps(student)
        self.teacher_taps, self.cache = teacher_taps, cache

    @classmethod
    def build(cls, stage, student, teacher, sample, label_smoothing, key, num_samples=0, cache=None,
              teacher_taps=None):
        """Create the stage's methods; their modules are sized by one dry forward pass of `sample`, run on the
        device each model lives on, and live on the student's. `teacher_taps`: a study's taps on its teacher,
        shared by its stages (they must record this stage's teacher layers); by default the stage's own. With a
        `cache` that lacks some of the stage's teacher layers, those come from the teacher cut after them."""
        logit = None
        if stage.logit is not None:
            logit = LOGIT_LOSSES.build(stage.logit.name, f"{key}.logit", dict(stage.logit.params),
                                       siblings=stage.logit.keys())
            weight = getattr(logit, "ce_weight", None)
            if not isinstance(logit, nn.Module) or not isinstance(weight, (int, float)) or isinstance(weight, bool):
                raise ConfigError(f"{key}.logit", f"logit method '{stage.logit.name}' must be an nn.Module with a "
                                  "numeric ce_weight attribute (see kd/train/losses/base.py), got "
                                  f"ce_weight={weight!r}")
        student_taps = Taps(student, feature_layers([stage], "student", key))
        teacher_taps = teacher_taps or Taps(teacher, feature_layers([stage], "teacher", key), detach=True)
        features = []
        if stage.features:
            for j, f in enumerate(stage.features):
                want = getattr(FEATURE_LOSSES.get(f.name, f"{key}.features[{j}]"), "layers", 1)
                if len(f.student) != len(f.teacher) or want is not None and len(f.student) != want:
                    raise ConfigError(f"{key}.features[{j}]", f"'{f.name}' matches {want or 'the same number of'} "
                                      f"student and teacher layer(s); got {len(f.student)} and {len(f.teacher)}")
            was_training = student.training
            models = [(student, "student"), (teacher, "teacher")]
            with torch.no_grad(), blame(models, key, "the dry forward pass failed"):
                logits = student.eval()(sample.to(device_of(student)))
                teacher.eval()(sample.to(device_of(teacher)))
            s_out, t_out = student_taps.take(), teacher_taps.take()
            student.train(was_training)
            for j, f in enumerate(stage.features):
                s_keys, t_keys = [tap_key(n, f.io) for n in f.student], [tap_key(n, f.io) for n in f.teacher]
                probe = Probe([tuple(s_out[k].shape[1:]) for k in s_keys], [tuple(t_out[k].shape[1:]) for k in t_keys],
                              num_samples, logits.shape[1])
                method = FEATURE_LOSSES.build(f.name, f"{key}.features[{j}]", dict(f.params), siblings=f.keys(),
                                              probe=probe)
                if not isinstance(method, nn.Module):
                    raise ConfigError(f"{key}.features[{j}]", f"feature method '{f.name}' must be an nn.Module")
                features.append((method.to(device_of(student)), s_keys, t_keys, f.weight))
        prefix = None
        if cache is not None:  # the teacher layers it lacks come from the teacher cut after them
            live = {name for f in stage.features for name in f.teacher if tap_key(name, f.io) not in cache.layers}
            prefix = truncated(teacher, live) if live else None
            if live and prefix is None:
                info(f"[{key}] torch.fx cannot trace the teacher: it runs whole for the layers the cache lacks")
                prefix = teacher
        return cls(student, teacher if stage.uses_teacher else None, logit, features, label_smoothing, student_taps,
                   teacher_taps, cache, prefix)

    def parts(self, key, student_key="student"):
        """(module, loss term, config key) of each part whose code may fail, so an error names the key to fix."""
        parts = [(self.student, None, student_key)] + ([(self.teacher, None, "teacher")] if self.teacher else [])
        if self.logit is not None:
            parts.append((self.logit, "logit", f"{key}.logit"))
        return parts + [(m, f"feat{j}", f"{key}.features[{j}]") for j, m in enumerate(self.features)]

    def train(self, mode=True):
        super().train(mode)
        for frozen in (self.teacher, self.teacher_prefix):
            if frozen is not None:
                frozen.eval()
        return self

    def learnable(self):
        """What the optimizer trains and a checkpoint saves: the student plus the methods' own modules."""
        return nn.ModuleDict({"student": self.student, "logit": self.logit or nn.Identity(), "features": self.features})

    def teacher_outputs(self, batch):
        """{"logits", "features"} of the teacher for `batch`: replayed from the cache (the view and indices say
        which), or computed without autograd; with both, the cache's and the prefix's layers together."""
        if self.cache is None:
            with torch.no_grad():
                logits = self.teacher(batch.images)
            return {"logits": logits, "features": self.teacher_taps.take()}
        outputs = self.cache.lookup(batch.view, batch.index)
        if self.teacher_prefix is not None:
            with torch.no_grad():
                self.teacher_prefix(batch.images)
            outputs["features"].update(self.teacher_taps.take())
        return outputs

    def forward(self, batch, epoch=0.0):
        """Loss terms for a Batch; `epoch` (fractional training progress) and the batch's labels and dataset
        indices are passed on to the methods."""
        logits = self.student(batch.images)
        student_features = self.student_taps.take()
        ce = F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.label_smoothing)
        terms = {"ce": ce}
        loss = ce
        if self.teacher is not None:
            teacher = self.teacher_outputs(batch)
            step = Step(batch.labels, batch.index, epoch)
            if self.logit is not None:
                terms["logit"] = self.logit(logits, teacher["logits"], step)
                loss = self.logit.ce_weight * ce + terms["logit"]
            for j, (method, (s, t, w)) in enumerate(zip(self.features, self.pairs)):
                terms[f"feat{j}"] = method([student_features[k] for k in s], [teacher["features"][k] for k in t], step)
                loss = loss + w * terms[f"feat{j}"]
        terms["loss"] = loss
        return logits, terms
