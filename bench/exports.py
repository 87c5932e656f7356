"""Agreement of each export's runtime with `retrainer label`; int8 accuracy, size and LiteRT speed.

    python bench/exports.py MODEL_DIR VAL_DIR   (a model trained with --export-formats all;
                                                VAL_DIR: one sub-folder of images per class)
"""
import json, sys, time
from pathlib import Path
import numpy as np
import tensorflow as tf
from retrainer.predict import Classifier
from retrainer.preprocess import decode_and_resize

model_dir, val_dir = Path(sys.argv[1]), Path(sys.argv[2])
paths = sorted(p for p in val_dir.rglob("*") if p.is_file())
truth = [p.parent.name for p in paths]
clf = Classifier.load(model_dir, runtime="tensorflow")
labels = clf.labels
ref = np.stack([r.probabilities for r in clf.label_paths([str(p) for p in paths])])
size = clf.input_size
blobs = [p.read_bytes() for p in paths]
prep = tf.function(lambda b: decode_and_resize(b, size))
t = time.perf_counter()
pixels = np.stack([prep(tf.constant(b)).numpy() for b in blobs])
prep_ms = 1000 * (time.perf_counter() - t) / len(blobs)
from retrainer.images import load_pixels
t = time.perf_counter()
ours = np.stack([load_pixels(b, size) for b in blobs])
images_ms = 1000 * (time.perf_counter() - t) / len(blobs)
out = {"images": len(paths), "pixel_max_diff": float(np.abs(ours - pixels).max()),
       "pixel_share_off": float((ours != pixels).mean()),
       "decode_resize_ms": {"retrainer.images": round(images_ms, 2), "retrainer.preprocess (eager tf.function)": round(prep_ms, 2)}}

def row(name, scores):
    out[name] = {"agree": float((scores.argmax(1) == ref.argmax(1)).mean()),
                 "max_score_diff": float(np.abs(scores - ref).max())}

saved = tf.saved_model.load(str(model_dir / "saved_model"))
fn = saved.signatures["classify_images"]
row("classify_images", np.concatenate([fn(image_bytes=tf.constant(blobs[i:i + 16]))["scores"].numpy()
                                       for i in range(0, len(blobs), 16)]))
gd = tf.compat.v1.GraphDef(); gd.ParseFromString((model_dir / "retrained_graph.pb").read_bytes())
with tf.Graph().as_default() as g:
    tf.compat.v1.import_graph_def(gd, name="")
    with tf.compat.v1.Session(graph=g) as s:
        row("plain_tf_recipe", np.concatenate([s.run("final_result:0", {"input:0": pixels[i:i + 16]})
                                               for i in range(0, len(pixels), 16)]))
from ai_edge_litert.interpreter import Interpreter
lite = Interpreter(model_path=str(model_dir / "model.tflite")).get_signature_runner("serving_default")
row("litert_model.tflite", np.concatenate([lite(images=pixels[i:i + 1])["scores"] for i in range(len(pixels))]))
import onnxruntime as ort
sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
row("onnxruntime_model.onnx", np.concatenate([sess.run(None, {sess.get_inputs()[0].name: pixels[i:i + 16]})[0]
                                              for i in range(0, len(pixels), 16)]))
# int8 vs float: accuracy against the folder labels, size, LiteRT latency (batch 1)
i8 = Interpreter(model_path=str(model_dir / "model_int8.tflite"))
run8 = i8.get_signature_runner("serving_default")
scale, zero = i8.get_output_details()[0]["quantization"]
u8 = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
def timed(fn, xs):
    fn(xs[0]); t = time.perf_counter(); res = [fn(x) for x in xs]; return res, 1000 * (time.perf_counter() - t) / len(xs)
s8, ms8 = timed(lambda x: (run8(images=x[None])["scores"][0].astype(np.float32) - zero) * scale, u8)
sf, msf = timed(lambda x: lite(images=x[None])["scores"][0], pixels)
s8, sf = np.stack(s8), np.stack(sf)
acc = lambda s: float(np.mean([labels[i] == t for i, t in zip(s.argmax(1), truth)]))
out["int8"] = {"accuracy_float": acc(sf), "accuracy_int8": acc(s8), "accuracy_label": acc(ref),
               "top1_agree_with_float": float((s8.argmax(1) == sf.argmax(1)).mean()),
               "size_float_bytes": (model_dir / "model.tflite").stat().st_size,
               "size_int8_bytes": (model_dir / "model_int8.tflite").stat().st_size,
               "litert_ms_per_image_float": round(msf, 2), "litert_ms_per_image_int8": round(ms8, 2)}
out["int8"]["size_ratio"] = out["int8"]["size_int8_bytes"] / out["int8"]["size_float_bytes"]
print(json.dumps(out, indent=1))
