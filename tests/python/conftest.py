"""Shared fixtures: real Fashion-MNIST models, free ports, real processes, leak checks."""

import collections
import contextlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYDIR = os.path.join(ROOT, "inst", "python")
SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"
sys.path.insert(0, PYDIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every process this test run starts inherits this tag, so the leak check counts only our
# own workers (other test runs on the same machine are none of its business).
RUN_TAG = "PRIVATEKERAS_TEST_RUN={}".format(os.getpid())
os.environ["PRIVATEKERAS_TEST_RUN"] = str(os.getpid())

from privatekeras.cluster import _port_in_use  # noqa: E402

# The stated tolerance for private vs plaintext logits (argmax must agree as well). ABY3
# encodes with 16 fractional bits; typical errors are ~1e-4, the worst seen ~0.004.
LOGIT_ATOL = 0.05
N_IMAGES = 100


# What the load, fault and bad-input tests did, summed over the run and printed at the end
# (the `make stress` summary): queries sent/answered/correct, faults injected/survived, bad
# inputs tried/rejected with a clear error, worker processes leaked.
TALLY = collections.Counter()


def pytest_terminal_summary(terminalreporter):
    t = TALLY
    terminalreporter.write_line(
        "privatekeras stress summary: queries sent {} / answered {} / correct {}; faults "
        "injected {} / survived {}; bad inputs tried {} / rejected with a clear error {}; "
        "processes leaked {}".format(
            t["queries sent"], t["queries answered"], t["queries correct"],
            t["faults injected"], t["faults survived"], t["bad inputs tried"],
            t["bad inputs rejected"], t["processes leaked"]))


@contextlib.contextmanager
def rejects(exc_type, match=None):
    """``pytest.raises`` that also counts one bad input tried and rejected with a clear error
    (an error of the expected class whose message matches)."""
    TALLY["bad inputs tried"] += 1
    with pytest.raises(exc_type, match=match) as info:
        yield info
    TALLY["bad inputs rejected"] += 1


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [PYDIR, env.get("PYTHONPATH", "")] if p)
    return env


# The start of a three-party check that runs in a fresh Python (see run_checks): TensorFlow
# with three logical CPUs, ABY3 over them (``prot``, ``devices``, TF Encrypted's ``aby3_mod``,
# ``ABY3PrivateTensor``, ``ShareType``), ``rand(*shape)`` full-range int64 values from ``rng``
# (seeded with SEED, which the check sets first) and ``share(value, kind, scaled)``: a numpy
# array split into replicated shares, party i holding shares i and i + 1 on its device.
ABY3_PRELUDE = """
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 3)
from privatekeras.mpc.aby3 import ABY3Engine
devices = ["/job:localhost/replica:0/task:0/device:CPU:%d" % i for i in range(3)]
prot = ABY3Engine.in_process(devices).prot  # imports TF Encrypted, patched
from tf_encrypted.protocol.aby3 import aby3 as aby3_mod
from tf_encrypted.protocol.aby3.aby3_tensors import ABY3PrivateTensor, ShareType
rng = np.random.default_rng(SEED)
def rand(*shape):
    return rng.integers(-2**63, 2**63 - 1, size=shape, dtype=np.int64, endpoint=True)
def share(value, kind=ShareType.ARITHMETIC, scaled=True):
    s = [rand(*value.shape), rand(*value.shape)]
    with np.errstate(over="ignore"):
        s.append(value ^ s[0] ^ s[1] if kind == ShareType.BOOLEAN else value - s[0] - s[1])
    pairs = []
    for i, device in enumerate(devices):
        with tf.device(device):
            pairs.append([prot.default_factory.tensor(tf.constant(s[(i + j) % 3]), encode=False)
                          for j in range(2)])
    return ABY3PrivateTensor(prot, pairs, scaled, kind)
"""


def aby3_check(body, seed):
    """The code of a three-party check: :data:`ABY3_PRELUDE` (its ``rng`` seeded with
    ``seed``), then ``body``."""
    return "SEED = {}\n{}\n{}".format(int(seed), ABY3_PRELUDE, body)


def last_line_per_setting(code, variable, wants, timeout=300):
    """Run ``code`` in a fresh Python once for each value of the environment ``variable``
    in ``wants``; the last line each run prints must be ``wants[value]``."""
    for value, want in wants.items():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(child_env(), **{variable: value}), timeout=timeout)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == want, (variable, value)


def run_checks(code, timeout, **env):
    """Run ``code`` in a fresh Python (privatekeras on its path, ``env`` added to its
    environment); it prints ``ALL`` when every one of its checks held, ``MISMATCH``
    otherwise. Fails the test on anything but ``ALL``."""
    out = subprocess.run([sys.executable, "-c", code], env=dict(child_env(), **env),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ALL" in out.stdout, out.stdout + out.stderr[-2000:]


# Not the `random` module: tests seed it (keras.utils.set_random_seed), and every test run
# on this machine would then pick the same ports at the same moment.
_PORTS = random.SystemRandom()


def free_hosts():
    """Three free loopback ports as 'localhost:port' strings."""
    while True:
        base = _PORTS.randrange(20000, 40000, 3)
        ports = [base, base + 1, base + 2]
        if not any(_port_in_use(p) for p in ports):
            return ["localhost:{}".format(p) for p in ports]


def _is_worker_cmdline(cmd):
    """``python -m privatekeras worker ...`` (or the ``privatekeras worker`` script)."""
    return any(a.endswith(b"privatekeras") and b == b"worker" for a, b in zip(cmd, cmd[1:]))


def worker_pids():
    """PIDs of the running privatekeras worker processes started by this test run."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/{}/cmdline".format(entry), "rb") as f:
                cmd = f.read().split(b"\0")
            if not _is_worker_cmdline(cmd):
                continue
            with open("/proc/{}/environ".format(entry), "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if RUN_TAG.encode() in env:
            pids.append(int(entry))
    return pids


@pytest.fixture(autouse=True)
def no_leaked_workers():
    """Every test must end all the worker processes it started, and free their ports."""
    before = set(worker_pids())
    yield
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and set(worker_pids()) - before:
        time.sleep(0.2)
    leaked = set(worker_pids()) - before
    TALLY["processes leaked"] += len(leaked)
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not leaked, "worker processes leaked: {}".format(sorted(leaked))


def tutorial_cnn(keras, batch_size=None):
    """The 2020 tutorial's CNN."""
    L = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1), batch_size=batch_size),
        L.Conv2D(16, 3, padding="same"), L.AveragePooling2D(2), L.ReLU(),
        L.Conv2D(32, 3, padding="same"), L.AveragePooling2D(2), L.ReLU(),
        L.Conv2D(64, 3, padding="same"), L.AveragePooling2D(2), L.ReLU(),
        L.Flatten(), L.Dense(10, name="logit"),
    ], name="tutorial_cnn")


def bn_maxpool_cnn(keras):
    """A CNN with BatchNormalization, MaxPooling, 'valid' and strided convs and a softmax."""
    L = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        L.Conv2D(8, 3, strides=2, padding="valid"), L.BatchNormalization(), L.ReLU(),
        L.MaxPooling2D(2),
        L.Conv2D(16, 3, padding="same", activation="relu"),
        L.Flatten(), L.Dense(32), L.BatchNormalization(), L.Activation("relu"),
        L.Dropout(0.2), L.Dense(10, activation="softmax"),
    ], name="bn_maxpool_cnn")


def residual_cnn(keras, rng):
    """A branched image model with a final sigmoid: Rescaling, Conv2D, standalone
    BatchNormalization after a ReLU (randomised), ZeroPadding2D, a residual Add of three
    inputs (one tensor twice), LeakyReLU as a layer and as an activation, Concatenate of two
    branches, MaxPooling2D 'same' after a ReLU, GlobalAveragePooling2D."""
    L = keras.layers
    inp = keras.Input((10, 10, 3))
    x = L.Rescaling(1 / 255.0, offset=-0.5)(inp)
    x = L.Conv2D(6, 3, padding="same", activation="relu")(x)
    x = L.BatchNormalization()(x)
    y = L.ZeroPadding2D(((1, 0), (2, 1)))(x)
    y = L.Conv2D(6, (2, 4), activation="leaky_relu")(y)
    x = L.Add()([x, y, x])
    x = L.LeakyReLU(0.1)(x)
    x = L.Concatenate()([L.Conv2D(3, 1)(x), L.ReLU()(x)])
    x = L.ReLU()(x)
    x = L.MaxPooling2D(3, strides=2, padding="same")(x)
    out = L.Dense(1, activation="sigmoid")(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out, name="residual")
    randomize_batchnorm(model, rng)
    return model


def randomize_batchnorm(model, rng):
    """Give every BatchNormalization layer statistics far from the identity."""
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            layer.set_weights([rng.uniform(0.5, 2, w.shape) if i in (0, 3) else
                               rng.normal(0, 0.5, w.shape) for i, w in enumerate(layer.get_weights())])


@pytest.fixture(scope="session")
def fashion():
    from privatekeras.data import load_fashion_mnist

    return load_fashion_mnist()


@pytest.fixture(scope="session")
def models(tmp_path_factory, fashion):
    """Trained models saved to disk, with test images and plaintext Keras logits."""
    import keras

    keras.utils.set_random_seed(1234)
    (x_train, y_train), (x_test, y_test) = fashion
    d = tmp_path_factory.mktemp("models")
    images = x_test[:N_IMAGES]
    np.save(d / "images.npy", images)
    np.save(d / "labels.npy", y_test[:N_IMAGES])

    cnn = tutorial_cnn(keras)
    cnn.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cnn.fit(x_train[:12000], y_train[:12000], epochs=1, batch_size=64, verbose=0)
    cnn.save(d / "tutorial.keras")
    np.save(d / "tutorial_logits.npy", cnn.predict(images, batch_size=50, verbose=0))

    bn = bn_maxpool_cnn(keras)
    bn.compile("adam", keras.losses.SparseCategoricalCrossentropy())
    bn.fit(x_train[:6000], y_train[:6000], epochs=1, batch_size=64, verbose=0)
    bn.save(d / "bn.keras")
    # Plaintext reference: the logits before the final softmax (Dropout is the identity at
    # inference).
    hidden = keras.Model(bn.inputs, bn.layers[-2].output).predict(images, batch_size=50, verbose=0)
    kernel, bias = bn.layers[-1].get_weights()
    np.save(d / "bn_logits.npy", hidden @ kernel + bias)
    return d


class Flow:
    """A model-owner process and a client process, run to completion."""

    def __init__(self, owner_args, client_args, timeout=420):
        self.hosts = free_hosts()
        h = ["--hosts", ",".join(self.hosts)]
        py = sys.executable
        self.owner = subprocess.Popen([py, str(SCRIPTS / "owner.py")] + h + owner_args,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=child_env())
        self.client = subprocess.Popen([py, str(SCRIPTS / "client.py")] + h + client_args,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, env=child_env())
        try:
            self.client_out = self.client.communicate(timeout=timeout)[0]
            self.owner_out = self.owner.communicate(timeout=120)[0]
        except subprocess.TimeoutExpired:
            for p in (self.client, self.owner):
                p.kill()
            self.client_out = self.client.communicate()[0]
            self.owner_out = self.owner.communicate()[0]
            raise AssertionError("flow timed out\nOWNER:\n{}\nCLIENT:\n{}".format(
                self.owner_out[-3000:], self.client_out[-3000:])) from None

    def check(self):
        assert self.client.returncode == 0 and self.owner.returncode == 0, (
            "owner rc={} client rc={}\nOWNER:\n{}\nCLIENT:\n{}".format(
                self.owner.returncode, self.client.returncode, self.owner_out[-4000:],
                self.client_out[-4000:]))
        return self


class Served:
    """A model served for the whole test session by a real model-owner process
    (scripts/owner_serve.py: it starts the cluster, shares the tutorial CNN and serves until
    its stop file appears). Tests that only need *a* served model use it instead of paying
    for a cluster start and a trace each."""

    def __init__(self, models, directory):
        from procs import Proc

        self.hosts = free_hosts()
        self.model = models / "tutorial.keras"
        self.images = np.load(models / "images.npy")
        self.images_path = models / "images.npy"
        self.plain = np.load(models / "tutorial_logits.npy")
        self.stop_file = directory / "stop"
        self.owner = Proc("owner_serve.py", ["--hosts", ",".join(self.hosts), "--model",
                                             self.model, "--stop-file", self.stop_file])
        try:
            self.owner.wait_for("SERVING", 300)
            self.client(timeout=120)._served_spec()  # worker 0 serves
        except BaseException:
            self.owner.kill()
            raise

    def cluster(self):
        """A fresh description of the cluster, as another process on this machine makes it."""
        import privatekeras as pk

        return pk.Cluster(self.hosts, auto_managed=False)

    def client(self, timeout=30):
        import privatekeras as pk

        return pk.connect(self.cluster(), (1, 28, 28, 1), (1, 10), timeout=timeout)

    def answered(self):
        """Queries answered so far in this serving session (worker 0's public board)."""
        board = self.cluster().status("client")[0]
        assert board.state == "serving", (board.state, board.message)
        return board.answered

    def check_answers(self, first=0, count=3):
        """Query images [first, first + count) from this process; each answer must match
        plaintext Keras."""
        c = self.client()
        got = c.query(self.images[first:first + count])
        expect = self.plain[first:first + count]
        assert (got.argmax(1) == expect.argmax(1)).all(), (got, expect)
        np.testing.assert_allclose(got, expect, atol=LOGIT_ATOL)
        TALLY["queries sent"] += count
        TALLY["queries answered"] += count
        TALLY["queries correct"] += count
        return got

    def close(self):
        """Stop serving; it must not wait for answers that dead clients never fetched."""
        t0 = time.monotonic()
        self.stop_file.write_text("stop")
        try:
            rc = self.owner.wait(120)
        finally:
            self.owner.kill()
        assert rc == 0, self.owner.output[-3000:]
        assert "SERVED" in self.owner.output, self.owner.output[-3000:]
        assert time.monotonic() - t0 < 30, "stopping took {:.0f} s".format(
            time.monotonic() - t0)


@pytest.fixture(scope="session")
def served(models, tmp_path_factory):
    s = Served(models, tmp_path_factory.mktemp("served"))
    yield s
    s.close()
