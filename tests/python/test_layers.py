"""Every supported layer kind, served privately by three real worker processes.

Each model is shared onto one cluster (started once for this module), served from a thread of
this process (the model owner) and queried by a client connection: ``predict_proba()`` must
equal ``model.predict()`` within PROBA_ATOL with 100 % agreement of the predicted class, and
``query()`` must return the values before the final activation. The fixed-point range check
is shown to matter: a model just inside the headroom answers exactly at its extreme input,
one just beyond it is refused, and the same model forced through anyway answers wrong.
"""

import threading

import numpy as np
import pytest

import privatekeras as pk
from conftest import LOGIT_ATOL, TALLY, free_hosts, rejects, residual_cnn

# Probabilities from the private evaluation (16 fractional bits) vs float32 Keras; the errors
# seen are ~1e-5. Classes: argmax (softmax), p > 0.5 (sigmoid).
PROBA_ATOL = 1e-3


@pytest.fixture(scope="module")
def cluster():
    c = pk.Cluster(free_hosts()).start()
    yield c
    c.stop()


def classes(p):
    return p.argmax(-1) if p.shape[-1] > 1 else (p[..., 0] > 0.5).astype(int)


def serve_and_ask(cluster, model, x, input_range, batch_size=1):
    """Share ``model``, serve it from a thread, and ask for ``x`` twice (``query`` and
    ``predict_proba``); returns (values, probabilities, shared model)."""
    shared = pk.share(model, cluster, input_range=input_range, batch_size=batch_size)
    batches = -(-len(x) // batch_size)
    server = threading.Thread(target=shared.serve, kwargs={"num_requests": 2 * batches})
    server.start()
    try:
        client = pk.connect(cluster, (batch_size,) + x.shape[1:],
                            (batch_size,) + tuple(shared.output_shape[1:]), timeout=60)
        values = client.query(x)
        proba = client.predict_proba(x)
        client.close()
    finally:
        server.join(timeout=300)
    assert not server.is_alive()
    TALLY["queries sent"] += 2 * batches
    TALLY["queries answered"] += shared.served
    return values, proba, shared


def check(model, x, proba, values=None, atol=PROBA_ATOL):
    plain = model.predict(x, verbose=0)
    err = np.abs(proba - plain).max()
    agree = (classes(proba) == classes(plain)).mean()
    print("{}: max probability error {:.2e}, class agreement {:.0%}".format(model.name, err, agree))
    assert proba.shape == plain.shape and err < atol and agree == 1.0
    TALLY["queries correct"] += 2 * len(x)


def test_residual_branched_image_model_with_sigmoid(cluster):
    """conftest.residual_cnn (Rescaling, Conv2D, standalone BatchNormalization as a private
    affine map, ZeroPadding2D, residual Add, LeakyReLU, Concatenate, MaxPooling2D 'same',
    GlobalAveragePooling2D, final sigmoid), in batches of 2 with a padded last batch."""
    import keras

    rng = np.random.default_rng(10)
    model = residual_cnn(keras, rng)
    model.layers[-1].set_weights([rng.normal(0, 0.5, (9, 1)), np.array([-1.0])])
    x = rng.uniform(0, 255, (5, 10, 10, 3))
    values, proba, shared = serve_and_ask(cluster, model, x, (0, 255), batch_size=2)
    check(model, x, proba)
    assert shared.public_spec["output_activation"] == "sigmoid"
    features = keras.Model(model.inputs, model.layers[-2].output).predict(x, verbose=0)
    kernel, bias = model.layers[-1].get_weights()
    np.testing.assert_allclose(values, features @ kernel + bias, atol=LOGIT_ATOL)


def test_one_dimensional_model_with_normalization_and_softmax(cluster):
    """Normalization (folded into the first Conv1D), Conv1D valid/causal/same, MaxPooling1D,
    AveragePooling1D, Activation('leaky_relu'), a Dense on every step, GlobalAveragePooling1D,
    final softmax."""
    import keras

    L = keras.layers
    rng = np.random.default_rng(11)
    norm = L.Normalization()
    norm.adapt(rng.normal(3, 2, (200, 20, 4)))
    model = keras.Sequential([
        keras.Input((20, 4)), norm,
        L.Conv1D(6, 3, activation="relu"), L.MaxPooling1D(2),
        L.Conv1D(6, 3, padding="causal"), L.Activation("leaky_relu"),
        L.Conv1D(6, 2, padding="same", activation="relu"), L.AveragePooling1D(2),
        L.Dense(5), L.GlobalAveragePooling1D(), L.Dense(3, activation="softmax"),
    ], name="steps")
    x = np.clip(rng.normal(3, 2, (4, 20, 4)), -10, 16)
    values, proba, _ = serve_and_ask(cluster, model, x, (-10, 16))
    check(model, x, proba)
    e = np.exp(values - values.max(1, keepdims=True))  # two evaluations, fresh randomness:
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), proba, atol=1e-4)  # ~1 ulp apart


def test_trained_binary_classifier_on_tabular_data(cluster):
    """The model an analyst brings most: Normalization, Dense(relu), Dense(1, sigmoid),
    trained; every test row gets the same class as model.predict()."""
    import keras

    L = keras.layers
    keras.utils.set_random_seed(12)
    rng = np.random.default_rng(12)
    x = rng.normal([40, 5, 100, 0.5], [10, 2, 30, 0.2], (400, 4))
    y = ((x[:, 0] - 40) / 10 + (x[:, 2] - 100) / 30 - (x[:, 1] - 5) / 2 > 0).astype(int)
    norm = L.Normalization()
    norm.adapt(x)
    model = keras.Sequential([keras.Input((4,)), norm, L.Dense(8, activation="relu"),
                              L.Dense(1, activation="sigmoid")], name="tabular")
    model.compile("adam", "binary_crossentropy")
    model.fit(x, y, epochs=30, batch_size=32, verbose=0)
    test = x[:24]
    _, proba, shared = serve_and_ask(cluster, model, test, (-50, 300), batch_size=8)
    check(model, test, proba)
    assert [n["kind"] for n in shared.public_spec["nodes"]] == ["dense", "relu", "dense"]


def _wide(keras, weight, n=256):
    model = keras.Sequential([keras.Input((n,)), keras.layers.Dense(1, name="wide")],
                             name="wide")
    model.layers[-1].set_weights([np.full((n, 1), weight), np.zeros(1)])
    return model


def test_near_the_headroom_answers_and_beyond_it_is_refused(cluster, monkeypatch):
    """256 inputs of up to 2000 times weights of 2000: 1.024e9, inside 2^30 = 1.074e9; the
    private answer at the extreme input is exact. 270 such inputs (1.08e9) are refused. Forced
    through (the check skipped), 1100 of them (4.4e9) get a wrong answer from the workers (just
    beyond 2^30 answers go wrong with a probability that depends on the masks; from ~2^32 on
    always)."""
    import keras

    top = np.full((1, 256), 2000.0)
    x = np.concatenate([top, np.random.default_rng(13).uniform(0, 2000, (2, 256))])
    values, _, _ = serve_and_ask(cluster, _wide(keras, 2000.0), x, (0, 2000))
    assert values[0, 0] == pytest.approx(1.024e9, rel=1e-6)
    np.testing.assert_allclose(values[:, 0], x.sum(1) * 2000.0, rtol=1e-6)

    beyond = _wide(keras, 2000.0, n=270)
    with rejects(pk.OutOfRangeError, match=r"layer 'wide' \(dense\) .* 1.08e\+09 .* \(0, 2000\)"):
        pk.share(beyond, cluster, input_range=(0, 2000))
    from privatekeras import owner

    monkeypatch.setattr(owner, "check_range", lambda spec, input_range: 0.0)
    forced = _wide(keras, 2000.0, n=1100)
    values, _, _ = serve_and_ask(cluster, forced, np.full((1, 1100), 2000.0), (0, 2000))
    print("forced beyond the headroom: {} instead of {}".format(values[0, 0], 1100 * 2000 ** 2))
    assert abs(values[0, 0] - 1100 * 2000.0 ** 2) > 1e6


def test_inputs_outside_the_declared_range_are_refused_by_the_client(cluster):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="small")
    shared = pk.share(model, cluster, input_range=(0, 1))
    server = threading.Thread(target=shared.serve, kwargs={"num_requests": 1})
    server.start()
    try:
        client = pk.connect(cluster, (1, 3), (1, 2), timeout=60)
        with rejects(pk.InputError, match=r"outside the range the model owner declared.*\[0, 1\]"):
            client.query(np.array([[0.5, 1.5, 0.0]]))
        assert shared.served == 0
        client.query(np.array([[0.5, 1.0, 0.0]]))
        client.close()
    finally:
        server.join(timeout=120)
    assert shared.served == 1
