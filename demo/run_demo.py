"""`make demo`: the 2020 tutorial's flow, private and end to end, on Fashion-MNIST.

1. Trains the tutorial CNN for one epoch (the model owner's plaintext model).
2. Starts a model-owner process (demo/serve.py): three workers, share, serve N queries.
3. Starts a separate client process (demo/client.py): secret-shares each test image,
   reconstructs the logits, prints `Actual: <label>, predicted: <label>` and compares with
   plaintext Keras.
4. Everything shuts down; the exit code is non-zero if anything failed or disagreed.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "inst", "python"))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10, help="test images to query privately")
    p.add_argument("--hosts", default="localhost:4000,localhost:4001,localhost:4002")
    p.add_argument("--out", default=os.path.join(ROOT, "demo-output"))
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras

    from privatekeras.data import load_fashion_mnist

    keras.utils.set_random_seed(2020)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    L = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1), batch_size=1),
        L.Conv2D(16, 3, padding="same"), L.AveragePooling2D(2), L.ReLU(),
        L.Conv2D(32, 3, padding="same"), L.AveragePooling2D(2), L.ReLU(),
        L.Conv2D(64, 3, padding="same"), L.AveragePooling2D(2), L.ReLU(),
        L.Flatten(), L.Dense(10, name="logit"),
    ], name="tutorial_cnn")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    print("demo: training the tutorial CNN for one epoch on 60,000 Fashion-MNIST images ...",
          flush=True)
    t0 = time.monotonic()
    # Train with a batch size of 64; the saved model keeps the fixed serving batch of 1.
    trainer = keras.Sequential([keras.Input((28, 28, 1))] + model.layers, name="trainer")
    trainer.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    trainer.fit(x_train, y_train, epochs=1, batch_size=64, verbose=2)
    _, acc = trainer.evaluate(x_test, y_test, batch_size=500, verbose=0)
    print("demo: trained in {:.0f} s; plaintext test accuracy {:.1%}".format(
        time.monotonic() - t0, acc), flush=True)

    model_path = os.path.join(a.out, "tutorial_cnn.keras")
    model.save(model_path)
    n = a.images
    np.save(os.path.join(a.out, "images.npy"), x_test[:n])
    np.save(os.path.join(a.out, "labels.npy"), y_test[:n])
    np.save(os.path.join(a.out, "plaintext_logits.npy"),
            model.predict(x_test[:n], batch_size=1, verbose=0))

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        x for x in [os.path.join(ROOT, "inst", "python"), env.get("PYTHONPATH", "")] if x)
    owner = subprocess.Popen([sys.executable, os.path.join(HERE, "serve.py"), model_path,
                              a.hosts, str(n)], env=env)
    client = subprocess.Popen([sys.executable, os.path.join(HERE, "client.py"), a.out, a.hosts],
                              env=env)
    try:
        client_rc = client.wait(timeout=900)
        owner_rc = owner.wait(timeout=120)
    except subprocess.TimeoutExpired:
        client.kill()
        owner.kill()
        print("demo: FAILED, timed out", flush=True)
        return 1
    if client_rc or owner_rc:
        print("demo: FAILED (model owner exit {}, client exit {})".format(owner_rc, client_rc))
        return 1
    print("demo: done; everything shut down", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
