"""`run.py predict`: the most likely classes of image files, by a checkpoint or an exported ONNX model, each
file read and normalised as its card says."""
from pathlib import Path

import torch

from kd.deploy.card import load_checkpoint, read_image
from kd.errors import KDError


def open_model(path):
    """(callable from images to logits, card) for a checkpoint with a card, or an ONNX file exported by this
    toolkit (onnxruntime is imported only then); both are checked as they are opened."""
    if Path(path).suffix == ".onnx":
        from kd.deploy.export import OnnxModel
        model = OnnxModel(path, torch.get_num_threads())
        return model, model.card
    return load_checkpoint(path)


@torch.inference_mode()
def predict(model_path, images, top=5):
    """Yields one line per image: its top classes with probabilities, or why it could not be read."""
    model, card = open_model(model_path)
    k = min(top, len(card["classes"]))
    for path in images:
        try:
            x = read_image(path, card)[None]
        except KDError as e:
            yield False, f"error: {e}"
            continue
        p, idx = model(x).float().softmax(1)[0].topk(k)
        ranked = zip(p.tolist(), idx.tolist())
        yield True, f"{path}: " + ", ".join(f"{card['classes'][i]} {100 * q:.1f}%" for q, i in ranked)
