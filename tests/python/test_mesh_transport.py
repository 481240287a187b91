"""The mesh transport (kernels/pk_mesh.cc, kernels/mesh.py): PkMeshSend / PkMeshRecv over real
sockets, with real TensorFlow ops.

The mesh state is process-wide, so every check runs in a fresh Python (run_checks). In one
process a socketpair joins the mesh to itself: end a is attached as peer 1 and end b as peer 2,
so a send to worker 1 arrives as a message from worker 2. Two processes talk over TCP loopback.
The failure checks bound their waits: none of them may hang.
"""

import subprocess
import sys

from conftest import child_env, run_checks

# What every check starts with: the mesh binding, `expect` (the call must raise `kind` with a
# message matching `pattern`; returns the seconds it took) and `wait_for` (a condition within
# a bound).
PRELUDE = r'''
import os, re, socket, struct, subprocess, sys, threading, time
import numpy as np
import tensorflow as tf
from privatekeras.errors import ClusterError
from privatekeras.kernels import mesh

MAGIC = 0x314D4B50

def expect(kind, pattern, fn):
    t0 = time.monotonic()
    try:
        fn()
    except kind as e:
        assert re.search(pattern, str(e)), (pattern, str(e))
        return time.monotonic() - t0
    raise AssertionError("expected %s matching %r" % (kind.__name__, pattern))

def wait_for(cond, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, "condition not reached within %s s" % seconds
        time.sleep(0.01)

def in_background(kind, fn):
    """Starts fn() in a thread that keeps the messages of the `kind` errors it raises;
    returns the thread and that list."""
    errs = []
    def run():
        try:
            fn()
        except kind as e:
            errs.append(str(e))
    t = threading.Thread(target=run)
    t.start()
    return t, errs

def failed_once(t, errs, pattern):
    """The background call ended, with exactly one error, whose message matches `pattern`."""
    t.join(5)
    assert not t.is_alive() and len(errs) == 1 and re.search(pattern, errs[0]), (pattern, errs)

def frame(dtype_enum, step, edge, dims, payload, nbytes=None):
    """A frame built from the format's description (not by the kernels)."""
    head = struct.pack("<IIqqI", MAGIC, dtype_enum, step, edge, len(dims))
    head += struct.pack("<%dq" % len(dims), *dims)
    head += struct.pack("<Q", len(payload) if nbytes is None else nbytes)
    return head + payload

def loop(nonblocking=False):
    """A socketpair attached to this process as peers 1 (end a) and 2 (end b). `nonblocking`:
    the sockets have a Python timeout, so their (shared) file flags say O_NONBLOCK."""
    a, b = socket.socketpair()
    if nonblocking:
        a.settimeout(5)
        b.settimeout(5)
    mesh.attach(1, a)
    mesh.attach(2, b)
    a.close(); b.close()
'''

ROUND_TRIPS = PRELUDE + r'''
loop(nonblocking=True)  # the kernels wait in poll() where a read or write would block
assert mesh.attached(1) == 1 and mesh.attached(2) == 1 and mesh.attached(0) == 0
rng = np.random.default_rng(11)
def full(*shape):
    return rng.integers(-2**63, 2**63 - 1, size=shape, dtype=np.int64, endpoint=True)

# Sent before the receive: waits in the inbox. Shapes (), [5], [3, 4, 5], 2,000,000 elements.
values = [full(), full(5), full(3, 4, 5), full(2000000)]
for edge, v in enumerate(values):
    mesh.send(1, v, peer=1, edge=edge)
wait_for(lambda: mesh.pending() == len(values))
for edge, v in enumerate(values):
    y = mesh.recv(1, tf.int64, v.shape, peer=2, edge=edge)
    assert y.dtype == tf.int64 and y.shape == v.shape, (y.dtype, y.shape)
    assert np.array_equal(y.numpy(), v), edge
assert mesh.pending() == 0

# The other dtypes, bit-exact (int8 / uint8 extremes, bool, uint64 top bit, int32).
others = [np.array([-128, -1, 0, 1, 127], np.int8), np.array([0, 255, 7], np.uint8),
          rng.integers(0, 2, size=(4, 9)).astype(bool),
          np.array([2**64 - 1, 2**63, 0], np.uint64), np.array([[-2**31, 2**31 - 1]], np.int32)]
for edge, v in enumerate(others):
    mesh.send(2, v, peer=1, edge=edge)
for edge, v in enumerate(others):
    y = mesh.recv(2, v.dtype, v.shape, peer=2, edge=edge).numpy()
    assert y.dtype == v.dtype and np.array_equal(y, v), (edge, y, v)

# Received before it is sent: the receive waits (in a tf.function, on another thread).
@tf.function
def receive(step):
    return mesh.recv(step, tf.int64, [3], peer=2, edge=7)
got = {}
t = threading.Thread(target=lambda: got.update(y=receive(tf.constant(3, tf.int64)).numpy()))
t.start()
wait_for(lambda: mesh.pending() == 1)  # the waiter
time.sleep(0.1)
assert "y" not in got
mesh.send(3, np.array([5, -6, 7], np.int64), peer=1, edge=7)
t.join(10)
assert not t.is_alive() and got["y"].tolist() == [5, -6, 7], got
assert mesh.pending() == 0

# A send inside a tf.function, then the receive inside another.
@tf.function
def send(step, x):
    mesh.send(step, x, peer=1, edge=8)
send(tf.constant(4, tf.int64), tf.constant([[1, 2], [3, 4]], tf.int64))
y = tf.function(lambda s: mesh.recv(s, tf.int64, [2, 2], peer=2, edge=8))(tf.constant(4, tf.int64))
assert y.numpy().tolist() == [[1, 2], [3, 4]]

# Several edges and steps, sent out of order, each received by its own name.
order = [(6, 2), (5, 1), (6, 0), (5, 0), (5, 2), (6, 1)]
for step, edge in order:
    mesh.send(step, np.array([step * 100 + edge], np.int64), peer=1, edge=edge)
wait_for(lambda: mesh.pending() == 6)
for step in (5, 6):
    for edge in (2, 0, 1):
        y = mesh.recv(step, tf.int64, [1], peer=2, edge=edge).numpy()
        assert y.tolist() == [step * 100 + edge], (step, edge, y)
assert mesh.pending() == 0

# Unknown-rank shape attr accepts any shape.
mesh.send(7, np.zeros((2, 0, 3), np.int64), peer=1, edge=0)
assert mesh.recv(7, tf.int64, None, peer=2, edge=0).shape == (2, 0, 3)

# The wire format as specified: a hand-built frame is received, and the kernels' frame is
# byte for byte the one the format describes.
c, d = socket.socketpair()
mesh.attach(0, c)
c.close()
d.sendall(frame(9, 8, 3, [2, 2], struct.pack("<4q", 1, -2, 3, -4)))  # 9 = DT_INT64
assert mesh.recv(8, tf.int64, [2, 2], peer=0, edge=3).numpy().tolist() == [[1, -2], [3, -4]]
mesh.send(8, np.array([[-1], [2]], np.int32), peer=0, edge=4)
want = frame(3, 8, 4, [2, 1], struct.pack("<2i", -1, 2))  # 3 = DT_INT32
raw = b""
d.settimeout(5)
while len(raw) < len(want):
    raw += d.recv(len(want) - len(raw))
assert raw == want, (raw, want)

# A send waits for its peer to be attached (here: peer 0 after a close and re-attach).
mesh.close()
assert mesh.attached(0) == 0 and mesh.attached(1) == 0 and mesh.pending() == 0
d.close()
result = {}
t = threading.Thread(target=lambda: result.update(
    done=mesh.send(9, np.array([42], np.int64), peer=1, edge=0)))
t.start()
time.sleep(0.3)
assert t.is_alive()  # still waiting for worker 1
loop()               # pk_mesh_close, then attach again (blocking sockets this time)
t.join(10)
assert not t.is_alive() and "done" in result
assert mesh.recv(9, tf.int64, [1], peer=2, edge=0).numpy().tolist() == [42]
mesh.close()
print("ALL")
'''

STALE = PRELUDE + r'''
loop()
one = lambda v: np.array([v], np.int64)
# Inbox: the receive for step 2 drops peer 2's message of step 1.
mesh.send(1, one(10), peer=1, edge=0)
mesh.send(2, one(20), peer=1, edge=0)
mesh.send(2, one(21), peer=1, edge=1)
wait_for(lambda: mesh.pending() == 3)
assert mesh.recv(2, tf.int64, [1], peer=2, edge=0).numpy().tolist() == [20]
assert mesh.pending() == 1  # step 1 dropped, step 2 edge 1 kept
# A message of an older step arriving later is dropped on arrival.
mesh.send(1, one(11), peer=1, edge=5)
time.sleep(0.2)
assert mesh.pending() == 1
# A receive for an older step is refused at once.
took = expect(tf.errors.AbortedError, r"step 1, edge 0\): superseded by step 2",
              lambda: mesh.recv(1, tf.int64, [1], peer=2, edge=0))
assert took < 1, took
assert mesh.recv(2, tf.int64, [1], peer=2, edge=1).numpy().tolist() == [21]
# A waiting receive of step 3 is failed when a receive of step 4 is issued.
t, errs = in_background(tf.errors.AbortedError,
                        lambda: mesh.recv(3, tf.int64, [1], peer=2, edge=9))
wait_for(lambda: mesh.pending() == 1)
mesh.send(4, one(40), peer=1, edge=0)
assert mesh.recv(4, tf.int64, [1], peer=2, edge=0).numpy().tolist() == [40]
failed_once(t, errs, "superseded by step 4")
assert mesh.pending() == 0
# Steps are per peer: peer 1's floor is untouched by receives from peer 2.
mesh.send(1, one(7), peer=2, edge=0)
assert mesh.recv(1, tf.int64, [1], peer=1, edge=0).numpy().tolist() == [7]
mesh.close()
print("ALL")
'''

# Worker 0 of the two-process check: listens, exchanges with worker 1 inside tf.functions.
TCP_PARTY0 = PRELUDE + r'''
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
print("PORT", srv.getsockname()[1], flush=True)
srv.settimeout(30)
conn, _ = srv.accept()
mesh.attach(1, conn)
conn.close(); srv.close()
assert mesh.attached(1) == 1
mesh.set_timeout(20)
rng = np.random.default_rng(5)
small = rng.integers(-2**63, 2**63 - 1, size=8, dtype=np.int64, endpoint=True)
flags = rng.integers(0, 2, size=(3, 7)).astype(bool)
big = rng.integers(-2**63, 2**63 - 1, size=512 * 1024, dtype=np.int64, endpoint=True)

@tf.function
def exchange(step, x, f):
    mesh.send(step, x, peer=1, edge=0)
    mesh.send(step, f, peer=1, edge=1)
    return mesh.recv(step, tf.int64, [8], peer=1, edge=2)

for step in range(1, 6):
    y = exchange(tf.constant(step, tf.int64), small + step, flags).numpy()
    assert np.array_equal(y, (small + step) * 3 + 1), step

@tf.function
def swap(step, x):  # both workers send 4 MB at once, then receive
    mesh.send(step, x, peer=1, edge=3)
    return mesh.recv(step, tf.int64, [big.size], peer=1, edge=4)

z = swap(tf.constant(10, tf.int64), big).numpy()
assert np.array_equal(z, big[::-1])
mesh.close()
print("ALL")
'''

TCP_PARTY1 = PRELUDE + r'''
conn = socket.create_connection(("127.0.0.1", int(os.environ["MESH_PORT"])))
mesh.attach(0, conn)
conn.close()
mesh.set_timeout(20)
rng = np.random.default_rng(5)
small = rng.integers(-2**63, 2**63 - 1, size=8, dtype=np.int64, endpoint=True)
flags = rng.integers(0, 2, size=(3, 7)).astype(bool)
big = rng.integers(-2**63, 2**63 - 1, size=512 * 1024, dtype=np.int64, endpoint=True)

@tf.function
def answer(step):
    y = mesh.recv(step, tf.int64, [8], peer=0, edge=0)
    f = mesh.recv(step, tf.bool, [3, 7], peer=0, edge=1)
    mesh.send(step, y * 3 + 1, peer=0, edge=2)
    return y, f

for step in range(1, 6):
    y, f = answer(tf.constant(step, tf.int64))
    assert np.array_equal(y.numpy(), small + step) and np.array_equal(f.numpy(), flags), step

@tf.function
def swap(step, x):
    mesh.send(step, x, peer=0, edge=4)
    return mesh.recv(step, tf.int64, [big.size], peer=0, edge=3)

z = swap(tf.constant(10, tf.int64), big[::-1].copy()).numpy()
assert np.array_equal(z, big)
mesh.close()
print("ALL")
'''

TIMEOUTS = PRELUDE + r'''
mesh.set_timeout(1)
loop()
# Nobody sends: DeadlineExceeded after the timeout, naming the message.
took = expect(tf.errors.DeadlineExceededError,
              r"no message from worker 2 for step 1 edge 0 within 1 s",
              lambda: mesh.recv(1, tf.int64, [2], peer=2, edge=0))
assert 0.9 < took < 3, took
assert mesh.pending() == 0
# Likewise inside a tf.function.
f = tf.function(lambda s: mesh.recv(s, tf.int32, [2], peer=1, edge=3))
took = expect(tf.errors.DeadlineExceededError, r"from worker 1 for step 2 edge 3",
              lambda: f(tf.constant(2, tf.int64)))
assert 0.9 < took < 3, took
# A send to a worker never attached: DeadlineExceeded naming it.
took = expect(tf.errors.DeadlineExceededError, r"worker 0 was not attached to the mesh within 1 s",
              lambda: mesh.send(1, np.array([1], np.int64), peer=0, edge=0))
assert 0.9 < took < 3, took
# A step cancelled (a session's own timeout) completes its waiting receive with Cancelled:
# the session returns at its 300 ms deadline, not the mesh's 30 s, and the waiter is gone.
mesh.set_timeout(30)
g = tf.Graph()
with g.as_default():
    y = mesh.recv(tf.constant(5, tf.int64), tf.int64, [2], peer=2, edge=0)
with tf.compat.v1.Session(graph=g) as sess:
    opts = tf.compat.v1.RunOptions(timeout_in_ms=300)
    took = expect(tf.errors.DeadlineExceededError, r".",
                  lambda: sess.run(y, options=opts))
    assert took < 5, took
    wait_for(lambda: mesh.pending() == 0, 2)  # the session is still open: cancellation did it
mesh.close()
print("ALL")
'''

REFUSALS = PRELUDE + r'''
loop()
# Attaching a peer twice, a bad index, a non-stream socket.
spare = socket.socketpair()[0]
expect(ClusterError, r"worker 1 is already attached", lambda: mesh.attach(1, spare))
expect(ClusterError, r"peer must be 0, 1 or 2, got 3", lambda: mesh.attach(3, spare))
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
expect(ClusterError, r"not a stream socket", lambda: mesh.attach(0, udp))
assert mesh.attached(0) == 0 and mesh.attached(1) == 1
# Shape against the attr: InvalidArgument (a fully defined and a partial attr).
mesh.send(1, np.zeros((3, 4), np.int64), peer=1, edge=0)
expect(tf.errors.InvalidArgumentError,
       r"worker 2 sent shape \[3,4\], the op's shape attr is \[3,5\]",
       lambda: mesh.recv(1, tf.int64, [3, 5], peer=2, edge=0))
mesh.send(1, np.zeros((3, 4), np.int64), peer=1, edge=1)
expect(tf.errors.InvalidArgumentError, r"shape attr is \[\?,4,1\]",
       lambda: mesh.recv(1, tf.int64, [None, 4, 1], peer=2, edge=1))
mesh.send(1, np.zeros((3, 4), np.int64), peer=1, edge=2)
assert mesh.recv(1, tf.int64, [None, 4], peer=2, edge=2).shape == (3, 4)
# dtype against T.
mesh.send(1, np.zeros(2, np.int32), peer=1, edge=3)
expect(tf.errors.InvalidArgumentError, r"worker 2 sent int32, the op expects int64",
       lambda: mesh.recv(1, tf.int64, [2], peer=2, edge=3))
# Refused at op construction: a dtype the mesh does not carry, a bad peer, a negative edge.
expect((TypeError, tf.errors.InvalidArgumentError), r"float",
       lambda: mesh.send(1, np.zeros(2, np.float32), peer=1, edge=0))
expect((TypeError, tf.errors.InvalidArgumentError), r"float",
       lambda: mesh.recv(1, tf.float32, [2], peer=2, edge=0))
expect(tf.errors.InvalidArgumentError, r"PkMeshSend: peer must be 0, 1 or 2, got 5",
       lambda: mesh.send(1, np.zeros(2, np.int64), peer=5, edge=0))
expect(tf.errors.InvalidArgumentError, r"PkMeshRecv: edge must be >= 0, got -1",
       lambda: mesh.recv(1, tf.int64, [2], peer=2, edge=-1))
expect(tf.errors.InvalidArgumentError, r"PkMeshSend: x must have rank <= 8",
       lambda: mesh.send(1, np.zeros([1] * 9, np.int64), peer=1, edge=0))
# Two receives for one message: the second is refused.
mesh.set_timeout(2)
t = threading.Thread(target=lambda: mesh.recv(1, tf.int64, [1], peer=2, edge=20))
t.start()
wait_for(lambda: mesh.pending() == 1)
expect(tf.errors.AlreadyExistsError, r"another receive is already waiting",
       lambda: mesh.recv(1, tf.int64, [1], peer=2, edge=20))
mesh.send(1, np.array([1], np.int64), peer=1, edge=20)
t.join(5)
assert mesh.pending() == 0
mesh.close()
print("ALL")
'''

MALFORMED = PRELUDE + r'''
mesh.set_timeout(10)
cases = [
    (b"GARBAGE!" * 8, r"malformed mesh frame: bad magic 0x42524147"),
    (frame(1, 1, 0, [2], b"\0" * 8), r"malformed mesh frame: dtype 1 is not allowed"),
    (frame(9, 1, 0, [4], b"\0" * 31), r"malformed mesh frame: payload of 31 bytes for 4 int64"),
    (frame(9, 1, 0, [1] * 9, b"\0" * 8), r"malformed mesh frame: rank 9 > 8"),
    (frame(9, 1, 0, [-1], b""), r"malformed mesh frame: negative dimension -1"),
    (frame(10, 1, 0, [3], b"\x00\x01\x02"), r"malformed mesh frame: bool element 2 is 2"),
    (frame(9, 7, 0, [1], b"\0" * 8) * 2, r"malformed mesh frame: step 7 edge 0 arrived twice"),
    (frame(9, 7, 0, [2], b"\0" * 4, nbytes=16),
     r"the mesh link to worker 0 closed in the middle of a frame"),
]
for garbage, message in cases:
    c, d = socket.socketpair()
    mesh.attach(0, c)
    c.close()
    # A receive is waiting when the garbage comes: it fails with the link's message.
    t, errs = in_background(tf.errors.UnavailableError,
                            lambda: mesh.recv(5, tf.int64, None, peer=0, edge=3))
    wait_for(lambda: mesh.pending() == 1)
    d.sendall(garbage)
    if "middle" in message:
        d.close()
    failed_once(t, errs, message)
    assert mesh.attached(0) == -1
    # Later receives and sends on the link fail at once, with the same message.
    took = expect(tf.errors.UnavailableError, message,
                  lambda: mesh.recv(6, tf.int64, [1], peer=0, edge=0))
    assert took < 0.5, took
    took = expect(tf.errors.UnavailableError, message,
                  lambda: mesh.send(6, np.array([1], np.int64), peer=0, edge=0))
    assert took < 0.5, took
    if d.fileno() >= 0:  # the kernels closed their end: the raw end sees the stream end
        d.settimeout(5)
        try:
            rest = d.recv(1)
        except ConnectionResetError:
            rest = b""
        assert rest == b"", rest
        d.close()
    mesh.close()
    assert mesh.attached(0) == 0 and mesh.pending() == 0
print("ALL")
'''

PEER_KILLED = PRELUDE + r'''
mesh.set_timeout(30)
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
peer = subprocess.Popen([sys.executable, "-c",
                         "import socket, sys, time\n"
                         "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
                         "time.sleep(60)\n", str(srv.getsockname()[1])])
srv.settimeout(20)
conn, _ = srv.accept()
mesh.attach(1, conn)
conn.close(); srv.close()
assert mesh.attached(1) == 1
killer = threading.Timer(0.5, peer.kill)
killer.start()
# Inside a tf.function: TensorFlow's executor turns Unavailable from any op but its own
# _Send/_Recv into InternalError ("to avoid invoking TF network error handling logic"),
# keeping the message.
f = tf.function(lambda s: mesh.recv(s, tf.int64, [2], peer=1, edge=0))
took = expect((tf.errors.UnavailableError, tf.errors.InternalError),
              r"step 1, edge 0\): the mesh link to worker 1 closed",
              lambda: f(tf.constant(1, tf.int64)))
assert 0.4 < took < 2.5, took
peer.wait(10)
assert mesh.attached(1) == -1
took = expect(tf.errors.UnavailableError, r"the mesh link to worker 1 closed",
              lambda: mesh.send(2, np.array([1], np.int64), peer=1, edge=0))
assert took < 0.5, took
took = expect(tf.errors.UnavailableError, r"the mesh link to worker 1 closed",
              lambda: mesh.recv(2, tf.int64, [1], peer=1, edge=0))
assert took < 0.5, took
# The other end of a socketpair closed while a receive waits (same process).
a, b = socket.socketpair()
mesh.attach(2, a)
a.close()
threading.Timer(0.3, b.close).start()
took = expect(tf.errors.UnavailableError, r"the mesh link to worker 2 closed",
              lambda: mesh.recv(1, tf.int64, [1], peer=2, edge=0))
assert took < 2.5, took
# pk_mesh_close fails a waiting receive with Cancelled and lets peers attach again.
loop_a, loop_b = socket.socketpair()
mesh.attach(0, loop_a)
t, errs = in_background(tf.errors.CancelledError,
                        lambda: mesh.recv(1, tf.int64, [1], peer=0, edge=0))
wait_for(lambda: mesh.pending() == 1)
mesh.close()
failed_once(t, errs, "the mesh was closed")
assert [mesh.attached(p) for p in range(3)] == [0, 0, 0] and mesh.pending() == 0
loop()
mesh.send(3, np.array([9], np.int64), peer=1, edge=1)
assert mesh.recv(3, tf.int64, [1], peer=2, edge=1).numpy().tolist() == [9]
mesh.close()
print("ALL")
'''


def test_round_trips_in_one_process():
    run_checks(ROUND_TRIPS, timeout=120)


def test_stale_steps_are_dropped_and_superseded():
    run_checks(STALE, timeout=60)


def test_two_processes_over_tcp_loopback():
    party0 = subprocess.Popen([sys.executable, "-c", TCP_PARTY0], env=child_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = party0.stdout.readline()
        assert line.startswith("PORT "), line + party0.stderr.read()[-3000:]
        run_checks(TCP_PARTY1, timeout=120, MESH_PORT=line.split()[1])
        out, err = party0.communicate(timeout=60)
        assert party0.returncode == 0, err[-3000:]
        assert "ALL" in out, out + err[-2000:]
    finally:
        if party0.poll() is None:
            party0.kill()
            party0.wait()


def test_timeouts_and_cancellation_do_not_hang():
    run_checks(TIMEOUTS, timeout=60)


def test_refusals():
    run_checks(REFUSALS, timeout=60)


def test_malformed_frames_fail_the_link():
    run_checks(MALFORMED, timeout=60)


def test_peer_killed_fails_waiting_receive():
    run_checks(PEER_KILLED, timeout=60)

