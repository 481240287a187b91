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


def drain(device, handle, dtypes):
    """Dequeue everything the queue holds now; returns how many items were dropped."""
    n = 0
    while size(device, handle) > 0:
        dequeue(device, handle, dtypes)
        n += 1
    return n


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


class ShareQueues:
    """The queues of one kind (inputs or outputs) of a served model, one per worker that
    receives shares: worker i holds ``counts[i]`` int64 shares of ``shape`` per item."""

    def __init__(self, devices, name, counts, shape, capacity=64):
        self.counts = tuple(counts)
        self.shape = [int(d) for d in shape]
        self.slots = []
        for i, count in enumerate(self.counts):
            if count:
                dtypes = [tf.int64] * count
                handle = open_queue(devices[i], name, dtypes, [self.shape] * count, capacity)
                self.slots.append((i, devices[i], dtypes, handle))

    def put(self, per_worker):
        """Enqueue each worker's shares on that worker (eagerly or inside a tf.function)."""
        for i, device, _, handle in self.slots:
            enqueue(device, handle, [tf.convert_to_tensor(s, tf.int64) for s in per_worker[i]])

    def take(self):
        """Dequeue one item from each worker; returns a tuple of shares per worker."""
        out = [() for _ in self.counts]
        for i, device, dtypes, handle in self.slots:
            out[i] = tuple(dequeue(device, handle, dtypes, [self.shape] * len(dtypes)))
        return out

    def wait(self, timeout, what, should_stop=None):
        """Poll until every worker's queue holds an item (see wait_until_nonempty)."""
        return wait_until_nonempty([s[1] for s in self.slots], [s[3] for s in self.slots],
                                   timeout, what, should_stop=should_stop)

    def pending(self):
        return any(size(device, handle) > 0 for _, device, _, handle in self.slots)

    def drain(self):
        """Drop every item left over (from an earlier serving session)."""
        for _, device, dtypes, handle in self.slots:
            drain(device, handle, dtypes)
