"""Where a worker keeps its shares inside TensorFlow: named resources on its own device.

Each worker puts what it receives through its API into resources of its own TensorFlow
server, which worker 0's private step reaches by name:

* one variable per weight share, ``pk/<model>/w<k>/<j>`` (weight k, share j of the pair);
* an input table ``pk/<model>/in``: query id -> this worker's input shares, flattened;
* an output table ``pk/<model>/out``: query id -> this worker's answer shares, flattened.

A table row holds the worker's ``SHARES`` shares one after the other. The private step looks
queries up by id (an id that is absent reads as shares of zero, which is how a group of
queries is padded), removes their inputs, and inserts their answers; the worker then takes
its answer shares out for the client that proves it asked.
"""

import numpy as np
import tensorflow as tf

SHARES = 2  # ABY3: worker i holds the pair (s_i, s_{i+1})
PAD_ID = ""  # never a client's query id: looks up as zeros


def weight_name(model_id, k, j):
    return "pk/{}/w{}/{}".format(model_id, k, j)


def table_name(model_id, direction):
    return "pk/{}/{}".format(model_id, direction)


def table(model_id, direction, width):
    """A handle to this model's ``"in"`` or ``"out"`` table (eagerly or inside a graph)."""
    return tf.raw_ops.MutableHashTableOfTensorsV2(
        key_dtype=tf.string, value_dtype=tf.int64, value_shape=[width],
        shared_name=table_name(model_id, direction), use_node_name_sharing=False)


def weight(model_id, k, j, shape):
    """A handle to one weight share's variable."""
    return tf.raw_ops.VarHandleOp(dtype=tf.int64, shape=list(shape),
                                  shared_name=weight_name(model_id, k, j))


def read_weight(model_id, k, j, shape):
    """The value of one weight share (inside the step, under its worker's device)."""
    return tf.raw_ops.ReadVariableOp(resource=weight(model_id, k, j, shape), dtype=tf.int64)


def take(handle, width, keys):
    """Rows for ``keys`` (absent keys give zeros), shape ``[len(keys), width]``, removed
    from the table. One handle for both ops, so that a traced graph orders them."""
    rows = tf.raw_ops.LookupTableFindV2(table_handle=handle, keys=keys,
                                        default_value=tf.zeros([width], tf.int64))
    with tf.control_dependencies([rows]):
        tf.raw_ops.LookupTableRemoveV2(table_handle=handle, keys=keys)
    return rows


def insert(handle, keys, rows):
    tf.raw_ops.LookupTableInsertV2(table_handle=handle, keys=keys, values=rows)


class LocalStore:
    """One model's resources on this worker's own device, used eagerly by its API server.

    Args:
        device: this worker's TensorFlow device.
        model_id: the uploaded model's id (names its resources).
        weight_shapes: the shape of every weight, in upload order.
        in_size, out_size: elements in one query's input and answer (batch included).
    """

    def __init__(self, device, model_id, weight_shapes, in_size, out_size):
        self.device, self.model_id = device, model_id
        self.weight_shapes = [tuple(s) for s in weight_shapes]
        self.in_width, self.out_width = SHARES * in_size, SHARES * out_size

    def put_weights(self, shares):
        """``shares[k]`` is this worker's pair of shares of weight k."""
        with tf.device(self.device):
            for k, pair in enumerate(shares):
                for j, value in enumerate(pair):
                    handle = weight(self.model_id, k, j, self.weight_shapes[k])
                    tf.raw_ops.AssignVariableOp(resource=handle,
                                                value=tf.constant(value, tf.int64))

    def put_input(self, query_id, pair):
        row = np.concatenate([np.ravel(s) for s in pair])[None, :]
        with tf.device(self.device):
            insert(table(self.model_id, "in", self.in_width), tf.constant([query_id]),
                   tf.constant(row, tf.int64))

    def take_output(self, query_id, shape):
        """This worker's answer pair for ``query_id``, removed from the table."""
        with tf.device(self.device):
            row = take(table(self.model_id, "out", self.out_width), self.out_width,
                       tf.constant([query_id])).numpy()[0]
        return [part.reshape(shape) for part in np.split(row, SHARES)]

    def drop(self, query_ids):
        """Forget queries' inputs and answers (expired, or never to be fetched)."""
        if not query_ids:
            return
        keys = tf.constant(list(query_ids))
        with tf.device(self.device):
            for direction, width in (("in", self.in_width), ("out", self.out_width)):
                tf.raw_ops.LookupTableRemoveV2(
                    table_handle=table(self.model_id, direction, width), keys=keys)

    def destroy(self):
        """Delete this model's tables and weight variables from the worker."""
        with tf.device(self.device):
            for direction, width in (("in", self.in_width), ("out", self.out_width)):
                tf.raw_ops.DestroyResourceOp(resource=table(self.model_id, direction, width),
                                             ignore_lookup_error=True)
            for k, shape in enumerate(self.weight_shapes):
                for j in range(SHARES):
                    tf.raw_ops.DestroyResourceOp(resource=weight(self.model_id, k, j, shape),
                                                 ignore_lookup_error=True)
