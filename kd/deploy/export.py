"""ONNX files of a model: exported from PyTorch with its card inside, and an int8 copy quantized after training
with onnxruntime's static quantizer. Opened for inference with a chosen number of threads."""
import contextlib
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from kd.deploy.card import check_outputs, checked, load_checkpoint, read_image
from kd.errors import KDError, first_line
from kd.store import atomic, content_digest, damaged, file_problem

OPSET = 18  # the torch.export-based exporter's lowest: the widest range of onnxruntime releases runs it
CARD = "kd.card"  # metadata key holding the card as JSON
WEIGHTS = "kd.weights"  # metadata key holding the weights' digest (weights_digest)
REEXPORT = "export it again from its checkpoint (run.py export)"
INPUT, OUTPUT = "images", "logits"


def export(model, card, path):
    """`model` (CPU, fp32) to one ONNX file, batch size free, its card in the metadata."""
    i = card["input"]
    example = torch.zeros(2, i["channels"], i["image_size"], i["image_size"])  # 2: batch 1 would be specialised
    try:
        with _quiet():  # the exporter narrates its steps, and logs whole graphs when it fails
            program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=OPSET,
                                        input_names=[INPUT], output_names=[OUTPUT], external_data=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    except Exception as e:  # the exporter fails in many ways on models it cannot trace or translate
        raise KDError(f"'{card['model']['name']}' cannot be exported to ONNX ({first_line(e)})") from None
    save(program.model_proto, card, path)


def weights_digest(graph):
    """The digest of a graph's weights (each initializer's name, type, shape and bytes), written beside the card
    and checked whenever the file is opened: a flipped bit in a weight leaves a file that loads and runs, but
    predicts other classes."""
    return content_digest({t.name: numpy_helper.to_array(t) for t in graph.initializer})


def save(proto, card, path):
    onnx.helper.set_model_props(proto, {CARD: json.dumps(card), WEIGHTS: weights_digest(proto.graph)})
    with atomic(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())


class Calibration(CalibrationDataReader):
    def __init__(self, images, batch_size=32):
        self.batches = iter([{INPUT: images[i:i + batch_size].numpy()} for i in range(0, len(images), batch_size)])

    def get_next(self):
        return next(self.batches, None)


def quantize(fp32_path, int8_path, images):
    """Post-training static int8: batch norm folded into the convolutions first, then int8 weights (one scale per
    output channel) and int8 activations whose ranges are calibrated on `images` (QDQ format, which onnxruntime
    fuses into integer kernels). The card is carried over.

    Weights use 7 of their 8 bits (reduce_range): x86 CPUs without VNNI (AVX2 only) multiply int8 pairs into
    saturating int16 sums, and full-range weights overflow them (docs/deployment.md measures what 8 bits cost
    there); the file must run correctly on whatever CPU it is deployed to."""
    card = read_card(fp32_path)
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        folded, quantized = Path(tmp) / "folded.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(fp32_path), str(folded))
            quantize_static(str(folded), str(quantized), Calibration(images), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8)
        except Exception as e:  # onnxruntime's quantizer raises its own and protobuf's errors
            raise KDError(f"'{card['model']['name']}' cannot be quantized to int8 ({first_line(e)})") from None
        save(onnx.load(str(quantized)), card, int8_path)


@contextlib.contextmanager
def _quiet():
    """Silence for the exporter and the quantizer, which print progress, log warnings (the quantizer's about
    pre-processing that `quantize` just did) and dump graphs on failure; their errors are raised as one line."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def session(model, threads, path):
    """An onnxruntime CPU session of `model` (the bytes of the file `path`) using `threads` threads for each
    operator; one line if it is not a model onnxruntime can run."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for damaged or invalid models
        raise KDError(f"{path}: not a model onnxruntime can run ({first_line(e)})") from None


def open_file(path):
    """(the bytes of an ONNX file `export` wrote, its card), checked: a valid card, weights that match their
    digest, and as many outputs as the card has classes where the graph fixes that number. The bytes checked
    are the bytes run."""
    if (reason := file_problem(path)) is not None:
        raise KDError(f"{path}: {reason}")
    try:
        data = Path(path).read_bytes()
        proto = onnx.load_from_string(data)
    except Exception as e:  # protobuf's DecodeError, OSError, ...
        raise KDError(f"{path}: not an ONNX file ({type(e).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if CARD not in props:
        raise KDError(f"{path}: carries no card (not exported by this toolkit), so its input and classes are unknown")
    try:
        card = json.loads(props[CARD])
    except (ValueError, RecursionError) as e:
        raise KDError(f"{path}: its card is not JSON ({first_line(e)}); {REEXPORT}") from None
    card = checked(card, path, REEXPORT)
    if WEIGHTS not in props:
        raise KDError(f"{path}: records no digest of its weights (exported before files carried one), so they "
                      f"cannot be checked; {REEXPORT}")
    try:
        intact = weights_digest(proto.graph) == props[WEIGHTS]
    except Exception:  # a damaged tensor (bytes that do not fill its shape, an unknown type) fails in onnx's reader
        intact = False
    if not intact:
        raise damaged(path, "its weights do not match the digest recorded at export", REEXPORT)
    dims = [v.type.tensor_type.shape.dim for v in proto.graph.output if v.name == OUTPUT]
    if dims and dims[0] and dims[0][-1].HasField("dim_value"):
        check_outputs(path, card, dims[0][-1].dim_value)
    return data, card


def read_card(path):
    """The card stored in an ONNX file by `export`, the file checked (`open_file`)."""
    return open_file(path)[1]


class OnnxModel:
    """An ONNX file `export` wrote, checked (`open_file`) and called like a PyTorch model: float images in, logits
    out (CPU tensors). Its number of outputs is checked against its card's classes where the graph leaves it
    free."""

    def __init__(self, path, threads):
        self.path = Path(path)
        data, self.card = open_file(path)
        self.session = session(data, threads, path)

    def __call__(self, x):
        try:
            logits = self.session.run(None, {INPUT: np.ascontiguousarray(x.cpu().numpy())})[0]
        except Exception as e:  # onnxruntime's own exception types: a graph that does not take what its card says
            raise KDError(f"{self.path}: onnxruntime cannot run it on the input its card describes "
                          f"({first_line(e)}); {REEXPORT}") from None
        check_outputs(self.path, self.card, logits.shape[-1])
        return torch.from_numpy(logits)


@torch.inference_mode()
def agreement(model, onnx_model, images):
    """How closely an ONNX model reproduces the PyTorch one on `images`."""
    reference, logits = model(images), onnx_model(images)
    return {"max_abs_logit_diff": (logits - reference).abs().max().item(),
            "top1_agreement": (logits.argmax(1) == reference.argmax(1)).float().mean().item()}


def export_checkpoint(checkpoint, out, images, int8):
    """`run.py export`: one checkpoint with a card to ONNX (and int8, calibrated on `images`), each checked
    against PyTorch on `images` (random inputs when none are given). Returns the lines to print."""
    model, card = load_checkpoint(checkpoint)
    i = card["input"]
    x = torch.stack([read_image(p, card) for p in images]) if images else \
        torch.randn(8, i["channels"], i["image_size"], i["image_size"])
    what = f"{len(images)} image(s)" if images else "8 random inputs (give --images for real ones)"
    files = [out] + ([out.with_suffix(".int8.onnx")] if int8 else [])
    export(model, card, files[0])
    if int8:
        quantize(files[0], files[1], x)
    lines = []
    for path in files:
        a = agreement(model, OnnxModel(path, torch.get_num_threads()), x)
        lines.append(f"{path} ({path.stat().st_size / 2**20:.2f} MB): top-1 agrees with PyTorch on "
                     f"{100 * a['top1_agreement']:.1f}% of {what}, max |logit difference| "
                     f"{a['max_abs_logit_diff']:.2e}")
    return lines
