"""Model conversion, checked exactly against Keras with a plaintext evaluation of the specs."""

import numpy as np
import pytest

from conftest import bn_maxpool_cnn, rejects, tutorial_cnn


def plaintext_forward(spec, x):
    """Evaluate converted layer specs in the clear with TensorFlow (NHWC)."""
    import tensorflow as tf

    x = tf.constant(x, tf.float64)
    for layer in spec.layers:
        p = layer.params
        if layer.kind == "conv2d":
            x = tf.nn.conv2d(x, layer.weights[0], p["strides"], p["padding"]) + layer.weights[1]
        elif layer.kind == "dense":
            x = x @ layer.weights[0] + layer.weights[1]
        elif layer.kind == "relu":
            x = tf.nn.relu(x)
        elif layer.kind == "avgpool":
            x = tf.nn.avg_pool2d(x, p["pool_size"], p["strides"], p["padding"])
        elif layer.kind == "maxpool":
            x = tf.nn.max_pool2d(x, p["pool_size"], p["strides"], p["padding"])
        elif layer.kind == "flatten":
            x = tf.reshape(x, [x.shape[0], -1])
        elif layer.kind == "reshape":
            x = tf.reshape(x, [x.shape[0]] + list(p["target_shape"]))
    return x.numpy()


def _randomize_bn(model, rng):
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            layer.set_weights([rng.uniform(0.5, 2, w.shape) if i in (0, 3) else
                               rng.normal(0, 0.5, w.shape) for i, w in enumerate(layer.get_weights())])


def test_tutorial_cnn_converts_exactly():
    import keras
    from privatekeras import convert

    model = tutorial_cnn(keras, batch_size=1)
    spec = convert(model)
    assert [layer.kind for layer in spec.layers] == [
        "conv2d", "avgpool", "relu", "conv2d", "avgpool", "relu", "conv2d", "avgpool", "relu",
        "flatten", "dense"]
    assert spec.input_shape == (28, 28, 1) and spec.output_shape == (10,)
    assert spec.batch_size == 1 and spec.output_activation is None
    x = np.random.default_rng(0).uniform(0, 1, (1, 28, 28, 1))
    np.testing.assert_allclose(plaintext_forward(spec, x), model(x).numpy(), atol=1e-5)


def test_batchnorm_is_folded_and_softmax_moves_to_the_client(tmp_path):
    import keras
    from privatekeras import convert

    rng = np.random.default_rng(1)
    model = bn_maxpool_cnn(keras)
    _randomize_bn(model, rng)
    spec = convert(model)
    kinds = [layer.kind for layer in spec.layers]
    assert "batchnorm" not in kinds and kinds.count("maxpool") == 1
    assert spec.output_activation == "softmax"
    x = rng.uniform(0, 1, (3, 28, 28, 1))
    logits = plaintext_forward(spec, x)
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(e / e.sum(1, keepdims=True), model(x).numpy(), atol=1e-5)
    # The same from a saved .keras file and an .h5 file.
    for name in ("m.keras", "m.h5"):
        model.save(tmp_path / name)
        np.testing.assert_allclose(plaintext_forward(convert(str(tmp_path / name)), x), logits,
                                   atol=1e-5)


def test_functional_chain_and_reshape():
    import keras
    from privatekeras import convert

    inp = keras.Input((4, 4, 2))
    h = keras.layers.Reshape((8, 4))(inp)
    h = keras.layers.Reshape((4, 4, 2))(h)
    h = keras.layers.Conv2D(3, 2)(h)
    out = keras.layers.Dense(5)(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    x = np.random.default_rng(2).normal(size=(2, 4, 4, 2))
    np.testing.assert_allclose(plaintext_forward(convert(model), x), model(x).numpy(), atol=1e-5)


@pytest.mark.parametrize("make_layer,name", [
    (lambda L: L.LSTM(4), "LSTM"),
    (lambda L: L.Activation("tanh"), "Activation"),
    (lambda L: L.Dense(4, activation="sigmoid"), "Dense"),
    (lambda L: L.LeakyReLU(), "LeakyReLU"),
    (lambda L: L.Conv2D(2, 3, dilation_rate=2), "Conv2D"),
])
def test_unsupported_layers_are_named(make_layer, name):
    import keras
    from privatekeras import UnsupportedLayerError, convert

    shape = (6, 4) if name == "LSTM" else (8, 8, 1)
    model = keras.Sequential([keras.Input(shape), make_layer(keras.layers)])
    with rejects(UnsupportedLayerError) as err:
        convert(model)
    msg = str(err.value)
    assert name in msg and "Supported layers:" in msg and "Conv2D" in msg


def test_batchnorm_first_is_rejected_and_branches_are_rejected():
    import keras
    from privatekeras import UnsupportedLayerError, convert

    model = keras.Sequential([keras.Input((8,)), keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])
    with pytest.raises(UnsupportedLayerError, match="folded into the layer before it"):
        convert(model)
    inp = keras.Input((8,))
    out = keras.layers.Add()([keras.layers.Dense(4)(inp), keras.layers.Dense(4)(inp)])
    with pytest.raises(UnsupportedLayerError):
        convert(keras.Model(inp, out))


def test_bad_model_files(tmp_path):
    from privatekeras import convert

    junk = tmp_path / "junk.keras"
    junk.write_bytes(b"this is not a model")
    with rejects(ValueError, match="could not load a Keras model"):
        convert(str(junk))
    with rejects(FileNotFoundError):
        convert(str(tmp_path / "missing.keras"))
    text = tmp_path / "model.txt"
    text.write_text("x")
    with rejects(ValueError, match="not a Keras model file"):
        convert(str(text))
    with rejects(TypeError, match="expected a Keras model"):
        convert(42)
