"""Named state on the workers: FIFO queues and variables, shared between processes by name.

Queues and variables are created with raw ops and a ``shared_name``, so every process that
names them reaches the same object on that worker. (TF's ``FIFOQueue`` wrapper destroys a
shared queue when any process that opened it exits; a raw handle leaves it to the worker.)
Nobody blocks on a dequeue: readers poll the queue size first, so a worker's threads are never
pinned and every wait has a timeout. :class:`Mailbox` holds one client's share queues.
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


def ping(device):
    """One round trip to ``device``'s worker; raises a tf.errors.OpError if it is gone."""
    with tf.device(device):
        tf.raw_ops.Identity(input=tf.constant(0)).numpy()


def destroy(device, handle):
    """Delete a queue (or variable) from its worker; later openers get a fresh one."""
    with tf.device(device):
        tf.raw_ops.DestroyResourceOp(resource=handle, ignore_lookup_error=True)


def open_variable(device, name, dtype):
    """A handle to the scalar variable ``name`` on ``device`` (uninitialised at first)."""
    with tf.device(device):
        return tf.raw_ops.VarHandleOp(dtype=dtype, shape=[], shared_name=name)


def read_variable(device, handle, dtype, default, known_initialized=False):
    """The variable's value as a Python object, or ``default`` if it was never assigned.

    Unless ``known_initialized``, first asks whether it was (one more round trip): reading a
    variable that does not exist yet fails on the worker, and a failed remote op is reported
    asynchronously and can surface in a later, unrelated call.
    """
    with tf.device(device):
        if not known_initialized and not bool(
                tf.raw_ops.VarIsInitializedOp(resource=handle).numpy()):
            return default
        return tf.raw_ops.ReadVariableOp(resource=handle, dtype=dtype).numpy()


def assign_variable(device, handle, value, dtype):
    with tf.device(device):
        tf.raw_ops.AssignVariableOp(resource=handle, value=tf.constant(value, dtype))


def drain(device, handle, dtypes):
    """Dequeue everything the queue holds now; returns how many items were dropped."""
    n = 0
    while size(device, handle) > 0:
        dequeue(device, handle, dtypes)
        n += 1
    return n


def wait_until_nonempty(devices, handles, timeout, what, should_stop=None, max_delay=0.002,
                        since=None):
    """Poll the queues until each holds an item; returns False if ``should_stop()`` fired.

    Polls back off from 0.2 ms to ``max_delay`` seconds, and beyond it to 5 % of the time
    waited so far (at most 20 ms): a long wait costs at most 5 % extra latency but few
    polls, so many waiting clients do not swamp a worker. ``since`` (a ``time.monotonic()``)
    is when the wait began, for callers that wait in several calls. Raises TimeoutError after
    ``timeout`` seconds (None: wait forever) and WorkerUnavailableError when a worker stops
    answering.
    """
    start = time.monotonic() if since is None else since
    deadline = None if timeout is None else time.monotonic() + timeout
    delay = 0.0002
    pending = list(range(len(devices)))
    while pending:
        try:
            # Check in order and stop at the first empty queue: one RPC per poll while
            # waiting, the others only once the first has its item.
            first_empty = next((k for k, i in enumerate(pending)
                                if size(devices[i], handles[i]) == 0), len(pending))
            pending = pending[first_empty:]
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
        patient = min(0.02, 0.05 * (time.monotonic() - start))
        delay = min(delay * 2, max(max_delay, patient))
    return True


def _first_line(exc):
    text = getattr(exc, "message", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


class Mailbox:
    """One client's share queues for one served model signature.

    On every worker that receives shares, ``in`` holds that worker's shares of each of the
    client's queries and ``out`` its shares of each answer. Only this client puts inputs and
    takes outputs; the model owner's step takes from ``in`` and puts to ``out``. Per-client
    queues are what keep concurrent clients' shares and answers apart.
    """

    def __init__(self, devices, prefix, counts, in_shape, out_shape, capacity=16):
        self.inputs = self._open(devices, prefix + "/in", counts, in_shape, capacity)
        self.outputs = self._open(devices, prefix + "/out", counts, out_shape, capacity)

    @staticmethod
    def _open(devices, name, counts, shape, capacity):
        slots = []
        for i, count in enumerate(counts):
            if count:
                dtypes = [tf.int64] * count
                handle = open_queue(devices[i], name, dtypes, [list(shape)] * count, capacity)
                slots.append(Slot(i, devices[i], dtypes, [int(d) for d in shape], handle))
        return slots

    @property
    def handles(self):
        """(input handles, output handles): the traced step's arguments."""
        return [s.handle for s in self.inputs], [s.handle for s in self.outputs]

    def put_inputs(self, per_worker):
        put(self.inputs, per_worker)

    def take_outputs(self):
        return take(self.outputs)

    def wait_outputs(self, timeout, what, since=None):
        return wait_until_nonempty([s.device for s in self.outputs],
                                   [s.handle for s in self.outputs], timeout, what, since=since)

    def destroy(self):
        """Delete this mailbox's queues from the workers (the client is done)."""
        for slot in self.inputs + self.outputs:
            destroy(slot.device, slot.handle)


class Slot:
    """One worker's queue of a mailbox: its position, device, component dtypes and shape."""

    __slots__ = ("index", "device", "dtypes", "shape", "handle")

    def __init__(self, index, device, dtypes, shape, handle):
        self.index, self.device, self.dtypes, self.shape, self.handle = (
            index, device, dtypes, shape, handle)

    def with_handle(self, handle):
        return Slot(self.index, self.device, self.dtypes, self.shape, handle)


def put(slots, per_worker):
    """Enqueue each worker's shares on that worker (eagerly or inside a tf.function)."""
    for slot in slots:
        enqueue(slot.device, slot.handle,
                [tf.convert_to_tensor(s, tf.int64) for s in per_worker[slot.index]])


def take(slots, workers=3):
    """Dequeue one item from each slot; returns a list of share tuples, one per worker."""
    out = [() for _ in range(workers)]
    for slot in slots:
        out[slot.index] = tuple(dequeue(slot.device, slot.handle, slot.dtypes,
                                        [slot.shape] * len(slot.dtypes)))
    return out
