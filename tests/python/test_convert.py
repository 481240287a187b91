"""Model conversion, checked exactly against Keras.

The converted graph is evaluated in the clear with the registry's own interval arithmetic on
degenerate intervals (lo = hi = x): that is the plaintext forward pass of the converted nodes,
in float64, so a wrong conversion (weights, folding, layout, padding) shows as a mismatch with
``model.predict``. The served, private evaluation of the same kinds is in test_layers.py.
"""

import numpy as np
import pytest

from conftest import bn_maxpool_cnn, randomize_batchnorm, rejects, residual_cnn, tutorial_cnn

ATOL = 1e-4  # float32 Keras vs float64 evaluation of the converted graph


def evaluate(spec, x):
    """The converted graph's output (before the client-side activation) for each row of x."""
    from privatekeras import layers
    from privatekeras.layers import INPUT

    out = []
    for row in np.asarray(x, dtype=np.float64):
        values = []
        for node in spec.nodes:
            ins = [(row, row) if i == INPUT else values[i][:2] for i in node.inputs]
            values.append(layers.by_kind(node.kind).bounds(node.public(), node.weights, *ins))
        lo, hi, _ = values[-1]
        np.testing.assert_array_equal(lo, hi)
        out.append(lo)
    return np.stack(out)


def final(spec, values):
    from privatekeras.layers.activations import apply_final

    return apply_final(spec.output_activation, values)


def _check(model, x, atol=ATOL):
    from privatekeras import convert

    spec = convert(model)
    np.testing.assert_allclose(final(spec, evaluate(spec, x)), model.predict(x, verbose=0),
                               atol=atol)
    return spec


def test_tutorial_cnn_converts_exactly():
    import keras
    from privatekeras import convert

    model = tutorial_cnn(keras, batch_size=1)
    spec = convert(model)
    # each average pool's 1/4 moved into the next convolution / the Dense, and the sum pool
    # that is left folded into the convolution before it: one 4x4 kernel at stride 2 (the
    # sum of the 3x3 kernel's four shifts), on the input padded as SAME padded it for the
    # 3x3 kernel; its bias times 4
    assert [n.kind for n in spec.nodes] == [
        "conv2d", "relu", "conv2d", "relu", "conv2d", "relu", "reshape", "dense"]
    np.testing.assert_allclose(spec.nodes[-1].weights[0] * 4, model.layers[-1].get_weights()[0],
                               rtol=1e-6)
    np.testing.assert_allclose(spec.nodes[0].weights[1], 4 * model.layers[0].get_weights()[1],
                               rtol=1e-6)
    for i, layer in zip((0, 2, 4), [l for l in model.layers if "conv" in l.name]):
        p, kernel = spec.nodes[i].params, layer.get_weights()[0]
        assert (tuple(p["strides"]), p["padding"], p["pad"]) == ((2, 2), "VALID",
                                                                 [[1, 1], [1, 1]]), p
        folded = np.zeros((4, 4) + kernel.shape[2:])
        for dy in (0, 1):
            for dx in (0, 1):
                folded[dy:dy + 3, dx:dx + 3] += kernel
        scale = 1.0 if i == 0 else 0.25  # the previous average pool's 1/4 moved in here
        np.testing.assert_allclose(spec.nodes[i].weights[0], folded * scale, rtol=1e-6)
    assert [n.inputs for n in spec.nodes] == [[-1]] + [[i] for i in range(7)]
    assert spec.input_shape == (28, 28, 1) and spec.output_shape == (10,)
    assert spec.batch_size == 1 and spec.output_activation is None
    _check(model, np.random.default_rng(0).uniform(0, 1, (2, 28, 28, 1)))


def test_pools_fold_into_strided_and_valid_convolutions():
    """A sum pool folds into any convolution before it, strided or VALID, odd sizes left
    over by the pool's VALID windows included: each folded node is one convolution, checked
    against Keras (a pool with windows overlapping, stride 1, too)."""
    import keras
    from keras import layers as L

    model = keras.Sequential([
        keras.Input((13, 11, 2)),
        L.Conv2D(4, 3, strides=2, padding="same"), L.AveragePooling2D(2), L.ReLU(),
        L.Conv2D(3, 2, padding="valid"), L.AveragePooling2D((2, 1), strides=(1, 1)),
        L.Flatten(), L.Dense(2)])
    rng = np.random.default_rng(5)
    for w in model.weights:
        w.assign(rng.normal(0, 0.5, w.shape))
    spec = _check(model, rng.uniform(0, 1, (3, 13, 11, 2)))
    assert [n.kind for n in spec.nodes] == ["conv2d", "relu", "conv2d", "reshape", "dense"]
    first, second = spec.nodes[0], spec.nodes[2]
    # 3x3 at stride 2 under a 2x2 pool: a 5x5 kernel at stride 4, padded as SAME pads 13x11
    assert first.weights[0].shape == (5, 5, 2, 4) and tuple(first.params["strides"]) == (4, 4)
    assert first.params["pad"] == [[1, 1], [1, 1]] and first.shape == (3, 3, 4)
    assert second.weights[0].shape == (3, 2, 4, 3) and second.params["pad"] == [[0, 0], [0, 0]]


def test_batchnorm_is_folded_and_softmax_moves_to_the_client(tmp_path):
    import keras
    from privatekeras import convert

    rng = np.random.default_rng(1)
    model = bn_maxpool_cnn(keras)
    randomize_batchnorm(model, rng)
    spec = _check(model, rng.uniform(0, 1, (3, 28, 28, 1)))
    kinds = [n.kind for n in spec.nodes]
    assert "affine" not in kinds and kinds.count("maxpool") == 1
    assert spec.output_activation == "softmax"
    x = rng.uniform(0, 1, (2, 28, 28, 1))
    for name in ("m.keras", "m.h5"):  # the same from a saved .keras file and an .h5 file
        model.save(tmp_path / name)
        np.testing.assert_allclose(evaluate(convert(str(tmp_path / name)), x),
                                   evaluate(spec, x), atol=1e-6)


def test_residual_and_branched_graph_with_every_image_layer():
    """Add and Concatenate joins, a tensor used by three layers (converted once), standalone
    BatchNormalization after a ReLU (a private affine map), Rescaling, ZeroPadding2D,
    LeakyReLU in both forms, MaxPooling 'same' after a ReLU, GlobalAveragePooling2D and a
    final sigmoid."""
    import keras

    rng = np.random.default_rng(2)
    model = residual_cnn(keras, rng)
    spec = _check(model, rng.uniform(0, 255, (3, 10, 10, 3)))
    kinds = [n.kind for n in spec.nodes]
    assert spec.output_activation == "sigmoid"
    assert kinds.count("affine") == 2 and "add" in kinds and "concat" in kinds
    add = next(n for n in spec.nodes if n.kind == "add")
    assert len(add.inputs) == 3 and add.inputs[0] == add.inputs[2]
    # the BatchNormalization output feeds three layers and is one node
    users = [n for n in spec.nodes if add.inputs[0] in n.inputs]
    assert len(users) == 2  # zero_pad2d and add (once, with three inputs)


def test_one_dimensional_layers_and_normalization():
    """Conv1D (valid, same, causal, strided), the 1-D pools, GlobalAveragePooling1D, a Dense
    on steps, Keras Normalization folded into the first convolution, a final softmax."""
    import keras

    L = keras.layers
    rng = np.random.default_rng(3)
    norm = L.Normalization()
    norm.adapt(rng.normal(5, 3, (100, 16, 2)))
    model = keras.Sequential([
        keras.Input((16, 2)), norm,
        L.Conv1D(4, 3, activation="relu"),
        L.Conv1D(4, 2, padding="same"), L.MaxPooling1D(2),
        L.Conv1D(5, 3, padding="causal", strides=1), L.Activation("leaky_relu"),
        L.AveragePooling1D(2, strides=1), L.Dense(3),
        L.GlobalAveragePooling1D(), L.Dense(4, activation="softmax"),
    ])
    spec = _check(model, rng.normal(5, 3, (3, 16, 2)))
    kinds = [n.kind for n in spec.nodes]
    assert "affine" not in kinds  # Normalization folded into the first Conv1D
    assert spec.nodes[0].name.startswith(norm.name + "+")
    assert kinds.count("conv1d") == 3 and "maxpool1d" in kinds
    assert "sumpool1d" in kinds  # the pool's 1/2 moved into the Dense on steps after it


def test_normalization_folds_into_dense_and_stays_private_before_same_padding():
    import keras

    L = keras.layers
    rng = np.random.default_rng(4)
    data = rng.normal(50, 20, (200, 6))
    norm = L.Normalization()
    norm.adapt(data)
    tabular = keras.Sequential([keras.Input((6,)), norm, L.Dense(8, activation="relu"),
                                L.Dense(1, activation="sigmoid")])
    spec = _check(tabular, data[:5])
    assert [n.kind for n in spec.nodes] == ["dense", "relu", "dense"]
    # The mean and variance are secret weights of the folded Dense, not public params.
    assert "mean" not in str([n.public() for n in spec.nodes])
    norm2 = L.Normalization(mean=3.0, variance=4.0)
    image = keras.Sequential([keras.Input((5, 5, 1)), norm2, L.Conv2D(2, 3, padding="same")])
    spec = _check(image, rng.normal(3, 2, (2, 5, 5, 1)))
    assert [n.kind for n in spec.nodes] == ["affine", "conv2d"]


def test_nested_model_is_inlined():
    import keras

    L = keras.layers
    block = keras.Sequential([keras.Input((6,)), L.Dense(5, activation="relu"), L.Dense(4)])
    inp = keras.Input((6,))
    out = L.Dense(2)(L.Add()([block(inp), L.Dense(4)(inp)]))
    spec = _check(keras.Model(inp, out), np.random.default_rng(5).normal(size=(3, 6)))
    assert [n.kind for n in spec.nodes].count("dense") == 4


def test_functional_chain_and_reshape():
    import keras

    inp = keras.Input((4, 4, 2))
    h = keras.layers.Reshape((8, 4))(inp)
    h = keras.layers.Reshape((4, 4, 2))(h)
    h = keras.layers.Conv2D(3, 2)(h)
    out = keras.layers.Dense(5)(keras.layers.Flatten()(h))
    _check(keras.Model(inp, out), np.random.default_rng(6).normal(size=(2, 4, 4, 2)))


@pytest.mark.parametrize("make_layer,name,why", [
    (lambda L: L.LSTM(4), "LSTM", None),
    (lambda L: L.Activation("tanh"), "Activation", "'tanh' is not supported"),
    (lambda L: L.ReLU(max_value=6.0), "ReLU", "max_value"),
    (lambda L: L.Conv2D(2, 3, dilation_rate=2), "Conv2D", "dilation_rate"),
    (lambda L: L.AveragePooling2D(3, padding="same"), "AveragePooling2D", "average the padding"),
    (lambda L: L.Conv2D(2, 1, data_format="channels_first"), "Conv2D", "channels_last"),
])
def test_unsupported_layers_are_named(make_layer, name, why):
    import keras
    from privatekeras import UnsupportedLayerError, convert

    shape = (6, 4) if name == "LSTM" else (8, 8, 1)
    model = keras.Sequential([keras.Input(shape), make_layer(keras.layers), keras.layers.Flatten()])
    with rejects(UnsupportedLayerError) as err:
        convert(model)
    msg = str(err.value)
    assert name in msg and "Supported layers:" in msg and "Conv1D" in msg
    assert why is None or why in msg, msg


def test_softmax_or_sigmoid_inside_the_network_is_refused():
    import keras
    from privatekeras import UnsupportedLayerError, convert

    L = keras.layers
    model = keras.Sequential([keras.Input((4,)), L.Dense(3, activation="sigmoid"), L.Dense(2)])
    with rejects(UnsupportedLayerError, match="only as the model's final activation"):
        convert(model)


def test_several_inputs_are_refused():
    import keras
    from privatekeras import UnsupportedLayerError, convert

    a, b = keras.Input((3,)), keras.Input((3,))
    with rejects(UnsupportedLayerError, match="2 inputs"):
        convert(keras.Model([a, b], keras.layers.Add()([a, b])))


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


# -- range ---------------------------------------------------------------------------------
def _wide_dense(keras, weight, n=256):
    model = keras.Sequential([keras.Input((n,)), keras.layers.Dense(1, name="wide")])
    model.layers[-1].set_weights([np.full((n, 1), weight), np.zeros(1)])
    return model


def test_range_bound_is_computed_and_enforced():
    """256 inputs in [0, 2000] times weights of 2000 reach 1.024e9 < 2^30: accepted; 270 of
    them reach 1.08e9 > 2^30: refused, naming the layer and the bound."""
    import keras
    from privatekeras import OutOfRangeError, check_range, convert

    assert check_range(convert(_wide_dense(keras, 2000.0)), (0, 2000)) == pytest.approx(1.024e9)
    with rejects(OutOfRangeError, match=r"layer 'wide' \(dense\) can reach values of magnitude "
                                         r"1.08e\+09 .* headroom of 1.07e\+09") as err:
        check_range(convert(_wide_dense(keras, 2000.0, n=270)), (0, 2000))
    assert "declared input range (0, 2000)" in str(err.value)
    # no declared range: the encoding's whole range, and the error says what to declare
    with rejects(OutOfRangeError, match="no input_range was declared.*input_range="):
        check_range(convert(_wide_dense(keras, 1000.0, n=600)), None)  # 600 * 2048 * 1000


def test_range_check_follows_signs_and_maxpool_same_needs_nonnegative_inputs():
    import keras
    from privatekeras import OutOfRangeError, check_range, convert

    L = keras.layers
    model = keras.Sequential([keras.Input((2,)), L.Dense(1, name="diff")])
    model.layers[-1].set_weights([np.array([[1.0], [-1.0]]), np.array([0.5])])
    # x0 - x1 + 0.5 for x in [-1, 3]: [-3.5, 4.5]; the peak before the bias is 4
    assert check_range(convert(model), (-1, 3)) == pytest.approx(4.5)
    pool = keras.Sequential([keras.Input((4, 4, 1)), L.MaxPooling2D(3, strides=2,
                                                                      padding="same")])
    assert check_range(convert(pool), (0, 1)) == pytest.approx(1.0)
    with rejects(OutOfRangeError, match="padding='same' needs inputs that cannot be negative"):
        check_range(convert(pool), (-1, 1))


@pytest.mark.parametrize("bad", [(1, 0), (0, 0), (0, float("nan")), (0, 5000), "01", (1, 2, 3)])
def test_bad_input_ranges(bad):
    from privatekeras.convert import check_input_range

    with rejects(ValueError, match="input_range"):
        check_input_range(bad)


def test_answer_scale_in_the_public_spec():
    """A model ending in a Dense or convolution is answered untruncated (2f fractional bits,
    decoded by the client); any other last layer at the encoding's f bits."""
    import keras
    from privatekeras import convert
    from privatekeras.owner import public_spec

    dense = public_spec(convert(tutorial_cnn(keras, batch_size=1)), "aby3", 1, 1)
    assert dense["output_frac_bits"] == 32 and dense["fixed_point"]["frac_digits"] == 16
    inp = keras.Input((6,))
    relu_last = keras.Model(inp, keras.layers.Dense(3, activation="relu")(inp))
    assert public_spec(convert(relu_last), "aby3", 1, 1)["output_frac_bits"] == 16
