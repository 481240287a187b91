"""The CKKS backend with a real server process (``privatekeras worker --scheme ckks``), real
TenSEAL keys and ciphertexts, real gRPC with mutual TLS; nothing is mocked.

* Keras logistic and softmax regressions (with Normalization and Dropout) and coefficient
  matrices: the decrypted linear predictor equals plaintext within 1e-3, classes agree on
  every row, ``predict_proba`` equals ``model.predict``; any number of rows per query.
* The server's contexts have no secret key: the server says so for each client context it
  checked, and a query whose context carries a secret key is refused.
* A model with a hidden ReLU is refused at ``share()`` with the reason and the three-party
  backend named; bad inputs get one clear error each; a server that is gone is a clear error
  within the client's timeout, not a hang.
* The parameters come from the HE standard's 128-bit table.
"""

import contextlib
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import privatekeras as pk
from conftest import child_env, free_hosts, rejects
from privatekeras import wire
from privatekeras.ckks import params as ckks_params

ETA_ATOL = 1e-3


@pytest.fixture(scope="module")
def server():
    srv = pk.Server(free_hosts()[0]).start()
    yield srv
    srv.stop()


def _client_view(srv, timeout=30):
    return pk.connect(pk.Server(srv.host, auto_managed=False), timeout=timeout)


@contextlib.contextmanager
def serving(model, srv, **share_args):
    """Share ``model`` on ``srv`` and serve it from a thread while the block runs."""
    shared = pk.share(model, srv, **share_args)
    thread = threading.Thread(target=shared.serve, daemon=True)
    thread.start()
    try:
        yield shared
    finally:
        shared.stop()
        thread.join(30)
        assert not thread.is_alive()


def _keras_data(rng, n, d):
    x = rng.normal(loc=3.0, scale=2.0, size=(n, d))
    w = rng.normal(size=d)
    y = (x @ w - (x @ w).mean() + rng.normal(scale=0.5, size=n) > 0).astype("float32")
    return x.astype("float32"), y


def _logistic_keras(x, y):
    import keras

    keras.utils.set_random_seed(3)
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = keras.Sequential([keras.Input((x.shape[1],)), norm, keras.layers.Dropout(0.1),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    model.fit(x, y, epochs=5, verbose=0)
    return model


def _logits(model, x):
    """The plaintext linear predictor of a Keras model ending in Dense(activation=...)."""
    import keras

    head = keras.Model(model.inputs, model.layers[-1].output)
    last = model.layers[-1]
    saved, last.activation = last.activation, keras.activations.linear
    try:
        return np.asarray(head.predict(x, verbose=0), np.float64)
    finally:
        last.activation = saved


def test_keras_logistic_regression_matches_plaintext(server):
    rng = np.random.default_rng(0)
    x, y = _keras_data(rng, 400, 30)
    model = _logistic_keras(x, y)
    plain_eta, plain_p = _logits(model, x), model.predict(x, verbose=0)
    with serving(model, server, input_range=(-10, 16)) as shared:
        assert shared.public_spec["output_activation"] == "sigmoid"
        client = _client_view(server)
        eta = client.query(x)
        proba = client.predict_proba(x[:7])
        client.close()
    err = np.abs(eta - plain_eta).max()
    print("max |eta - plaintext| = {:.2e}".format(err))
    assert eta.shape == (400, 1)
    assert err < ETA_ATOL
    assert ((eta > 0) == (plain_eta > 0)).all()
    np.testing.assert_allclose(proba, plain_p[:7], atol=1e-4)


def test_keras_softmax_regression_and_batches_beyond_one_ciphertext(server):
    import keras

    rng = np.random.default_rng(1)
    d, k = 6, 3
    x = rng.uniform(0, 10, size=(5000, d)).astype("float32")
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = keras.Sequential([keras.Input((d,)), norm, keras.layers.Dense(5),
                              keras.layers.Dropout(0.2),
                              keras.layers.Dense(k, activation="softmax")])
    plain_eta, plain_p = _logits(model, x), model.predict(x, verbose=0)
    with serving(model, server, input_range=(0, 10)) as shared:
        slots = shared.public_spec["ckks"]["slots"]
        assert x.shape[0] > slots  # several queries of N/2 rows each
        client = _client_view(server)
        before = shared.served
        eta = client.query(x)
        proba = client.predict_proba(x[:1])  # one row
        client.close()
    assert eta.shape == (5000, k)
    assert np.abs(eta - plain_eta).max() < ETA_ATOL
    assert (eta.argmax(1) == plain_eta.argmax(1)).all()
    np.testing.assert_allclose(proba, plain_p[:1], atol=1e-4)
    assert shared.served - before == -(-5000 // slots) + 1


def test_coefficient_matrix_from_python_with_a_link(server):
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(4, 1)), np.array([0.3])
    model = pk.ckks.LinearModel(w, b, link="log", feature_names=["a", "b", "c", "d"],
                                name="poisson")
    x = rng.uniform(-1, 1, size=(10, 4))
    with serving(model, server, input_range=(-1, 1)):
        client = _client_view(server)
        mu = client.predict_proba(x)
        assert client.features == ["a", "b", "c", "d"]
        client.close()
    np.testing.assert_allclose(mu, np.exp(x @ w + b), rtol=1e-4)


def test_server_contexts_hold_no_secret_key(server):
    """The server checks each client context: none holds a secret key (its log says so per
    context), and a query whose context carries the secret key is refused and not evaluated."""
    from privatekeras.ckks.engine import make_context
    from privatekeras.deploy import pki

    rng = np.random.default_rng(3)
    model = pk.ckks.LinearModel(rng.normal(size=(3, 2)), rng.normal(size=2))
    with serving(model, server, input_range=(0, 1)) as shared:
        client = _client_view(server)
        client.query(rng.uniform(size=(5, 3)))
        public = client._keys[2]
        # The client's own check of what it sent: parameters only.
        from privatekeras.ckks._tenseal import tenseal

        ts = tenseal()
        assert not ts.context_from(public).is_private()
        # A query whose context carries the secret key (a broken client), sent by hand:
        spec = client.describe()
        private_ctx = make_context(spec["ckks"], secret=True)
        leaked = private_ctx.serialize(save_secret_key=True)
        blobs = [ts.ckks_vector(private_ctx, [0.5]).serialize() for _ in range(3)]
        secret = os.urandom(32)
        creds = pki.load_local(server._local_key(), "client")
        stub = wire.Stub(wire.channel(server.host, creds, "worker0"))
        qid = os.urandom(16).hex()
        board = stub.Status(wire.M.Empty(), timeout=5)
        stub.Submit(wire.M.SubmitRequest(query_id=qid, model_id=spec["model_id"],
                                         session=board.session, fetch_digest=wire.digest(secret),
                                         context=leaked, blobs=blobs), timeout=10)
        with rejects(pk.InputError, match="secret key"):
            try:
                stub.Fetch(wire.M.FetchRequest(query_id=qid, fetch_secret=secret,
                                               wait_seconds=5), timeout=15)
            except Exception as exc:  # noqa: BLE001
                raise wire.translate(exc, "worker0") from None
        stub.close()
        answered = shared.served
        client.close()
    log = server._worker_log(0, tail=1000000)
    checked = [line for line in log.splitlines() if "client context" in line]
    assert checked and all("public (no secret key)" in line for line in checked)
    assert answered >= 1


def test_hidden_relu_is_refused_with_the_reason(server):
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    with rejects(pk.UnsupportedLayerError, match="nonlinearity.*three-party"):
        pk.share(model, server)
    hidden_sigmoid = keras.Sequential([keras.Input((4,)),
                                       keras.layers.Dense(8, activation="sigmoid"),
                                       keras.layers.Dense(1)])
    with rejects(pk.UnsupportedLayerError, match="three-party"):
        pk.share(hidden_sigmoid, server)
    conv = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3),
                             keras.layers.Flatten(), keras.layers.Dense(1)])
    with rejects(pk.UnsupportedLayerError, match="three-party"):
        pk.share(conv, server)


def test_bad_inputs_get_one_clear_error(server):
    rng = np.random.default_rng(4)
    model = pk.ckks.LinearModel(rng.normal(size=(4, 1)), [0.1], link="logit")
    with serving(model, server, input_range=(0, 10)):
        client = _client_view(server)
        good = rng.uniform(0, 10, size=(3, 4))
        client.query(good)
        with rejects(pk.InputError, match="4 features per row.*has 3"):
            client.query(good[:, :3])
        with rejects(pk.InputError, match="NaN"):
            bad = good.copy()
            bad[1, 2] = np.nan
            client.query(bad)
        with rejects(pk.InputError, match="matrix of rows"):
            client.query(np.zeros((2, 2, 4)))
        with rejects(pk.InputError, match="empty"):
            client.query(np.zeros((0, 4)))
        with rejects(pk.InputError, match="numeric"):
            client.query(np.array([["a", "b", "c", "d"]]))
        with rejects(pk.InputError, match="outside the range"):
            client.query(good * 100)
        # Still answering afterwards:
        np.testing.assert_allclose(client.query(good), model.linear_predictor(good), atol=1e-3)
        client.close()


def test_client_refuses_parameters_below_128_bit_security():
    ok = ckks_params.choose(10, 1024, 1, 4)
    assert sum(ok["coeff_mod_bit_sizes"]) <= ckks_params.HE_STANDARD_128[
        ok["poly_modulus_degree"]]
    ckks_params.check_secure(ok)
    weak = dict(ok, poly_modulus_degree=4096, coeff_mod_bit_sizes=[60, 40, 40])
    with pytest.raises(ValueError, match="below 128-bit"):
        ckks_params.check_secure(weak)
    # Depth decides the chain: a deeper evaluation needs more primes, hence a larger N.
    deep = ckks_params.choose(10, 1024, 1, 4, depth=4)
    assert deep["poly_modulus_degree"] > ok["poly_modulus_degree"]


def test_owner_cannot_query_and_client_cannot_upload(server):
    from privatekeras.deploy import pki

    owner = wire.Stub(wire.channel(server.host, pki.load_local(server._local_key(), "owner"),
                                   "worker0"))
    with pytest.raises(pk.AccessDeniedError):
        try:
            owner.Submit(wire.M.SubmitRequest(), timeout=5)
        except Exception as exc:  # noqa: BLE001
            raise wire.translate(exc, "worker0") from None
    client = wire.Stub(wire.channel(server.host, pki.load_local(server._local_key(), "client"),
                                    "worker0"))
    with pytest.raises(pk.AccessDeniedError):
        try:
            client.Upload(iter([wire.M.UploadChunk()]), timeout=5)
        except Exception as exc:  # noqa: BLE001
            raise wire.translate(exc, "worker0") from None
    owner.close()
    client.close()


def test_server_gone_is_a_clear_error_without_a_hang():
    """A client in another process: its server is killed between two queries."""
    srv = pk.Server(free_hosts()[0]).start()
    try:
        rng = np.random.default_rng(5)
        model = pk.ckks.LinearModel(rng.normal(size=(2, 1)))
        script = (
            "import sys, time, numpy as np, privatekeras as pk\n"
            "c = pk.connect(pk.Server(sys.argv[1], auto_managed=False), timeout=8)\n"
            "print('FIRST', c.query(np.ones((1, 2)))[0, 0], flush=True)\n"
            "sys.stdin.readline()\n"
            "t = time.monotonic()\n"
            "try:\n"
            "    c.query(np.ones((1, 2)))\n"
            "except pk.PrivateKerasError as e:\n"
            "    print('ERROR', type(e).__name__, round(time.monotonic() - t, 1), e, flush=True)\n")
        with serving(model, srv, input_range=(0, 1)):
            proc = subprocess.Popen([sys.executable, "-c", script, srv.host], env=child_env(),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            first = proc.stdout.readline()
            assert first.startswith("FIRST"), first + proc.stderr.read()
            os.kill(srv.pids[0], 9)
            proc.stdin.write("\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=60)
    finally:
        srv.stop()
    print(out)
    assert "ERROR WorkerUnavailableError" in out or "ERROR NotServingError" in out, out + err
    assert float(out.split()[2]) < 20


def test_keys_and_encryptions_draw_from_the_os_csprng(tmp_path):
    """SEAL (under TenSEAL) seeds its PRNG from /dev/urandom for the secret key and again
    for every encryption: seen in the system calls of a client's key generation and
    encryption."""
    import shutil

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    script = (
        "import os\n"
        "from privatekeras.ckks._tenseal import tenseal\n"
        "from privatekeras.ckks.engine import make_context\n"
        "ts = tenseal()\n"
        "p = {'poly_modulus_degree': 4096, 'coeff_mod_bit_sizes': [40, 40, 29], "
        "'scale_bits': 34}\n"
        "os.write(2, b'MARK-KEYS')\n"
        "ctx = make_context(p)\n"
        "os.write(2, b'MARK-ENCRYPT')\n"
        "ts.ckks_vector(ctx, [1.0, 2.0])\n"
        "os.write(2, b'MARK-END')\n")
    trace = tmp_path / "trace.txt"
    res = subprocess.run(["strace", "-f", "-e", "trace=openat,getrandom,write", "-o",
                          str(trace), sys.executable, "-c", script], env=child_env(),
                         capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    text = trace.read_text()
    keys = text.split("MARK-KEYS", 1)[1].split("MARK-ENCRYPT", 1)[0]
    encrypt = text.split("MARK-ENCRYPT", 1)[1].split("MARK-END", 1)[0]
    for part in (keys, encrypt):
        assert "/dev/urandom" in part or "getrandom(" in part
