"""Share queues on the workers: how inputs reach the model and outputs reach the client.

For each served model, every worker holds three FIFO queues, named after the model's id:
``in`` (that worker's shares of each query), ``out`` (its shares of each answer) and
``ready`` (one public spec string while the model is served). The queues are created with
raw ops: TF's ``FIFOQueue`` wrapper destroys a shared queue when any process that opened
it exits, while a raw handle leaves it to the worker. Nobody blocks on a dequeue: readers poll
the queue size first, so a worker's threads are never pinned and every wait has a timeout.
"""

import time

import tensorflow as tf

from .errors import WorkerUnavailableError


def open_queue(device, name, dtypes, shapes, capacity):
    """A handle to the queue ``name`` on ``device`` (created on first use)."""
    with tf.device(device):
        return tf.raw_ops.FIFOQueueV2(
            component_types=dtypes, shapes=shapes, capacity=capacity, shared_name=name, name=None
        )


def enqueue(device, handle, values):
    with tf.device(device):
        tf.raw_ops.QueueEnqueueV2(handle=handle, components=values)


def dequeue(device, handle, dtypes, shapes=None):
    """Dequeue one item; ``shapes`` restores the static shapes a raw dequeue loses."""
    with tf.device(device):
        values = tf.raw_ops.QueueDequeueV2(handle=handle, component_types=dtypes)
    if shapes is not None:
        for value, shape in zip(values, shapes):
            value.set_shape(shape)
    return values


def size(device, handle):
    with tf.device(device):
        return int(tf.raw_ops.QueueSizeV2(handle=handle).numpy())


def close(device, handle):
    with tf.device(device):
        tf.raw_ops.QueueCloseV2(handle=handle, cancel_pending_enqueues=True)


def wait_until_nonempty(devices, handles, timeout, what, should_stop=None):
    """Poll the queues until each holds an item; returns False if ``should_stop()`` fired.

    Raises TimeoutError after ``timeout`` seconds (None: wait forever) and
    WorkerUnavailableError when a worker stops answering.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.0002
    pending = list(range(len(devices)))
    while pending:
        try:
            pending = [i for i in pending if size(devices[i], handles[i]) == 0]
        except (tf.errors.UnavailableError, tf.errors.CancelledError,
                tf.errors.InternalError, tf.errors.AbortedError) as exc:
            raise WorkerUnavailableError(
                "a worker stopped answering while waiting for {}: {}".format(what, _first_line(exc))
            ) from None
        if not pending:
            return True
        if should_stop is not None and should_stop():
            return False
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError("timed out after {:.1f} s waiting for {}".format(timeout, what))
        time.sleep(delay)
        delay = min(delay * 2, 0.005)
    return True


def _first_line(exc):
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
