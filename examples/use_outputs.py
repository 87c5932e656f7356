"""Use a trained model from Python: with retrainer, and with plain TensorFlow / TFLite.

    python examples/use_outputs.py retrained photo.jpg [photo2.jpg ...]
"""
import sys

import numpy as np


def with_retrainer(model_dir: str, paths: list[str]) -> None:
    from retrainer.predict import Classifier

    classifier = Classifier.load(model_dir)
    for result in classifier.label_paths(paths, top_k=3):
        if result.error:
            print(f"{result.path}: {result.error}")
            continue
        best = ", ".join(f"{p.label} {p.score:.3f}" for p in result.predictions)
        print(f"{result.path}: {best}")


def with_tflite(model_dir: str, paths: list[str]) -> None:
    """TFLite needs only the .tflite file, the labels and the input size in metadata.json.

    It runs on LiteRT (``pip install ai-edge-litert``), TensorFlow Lite's runtime without
    TensorFlow. Where only TensorFlow is installed, ``tf.lite.Interpreter`` takes the same
    arguments (deprecated since TF 2.20).
    """
    import json

    from PIL import Image

    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older setups: TensorFlow's own interpreter
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter

    meta = json.load(open(f"{model_dir}/metadata.json", encoding="utf-8"))
    height, width = meta["backbone"]["input_size"]
    runner = Interpreter(model_path=f"{model_dir}/model.tflite").get_signature_runner()
    for path in paths:
        image = Image.open(path).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        scores = runner(images=np.asarray(image, np.float32)[None])["scores"][0]
        print(f"{path}: {meta['labels'][int(scores.argmax())]} {scores.max():.3f} (tflite)")


if __name__ == "__main__":
    model_dir, *images = sys.argv[1:] or ["retrained"]
    with_retrainer(model_dir, images)
    with_tflite(model_dir, images)
