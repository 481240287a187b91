"""Privacy invariants of one private query, observed on the wire (issue 5).

One module-scoped run: three workers started by the test, a model owner sharing the trained
tutorial CNN and a client sending one batch-1 query. Every worker is reached only through a
recording TCP proxy: worker i listens on a private port Q_i, while the owner, the client and
the other workers are told its address is P_i, where the test's proxy forwards to Q_i and
keeps every byte in both directions. Each proxied connection is attributed to the process
that opened it (its socket inode in /proc), so the view of worker i is

    every byte through proxy i (both directions)
    + every byte on connections worker i itself opened to the other proxies.

A socket audit samples the workers' TCP sockets throughout, to show nothing bypasses the
proxies. The owner and client scripts record, from inside the processes (no extra traffic):
the client's shares x_0, x_1, x_2 of the encoded input (worker i is sent (x_i, x_{i+1})),
the output shares y_0, y_1, y_2 the workers returned and their sum (the encoded answer), and
per weight TFE's fixed-point encoding, the seeds of its first two shares and its third share.

Byte search: every recorded stream is also de-framed (HTTP/2 DATA payloads reassembled per
stream), so a tensor split across frames is still contiguous. Needles are 8-element windows
(64 bytes for int64/float64) that are "informative": all 8 elements non-zero and at least 4
distinct, so a window cannot match padding or small constants by chance.
"""

import collections
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import LOGIT_ATOL, SCRIPTS, child_env, free_hosts

SCALE = 2.0 ** 16  # ABY3's fixed point: round(x * 2^16) as int64 (mod 2^64)
WINDOW = 8  # elements per needle window


# ----------------------------------------------------------------------------------------
# The recording proxy
# ----------------------------------------------------------------------------------------
class Connection:
    """One proxied TCP connection to a worker: who opened it and every byte each way."""

    def __init__(self, worker, peer_port):
        self.worker = worker  # the proxy (= worker index) it went through
        self.peer_port = peer_port
        self.origin = None  # name of the process that opened it ("owner", "client", "w0", ...)
        self.chunks = {"to_worker": [], "from_worker": []}  # (time, bytes)
        self.lock = threading.Lock()

    def data(self, direction, t0=None, t1=None):
        with self.lock:
            return b"".join(c for t, c in self.chunks[direction]
                            if (t0 is None or t >= t0) and (t1 is None or t <= t1))

    def nbytes(self, direction, t0=None, t1=None):
        with self.lock:
            return sum(len(c) for t, c in self.chunks[direction]
                       if (t0 is None or t >= t0) and (t1 is None or t <= t1))


class RecordingProxy:
    """Listens on 127.0.0.1:listen_port and forwards each connection to 127.0.0.1:target_port,
    recording both directions (two pump threads per connection, so neither direction can
    block the other)."""

    def __init__(self, worker, listen_port, target_port, identify):
        self.worker, self.target_port, self.identify = worker, target_port, identify
        self.connections = []
        self.errors = []
        self._sockets = []
        self._closed = False
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", listen_port))
        self.server.listen(64)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._closed:
            try:
                down, addr = self.server.accept()
            except OSError:
                return
            conn = Connection(self.worker, addr[1])
            conn.origin = self.identify(addr[1], self.server.getsockname()[1])
            try:
                up = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError as exc:
                self.errors.append("connect to worker {}: {}".format(self.worker, exc))
                down.close()
                continue
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [down, up]
            self.connections.append(conn)
            for src, dst, direction in ((down, up, "to_worker"), (up, down, "from_worker")):
                threading.Thread(target=self._pump, args=(src, dst, conn, direction),
                                 daemon=True).start()

    @staticmethod
    def _pump(src, dst, conn, direction):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with conn.lock:
                    conn.chunks[direction].append((time.monotonic(), data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def close(self):
        self._closed = True
        for s in [self.server] + self._sockets:
            try:
                s.close()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------
# /proc helpers: which process owns a socket, what a process has mapped
# ----------------------------------------------------------------------------------------
def _tcp_table():
    """Rows (local_port, remote_port, state, inode, local_addr) of /proc/net/tcp{,6}."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                parts = line.split()
                laddr, lport = parts[1].rsplit(":", 1)
                rport = int(parts[2].rsplit(":", 1)[1], 16)
                rows.append((int(lport, 16), rport, parts[3], int(parts[9]), laddr))
    return rows


def _socket_inodes(pid):
    inodes = set()
    try:
        for fd in os.listdir("/proc/{}/fd".format(pid)):
            try:
                target = os.readlink("/proc/{}/fd/{}".format(pid, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


class Processes:
    """Names of the processes of this run by PID, to attribute sockets."""

    def __init__(self):
        self.pids = {}  # name -> pid

    def owner_of_port(self, local_port, remote_port):
        for _ in range(50):
            inode = next((r[3] for r in _tcp_table()
                          if r[0] == local_port and r[1] == remote_port and r[3]), None)
            if inode is not None:
                for name, pid in list(self.pids.items()):
                    if inode in _socket_inodes(pid):
                        return name
            time.sleep(0.01)
        return "unknown:{}".format(local_port)


def _maps(pid):
    with open("/proc/{}/maps".format(pid)) as f:
        return f.read()


# ----------------------------------------------------------------------------------------
# HTTP/2 de-framing and window search
# ----------------------------------------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def http2_data(raw):
    """DATA payloads of an HTTP/2 byte stream, reassembled per stream id.

    Returns (payload bytes, complete) where complete says the frames tiled the whole stream.
    """
    pos = len(PREFACE) if raw.startswith(PREFACE) else 0
    streams = collections.OrderedDict()
    while pos + 9 <= len(raw):
        length = int.from_bytes(raw[pos:pos + 3], "big")
        ftype, flags = raw[pos + 3], raw[pos + 4]
        sid = int.from_bytes(raw[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        body = raw[pos + 9:pos + 9 + length]
        if len(body) < length:
            break
        if ftype == 0:  # DATA
            if flags & 0x8:  # PADDED
                body = body[1:len(body) - body[0]]
            streams.setdefault(sid, []).append(body)
        pos += 9 + length
    return b"".join(b"".join(parts) for parts in streams.values()), pos == len(raw)


def windows(arr, step=1):
    """Byte strings of the WINDOW-element windows of ``arr`` (flattened, starting every
    ``step`` elements), keeping only informative ones: all elements non-zero and at least 4
    distinct."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    out = []
    for k in range(0, flat.size - WINDOW + 1, step):
        w = flat[k:k + WINDOW]
        if np.any(w == 0) or len(np.unique(w)) < 4:
            continue
        out.append(w.tobytes())
    return out


class Haystack:
    """A byte string with its 8-byte words at each of the 8 byte alignments, for searching
    many needles at once."""

    def __init__(self, data):
        self.data = bytes(data)
        self.words = [np.frombuffer(self.data, dtype="<u8", count=(len(self.data) - a) // 8,
                                    offset=a) if len(self.data) - a >= 8 else np.zeros(0, "<u8")
                      for a in range(8)]


def found(haystacks, needles):
    """The needles (byte strings of >= 8 bytes) that occur in any of the haystacks: candidate
    positions are where a word equals some needle's first 8 bytes (a sorted-array lookup),
    then the whole needle is compared."""
    if not needles:
        return set()
    by_key = collections.defaultdict(list)
    for n, k in zip(needles, np.frombuffer(b"".join(n[:8] for n in needles), "<u8").tolist()):
        by_key[k].append(n)
    keys = np.array(sorted(by_key), dtype="<u8")
    hits = set()
    for h in haystacks:
        for a, words in enumerate(h.words):
            if not words.size:
                continue
            slot = np.minimum(np.searchsorted(keys, words), keys.size - 1)
            for i in np.nonzero(keys[slot] == words)[0].tolist():
                pos = a + 8 * i
                for n in by_key[int(words[i])]:
                    if n not in hits and h.data[pos:pos + len(n)] == n:
                        hits.add(n)
    return hits


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------
def _ports(hosts):
    return [int(h.rsplit(":", 1)[1]) for h in hosts]


class _Lines(threading.Thread):
    """Reads a process's output, timestamping each line (same clock as the proxies)."""

    def __init__(self, proc):
        super().__init__(daemon=True)
        self.proc, self.lines = proc, []
        self.start()

    def run(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def time_of(self, prefix):
        return next((t for t, line in self.lines if line.startswith(prefix)), None)

    def line(self, prefix):
        return next((line for t, line in self.lines if line.startswith(prefix)), None)

    def text(self):
        return "\n".join(line for _, line in self.lines)


class _SocketAudit(threading.Thread):
    """Samples the TCP sockets of the worker processes: every connection (in any state but
    LISTEN) must be one the proxies see: accepted on the worker's private port Q_i (which only
    its proxy knows), or opened to a proxy port P_j. Also collects the listening sockets."""

    def __init__(self, pids, private_ports, proxy_ports):
        super().__init__(daemon=True)
        self.pids, self.private, self.proxy = pids, private_ports, set(proxy_ports)
        self.unproxied, self.listening = set(), collections.defaultdict(set)
        self.samples = 0
        self.done = threading.Event()
        self.start()

    def run(self):
        while not self.done.wait(0.25):
            self.sample()

    def sample(self):
        rows = _tcp_table()
        for i, pid in enumerate(self.pids):
            inodes = _socket_inodes(pid)
            for lport, rport, state, inode, laddr in rows:
                if inode not in inodes:
                    continue
                if state == "0A":
                    self.listening[i].add((laddr, lport))
                elif lport != self.private[i] and rport not in self.proxy:
                    self.unproxied.add((i, lport, rport))
        self.samples += 1


class Run:
    """Everything recorded in one private query, for the tests to assert on."""


def _start_worker(i, hosts, env):
    cmd = [sys.executable, "-m", "privatekeras.worker", "--hosts", ",".join(hosts),
           "--index", str(i), "--parent-pid", str(os.getpid())]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    from privatekeras.cluster import _child_env

    t_start = time.monotonic()
    d = tmp_path_factory.mktemp("privacy")
    public = free_hosts()
    private = free_hosts()
    # The workers bind their ports seconds later: keep them below the ephemeral range
    # (32768+), where an outgoing connection could take them in the meantime.
    while set(private) & set(public) or max(_ports(private)) >= 32768:
        private = free_hosts()
    P, Q = _ports(public), _ports(private)
    np.save(d / "image.npy", np.load(models / "images.npy")[:1])

    names = Processes()
    proxies, workers, others, audit, readers = [], [], [], None, {}
    r = Run()
    try:
        proxies = [RecordingProxy(i, P[i], Q[i], names.owner_of_port) for i in range(3)]
        # Worker i binds its own private port; everyone else is told the proxy's port.
        env = _child_env(loopback_only=True)  # exactly what Cluster.start() gives workers
        for i in range(3):
            hosts = list(public)
            hosts[i] = private[i]
            workers.append(_start_worker(i, hosts, env))
            names.pids["w{}".format(i)] = workers[-1].pid
        worker_out = [_Lines(w) for w in workers]
        readers.update((w.pid, o) for w, o in zip(workers, worker_out))
        deadline = time.monotonic() + 120
        while not all(o.time_of("READY") for o in worker_out):
            assert all(w.poll() is None for w in workers), [o.text() for o in worker_out]
            assert time.monotonic() < deadline, [o.text() for o in worker_out]
            time.sleep(0.1)
        r.t_ready = time.monotonic()
        audit = _SocketAudit([w.pid for w in workers], Q, P)

        h = ["--hosts", ",".join(public)]
        py = sys.executable
        owner = subprocess.Popen(
            [py, str(SCRIPTS / "owner.py")] + h + [
                "--model", str(models / "tutorial.keras"), "--num-requests", "1",
                "--external-workers", "--record-weight-shares", str(d / "weights")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
        others.append(owner)
        names.pids["owner"] = owner.pid
        client = subprocess.Popen(
            [py, str(SCRIPTS / "client.py")] + h + [
                "--images", str(d / "image.npy"), "--out", str(d / "logits.npy"),
                "--input-shape", "1,28,28,1", "--output-shape", "1,10",
                "--record", str(d / "client"), "--start-after", str(d / "serving")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
        others.append(client)
        names.pids["client"] = client.pid
        owner_out, client_out = _Lines(owner), _Lines(client)
        readers.update({owner.pid: owner_out, client.pid: client_out})

        def report(what):
            return "{}\nworkers' exit codes {} (-11: SIGSEGV)\nOWNER:\n{}\nCLIENT:\n{}{}".format(
                what, [w.poll() for w in workers], owner_out.text()[-3000:],
                client_out.text()[-3000:],
                "".join("\nWORKER {}:\n{}".format(i, o.text()[-1500:])
                        for i, o in enumerate(worker_out)))

        # The client (already importing TensorFlow) connects once the owner serves, so its
        # eager contexts are not created on the workers while the owner's ops run there.
        deadline = time.monotonic() + 240
        while not any("privatekeras: serving" in line for _, line in owner_out.lines):
            assert owner.poll() is None and time.monotonic() < deadline, report("owner")
            time.sleep(0.05)
        (d / "serving").touch()
        try:
            client.wait(max(1.0, deadline - time.monotonic()))
            owner.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(report("flow timed out")) from None
        owner_out.join(5)
        client_out.join(5)
        assert owner.returncode == 0 and client.returncode == 0, report(
            "owner rc={} client rc={}".format(owner.returncode, client.returncode))
        audit.sample()
        r.maps = [_maps(w.pid) for w in workers]
    finally:
        if audit is not None:
            audit.done.set()
        _stop(others)
        _stop(workers)
        for p in proxies:
            p.close()
        for p in others + workers:  # the readers have seen EOF: the processes are gone
            reader = readers.get(p.pid)
            if reader is not None:
                reader.join(5)
            p.stdout.close()
    r.t_start, r.elapsed_run = t_start, time.monotonic() - t_start
    r.audit, r.proxies, r.P, r.Q = audit, proxies, P, Q
    r.owner_out, r.client_out, r.worker_out = owner_out, client_out, worker_out
    r.connections = [c for p in proxies for c in p.connections]
    r.proxy_errors = [e for p in proxies for e in p.errors]
    # The client stamps its markers with time.monotonic() (CLOCK_MONOTONIC, the proxies'
    # clock too): exact even when this process reads its output late.
    stamp = lambda marker: float(client_out.line(marker).split()[-1])  # noqa: E731
    r.t_split, r.t_reconstruct = stamp("RECORD SPLIT"), stamp("RECORD RECONSTRUCT")
    r.t_shared = float(owner_out.line("RECORD SHARED").split()[-1])
    load = lambda name: np.load(d / "client" / (name + ".npy"))  # noqa: E731
    r.x_enc = load("input_encoded")
    r.x = [load("input_w0_a"), load("input_w1_a"), load("input_w2_a")]
    r.x_pairs = [(load("input_w{}_a".format(i)), load("input_w{}_b".format(i))) for i in range(3)]
    r.y_pairs = [(load("output_w{}_a".format(i)), load("output_w{}_b".format(i)))
                 for i in range(3)]
    r.y = [p[0] for p in r.y_pairs]
    r.y_enc = load("output_encoded")
    r.logits = np.load(d / "logits.npy")
    r.plain_logits = np.load(models / "tutorial_logits.npy")[:1]
    r.image = np.load(d / "image.npy")
    nweights = len(list((d / "weights").glob("secret_*.npy")))
    wload = lambda name, k: np.load(d / "weights" / "{}_{}.npy".format(name, k))  # noqa: E731
    r.w_secret = [wload("secret", k) for k in range(nweights)]
    r.w_share2 = [wload("share2", k) for k in range(nweights)]
    r.w_seeds = [(wload("seed0", k), wload("seed1", k)) for k in range(nweights)]
    r.w_devices = json.loads((d / "weights" / "devices.json").read_text())
    import keras

    model = keras.models.load_model(models / "tutorial.keras", compile=False)
    r.keras_weights = model.get_weights()

    # Haystacks: raw and de-framed bytes, per connection and direction.
    t = time.monotonic()
    r.hay = {}
    r.complete = {}
    for k, c in enumerate(r.connections):
        for direction in ("to_worker", "from_worker"):
            raw = c.data(direction)
            data, complete = http2_data(raw)
            r.complete[(k, direction)] = complete
            r.hay[(k, direction)] = (Haystack(raw), Haystack(data))
    r.index_time = time.monotonic() - t
    return r


def view(r, i):
    """Haystacks of everything worker i sent or received."""
    out = []
    for k, c in enumerate(r.connections):
        if c.worker == i or c.origin == "w{}".format(i):
            for direction in ("to_worker", "from_worker"):
                out += list(r.hay[(k, direction)])
    return out


def all_traffic(r):
    return [h for pair in r.hay.values() for h in pair]



def through(r, i, origin, direction):
    """Haystacks of the bytes in ``direction`` on connections ``origin`` opened to worker i."""
    return [h for k, c in enumerate(r.connections) if c.worker == i and c.origin == origin
            for h in r.hay[(k, direction)]]


def phase_bytes(r, t0, t1):
    """Bytes per (origin, worker, direction) between two times."""
    out = collections.Counter()
    for c in r.connections:
        for direction in ("to_worker", "from_worker"):
            out[(c.origin, c.worker, direction)] += c.nbytes(direction, t0, t1)
    return out


WORKERS = {"w0", "w1", "w2"}  # names of the worker processes as connection origins


# ----------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------
def bit_frequencies(a):
    """Frequency of 1 at each of the 64 bit positions over the elements of an int64 array."""
    u = np.ascontiguousarray(a).reshape(-1).view(np.uint64)
    return ((u[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)).mean(axis=0)


def chi_square_bytes(a):
    """Pearson chi-square statistic of the byte values of ``a`` against uniform (255 df)."""
    b = np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8)
    expected = b.size / 256.0
    return float((((np.bincount(b, minlength=256) - expected) ** 2) / expected).sum())


def chi_square_bound(df=255, z=4.7534):
    """The chi-square quantile at one-sided p = 1e-6 (z = 4.7534), by Wilson-Hilferty:
    a uniform byte source exceeds it once in a million trials. For 255 df it is ~377."""
    c = 2.0 / (9 * df)
    return df * (1 - c + z * np.sqrt(c)) ** 3


def wrapping_sum(a, b):
    with np.errstate(over="ignore"):
        return a + b


# ----------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------
def test_wire_search_finds_tensors_split_across_http2_frames():
    """The search itself: a tensor cut by an HTTP/2 frame header is invisible in the raw
    bytes but found after de-framing, at any byte alignment; random needles are not found."""
    rng = np.random.default_rng(5)
    secret = rng.integers(1, 2 ** 62, size=40, dtype=np.int64)
    payload = b"\x00\x07junk" + secret.tobytes() + b"tail"

    def frame(body, stream=1, ftype=0, pad=0):
        flags = 0x8 if pad else 0
        if pad:
            body = bytes([pad]) + body + b"\x00" * pad
        return (len(body).to_bytes(3, "big") + bytes([ftype, flags]) + stream.to_bytes(4, "big")
                + body)

    # A SETTINGS frame, the tensor cut over two DATA frames (one padded), a HEADERS frame
    # of another stream in between.
    raw = (PREFACE + frame(b"", 0, ftype=4) + frame(payload[:101], pad=5)
           + frame(b"\x88", 3, ftype=1) + frame(payload[101:]))
    data, complete = http2_data(raw)
    assert complete and data == payload
    needles = windows(secret)
    split_by_header = [n for n in needles if n not in raw]
    assert split_by_header  # the frame boundary cuts some windows in the raw stream
    assert found([Haystack(data)], needles) == set(needles)
    assert found([Haystack(raw)], needles) == set(needles) - set(split_by_header)
    other = windows(rng.integers(1, 2 ** 62, size=40, dtype=np.int64))
    assert not found([Haystack(data), Haystack(raw)], other)


def test_the_private_answer_matches_plaintext_keras(run):
    """The recorded query is a real one: the client's answer is the decoding of the output
    shares it recorded, and it agrees with plaintext Keras (argmax and LOGIT_ATOL)."""
    np.testing.assert_allclose(run.logits, (run.y_enc / SCALE).astype(np.float32), atol=1e-6)
    assert run.logits.argmax(1).tolist() == run.plain_logits.argmax(1).tolist()
    assert np.abs(run.logits - run.plain_logits).max() < LOGIT_ATOL
    np.testing.assert_array_equal(run.x_enc, np.round(run.image * SCALE).astype(np.int64))


def test_every_byte_a_worker_exchanges_is_recorded(run):
    """Completeness of the recording, so that 'not found in the traffic' means 'never sent':

    - sampled every 0.25 s, every TCP connection of every worker process (any state but
      LISTEN) is either accepted on its private port (only the proxy knows it) or opened to
      a proxy port: nothing bypasses the proxies (e.g. to the owner's or client's servers);
    - every connection that carried a byte to a worker is attributed to the process that
      opened it (the only unattributed ones are the cluster's TCP reachability probes,
      which close at once and send nothing);
    - workers talk to each other through the proxies too (the owner's cluster spec names
      the proxy ports): in the query, each worker pulls data from the others;
    - every recorded stream is a whole sequence of HTTP/2 frames.
    Prints the measured bytes per phase."""
    r = run
    assert not r.proxy_errors
    assert r.audit.samples >= 20, r.audit.samples
    assert not r.audit.unproxied, r.audit.unproxied
    known = {"owner", "client"} | WORKERS
    for c in r.connections:
        if c.origin not in known:
            assert c.nbytes("to_worker") == 0, (c.worker, c.origin, c.nbytes("to_worker"))
    assert all(r.complete.values()), [k for k, v in r.complete.items() if not v]

    t_query = (r.t_split, r.t_reconstruct + 0.2)  # the proxies may stamp a little late
    phases = [("sharing the weights", None, r.t_shared),
              ("tracing + serving set-up, client connecting", r.t_shared, t_query[0]),
              ("one query (the first: it also instantiates the step's functions on the "
               "workers)", t_query[0], t_query[1])]
    print("\nbytes through each worker's proxy (to worker / from worker):")
    for name, t0, t1 in phases:
        b = phase_bytes(r, t0, t1)
        print("  {}:".format(name))
        for origin in ["owner", "client", "w0", "w1", "w2"]:
            cells = ["w{} {:>9,} / {:>9,}".format(i, b[(origin, i, "to_worker")],
                                                   b[(origin, i, "from_worker")])
                     for i in range(3) if origin != "w{}".format(i)]
            print("    from {:<6} ".format(origin) + " | ".join(cells))
    q = phase_bytes(r, *t_query)
    w2w = sum(v for (o, _, _), v in q.items() if o in WORKERS)
    print("  worker<->worker bytes in the query: {:,}".format(w2w))
    print("  timeline (s): workers ready {:.1f}, weights shared {:.1f}, query sent {:.1f}, "
          "answered {:.1f}, all stopped {:.1f}; indexing the bytes {:.1f}".format(
              *(t - r.t_start for t in (r.t_ready, r.t_shared, r.t_split, r.t_reconstruct,
                                        r.t_start + r.elapsed_run)), r.index_time))
    for i in range(3):
        # Worker i served other workers' requests during the step, and asked them itself.
        assert sum(q[("w{}".format(j), i, "from_worker")] for j in range(3) if j != i) > 0
        assert sum(q[("w{}".format(i), j, "from_worker")] for j in range(3) if j != i) > 0


def test_each_worker_receives_its_two_input_shares_and_never_the_third(run):
    """Worker i is sent exactly (x_i, x_{i+1}) of the client's input shares: every window
    of both is found in what the client sent to worker i (positive control: the recording
    and search see tensors), and no window of x_{i+2} appears anywhere in worker i's view
    (all it received or sent, from the client, the owner and the other workers). Without
    x_{i+2}, worker i's shares are independent of the input."""
    r = run
    for i in range(3):
        mine, nxt, third = r.x[i], r.x[(i + 1) % 3], r.x[(i + 2) % 3]
        np.testing.assert_array_equal(r.x_pairs[i][0], mine)
        np.testing.assert_array_equal(r.x_pairs[i][1], nxt)
        sent = through(r, i, "client", "to_worker")
        for share in (mine, nxt):
            needles = windows(share)
            assert len(needles) > 700
            assert found(sent, needles) == set(needles), "worker {} missed a share".format(i)
        assert not found(view(r, i), windows(third)), (
            "worker {} saw the third input share x_{}".format(i, (i + 2) % 3))


def test_each_worker_returns_its_two_output_shares_and_never_sees_the_third(run):
    """Worker i returns (y_i, y_{i+1}) of the answer to the client (found in its responses
    to the client), and no window of y_{i+2} appears anywhere in worker i's view: no single
    worker ever holds all three output shares."""
    r = run
    for i in range(3):
        mine, nxt, third = r.y[i], r.y[(i + 1) % 3], r.y[(i + 2) % 3]
        np.testing.assert_array_equal(r.y_pairs[i][1], nxt)
        returned = through(r, i, "client", "from_worker")
        for share in (mine, nxt):
            needles = windows(share)
            assert len(needles) == 3
            assert found(returned, needles) == set(needles)
        assert not found(view(r, i), windows(third)), (
            "worker {} saw the third output share y_{}".format(i, (i + 2) % 3))


def test_neither_the_clear_input_nor_the_clear_answer_is_on_the_wire(run):
    """No window of the input image (as fixed-point int64, float32 or float64) or of the
    answer (fixed-point int64 as reconstructed by the client, float32 and float64 logits)
    appears in any byte any worker sent or received, in any phase."""
    r = run
    needles = {
        "input fixed-point": windows(r.x_enc),
        "input float32": windows(r.image.astype(np.float32)),
        "input float64": windows(r.image.astype(np.float64)),
        "answer fixed-point": windows(r.y_enc),
        "answer float32": windows(r.logits.astype(np.float32)),
        "answer float64": windows(r.y_enc / SCALE),
    }
    everything = all_traffic(r)
    for name, ns in needles.items():
        assert len(ns) >= (3 if name.startswith("answer") else 100), (name, len(ns))
        hits = found(everything, ns)
        assert not hits, "{}: {} of {} windows found on the wire".format(name, len(hits), len(ns))


def test_the_clear_weights_never_reach_a_worker_and_no_worker_gets_all_their_shares(run):
    """The owner's weights are shared in its own process. For every weight tensor:

    - TFE's fixed-point encoding (as recorded in the owner, and as recomputed here as
      round(w * 2^16)), the float32 Keras weights and their float64 form never appear in any
      worker's traffic;
    - replicated sharing is as ABY3 prescribes, seen on the wire: worker 0 receives seed0
      and seed1 (which expand to share0, share1), worker 1 seed1 and share2, worker 2 share2
      and seed0 (positive controls), and no worker's view contains the third piece: not
      share2 for worker 0, not seed0 for worker 1, not seed1 for worker 2."""
    r = run
    assert len(r.w_secret) == len(r.keras_weights) == 8
    for devices in r.w_devices:  # encoding, share2 and seeds live in the owner's process
        assert all("/job:localhost/" in dev for dev in devices), devices
    for secret, w in zip(r.w_secret, r.keras_weights):
        assert secret.size == w.size
        ours = np.round(w.astype(np.float64) * SCALE).reshape(-1)
        assert np.abs(secret.reshape(-1) - ours).max() <= 1

    clear = []
    for secret, w in zip(r.w_secret, r.keras_weights):
        step = WINDOW if w.size > 1000 else 1
        clear += windows(secret, step)
        clear += windows(np.round(w.astype(np.float64) * SCALE).astype(np.int64), step)
        clear += windows(w.astype(np.float32), step)
        clear += windows(w.astype(np.float64), step)
        clear += windows(w.astype(np.float64) * SCALE, step)
    clear = list(set(clear))
    assert len(clear) > 10000
    hits = found(all_traffic(r), clear)
    assert not hits, "{} windows of clear weights found on the wire".format(len(hits))

    share2 = [n for s in r.w_share2 for n in windows(s, WINDOW if s.size > 1000 else 1)]
    seed0 = [s0.tobytes() for s0, _ in r.w_seeds]
    seed1 = [s1.tobytes() for _, s1 in r.w_seeds]
    assert all(len(s) == 32 for s in seed0 + seed1) and len(set(seed0 + seed1)) == 16
    gets = {0: (seed0, seed1), 1: (seed1, share2), 2: (share2, seed0)}
    never = {0: share2, 1: seed0, 2: seed1}
    for i in range(3):
        sent = through(r, i, "owner", "to_worker")
        for piece in gets[i]:
            assert found(sent, piece) == set(piece), "worker {} missed a weight share".format(i)
        hits = found(view(r, i), never[i])
        assert not hits, "worker {} saw {} windows of a third weight share".format(i, len(hits))


def test_shares_look_uniform_and_the_clear_encoding_does_not(run):
    """What each worker holds is statistically uniform, and the same statistics reject the
    clear encodings (so the test can fail):

    - input shares x_j and each worker's pair sum x_i + x_{i+1} (= input - x_{i+2}), and the
      weights' share2 (all weights): every one of the 64 bit positions is 1 with frequency
      0.5 +- 0.1 (> 5 standard deviations for these sizes), and the byte-value chi-square
      (255 df) is below its p = 1e-6 quantile (~377). The clear input fails both; the clear
      weights pass the bit test (signed values symmetric about 0 set the high bits about half
      the time) but fail the chi-square by orders of magnitude, which is why both are used;
    - output shares (10 values only): the pooled bit frequency is 0.5 +- 0.1, and at most a
      quarter of the top 4 bytes of each value are 0x00/0xff (uniform: ~0.8%; a small
      fixed-point number: all of them)."""
    r = run
    bound = chi_square_bound()
    big = {"x{}".format(j): r.x[j] for j in range(3)}
    big.update({"x{}+x{}".format(i, (i + 1) % 3): wrapping_sum(r.x[i], r.x[(i + 1) % 3])
                for i in range(3)})
    big["weights share2"] = np.concatenate([s.reshape(-1) for s in r.w_share2])
    for name, a in big.items():
        f = bit_frequencies(a)
        chi = chi_square_bytes(a)
        print("{:>15}: bit frequencies {:.3f}..{:.3f}, chi-square {:.0f} (bound {:.0f})".format(
            name, f.min(), f.max(), chi, bound))
        assert np.all(np.abs(f - 0.5) <= 0.1), (name, f)
        assert chi < bound, (name, chi)
    for name, a in {"input": r.x_enc,
                    "weights": np.concatenate([s.reshape(-1) for s in r.w_secret])}.items():
        f = bit_frequencies(a)
        chi = chi_square_bytes(a)
        print("{:>15}: bit frequencies {:.3f}..{:.3f}, chi-square {:.0f} (clear)".format(
            name, f.min(), f.max(), chi))
        assert chi > 10 * bound, name
        if name == "input":  # pixels in [0, 1]: the high bits are never set
            assert np.any(np.abs(f - 0.5) > 0.1)

    def top_bytes_extreme(a):
        top = np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8).reshape(-1, 8)[:, 4:]
        return float(np.isin(top, [0, 255]).mean())

    small = {"y{}".format(j): r.y[j] for j in range(3)}
    small.update({"y{}+y{}".format(i, (i + 1) % 3): wrapping_sum(r.y[i], r.y[(i + 1) % 3])
                  for i in range(3)})
    for name, a in small.items():
        f = bit_frequencies(a).mean()
        assert abs(f - 0.5) <= 0.1, (name, f)
        assert top_bytes_extreme(a) <= 0.25, (name, top_bytes_extreme(a))
    assert top_bytes_extreme(r.y_enc) == 1.0


def test_workers_run_our_kernels_and_listen_on_loopback_only(run):
    """The secure kernels are the ones in use on every worker:

    - each worker process has privatekeras' kernel library (ChaCha20 CSPRNG, ABY3 bit ops)
      and the loopback bind() interposer mapped (/proc/<pid>/maps);
    - the interposer is in effect: each worker listens on 127.0.0.1:Q_i and nothing else;
    - what the owner sent each worker to run names our random ops (PkSecureSeed,
      PkSeededRandomUniform, as the protobuf field ``op``/``name`` = tag 0x12, length, name)
      and no stock TensorFlow random or seed op anywhere, including the bodies of the
      traced step's loops (test_invariants checks the traced graph on the owner's side; this
      checks what actually reached the workers)."""
    import tensorflow as tf
    from privatekeras.kernels.build import default_library_path, loopback_library_path

    r = run
    kernels = os.path.realpath(default_library_path())
    shim = os.path.realpath(loopback_library_path())
    for i, maps in enumerate(r.maps):
        assert kernels in maps, "worker {} has not loaded {}".format(i, kernels)
        assert shim in maps, "worker {} runs without the loopback interposer".format(i)
        assert r.audit.listening[i] == {("0100007F", r.Q[i])}, (i, r.audit.listening[i])

    def op_field(name):
        return b"\x12" + bytes([len(name)]) + name.encode()

    stock = [n for n in dir(tf.raw_ops)
             if re.search("Random|Seed|Stateless|Multinomial|TruncatedNormal|Rng", n)]
    assert "RandomUniformInt" in stock and "StatelessRandomUniformV2" in stock
    for i in range(3):
        sent = b"".join(r.hay[(k, "to_worker")][1].data for k, c in enumerate(r.connections)
                        if c.worker == i and c.origin == "owner")  # de-framed
        assert sent.count(op_field("PkSecureSeed")) > 0, i
        assert sent.count(op_field("PkSeededRandomUniform")) > 0, i
        everything = b"".join(h.data for k, c in enumerate(r.connections) if c.worker == i
                              for h in r.hay[(k, "to_worker")])
        assert not [n for n in stock if op_field(n) in everything], i
