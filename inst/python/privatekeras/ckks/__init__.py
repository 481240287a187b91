"""Encrypted predictions on one server with CKKS (TenSEAL / Microsoft SEAL).

A model owner uploads a linear model (an affine map and an inverse link: Dense-only Keras
models, R ``lm``/``glm`` fits, coefficient matrices) **in clear** to one server
(:class:`privatekeras.Server`); a client encrypts its rows under a key it generates and keeps,
the server evaluates the linear predictor on the ciphertexts, and only the client decrypts
and applies the inverse link. The server sees the model, never an input or an answer.

    import privatekeras as pk
    server = pk.Server("localhost:4100").start()
    shared = pk.share(model, server)           # Keras, LinearModel, (W, b)
    shared.serve(num_requests=None)
    # another process:
    client = pk.connect(pk.Server("localhost:4100", auto_managed=False))
    probabilities = client.predict_proba(rows)

Modules: :mod:`.params` (128-bit parameters from the HE standard's table), :mod:`.model`
(what is served, inverse links), :mod:`.engine` (the evaluation), :mod:`.server`,
:mod:`.owner`, :mod:`.client`. Nothing here imports TensorFlow (reading a Keras model does).
"""

from .model import LinearModel, from_keras, from_r, inverse_link  # noqa: F401
from .params import HE_STANDARD_128, check_secure, choose, describe  # noqa: F401

__all__ = ["LinearModel", "from_keras", "from_r", "inverse_link", "HE_STANDARD_128", "choose",
           "check_secure", "describe"]
