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
    """LiteRT needs only model.tflite (its labels are inside it) and the input size."""
    import io
    import json
    import zipfile

    from ai_edge_litert.interpreter import Interpreter

    from retrainer.preprocess import decode_and_resize  # TensorFlow ops only

    meta = json.load(open(f"{model_dir}/metadata.json", encoding="utf-8"))
    size = meta["input"]["shape"][1:3]
    blob = open(f"{model_dir}/model.tflite", "rb").read()
    labels = zipfile.ZipFile(io.BytesIO(blob)).read("labels.txt").decode().splitlines()
    runner = Interpreter(model_content=blob).get_signature_runner()
    for path in paths:
        image = decode_and_resize(open(path, "rb").read(), size).numpy()
        scores = runner(images=image[None])["scores"][0]
        print(f"{path}: {labels[int(scores.argmax())]} {scores.max():.3f} (litert)")


if __name__ == "__main__":
    model_dir, *images = sys.argv[1:] or ["retrained"]
    with_retrainer(model_dir, images)
    with_tflite(model_dir, images)
