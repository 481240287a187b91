"""Helpers of the privacy and invariant tests (test_privacy.py, test_invariants.py): recording
TCP proxies, who owns which socket (/proc), a socket audit, HTTP/2, TLS and the mesh's framing
(kernel frames and JSON notes), and the windowed byte search. Imported by the tests (this
directory is put on sys.path), not run.
"""

import collections
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from netns import Lines  # noqa: F401  (re-exported for the tests)

WINDOW = 8  # elements per needle window


# ----------------------------------------------------------------------------------------
# Ports and processes
# ----------------------------------------------------------------------------------------
def _free(port):
    from privatekeras.cluster import _port_in_use

    return not _port_in_use(port)


# Not the `random` module: the models fixture seeds it, so every pytest session on this machine
# would pick the same ports.
_PORTS = random.SystemRandom()


def free_ports(n, avoid=()):
    """``n`` distinct free loopback ports below the ephemeral range (32768+), so that no
    outgoing connection takes one before the process meant to bind it does."""
    ports = []
    while len(ports) < n:
        port = _PORTS.randrange(20000, 32700)
        if port not in ports and port not in avoid and _free(port):
            ports.append(port)
    return ports


def make_credentials(runtime, hosts, copies=()):
    """Throw-away credentials of a local cluster (``deploy.pki.make_local``) for ``hosts``, in
    the runtime directory ``runtime`` (the children get PRIVATEKERAS_RUNTIME_DIR=runtime);
    and the same files under each hosts list of ``copies``: a worker finds its credentials by
    the hosts list it is given, so one told other addresses for itself needs its own copy."""
    from privatekeras.deploy.pki import local_dir, make_local

    saved = os.environ.get("PRIVATEKERAS_RUNTIME_DIR")
    os.environ["PRIVATEKERAS_RUNTIME_DIR"] = runtime
    try:
        make_local(hosts)
        for other in copies:
            shutil.copytree(local_dir(hosts), local_dir(other))
    finally:
        if saved is None:
            del os.environ["PRIVATEKERAS_RUNTIME_DIR"]
        else:
            os.environ["PRIVATEKERAS_RUNTIME_DIR"] = saved


def popen(cmd, env):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def worker_cmd(hosts, index, compute, compute_port=None, mesh=None, mesh_port=None):
    """``python -m privatekeras worker ...`` exactly as an operator starts a worker by hand;
    it dies with this process (--parent-pid). ``mesh`` (the three mesh addresses) and
    ``mesh_port`` (what this worker binds, if not its --mesh port) are left to the worker's
    defaults when None, like ``compute_port``."""
    cmd = [sys.executable, "-m", "privatekeras", "worker", "--hosts", ",".join(hosts),
           "--index", str(index), "--compute", ",".join(compute),
           "--parent-pid", str(os.getpid())]
    if compute_port is not None:
        cmd += ["--compute-port", str(compute_port)]
    if mesh is not None:
        cmd += ["--mesh", ",".join(mesh)]
    if mesh_port is not None:
        cmd += ["--mesh-port", str(mesh_port)]
    return cmd


def stop(procs, timeout=10):
    """End the processes we started (each by its own Popen handle)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_for(what, condition, procs, timeout, report):
    """Poll ``condition`` until true; fail (with ``report()``) on timeout or when one of
    ``procs`` exits."""
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise AssertionError("{}: {}\n{}".format(
                what, "exited: {}".format(dead) if dead else "timed out", report()))
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------
# /proc: sockets and their owners
# ----------------------------------------------------------------------------------------
def tcp_table():
    """Rows ``(local_addr, local_port, remote_addr, remote_port, state, inode)`` of
    /proc/net/tcp and tcp6 (addresses in the kernel's hex form)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            laddr, lport = parts[1].rsplit(":", 1)
            raddr, rport = parts[2].rsplit(":", 1)
            rows.append((laddr, int(lport, 16), raddr, int(rport, 16), parts[3], int(parts[9])))
    return rows


def socket_inodes(pid):
    inodes = set()
    try:
        fds = os.listdir("/proc/{}/fd".format(pid))
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink("/proc/{}/fd/{}".format(pid, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def maps(pid):
    with open("/proc/{}/maps".format(pid)) as f:
        return f.read()


class Names:
    """The processes of a run by name, to attribute sockets; "test" is this process (where
    the proxies run)."""

    def __init__(self):
        self.pids = {"test": os.getpid()}

    def owner_of_inode(self, inode, cache=None):
        for name, pid in list(self.pids.items()):
            inodes = cache[name] if cache is not None else socket_inodes(pid)
            if inode in inodes:
                return name
        return None

    def opener(self, local_port, remote_port):
        """Name of the process whose socket has local port ``local_port`` connected to
        ``remote_port`` (the process that opened a connection we accepted)."""
        for _ in range(100):
            inode = next((r[5] for r in tcp_table()
                          if r[1] == local_port and r[3] == remote_port and r[5]), None)
            if inode is not None:
                name = self.owner_of_inode(inode)
                if name is not None:
                    return name
            time.sleep(0.01)
        return "unknown:{}".format(local_port)


class SocketAudit(threading.Thread):
    """Samples, every ``period`` s, the TCP sockets of the named processes:

    - ``listening[name]``: every (family, address, port) it listened on
      (privatekeras.deploy.listening.listening_sockets);
    - ``links[name]``: every established connection as (local port, remote port, name of
      the process at the other end: one of ours, "test" for this process, or "?")."""

    def __init__(self, names, period=0.2):
        super().__init__(daemon=True)
        self.names, self.period = names, period
        self.listening = collections.defaultdict(set)
        self.links = collections.defaultdict(set)
        self.samples = collections.Counter()
        self.done = threading.Event()
        self.start()

    def run(self):
        while not self.done.wait(self.period):
            self.sample()

    def sample(self):
        from privatekeras.deploy.listening import listening_sockets

        pending = []  # (name, local port, remote port) of established connections
        for attempt in range(3):
            rows = tcp_table()
            inodes = {name: socket_inodes(pid) for name, pid in list(self.names.pids.items())}
            # Everything here is on loopback: a connection's two ends are the rows with
            # swapped ports (one may be in tcp6, as an IPv4-mapped address, the other in tcp).
            by_ends = {(r[1], r[3]): r[5] for r in rows if r[5]}
            if attempt == 0:
                for name, pid in list(self.names.pids.items()):
                    if name == "test":
                        continue
                    try:
                        self.listening[name].update(listening_sockets(pid))
                    except OSError:  # ended
                        continue
                    self.samples[name] += 1
                    pending += [(name, r[1], r[3]) for r in rows
                                if r[4] == "01" and r[5] in inodes[name]]
            still = []
            for name, lport, rport in pending:
                peer = by_ends.get((rport, lport))
                who = self.names.owner_of_inode(peer, inodes) if peer else None
                if who is not None:
                    self.links[name].add((lport, rport, who))
                elif by_ends.get((lport, rport)) in inodes[name]:  # still there: look again
                    still.append((name, lport, rport))
            pending = still
            if not pending:
                return
            time.sleep(0.01)
        for name, lport, rport in pending:
            self.links[name].add((lport, rport, "?"))

    def stop(self):
        self.done.set()
        self.join(5)
        self.sample()


# ----------------------------------------------------------------------------------------
# The recording proxy
# ----------------------------------------------------------------------------------------
class Connection:
    """One proxied TCP connection: the link and worker it reaches, the process that opened
    it, and every byte each way with its arrival time."""

    def __init__(self, link, worker):
        self.link, self.worker = link, worker  # "api", "compute" or "mesh"; worker index
        self.origin = None
        self.chunks = {"to_worker": [], "from_worker": []}  # (time, bytes)
        self.lock = threading.Lock()

    def data(self, direction, t0=None, t1=None):
        with self.lock:
            return b"".join(c for t, c in self.chunks[direction]
                            if (t0 is None or t >= t0) and (t1 is None or t <= t1))

    def arrival(self, direction, offsets):
        """When the byte before each offset of the ``direction`` stream arrived."""
        with self.lock:
            chunks = list(self.chunks[direction])
        ends = np.cumsum([len(c) for _, c in chunks])
        times = [t for t, _ in chunks]
        return [times[min(int(np.searchsorted(ends, o)), len(times) - 1)] for o in offsets]

    def nbytes(self, direction, t0=None, t1=None):
        with self.lock:
            return sum(len(c) for t, c in self.chunks[direction]
                       if (t0 is None or t >= t0) and (t1 is None or t <= t1))


class RecordingProxy:
    """Listens on 127.0.0.1:listen_port, forwards each connection to 127.0.0.1:target_port
    and records both directions (one pump thread per direction, so neither can block the
    other)."""

    def __init__(self, link, worker, listen_port, target_port, names):
        self.link, self.worker, self.target_port, self.names = link, worker, target_port, names
        self.connections, self.errors = [], []
        self._sockets = []
        self._closed = False
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", listen_port))
        self.server.listen(64)
        self.port = listen_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                down, addr = self.server.accept()
            except OSError:
                return
            conn = Connection(self.link, self.worker)
            conn.origin = self.names.opener(addr[1], self.port)
            try:
                up = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError as exc:
                self.errors.append((time.monotonic(), "{} proxy of worker {}: {}".format(
                    self.link, self.worker, exc)))
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
# Framing: HTTP/2 (TensorFlow's worker-to-worker gRPC, plaintext), TLS (the API, and the
# mesh's handshake) and the mesh's frames and notes
# ----------------------------------------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def http2_data_frames(raw):
    """The DATA frames of an HTTP/2 byte stream as (end offset, stream id, payload), and
    whether the frames tile the whole stream."""
    pos = len(PREFACE) if raw.startswith(PREFACE) else 0
    frames = []
    while pos + 9 <= len(raw):
        length = int.from_bytes(raw[pos:pos + 3], "big")
        ftype, flags = raw[pos + 3], raw[pos + 4]
        sid = int.from_bytes(raw[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        body = raw[pos + 9:pos + 9 + length]
        if len(body) < length:
            break
        pos += 9 + length
        if ftype == 0:  # DATA
            if flags & 0x8:  # PADDED
                body = body[1:len(body) - body[0]]
            frames.append((pos, sid, body))
    return frames, pos == len(raw)


def join_streams(frames):
    """DATA payloads reassembled per stream id (in order of first appearance), so a message
    cut into several frames is contiguous again."""
    streams = collections.OrderedDict()
    for _, sid, body in frames:
        streams.setdefault(sid, []).append(body)
    return b"".join(b"".join(parts) for parts in streams.values())


def http2_data(raw):
    """The DATA payloads of an HTTP/2 byte stream, reassembled per stream id. Returns
    (payload, complete): complete when the frames tile the whole stream."""
    frames, complete = http2_data_frames(raw)
    return join_streams(frames), complete


TLS_TYPES = (20, 21, 22, 23)


def tls_records(raw, only_tls=False):
    """The TLS records of one direction of a connection: list of (content type, version,
    length); and whether they tile the whole stream. Content types: 20 change cipher spec,
    21 alert, 22 handshake, 23 application data. With ``only_tls``, the run of records stops
    before the first header that is not a TLS record's (another content type, or a version
    other than 3.x): where something else follows TLS on the same connection (the mesh)."""
    records, pos = [], 0
    while pos + 5 <= len(raw):
        ctype, version = raw[pos], int.from_bytes(raw[pos + 1:pos + 3], "big")
        length = int.from_bytes(raw[pos + 3:pos + 5], "big")
        if only_tls and (ctype not in TLS_TYPES or version >> 8 != 3):
            break
        if pos + 5 + length > len(raw):
            break
        records.append((ctype, version, length))
        pos += 5 + length
    return records, pos == len(raw)


# The mesh (privatekeras.deploy.mesh): two connections per pair of workers, each opened with a
# mutual TLS 1.3 handshake (the hello line "PKMESH1 i j" or "PKNOTE1 i j" and its "OK" inside,
# then close_notify both ways); after it, the raw stream carries either
#
# - the kernels' frames (the "PKMESH1" link), one per protocol message, all little-endian:
#   magic "PKM1", dtype (TensorFlow's DataType enum: a fixed-width integer or bool) uint32,
#   step int64, edge int64, rank uint32, dims int64[rank], payload bytes uint64, then the
#   tensor's raw bytes; or
# - the workers' notes (the "PKNOTE1" link): one JSON object per line, newline-terminated.
MESH_MAGIC = b"PKM1"
MESH_DTYPES = {9: ("int64", 8), 3: ("int32", 4), 5: ("int16", 2), 6: ("int8", 1),
               23: ("uint64", 8), 22: ("uint32", 4), 17: ("uint16", 2), 4: ("uint8", 1),
               10: ("bool", 1)}
MESH_MAX_RANK = 8
NOTE_MAX = 65536  # bytes in one note's line, newline included (deploy.mesh.MAX_NOTE)
MeshFrame = collections.namedtuple("MeshFrame", "start end dtype step edge shape payload")
Note = collections.namedtuple("Note", "start end line fields")
MeshStream = collections.namedtuple("MeshStream", "records kind frames notes complete")


def mesh_frames(raw, pos=0):
    """The mesh frames of ``raw`` from offset ``pos`` on, as MeshFrame (start and end offsets
    in ``raw``, dtype name, step, edge, shape, payload), and whether they tile the rest of
    the stream. Parsing stops at the first header that is not a valid frame's: wrong magic,
    a dtype the mesh does not carry, rank above MESH_MAX_RANK, a negative dimension, a
    payload size other than the shape's elements times the dtype's size, or a frame cut
    short."""
    frames = []
    while pos + 28 <= len(raw):
        if raw[pos:pos + 4] != MESH_MAGIC:
            break
        dtype = int.from_bytes(raw[pos + 4:pos + 8], "little")
        step = int.from_bytes(raw[pos + 8:pos + 16], "little", signed=True)
        edge = int.from_bytes(raw[pos + 16:pos + 24], "little", signed=True)
        rank = int.from_bytes(raw[pos + 24:pos + 28], "little")
        if dtype not in MESH_DTYPES or rank > MESH_MAX_RANK:
            break
        head = pos + 28 + 8 * rank + 8
        if head > len(raw):
            break
        shape = [int.from_bytes(raw[pos + 28 + 8 * k:pos + 36 + 8 * k], "little", signed=True)
                 for k in range(rank)]
        nbytes = int.from_bytes(raw[head - 8:head], "little")
        name, size = MESH_DTYPES[dtype]
        if any(d < 0 for d in shape) or nbytes != size * int(np.prod(shape, dtype=np.int64)):
            break
        if head + nbytes > len(raw):
            break
        frames.append(MeshFrame(pos, head + nbytes, name, step, edge, tuple(shape),
                                raw[head:head + nbytes]))
        pos = head + nbytes
    return frames, pos == len(raw)


def _strict_object(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("a key repeated: {}".format(keys))
    return dict(pairs)


def _no_constant(name):
    raise ValueError("not JSON: {}".format(name))


def note_lines(raw, pos=0):
    """The notes of ``raw`` from offset ``pos`` on, as Note (start and end offsets in ``raw``,
    the line with its newline, the decoded object), and whether they tile the rest of the
    stream. Parsing stops at the first line that is cut short (no newline), longer than
    NOTE_MAX, not UTF-8, not strict JSON (NaN, Infinity or a repeated key are refused), or
    not a JSON object."""
    import json

    notes = []
    while pos < len(raw):
        end = raw.find(b"\n", pos)
        if end < 0 or end + 1 - pos > NOTE_MAX:
            break
        line = raw[pos:end + 1]
        try:
            fields = json.loads(line.decode("utf-8"), object_pairs_hook=_strict_object,
                                parse_constant=_no_constant)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError too
            break
        if not isinstance(fields, dict):
            break
        notes.append(Note(pos, end + 1, line, fields))
        pos = end + 1
    return notes, pos == len(raw)


def mesh_stream(raw):
    """One direction of a mesh connection: the run of TLS records it opens with (the
    handshake, hello and answer, close_notify), then either mesh frames or notes. Returns a
    MeshStream: ``records``; ``kind``, what follows the TLS records: "frames" (it starts with
    the frames' magic), "notes" (it starts with "{"), "" (nothing: the stream ends with its
    TLS), None (anything else); ``frames`` and ``notes``, the parsed ones; ``complete``, when
    the TLS records and the frames or notes tile the whole stream."""
    records, _ = tls_records(raw, only_tls=True)
    pos = sum(5 + length for _, _, length in records)
    frames, notes = [], []
    if pos == len(raw):
        kind, complete = "", True
    elif raw.startswith(MESH_MAGIC, pos):
        kind = "frames"
        frames, complete = mesh_frames(raw, pos)
    elif raw.startswith(b"{", pos):
        kind = "notes"
        notes, complete = note_lines(raw, pos)
    else:
        kind, complete = None, False
    return MeshStream(records, kind, frames, notes, complete)


def mesh_data(raw):
    """The payloads of the mesh frames of one direction of a mesh connection, concatenated
    (each frame is one whole tensor). Returns (payload, complete)."""
    stream = mesh_stream(raw)
    return b"".join(f.payload for f in stream.frames), stream.complete


def note_values(notes):
    """The values the notes carry, as bytes for the byte search, in order: each integer as
    8 bytes little-endian (two's complement, mod 2^64), each string hex-decoded when it is
    hex of even length, else base64-decoded when it is valid base64, else as its UTF-8 bytes;
    lists and objects walked in order (object keys as strings). So an int64 tensor a note
    carried as a list of numbers, or as a hex or base64 string, is contiguous again."""
    import base64
    import binascii

    out = []

    def walk(v):
        if isinstance(v, bool) or v is None:
            return
        if isinstance(v, int):
            out.append((v % (1 << 64)).to_bytes(8, "little"))
        elif isinstance(v, float):
            out.append(np.float64(v).tobytes())
        elif isinstance(v, str):
            data = v.encode("utf-8")
            try:
                if len(v) % 2 == 0 and all(c in "0123456789abcdefABCDEF" for c in v):
                    data = bytes.fromhex(v)
                else:
                    data = base64.b64decode(v, validate=True) if v else b""
            except (ValueError, binascii.Error):
                pass
            out.append(data)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(k)
                walk(x)

    for note in notes:
        walk(note.fields)
    return b"".join(out)


# ----------------------------------------------------------------------------------------
# The windowed search
# ----------------------------------------------------------------------------------------
def windows(arr, step=1):
    """Byte strings of the WINDOW-element windows of ``arr`` (flattened, one every ``step``
    elements), keeping the informative ones only: all elements non-zero and at least 4
    distinct, so that a window cannot match padding or small constants by chance."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    out = []
    for k in range(0, flat.size - WINDOW + 1, step):
        w = flat[k:k + WINDOW]
        if np.any(w == 0) or len(np.unique(w)) < 4:
            continue
        out.append(w.tobytes())
    return out


class Haystack:
    """A byte string with its 8-byte words at each of the 8 byte alignments (and, made on
    first use and kept, their low 20 bits, the key of the bitmap in :func:`found`)."""

    def __init__(self, data):
        self.data = bytes(data)
        self.words = [np.frombuffer(self.data, dtype="<u8", count=(len(self.data) - a) // 8,
                                    offset=a) if len(self.data) - a >= 8 else np.zeros(0, "<u8")
                      for a in range(8)]
        self._low = None

    def low(self):
        if self._low is None:
            self._low = [(w.astype(np.uint32) & np.uint32(LOW_MASK)).astype(np.intp)
                         for w in self.words]
        return self._low


LOW_MASK = (1 << 20) - 1


def found(haystacks, needles):
    """The needles (byte strings of >= 8 bytes) that occur in any of the haystacks. A word of
    a haystack is a candidate when its low 20 bits are those of some needle's first 8 bytes
    (a bitmap lookup), then when it equals one of them (sorted-array lookup); then the whole
    needle is compared."""
    if not needles:
        return set()
    by_key = collections.defaultdict(list)
    for n, k in zip(needles, np.frombuffer(b"".join(n[:8] for n in needles), "<u8").tolist()):
        by_key[k].append(n)
    keys = np.array(sorted(by_key), dtype="<u8")
    bitmap = np.zeros(LOW_MASK + 1, dtype=bool)
    bitmap[(keys & np.uint64(LOW_MASK)).astype(np.intp)] = True
    hits = set()
    for h in haystacks:
        for a, (words, low) in enumerate(zip(h.words, h.low())):
            if not words.size:
                continue
            candidates = np.flatnonzero(bitmap[low])
            if not candidates.size:
                continue
            cw = words[candidates]
            slot = np.minimum(np.searchsorted(keys, cw), keys.size - 1)
            for i in candidates[keys[slot] == cw].tolist():
                pos = a + 8 * i
                for n in by_key[int(words[i])]:
                    if n not in hits and h.data[pos:pos + len(n)] == n:
                        hits.add(n)
    return hits


def random_looking_chunks(data, size=64, stride=64, min_distinct=40):
    """The ``size``-byte chunks of ``data`` (one every ``stride`` bytes) that look uniformly
    random: at least ``min_distinct`` distinct byte values (64 uniform bytes have ~57 on
    average and fewer than 45 with probability < 1e-6; text, protobuf framing and small
    integers have far fewer). Masked shares and PRF output are such chunks: one found again
    in another step's traffic means reused randomness. With the default stride, any repeated
    random-looking region of 2 * size - 1 bytes or more contains one of these chunks."""
    buf = np.frombuffer(data, dtype=np.uint8)
    n = (len(buf) - size) // stride + 1
    if n <= 0:
        return []
    rows = np.lib.stride_tricks.as_strided(buf, shape=(n, size), strides=(stride, 1))
    distinct = 1 + np.count_nonzero(np.diff(np.sort(rows, axis=1), axis=1), axis=1)
    return [rows[k].tobytes() for k in np.flatnonzero(distinct >= min_distinct).tolist()]
