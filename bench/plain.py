"""Plaintext side of the benchmark (its own process, no cluster): train, reference, time.

Trains the 2020 tutorial CNN on Fashion-MNIST (one epoch), saves it as ``.keras``, saves the
test images the private runs will query with their plaintext Keras logits, and times plaintext
inference at each batch size, so that private and plaintext figures come from the same run.
Writes ``plain.json`` in the output directory.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "inst", "python"))


def tutorial_cnn(keras):
    """The 2020 tutorial's CNN, without a fixed batch size (shared at any batch size)."""
    L = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(16, 3, padding="same"), L.AveragePooling2D(2), L.ReLU(),
        L.Conv2D(32, 3, padding="same"), L.AveragePooling2D(2), L.ReLU(),
        L.Conv2D(64, 3, padding="same"), L.AveragePooling2D(2), L.ReLU(),
        L.Flatten(), L.Dense(10, name="logit"),
    ], name="tutorial_cnn")


def time_calls(fn, x, repeats):
    """Seconds per call of ``fn(x)``, after two untimed calls (tracing, caches)."""
    fn(x)
    fn(x)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--images", type=int, required=True, help="test images to save with logits")
    p.add_argument("--batches", required=True, help="comma-separated batch sizes to time")
    p.add_argument("--repeats", type=int, default=50, help="timed calls per batch size")
    p.add_argument("--train-images", type=int, default=60000)
    p.add_argument("--reuse-model", action="store_true",
                   help="reuse OUT/tutorial_cnn.keras when it exists instead of training")
    a = p.parse_args()

    import keras
    import tensorflow as tf

    from privatekeras.data import load_fashion_mnist

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    model_path = os.path.join(a.out, "tutorial_cnn.keras")
    info = {"tensorflow": tf.__version__, "keras": keras.__version__}
    trained_path = os.path.join(a.out, "tutorial_cnn.json")  # how the saved model was made
    if a.reuse_model and os.path.exists(model_path) and os.path.exists(trained_path):
        print("bench: reusing {}".format(model_path), file=sys.stderr, flush=True)
        model = keras.models.load_model(model_path)
        with open(trained_path) as f:
            info.update(json.load(f))
    else:
        keras.utils.set_random_seed(2020)
        model = tutorial_cnn(keras)
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        n = min(a.train_images, len(x_train))
        print("bench: training the tutorial CNN for one epoch on {} images ...".format(n),
              file=sys.stderr, flush=True)
        t0 = time.monotonic()
        model.fit(x_train[:n], y_train[:n], epochs=1, batch_size=64, verbose=0)
        trained = {"train_images": n, "train_seconds": time.monotonic() - t0}
        model.save(model_path)
        with open(trained_path, "w") as f:
            json.dump(trained, f)
        info.update(trained)
    _, acc = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    info["test_accuracy"] = float(acc)
    print("bench: plaintext test accuracy {:.1%}".format(acc), file=sys.stderr, flush=True)

    images = x_test[:a.images]
    np.save(os.path.join(a.out, "images.npy"), images)
    np.save(os.path.join(a.out, "plain_logits.npy"), model.predict(images, batch_size=100,
                                                                    verbose=0))

    timings = {}
    for b in [int(s) for s in a.batches.split(",")]:
        x = x_test[:b]
        call = time_calls(lambda v: model(v, training=False), tf.constant(x), a.repeats)
        pob = time_calls(model.predict_on_batch, x, a.repeats)
        timings[str(b)] = {"call_s": call, "predict_on_batch_s": pob}
        print("bench: plaintext batch {}: model(x) {:.2f} ms, predict_on_batch {:.2f} ms "
              "(medians)".format(b, 1e3 * np.median(call), 1e3 * np.median(pob)),
              file=sys.stderr, flush=True)
    info["timings"] = timings
    info["model_path"] = model_path
    with open(os.path.join(a.out, "plain.json"), "w") as f:
        json.dump(info, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
