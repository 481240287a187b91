"""Where a worker keeps its weight shares inside TensorFlow: named variables on its device.

Each worker puts the weight shares it receives through its API into variables of its own
TensorFlow device, one per weight share, ``pk/<model>/w<k>/<j>`` (weight k, share j of the
pair), which its part of the private step reads by name. Queries' input and answer shares
never enter TensorFlow's state: the worker feeds a group's input rows to its part of the step
and gets the answer rows back (a row holds the worker's ``SHARES`` shares one after the
other).
"""

import tensorflow as tf

SHARES = 2  # ABY3: worker i holds the pair (s_i, s_{i+1})


def weight_name(model_id, k, j):
    return "pk/{}/w{}/{}".format(model_id, k, j)


def weight(model_id, k, j, shape):
    """A handle to one weight share's variable."""
    return tf.raw_ops.VarHandleOp(dtype=tf.int64, shape=list(shape),
                                  shared_name=weight_name(model_id, k, j))


def read_weight(model_id, k, j, shape):
    """The value of one weight share (inside the step, under its worker's device)."""
    return tf.raw_ops.ReadVariableOp(resource=weight(model_id, k, j, shape), dtype=tf.int64)


class LocalStore:
    """One model's weight shares on this worker's own device, written eagerly by its API
    server.

    Args:
        device: this worker's TensorFlow device.
        model_id: the uploaded model's id (names its resources).
        weight_shapes: the shape of every weight, in upload order.
    """

    def __init__(self, device, model_id, weight_shapes):
        self.device, self.model_id = device, model_id
        self.weight_shapes = [tuple(s) for s in weight_shapes]

    def put_weights(self, shares):
        """``shares[k]`` is this worker's pair of shares of weight k."""
        with tf.device(self.device):
            for k, pair in enumerate(shares):
                for j, value in enumerate(pair):
                    handle = weight(self.model_id, k, j, self.weight_shapes[k])
                    tf.raw_ops.AssignVariableOp(resource=handle,
                                                value=tf.constant(value, tf.int64))

    def destroy(self):
        """Delete this model's weight variables from the worker."""
        with tf.device(self.device):
            for k, shape in enumerate(self.weight_shapes):
                for j in range(SHARES):
                    tf.raw_ops.DestroyResourceOp(resource=weight(self.model_id, k, j, shape),
                                                 ignore_lookup_error=True)
