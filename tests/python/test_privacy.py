"""Privacy invariants of private queries, observed on the wire and at the message level.

One module-scoped run with real processes: three workers started by hand, as an operator
would (``python -m privatekeras worker --hosts ... --index i --compute ... --compute-port ...``
with credentials from ``deploy.pki.make_local``), a model owner sharing the trained tutorial
CNN and serving three queries, and a client sending one image three times: query 0 with fresh
shares, queries 1 and 2 with one and the same share set (byte-identical submissions).

Three kinds of links, all recorded by TCP proxies in this process:

- **API** (owner/client/worker 0 -> worker i's API; gRPC over mutual TLS): worker i binds its API
  on a private port R_i, and everyone else is told its address is A_i, where a proxy forwards
  to R_i (worker i is started with a hosts list naming R_i for itself and A_j for the others;
  its credentials directory, keyed by that list, is a copy of the cluster's). The recordings
  can only show that this link is TLS. What each worker receives from the owner and the client
  is checked at the message level instead: the owner and client scripts (privacy_owner.py,
  privacy_client.py) wrap, in their own processes, the stubs they call the workers with and
  keep every request and reply (privacy_record.py), together with the shares they made.
- **compute** (worker <-> worker, TensorFlow's plaintext gRPC, HTTP/2 + protobuf): the
  workers' TensorFlow servers, which still listen but which no worker joins (each runs its
  own part of the step in its own process), so no connection is ever made to them; the
  proxies are there to show it, and every check below would search what they carried.
  Worker i's TensorFlow server binds Q_i (``--compute-port``) while ``--compute`` names the
  proxies P_j for everyone.
- **mesh** (worker <-> worker, two TCP connections per pair, both opened by the
  lower-indexed worker, see privatekeras.deploy.mesh): each opens with a mutual TLS 1.3
  handshake (the hello line "PKMESH1 i j" or "PKNOTE1 i j" and the answer "OK" inside it,
  then close_notify both ways), after which the raw stream carries either the step's protocol
  messages as the kernels' frames (one connection per pair) or the workers' notes, one JSON
  object per line (the other): workers 1 and 2 tell worker 0 each query's arrival
  (``{"arrived": query id}``), and worker 0 starts each step by telling workers 1 and 2
  ``{"go": step id, "session": ..., "model": ..., "ids": [query ids]}``; each worker then
  feeds its own input shares of those queries to its own part of the step and gets its own
  answer shares back. Worker i's mesh binds N_i (``--mesh-port``) while ``--mesh`` names the
  proxies M_j for everyone.

So every byte between workers crosses a proxy; a socket audit samples the workers' sockets
throughout to show nothing bypasses the proxies.

Each proxied connection is attributed to the process that opened it (its socket inode in
/proc), so worker i's view of the links between workers is every byte through its compute and
mesh proxies plus every byte on compute and mesh connections it opened.

Byte search: every recorded compute stream is also de-framed (HTTP/2 DATA payloads reassembled
per stream), every mesh frames stream too (its frames' payloads, each one whole tensor,
concatenated), so a tensor split across frames, or cut by frame headers, is contiguous again,
and every notes stream is decoded (the values its notes carry: integers as int64, hex and
base64 strings decoded), so a tensor sent as a list of numbers or as a string is too.
Needles are 8-element windows (64 bytes for int64/float64) that are "informative": all 8
elements non-zero and at least 4 distinct, so a window cannot match padding or small constants
by chance.
"""

import collections
import os
import pickle
import re
import sys
import time

import numpy as np
import pytest

from conftest import LOGIT_ATOL, SCRIPTS, child_env

sys.path.insert(0, str(SCRIPTS))
from privacy_net import (MESH_MAGIC, NOTE_MAX, PREFACE, Haystack,  # noqa: E402
                         Lines, Names, RecordingProxy, SocketAudit, found, free_ports,
                         http2_data, http2_data_frames, join_streams,
                         make_credentials, maps, mesh_data, mesh_frames, mesh_stream,
                         note_lines, note_values, popen, random_looking_chunks, stop,
                         tls_records, wait_for, windows, worker_cmd)

SCALE = 2.0 ** 16  # the fixed point: round(x * 2^16) as int64 (mod 2^64)
# The tutorial CNN ends in a Dense, whose product the workers leave untruncated: the answer
# has twice the fractional bits (the public spec's output_frac_bits).
ANSWER_SCALE = SCALE ** 2
QUERIES = 3
SAME_FROM = 1  # queries 1 and 2 carry byte-identical shares
WORKERS = ("w0", "w1", "w2")
WORKER_LINKS = ("compute", "mesh")  # the links between workers


# ----------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------
class Run:
    """Everything recorded in the run, for the tests to assert on."""


def _decode(messages, party):
    from privatekeras import wire

    out = []
    for m in messages:
        _kind, request, reply, _roles = wire.METHODS[m["method"]]
        cls = getattr(wire.M, request if m["kind"] == "request" else reply)
        out.append(dict(m, party=party, message=cls.FromString(m["data"])))
    return out


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    from privatekeras.kernels.build import default_library_path, loopback_library_path

    t_start = time.monotonic()
    r = Run()
    # The libraries the workers load as they start (the kernels' path names their source).
    r.kernels = os.path.realpath(default_library_path())
    r.shim = os.path.realpath(loopback_library_path())
    d = tmp_path_factory.mktemp("privacy")
    A = free_ports(3)  # the APIs as everyone reaches them: proxies
    R = free_ports(3, avoid=A)  # what the workers' API servers bind
    P = free_ports(3, avoid=A + R)  # the compute ports as the workers reach them: proxies
    Q = free_ports(3, avoid=A + R + P)  # what the workers' TensorFlow servers bind
    M = free_ports(3, avoid=A + R + P + Q)  # the mesh ports as the workers reach them: proxies
    N = free_ports(3, avoid=A + R + P + Q + M)  # what the workers' meshes bind
    api = ["localhost:{}".format(p) for p in A]
    compute = ["127.0.0.1:{}".format(p) for p in P]
    mesh = ["127.0.0.1:{}".format(p) for p in M]
    own_hosts = [[api[j] if j != i else "localhost:{}".format(R[i]) for j in range(3)]
                 for i in range(3)]
    env = child_env()
    env["PRIVATEKERAS_RUNTIME_DIR"] = str(d / "runtime")
    make_credentials(env["PRIVATEKERAS_RUNTIME_DIR"], api, copies=own_hosts)
    np.save(d / "image.npy", np.load(models / "images.npy")[:1])

    names = Names()
    proxies, workers, others, out, audit = [], [], [], {}, None
    try:
        proxies = ([RecordingProxy("api", i, A[i], R[i], names) for i in range(3)]
                   + [RecordingProxy("compute", i, P[i], Q[i], names) for i in range(3)]
                   + [RecordingProxy("mesh", i, M[i], N[i], names) for i in range(3)])
        audit = SocketAudit(names)
        for i in range(3):
            workers.append(popen(worker_cmd(own_hosts[i], i, compute, Q[i], mesh, N[i]), env))
            names.pids[WORKERS[i]] = workers[-1].pid
            out[WORKERS[i]] = Lines(workers[-1])

        def report(what=""):
            return "{}\n{}".format(what, "\n".join(
                "--- {} (rc {}):\n{}".format(name, p.poll(), out[name].text())
                for name, p in zip(list(WORKERS) + ["owner", "client"], workers + others)))

        wait_for("workers ready", lambda: all(out[w].first("READY") for w in WORKERS),
                 workers, 180, report)
        r.t_ready = time.monotonic()
        py = sys.executable
        h = ["--hosts", ",".join(api)]
        owner = popen([py, str(SCRIPTS / "privacy_owner.py")] + h + [
            "--model", str(models / "tutorial.keras"), "--num-requests", str(QUERIES),
            "--out", str(d / "owner.pkl")], env)
        others.append(owner)
        names.pids["owner"] = owner.pid
        out["owner"] = Lines(owner)
        # The client starts once the model is shared (it would only poll the board while
        # worker 0 traces the step); it waits by itself for serving to begin.
        wait_for("model shared", lambda: out["owner"].first("RECORD SHARED"), workers + others,
                 300, report)
        client = popen([py, str(SCRIPTS / "privacy_client.py")] + h + [
            "--image", str(d / "image.npy"), "--queries", str(QUERIES),
            "--same-shares-from", str(SAME_FROM), "--out", str(d / "client.pkl")], env)
        others.append(client)
        names.pids["client"] = client.pid
        out["client"] = Lines(client)
        wait_for("owner and client done", lambda: owner.poll() is not None and
                 client.poll() is not None, workers, 300, report)
        assert owner.returncode == 0 and client.returncode == 0, report("owner/client failed")
        audit.sample()
        r.maps = {w: maps(p.pid) for w, p in zip(WORKERS, workers)}
    finally:
        if audit is not None:
            audit.stop()
        stop(others)
        stop(workers)
        for p in proxies:
            p.close()
        for lines in out.values():
            lines.join(5)
        for p in workers + others:
            p.stdout.close()
    r.elapsed_run = time.monotonic() - t_start
    r.owner_output = out["owner"].text()
    r.t_start, r.audit, r.names = t_start, audit, names
    r.A, r.R, r.P, r.Q, r.M, r.N, r.api = A, R, P, Q, M, N, api
    r.proxy_errors = [e for p in proxies for e in p.errors]
    r.conns = [c for p in proxies for c in p.connections]

    with open(d / "owner.pkl", "rb") as f:
        o = pickle.load(f)
    with open(d / "client.pkl", "rb") as f:
        c = pickle.load(f)
    r.weights, r.t_shared = o["weights"], o["t_shared"]
    r.sharings, r.queries = c["sharings"], c["queries"]
    r.messages = _decode(o["messages"], "owner") + _decode(c["messages"], "client")
    r.image = np.load(d / "image.npy")
    r.plain_logits = np.load(models / "tutorial_logits.npy")[:1]
    import keras

    r.keras_weights = keras.models.load_model(models / "tutorial.keras",
                                              compile=False).get_weights()
    # What the owner shares: the converted weights (each average pool's 1/4 moved into the
    # layer after it; see privatekeras.convert).
    from privatekeras import convert

    r.model_weights = convert(str(models / "tutorial.keras")).weights

    # Haystacks: compute and mesh streams raw and de-framed (a mesh stream's frames' payloads
    # and its notes' values), API streams raw. Each mesh stream parsed once:
    # r.mesh[(k, direction)] = privacy_net.MeshStream (TLS records, kind, frames, notes,
    # complete).
    t = time.monotonic()
    r.hay, r.complete, r.mesh = {}, {}, {}
    for k, conn in enumerate(r.conns):
        for direction in ("to_worker", "from_worker"):
            raw = conn.data(direction)
            if conn.link == "compute":
                data, r.complete[(k, direction)] = http2_data(raw)
                r.hay[(k, direction)] = [Haystack(raw), Haystack(data)]
            elif conn.link == "mesh":
                stream = r.mesh[(k, direction)] = mesh_stream(raw)
                r.complete[(k, direction)] = stream.complete
                r.hay[(k, direction)] = [Haystack(raw),
                                         Haystack(b"".join(f.payload for f in stream.frames)),
                                         Haystack(note_values(stream.notes))]
            else:
                r.hay[(k, direction)] = [Haystack(raw)]
    r.index_time = time.monotonic() - t
    return r


# -- views ---------------------------------------------------------------------------------
def worker_link_view(r, i):
    """Haystacks of every byte worker i sent or received on the links between workers
    (compute, and mesh: its frames and its notes)."""
    return [h for k, c in enumerate(r.conns) if c.link in WORKER_LINKS
            and (c.worker == i or c.origin == WORKERS[i])
            for d in ("to_worker", "from_worker") for h in r.hay[(k, d)]]


def directed(c, d, j, i):
    """Whether direction ``d`` of connection ``c`` carries what worker j sent worker i."""
    return ((d, c.worker, c.origin) in (("to_worker", i, WORKERS[j]),
                                        ("from_worker", j, WORKERS[i])))


def sent_between(r, j, i, kinds=WORKER_LINKS):
    """Haystacks of the bytes worker j sent worker i on the links between workers (``kinds``:
    compute and mesh, frames and notes)."""
    return [h for k, c in enumerate(r.conns) if c.link in kinds
            for d in ("to_worker", "from_worker") if directed(c, d, j, i)
            for h in r.hay[(k, d)]]


def between_workers(r):
    """Haystacks of every byte on the links between workers (compute, mesh frames and
    notes)."""
    return [h for k, c in enumerate(r.conns) if c.link in WORKER_LINKS
            for d in ("to_worker", "from_worker") for h in r.hay[(k, d)]]


def all_traffic(r):
    return [h for hs in r.hay.values() for h in hs]


def mesh_frames_between(r, t0, t1, links=None):
    """(connection, direction, frame) of the mesh frames whose last byte arrived between t0
    and t1; ``links`` picks (connection, direction) pairs."""
    out = []
    for k, c in enumerate(r.conns):
        for d in ("to_worker", "from_worker"):
            if c.link != "mesh" or (links is not None and not links(c, d)):
                continue
            frames = r.mesh[(k, d)].frames
            times = c.arrival(d, [f.end for f in frames])
            out += [(c, d, f) for f, t in zip(frames, times) if t0 <= t <= t1]
    return out


def mesh_kind(r, k):
    """What mesh connection ``k`` carries after its TLS handshake: "frames" (the kernels'
    frames one way or both, nothing else), "notes" (notes one way or both, nothing else),
    "idle" (nothing either way) or None (a mix, or anything else)."""
    kinds = {r.mesh[(k, d)].kind for d in ("to_worker", "from_worker")} - {""}
    if not kinds:
        return "idle"
    return kinds.pop() if len(kinds) == 1 and kinds <= {"frames", "notes"} else None


def notes_sent(r, j, i):
    """The notes worker j sent worker i, in stream order (one notes connection per pair), as
    (time the proxy had the note's last byte, privacy_net.Note)."""
    out = []
    for k, c in enumerate(r.conns):
        for d in ("to_worker", "from_worker"):
            if c.link == "mesh" and directed(c, d, j, i):
                notes = r.mesh[(k, d)].notes
                out += list(zip(c.arrival(d, [n.end for n in notes]), notes))
    return out


def worker_payload(r, t0, t1, links=None, kinds=WORKER_LINKS):
    """The payload bytes that arrived between t0 and t1 on the links between workers, one
    string per connection and direction: on compute, the HTTP/2 DATA frames' payloads
    reassembled per stream; on the mesh, the frames' payloads (whole tensors) concatenated.
    ``links`` picks (connection, direction) pairs, ``kinds`` the kinds of link."""
    out = []
    for c in r.conns:
        for d in ("to_worker", "from_worker"):
            if c.link not in kinds or c.link == "mesh" or (links is not None and
                                                           not links(c, d)):
                continue
            frames, _ = http2_data_frames(c.data(d))
            times = c.arrival(d, [end for end, _, _ in frames])
            out.append(join_streams([f for f, t in zip(frames, times) if t0 <= t <= t1]))
    if "mesh" in kinds:
        per = collections.OrderedDict()
        for c, d, f in mesh_frames_between(r, t0, t1, links):
            per.setdefault((id(c), d), []).append(f.payload)
        out += [b"".join(p) for p in per.values()]
    return out


def api_messages(r, i, method=None, kind=None, party=None):
    return [m for m in r.messages if m["worker"] == i
            and (method is None or m["method"] == method)
            and (kind is None or m["kind"] == kind) and (party is None or m["party"] == party)]


def message_view(r, i):
    """Haystacks of every API message worker i received from or sent to the owner and the
    client (serialized protobuf: what it decrypts from, or encrypts onto, its TLS links)."""
    return [Haystack(m["data"]) for m in api_messages(r, i)]


def submits(r, i):
    """Worker i's Submit requests, in query order (the client sends one per query)."""
    return [m["message"] for m in api_messages(r, i, "Submit", "request")]


def answers(r, i):
    """Worker i's ready Fetch replies, in query order."""
    return [m["message"] for m in api_messages(r, i, "Fetch", "reply") if m["message"].ready]


def arrays(msg_tensors):
    from privatekeras import wire

    return [wire.array(t) for t in msg_tensors]


def output_shares(r, q):
    """(y_0, y_1, y_2) of query q, from the workers' replies: worker i returned
    (y_i, y_{i+1})."""
    return tuple(arrays(answers(r, i)[q].shares)[0] for i in range(3))


def reconstruct(shares):
    with np.errstate(over="ignore"):
        return shares[0] + shares[1] + shares[2]


def phase_bytes(r, t0, t1):
    """Bytes per (link, opener, worker, direction) between two times."""
    out = collections.Counter()
    for c in r.conns:
        for direction in ("to_worker", "from_worker"):
            out[(c.link, c.origin, c.worker, direction)] += c.nbytes(direction, t0, t1)
    return out


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
    """The chi-square quantile at one-sided p = 1e-6 (z = 4.7534), by Wilson-Hilferty: a
    uniform byte source exceeds it once in a million trials. For 255 df it is ~377."""
    c = 2.0 / (9 * df)
    return df * (1 - c + z * np.sqrt(c)) ** 3


def wrapping_sum(a, b):
    with np.errstate(over="ignore"):
        return a + b


def weight_windows(tensors):
    """Windows of a list of weight tensors (every 8th window of the big ones: ~60,000 kernel
    elements)."""
    out = []
    for a in tensors:
        out += windows(a, 8 if a.size > 1000 else 1)
    return out


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


def mesh_frame(dtype, step, edge, shape, payload, nbytes=None, magic=MESH_MAGIC):
    """One mesh frame as privatekeras' mesh kernels write it (little-endian)."""
    head = (magic + dtype.to_bytes(4, "little") + step.to_bytes(8, "little", signed=True)
            + edge.to_bytes(8, "little", signed=True) + len(shape).to_bytes(4, "little")
            + b"".join(d.to_bytes(8, "little", signed=True) for d in shape))
    n = len(payload) if nbytes is None else nbytes
    return head + n.to_bytes(8, "little") + payload


def test_mesh_parser_reads_tls_records_then_whole_frames():
    """The mesh parser itself: a stream of TLS records followed by frames (an int64 tensor
    whose windows the frame headers would cut, a bool scalar, an empty uint8 tensor) parses
    to the end as a frames stream, with each frame's header fields and payload; the payloads
    concatenated hold the tensor's windows. A frame cut short, a payload size that does not
    match the shape, an unknown dtype, a wrong magic, or a note after the frames stops the
    parse (incomplete)."""
    rng = np.random.default_rng(6)
    secret = rng.integers(1, 2 ** 62, size=(4, 10), dtype=np.int64)
    tls = (b"\x16\x03\x01\x00\x04" + b"\x01\x00\x00\x00" + b"\x14\x03\x03\x00\x01\x01"
           + b"\x17\x03\x03\x00\x03abc")
    step = 1_700_000_000_123_456_789
    frames = [mesh_frame(10, step, 8, [], b"\x01"),
              mesh_frame(4, step, 9, [0, 3], b""),
              mesh_frame(9, step, 7, [4, 5], secret[:2].tobytes()),
              mesh_frame(9, step + 1, 7, [2, 10], secret[2:].tobytes())]
    raw = tls + b"".join(frames)
    stream = mesh_stream(raw)
    parsed = stream.frames
    assert stream.complete and stream.kind == "frames" and not stream.notes
    assert [t for t, _, _ in stream.records] == [22, 20, 23]
    assert [(f.dtype, f.step, f.edge, f.shape) for f in parsed] == [
        ("bool", step, 8, ()), ("uint8", step, 9, (0, 3)), ("int64", step, 7, (4, 5)),
        ("int64", step + 1, 7, (2, 10))]
    assert parsed[0].start == len(tls) and parsed[-1].end == len(raw)
    data, complete = mesh_data(raw)
    assert complete and data == b"\x01" + secret.tobytes()
    needles = windows(secret)
    assert found([Haystack(data)], needles) == set(needles)
    assert set(needles) - found([Haystack(raw)], needles)  # headers cut some windows
    alone, complete = mesh_frames(b"".join(frames))  # the same frames, without the TLS
    assert complete and [f[2:] for f in alone] == [f[2:] for f in parsed]
    for bad in (raw[:-1], tls + mesh_frame(9, step, 7, [4, 5], secret[:2].tobytes(), 79),
                tls + mesh_frame(1, step, 7, [4], secret[0, :4].tobytes()),
                tls + mesh_frame(9, step, 7, [4], secret[0, :4].tobytes(), magic=b"PKM2"),
                raw + b'{"arrived":"00"}\n'):
        assert not mesh_stream(bad).complete


def test_mesh_parser_reads_tls_records_then_whole_notes():
    """The same parser on a notes link: TLS records followed by JSON lines parse to the end
    as a notes stream, each note with its line and object; a stream that ends with its TLS
    is complete and idle (kind ""). The notes' decoded values (note_values) hold a tensor a
    note would carry as a list of numbers, a hex string or a base64 string, which the raw
    JSON text does not. A line cut short (no newline) or longer than NOTE_MAX, a line that is
    not a JSON object, NaN, a repeated key, invalid UTF-8, a frame after the notes, or
    anything but a frame or a note after the TLS stops the parse (incomplete)."""
    import base64
    import json

    rng = np.random.default_rng(7)
    secret = rng.integers(1, 2 ** 62, size=3 * 16, dtype=np.int64)
    tls = b"\x16\x03\x01\x00\x04" + b"\x01\x00\x00\x00" + b"\x17\x03\x03\x00\x03abc"
    qid = "3f2efe77f83555908296265e15746798"
    notes = [{"go": 1796194490307464120, "session": "f9e008fcd8a48873",
              "model": "7f5c5f26c05f6b13", "ids": [qid, ""]}, {"arrived": qid}]
    lines = [json.dumps(n, separators=(",", ":")).encode() + b"\n" for n in notes]
    raw = tls + b"".join(lines)
    stream = mesh_stream(raw)
    assert stream.complete and stream.kind == "notes" and not stream.frames
    assert [n.fields for n in stream.notes] == notes
    assert [n.line for n in stream.notes] == lines and stream.notes[-1].end == len(raw)
    assert stream.notes[0].start == len(tls)
    idle = mesh_stream(tls)
    assert idle.complete and idle.kind == "" and not idle.frames and not idle.notes
    values = note_values(stream.notes)
    assert (1796194490307464120).to_bytes(8, "little") in values
    assert bytes.fromhex(qid) in values
    carried = [{"rows": secret[:16].tolist()}, {"hex": secret[16:32].tobytes().hex()},
               {"b64": base64.b64encode(secret[32:].tobytes()).decode()}]
    text = tls + b"".join(json.dumps(n).encode() + b"\n" for n in carried)
    stream = mesh_stream(text)
    assert stream.complete and stream.kind == "notes"
    needles = [n for k in range(3) for n in windows(secret[16 * k:16 * (k + 1)])]
    assert len(needles) == 27
    assert found([Haystack(note_values(stream.notes))], needles) == set(needles)
    assert not found([Haystack(text)], needles)
    long = b'{"a":"' + b"x" * NOTE_MAX + b'"}\n'
    for bad in (raw[:-1], tls + b"[1,2]\n", tls + b'{"go":NaN}\n', tls + b'{"a":1,"a":2}\n',
                tls + b'{"a":"\xff"}\n', tls + b"{oops}\n", tls + long,
                raw + mesh_frame(9, 1, 1, [1], b"\x00" * 8), tls + b"PRI * HTTP/2.0"):
        assert not mesh_stream(bad).complete, bad[len(tls):len(tls) + 20]
    assert mesh_stream(tls + b"PRI * HTTP/2.0").kind is None
    longest = b'{"a":"' + b"x" * (NOTE_MAX - 9) + b'"}\n'  # NOTE_MAX bytes: still a note
    assert len(longest) == NOTE_MAX and note_lines(longest)[1]
    assert len(note_lines(longest + longest)[0]) == 2


def test_the_recorded_queries_are_real(run):
    """The run answered three real queries: the client's logits are the decoding of the
    answer shares the workers returned, they agree with plaintext Keras (argmax and
    LOGIT_ATOL), and the client encoded its input as round(x * 2^16)."""
    r = run
    assert len(r.queries) == QUERIES
    for q in range(QUERIES):
        for i in range(3):
            assert len(answers(r, i)) == QUERIES and len(submits(r, i)) == QUERIES
        logits = r.queries[q]["logits"]
        y = reconstruct(output_shares(r, q))
        np.testing.assert_allclose(logits, (y / ANSWER_SCALE).astype(np.float32), atol=1e-6)
        assert logits.argmax(1).tolist() == r.plain_logits.argmax(1).tolist()
        assert np.abs(logits - r.plain_logits).max() < LOGIT_ATOL
        np.testing.assert_array_equal(r.sharings[q]["encoded"],
                                      np.round(r.image * SCALE).astype(np.int64))


def test_every_byte_between_workers_goes_through_a_recording_proxy(run):
    """Completeness of the recording, so that "not found on the wire" means "never sent":

    - sampled every 0.2 s throughout the run, every established TCP connection of every
      worker has one of this test's proxies at its other end, and is either accepted on the
      worker's own API, compute or mesh port (which only its proxies know) or opened to a
      proxy port: no worker ever talks to another directly (the workers' gRPC, TensorFlow and
      mesh connections are long-lived, so none escapes the sampling);
    - the owner and the client connect to the API proxies only (never a compute or mesh
      port);
    - once all workers were up, every proxied connection reached its worker;
    - every proxied connection is attributed to the process that opened it; only workers
      open compute and mesh connections; the mesh is exactly two connections per pair of
      workers, both opened by the lower-indexed one, and what follows their TLS handshakes
      tells them apart: one carries the kernels' frames, the other the notes (between
      workers 1 and 2 it stays idle: notes only go to and from worker 0); every recorded
      compute stream is a whole sequence of HTTP/2 frames, every recorded mesh stream a run
      of TLS records followed by whole mesh frames or whole JSON lines, to its last byte;
    - the query ids travel on the mesh only: each query's id is in the notes workers 1 and
      2 sent worker 0 (its arrival) and in the notes worker 0 sent each of them (the "go"),
      while that query was evaluated; it is never on a compute link (raw or de-framed), at
      any time of the run;
    - the step runs over the mesh only: while each query was evaluated, each of the three
      pairs of workers exchanged mesh frames; and no worker ever opened a connection to
      another's compute port (the TensorFlow servers still listen, but no worker joins
      another's: each runs its own part of the step).
    Prints the bytes per link and phase."""
    r = run
    # Worker 0 polls the others' APIs until they answer, and each worker dials the meshes of
    # the higher-indexed ones until they listen: while worker i starts, a proxy may find
    # nobody behind it. After that, no proxy ever failed to connect.
    assert all("Connection refused" in e for _, e in r.proxy_errors), r.proxy_errors
    assert not [e for t, e in r.proxy_errors if t > r.t_ready], r.proxy_errors
    known = {"owner", "client"} | set(WORKERS)
    for name, least in (("w0", 20), ("w1", 20), ("w2", 20), ("owner", 10), ("client", 3)):
        assert r.audit.samples[name] >= least, r.audit.samples
    for i, w in enumerate(WORKERS):
        assert r.audit.links[w], w
        bad = [(lport, rport, peer) for lport, rport, peer in r.audit.links[w]
               if peer != "test" or not (lport in (r.R[i], r.Q[i], r.N[i])
                                         or rport in r.A + r.P + r.M)]
        assert not bad, (w, bad)
        assert [link for link in r.audit.links[w] if link[0] == r.N[i] or link[1] in r.M], w
    for party in ("owner", "client"):
        assert r.audit.links[party]
        bad = [link for link in r.audit.links[party] if link[1] not in r.A or link[2] != "test"]
        assert not bad, (party, bad)
    assert {c.origin for c in r.conns} <= known, {c.origin for c in r.conns}
    assert {c.origin for c in r.conns if c.link in WORKER_LINKS} <= set(WORKERS)
    mesh = sorted((c.origin, c.worker) for c in r.conns if c.link == "mesh")
    assert mesh == [("w0", 1), ("w0", 1), ("w0", 2), ("w0", 2), ("w1", 2), ("w1", 2)], mesh
    kinds = collections.defaultdict(list)
    for k, c in enumerate(r.conns):
        if c.link == "mesh":
            kinds[(c.origin, c.worker)].append(mesh_kind(r, k))
    assert {pair: sorted(v, key=str) for pair, v in kinds.items()} == {
        ("w0", 1): ["frames", "notes"], ("w0", 2): ["frames", "notes"],
        ("w1", 2): ["frames", "idle"]}, dict(kinds)
    assert all(r.complete.values()), [(r.conns[k].link, r.conns[k].origin, r.conns[k].worker,
                                       d) for (k, d), v in r.complete.items() if not v]

    compute = [c for c in r.conns if c.link == "compute"]
    assert not compute, [(c.origin, c.worker) for c in compute]
    for q, query in enumerate(r.queries):
        qid = submits(r, 0)[q].query_id.encode()
        for i in (1, 2):
            for j, to in ((i, 0), (0, i)):  # the arrival, then the "go"
                lines = [n.line for t, n in notes_sent(r, j, to)
                         if query["t_start"] <= t <= query["t_end"]]
                assert any(qid in line for line in lines), (q, j, to)

    print("\nbytes between workers while each query was evaluated (compute / mesh):")
    for q, query in enumerate(r.queries):
        b = phase_bytes(r, query["t_start"], query["t_end"])

        def total(link, i=None):
            return sum(n for (lk, origin, w, _d), n in b.items() if lk == link
                       and (i is None or w == i or origin == WORKERS[i]))

        pairs = collections.Counter()
        for c, _d, f in mesh_frames_between(r, query["t_start"], query["t_end"]):
            pairs[(c.origin, c.worker)] += 1
        print("  query {}: all {:,} / {:,}; worker 1 {:,} / {:,}; worker 2 {:,} / {:,}; "
              "mesh frames per pair {}".format(
                  q, total("compute"), total("mesh"), total("compute", 1), total("mesh", 1),
                  total("compute", 2), total("mesh", 2), dict(pairs)))
        assert set(pairs) == {("w0", 1), ("w0", 2), ("w1", 2)}, (q, pairs)
        assert total("compute") == 0 and total("mesh") > 0, q

    phases = [("sharing the weights, tracing and warming up the step", r.t_ready, r.t_shared),
              ("query 0 (includes the client's start)", r.t_shared, r.queries[0]["t_end"])]
    phases += [("query {}".format(q), r.queries[q]["t_start"], r.queries[q]["t_end"])
               for q in range(1, QUERIES)]
    print("\nbytes through each worker's proxies (to worker / from worker):")
    for name, t0, t1 in phases:
        b = phase_bytes(r, t0, t1)
        print("  {} ({:.2f} s):".format(name, t1 - t0))
        for link in ("api",) + WORKER_LINKS:
            for origin in ["owner", "client"] + list(WORKERS):
                cells = ["w{} {:>9,} / {:>9,}".format(i, b[(link, origin, i, "to_worker")],
                                                       b[(link, origin, i, "from_worker")])
                         for i in range(3) if origin != WORKERS[i]]
                if any(b[(link, origin, i, d)] for i in range(3)
                       for d in ("to_worker", "from_worker")):
                    print("    {:<7} from {:<6} ".format(link, origin) + " | ".join(cells))
    print("  the owner's output:\n    " + "\n    ".join(r.owner_output.splitlines()[-8:]))
    print("  timeline (s): workers ready {:.1f}, weights shared {:.1f}, last answer {:.1f}, "
          "run {:.1f}; indexing {:.2f}".format(r.t_ready - r.t_start, r.t_shared - r.t_start,
                                               r.queries[-1]["t_end"] - r.t_start,
                                               r.elapsed_run, r.index_time))


def test_the_api_links_are_tls_on_the_wire(run):
    """Every recorded API connection (owner and client to each worker's API, worker 0 to the
    APIs of workers 1 and 2; workers 1 and 2 open none: what they tell worker 0 goes over the
    mesh, as notes) is TLS 1.3 from its first byte to its last: both directions are whole
    sequences of TLS records, each opens with one handshake record (ClientHello /
    ServerHello) and all that follows is encrypted (application data, plus the compatibility
    change-cipher-spec), so even the certificates (names, roles) cross encrypted. Nothing
    readable is on these links:

    - no HTTP/2 connection preface, which opens every plaintext gRPC connection (control: it
      opens every recorded compute connection, TensorFlow's plaintext gRPC);
    - no query id, model id or piece of the model spec, although the message-level records
      show every one of them was sent over exactly these connections;
    - no window of any input, weight or answer share, although every one of them is in the
      messages."""
    r = run
    api = [(k, c) for k, c in enumerate(r.conns) if c.link == "api"]
    assert {c.origin for _, c in api} == {"owner", "client", "w0"}, {c.origin for _, c in api}
    assert {c.worker for _, c in api if c.origin == "w0"} == {1, 2}
    for k, c in api:
        for direction in ("to_worker", "from_worker"):
            records, complete = tls_records(c.data(direction))
            where = (c.worker, c.origin, direction)
            assert complete and records, where
            assert records[0][0] == 22, (where, records[0])  # handshake
            assert {t for t, _, _ in records[1:]} <= {20, 21, 23}, where
            assert any(t == 23 for t, _, _ in records), where
            assert all(v == 0x0303 for _, v, _ in records[1:]), where
    for k, c in enumerate(r.conns):
        if c.link == "compute":
            assert c.data("to_worker").startswith(PREFACE), (c.worker, c.origin)

    raw = [h for k, _ in api for d in ("to_worker", "from_worker") for h in r.hay[(k, d)]]
    uploads = [m["message"] for m in r.messages if m["method"] == "Upload"
               and m["kind"] == "request"]
    spec = next(u.spec_json for u in uploads if u.spec_json)
    submitted = [m["message"] for m in r.messages if m["method"] == "Submit"
                 and m["kind"] == "request"]
    sent = [spec[i:i + 32].encode() for i in range(0, len(spec) - 32, 32)]
    sent += [submitted[0].model_id.encode()] + [m.query_id.encode() for m in submitted]
    for marker in sent:
        assert any(marker in m["data"] for m in r.messages), marker  # they were sent ...
    for marker in sent + [PREFACE]:
        assert not any(marker in h.data for h in raw), marker  # ... and cannot be read
    shares = [n for s in r.sharings for a in s["shares"] for n in windows(a)]
    shares += [n for q in range(QUERIES) for y in output_shares(r, q) for n in windows(y)]
    shares += weight_windows([a for w in r.weights for a in w["shares"]])
    assert found([Haystack(m["data"]) for m in r.messages], shares) == set(shares)
    assert not found(raw, shares)


def varint(n):
    """``n`` (>= 0) as a protobuf varint."""
    out = b""
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([low])
        out += bytes([low | 0x80])


def test_mesh_links_authenticate_before_any_frame_or_note(run):
    """Each mesh connection authenticates before it carries a single protocol message or note:

    - both directions open with a TLS handshake record (0x16 0x03 ...: the dialer's
      ClientHello, the acceptor's ServerHello), never with a frame, a note or an HTTP/2
      preface;
    - each direction is a run of TLS records -- one handshake record, then only change
      cipher spec and encrypted records, at least three of those (TLS 1.3 hides alert
      types: the rest of the handshake, the hello line or its answer, the close_notify) --
      followed by whole mesh frames or whole notes (JSON lines) to its last byte; neither
      hello line ("PKMESH1 i j", "PKNOTE1 i j") is readable in it;
    - no frame or note in one direction arrived before the last TLS record of the other
      direction: each worker sends frames or notes only once it has its peer's
      close_notify, which ends a handshake that authenticated the peer;
    - no frame carries step id 0, and each (step, edge) is one message: it occurs once in all
      the mesh traffic;
    - each query's frames carry one step id of their own, greater than the previous query's,
      and it is the step id of the "go" note in which worker 0 named that query to workers 1
      and 2, during the query; more: the step ids of all the frames are exactly those of
      worker 0's "go" notes (the same to worker 1 as to worker 2), so no step ran that worker
      0 did not start with a "go", and every "go" ran a step; no step id (8 bytes
      little-endian, or a protobuf varint) is on any compute link, at any time: workers 1
      and 2 learn it from the note only."""
    r = run
    mesh = [(k, c) for k, c in enumerate(r.conns) if c.link == "mesh"]
    assert len(mesh) == 6, [(c.origin, c.worker) for _, c in mesh]
    other = {"to_worker": "from_worker", "from_worker": "to_worker"}
    messages = collections.Counter()
    for k, c in mesh:
        tls_end, first = {}, {}
        for d in ("to_worker", "from_worker"):
            raw = c.data(d)
            stream = r.mesh[(k, d)]
            records = stream.records
            where = (c.origin, c.worker, d, stream.kind)
            assert raw[:2] == b"\x16\x03" and not raw.startswith(PREFACE), (where, raw[:8])
            assert stream.complete and records, (where, stream.complete, len(records),
                                                 len(stream.frames), len(stream.notes))
            assert stream.kind in ("frames", "notes", ""), where
            assert records[0][0] == 22, (where, records[0])
            assert {t for t, _, _ in records[1:]} <= {20, 23}, (where, records)
            assert sum(t == 23 for t, _, _ in records) >= 3, (where, records)
            tls_end[d] = sum(5 + n for _, _, n in records)
            assert b"PKMESH1" not in raw[:tls_end[d]], where
            assert b"PKNOTE1" not in raw[:tls_end[d]], where
            starts = [f.start for f in stream.frames] + [n.start for n in stream.notes]
            if starts:
                assert min(starts) == tls_end[d], where
                first[d] = c.arrival(d, [min(starts) + 1])[0]
            messages.update((f.step, f.edge) for f in stream.frames)
        assert first or mesh_kind(r, k) == "idle", (c.origin, c.worker)
        for d, t in first.items():
            authenticated = c.arrival(other[d], [tls_end[other[d]]])[0]
            assert t >= authenticated, (c.origin, c.worker, d, t - authenticated)
    assert not [m for m in messages if m[0] == 0], "frames with step id 0"
    twice = [m for m, n in messages.items() if n > 1]
    assert not twice, "{} (step, edge) pairs sent more than once, e.g. {}".format(
        len(twice), twice[:3])

    gos = {i: [(t, n.fields) for t, n in notes_sent(r, 0, i) if "go" in n.fields]
           for i in (1, 2)}
    assert [g for _, g in gos[1]] == [g for _, g in gos[2]], "different gos to workers 1, 2"
    go_steps = [g["go"] for _, g in gos[1]]
    assert {s for s, _ in messages} == set(go_steps), (sorted({s for s, _ in messages}),
                                                       go_steps)
    previous = None
    for q, query in enumerate(r.queries):
        steps = {f.step for _, _, f in mesh_frames_between(r, query["t_start"], query["t_end"])}
        assert len(steps) == 1, (q, steps)
        (step,) = steps
        assert previous is None or step > previous, (q, previous, step)
        previous = step
        qid = submits(r, 0)[q].query_id
        for i in (1, 2):
            named = [(t, g["go"]) for t, g in gos[i] if qid in g["ids"]]
            assert len(named) == 1, (q, i, named)
            (t, go), = named
            assert go == step and query["t_start"] <= t <= query["t_end"], (q, i, go, step)
    compute = [h for k, c in enumerate(r.conns) if c.link == "compute"
               for d in ("to_worker", "from_worker") for h in r.hay[(k, d)]]
    for step in go_steps:
        encodings = [step.to_bytes(8, "little", signed=True)]
        if step > 0:
            encodings.append(varint(step))
        assert not any(e in h.data for h in compute for e in encodings), step
    print("\nmesh: {:,} frames, {:,} step ids ({:,} \"go\" notes to each of workers 1 and 2); "
          "TLS records per direction {}".format(
              sum(messages.values()), len({s for s, _ in messages}), len(go_steps),
              [len(r.mesh[(k, d)].records) for k, _ in mesh
               for d in ("to_worker", "from_worker")]))


QUERY_ID = re.compile(r"[0-9a-f]{32}\Z")  # a client's query id (privatekeras.worker.QUERY_ID)
SESSION = re.compile(r"[0-9a-f]{16}\Z")  # a serving session: 8 random bytes, hex
GO = {"go", "session", "model", "ids"}


def test_the_notes_are_public_bookkeeping_going_the_documented_ways(run):
    """The notes links carry public bookkeeping only, each note going the documented way:

    - every note is one line that is, byte for byte, the compact JSON encoding of its object
      (no whitespace, no padding: nothing rides along), of one of two kinds:
      ``{"arrived": <query id>}``, from worker 1 or 2 to worker 0 only, and
      ``{"go": <step id>, "session": ..., "model": <model id>, "ids": [<query ids>]}``, from
      worker 0 to workers 1 and 2 only, the same notes to both; workers 1 and 2 send each
      other none (their notes link stays idle after its TLS);
    - the fields: query ids are 32 lowercase hex digits, step ids positive int64s, strictly
      increasing from one "go" to the next, the model is the one the client queried, and a
      "go"'s ids are a group of a traced size (1 or the model's max_group), padded with ""
      at its end;
    - Prepare's warm-up: the "go" notes that passed before the owner's share() returned
      have session "" and only "" ids (public padding, no query), one per group size in
      ascending order;
    - serving: every later "go" is of one serving session (16 hex digits); together their
      ids are the client's query ids, in the client's order, each named once;
    - "arrived": each of workers 1 and 2 names each of the client's query ids exactly once,
      in the client's order, after the client sent it that query's Submit and before the
      client had its answer;
    - worker 0 evaluates a query only once all three workers hold its shares: the "go"
      naming a query passed its proxy after both "arrived" notes of that query had passed
      theirs (a proxy times a byte before it forwards it, so this is causal), and after the
      client sent worker 0 that query's Submit.
    Prints the notes' count and bytes."""
    import json

    r = run
    head = next(m["message"] for m in api_messages(r, 0, "Upload", "request")
                if m["message"].spec_json)
    spec = json.loads(head.spec_json)
    groups = sorted({1, int(spec["max_group"])})
    qids = [m.query_id for m in submits(r, 0)]
    assert len(qids) == QUERIES and all(QUERY_ID.match(q) for q in qids), qids
    model = submits(r, 0)[0].model_id
    assert model == spec["model_id"]

    for j in range(3):
        for i in range(3):
            if i == j:
                continue
            notes = notes_sent(r, j, i)
            for _, n in notes:
                assert n.line == json.dumps(n.fields, separators=(",", ":")).encode() + b"\n", (
                    j, i, n.line)
                assert len(n.line) <= NOTE_MAX
            if j == 0:
                assert notes and all(set(n.fields) == GO for _, n in notes), (j, i)
            elif i == 0:
                assert notes and all(set(n.fields) == {"arrived"} for _, n in notes), (j, i)
            else:
                assert not notes, (j, i, notes[:3])

    gos = {i: notes_sent(r, 0, i) for i in (1, 2)}
    assert [n.line for _, n in gos[1]] == [n.line for _, n in gos[2]]
    steps = []
    for _, n in gos[1]:
        g = n.fields
        assert type(g["go"]) is int and 0 < g["go"] < 2 ** 63, g
        assert g["model"] == model, g
        assert type(g["session"]) is str and type(g["ids"]) is list, g
        assert len(g["ids"]) in groups, g
        assert all(type(x) is str and (x == "" or QUERY_ID.match(x)) for x in g["ids"]), g
        real = [x for x in g["ids"] if x]
        assert g["ids"] == real + [""] * (len(g["ids"]) - len(real)), g
        steps.append(g["go"])
    assert steps == sorted(set(steps)), steps  # strictly increasing
    for i in (1, 2):
        warm = [n.fields for t, n in gos[i] if t < r.t_shared]
        serve = [n.fields for t, n in gos[i] if t >= r.t_shared]
        assert [len(g["ids"]) for g in warm] == groups, warm
        assert all(g["session"] == "" and set(g["ids"]) == {""} for g in warm), warm
        assert serve and len({g["session"] for g in serve}) == 1, serve
        assert SESSION.match(serve[0]["session"]), serve[0]
        assert all([x for x in g["ids"] if x] for g in serve), serve
        assert [x for g in serve for x in g["ids"] if x] == qids, serve

    arrived = {}
    for i in (1, 2):
        notes = notes_sent(r, i, 0)
        assert [n.fields["arrived"] for _, n in notes] == qids, (i, notes)
        arrived[i] = [t for t, _ in notes]
        sent = [m["time"] for m in api_messages(r, i, "Submit", "request")]
        for q, t in enumerate(arrived[i]):
            assert sent[q] < t < r.queries[q]["t_end"], (i, q)
    sent0 = [m["time"] for m in api_messages(r, 0, "Submit", "request")]
    for q, qid in enumerate(qids):
        for i in (1, 2):
            named = [t for t, n in gos[i] if qid in n.fields["ids"]]
            assert len(named) == 1, (q, i, named)
            t_go = named[0]
            assert t_go > max(arrived[1][q], arrived[2][q]), (q, i)
            assert t_go > sent0[q], (q, i)
    print("\nnotes: {} \"go\" to each of workers 1 and 2 ({} warm-up), {} \"arrived\" from "
          "each; bytes {:,} / {:,} (go / arrived, all)".format(
              len(gos[1]), len(groups), len(arrived[1]),
              sum(len(n.line) for i in (1, 2) for _, n in gos[i]),
              sum(len(n.line) for i in (1, 2) for _, n in notes_sent(r, i, 0))))


def test_each_worker_receives_exactly_its_two_input_shares(run):
    """Message level: for every query the client sends worker i exactly (s_i, s_{i+1}) of the
    input's shares (s_0 + s_1 + s_2 = the encoded input), under one query id for all three
    and a different fetch digest each; the replicas agree (worker i's second share is worker
    i+1's first). No window of the third share s_{i+2} is in anything worker i received or
    sent: its API messages and every byte of its links to the other workers (compute, mesh
    frames and notes; raw, de-framed and decoded)."""
    r = run
    for q in range(QUERIES):
        s = r.sharings[q]["shares"]
        np.testing.assert_array_equal(reconstruct(s), r.sharings[q]["encoded"])
        requests = [submits(r, i)[q] for i in range(3)]
        assert len({m.query_id for m in requests}) == 1
        assert len({m.fetch_digest for m in requests}) == 3
        for i in range(3):
            pair = arrays(requests[i].shares)
            assert len(pair) == 2
            np.testing.assert_array_equal(pair[0], s[i])
            np.testing.assert_array_equal(pair[1], s[(i + 1) % 3])
            assert requests[i].shares[1].data == requests[(i + 1) % 3].shares[0].data
    for i in range(3):
        third = [n for q in range(QUERIES) for n in windows(r.sharings[q]["shares"][(i + 2) % 3])]
        assert len(third) > 700 * QUERIES
        assert not found(message_view(r, i), third), "worker {} was sent s_{}".format(
            i, (i + 2) % 3)
        assert not found(worker_link_view(r, i), third), "worker {} saw s_{} on the wire".format(
            i, (i + 2) % 3)


def test_each_worker_returns_its_two_answer_shares_and_never_sees_the_third(run):
    """Message level: worker i answers the client's Fetch with (y_i, y_{i+1}) and the replicas
    agree (worker i's y_{i+1} is worker i+1's first share). No window of y_{i+2} is in
    anything worker i received or sent (API messages; compute links, mesh frames and notes):
    no single worker ever holds all three answer shares."""
    r = run
    for q in range(QUERIES):
        for i in range(3):
            mine = answers(r, i)[q].shares
            nxt = answers(r, (i + 1) % 3)[q].shares
            assert len(mine) == 2 and mine[1].data == nxt[0].data
    for i in range(3):
        third = [n for q in range(QUERIES) for n in windows(output_shares(r, q)[(i + 2) % 3])]
        assert len(third) == 3 * QUERIES
        assert not found(message_view(r, i), third)
        assert not found(worker_link_view(r, i), third)


def test_each_worker_receives_exactly_its_two_shares_of_every_weight(run):
    """Message level: the owner's upload to worker i is the public spec (architecture and
    shapes, no weight) followed by, for each of the 8 weight tensors, exactly (w_i, w_{i+1})
    of its shares (w_0 + w_1 + w_2 = round(w * 2^16)); the replicas agree. No window of the
    third share w_{i+2} of any weight is in anything worker i received or sent (API messages;
    compute links, mesh frames and notes)."""
    import json

    r = run
    assert len(r.weights) == len(r.model_weights) == len(r.keras_weights) == 8
    for w, kw in zip(r.weights, r.model_weights):
        np.testing.assert_array_equal(reconstruct(w["shares"]), w["encoded"])
        assert w["encoded"].size == kw.size
        assert np.abs(np.sort(w["encoded"].reshape(-1)) - np.sort(np.round(
            kw.astype(np.float64) * SCALE).reshape(-1))).max() <= 1
    chunks = [[m["message"] for m in api_messages(r, i, "Upload", "request")] for i in range(3)]
    for i in range(3):
        head, body = chunks[i][0], chunks[i][1:]
        assert head.spec_json and not head.weights
        spec = json.loads(head.spec_json)
        assert set(spec) == {"model_id", "name", "protocol", "batch_size", "input_shape",
                             "output_shape", "output_activation", "input_range", "fixed_point",
                             "output_frac_bits", "max_group", "nodes"}
        assert spec["output_frac_bits"] == 32  # the last Dense is answered untruncated
        assert all(set(node) == {"kind", "name", "inputs", "params", "shape", "weight_shapes"}
                   for node in spec["nodes"])
        assert len(body) == len(r.weights) and not any(c.spec_json for c in body)
        for k, (chunk, w) in enumerate(zip(body, r.weights)):
            pair = arrays(chunk.weights)
            assert len(pair) == 2
            np.testing.assert_array_equal(pair[0], w["shares"][i])
            np.testing.assert_array_equal(pair[1], w["shares"][(i + 1) % 3])
            assert chunk.weights[1].data == chunks[(i + 1) % 3][1 + k].weights[0].data
    for i in range(3):
        third = weight_windows([w["shares"][(i + 2) % 3] for w in r.weights])
        assert len(third) > 3000
        assert not found(message_view(r, i), third), "worker {} was sent w_{}".format(
            i, (i + 2) % 3)
        assert not found(worker_link_view(r, i), third), "worker {} saw w_{}".format(
            i, (i + 2) % 3)


def test_workers_never_send_each_other_an_input_or_weight_share(run):
    """Stronger than "never the third share": in ABY3 a worker's input and weight shares are
    only ever used locally (products are re-shared as z_i = local products + a fresh zero
    share, truncation sends masked values), so no window of any input share s_j or any weight
    share w_j appears on any link between workers (compute, mesh frames or notes) at all.

    Positive control on this very traffic: the search finds what ABY3 does send. The answer
    is the last Dense's re-shared product, untruncated, plus the bias at double scale:
    y_j = z_j + b_j * 2^16. Worker 2, which holds (y_2, y_0), is sent z_0 by worker 0 (the
    re-sharing: each worker sends its masked product share to the one before it), so every
    window of y_0 - b_0 * 2^16 is found on the link from worker 0 to worker 2, in every
    query: on the mesh, and not on the compute link (a protocol message, which the mesh
    carries)."""
    r = run
    links = between_workers(r)
    inputs = [n for s in r.sharings for a in s["shares"] for n in windows(a)]
    weights = weight_windows([a for w in r.weights for a in w["shares"]])
    assert not found(links, inputs)
    assert not found(links, weights)

    bias = r.weights[-1]["shares"][0]
    with np.errstate(over="ignore"):
        lifted = bias * np.int64(2 ** 16)
    for q in range(QUERIES):
        z = windows(wrapping_sum(output_shares(r, q)[0], -lifted))
        assert len(z) == 3
        assert found(sent_between(r, 0, 2, kinds=("mesh",)), z) == set(z), q
        assert not found(sent_between(r, 0, 2, kinds=("compute",)), z), q


def test_no_clear_value_is_on_any_link_or_in_any_message(run):
    """No window of the input image (fixed-point int64, float32, float64), of the answer
    (fixed-point as reconstructed, float32 logits, float64) or of any weight (the owner's
    fixed-point encoding, round(w * 2^16) recomputed here, float32, float64, float64 * 2^16)
    is in any recorded byte (compute links, mesh frames and notes, raw, de-framed and
    decoded; API links) or in any API message the owner or the client exchanged with a
    worker."""
    r = run
    y_enc = reconstruct(output_shares(r, 0))
    needles = {
        "input fixed-point": windows(r.sharings[0]["encoded"]),
        "input float32": windows(r.image.astype(np.float32)),
        "input float64": windows(r.image.astype(np.float64)),
        "answer fixed-point": windows(y_enc),
        "answer float32": windows(r.queries[0]["logits"].astype(np.float32)),
        "answer float64": windows(y_enc / ANSWER_SCALE),
    }
    clear = []
    for w, kw, mw in zip(r.weights, r.keras_weights, r.model_weights):
        clear += weight_windows([w["encoded"], np.round(kw.astype(np.float64) * SCALE).astype(
            np.int64), kw.astype(np.float32), kw.astype(np.float64),
            kw.astype(np.float64) * SCALE, mw.astype(np.float32), mw])
    needles["weights"] = list(set(clear))
    haystacks = all_traffic(r) + [Haystack(m["data"]) for m in r.messages]
    hits = found(haystacks, [n for ns in needles.values() for n in ns])
    for name, ns in needles.items():
        assert len(ns) >= {"answer": 3, "input": 100, "weights": 10000}[name.split()[0]], (
            name, len(ns))
        assert not hits & set(ns), "{}: {} of {} windows found".format(
            name, len(hits & set(ns)), len(ns))


def test_shares_look_uniform_and_the_clear_encoding_does_not(run):
    """What each worker holds reconstructs nothing on its own: it is statistically uniform,
    and the same statistics reject the clear encodings (so the test can fail):

    - input shares s_j and each worker's pair sum s_i + s_{i+1} (= input - s_{i+2}), and each
      of the weights' shares w_j (all weights): every one of the 64 bit positions is 1 with
      frequency 0.5 +- 0.1 (> 5 standard deviations at these sizes), and the byte-value
      chi-square (255 df) is below its p = 1e-6 quantile (~377). The clear input fails both;
      the clear weights pass the bit test (signed values symmetric about 0 set the high bits
      about half the time) but fail the chi-square by orders of magnitude;
    - answer shares (10 values only): the pooled bit frequency is 0.5 +- 0.1, and at most a
      quarter of the top 4 bytes of each value are 0x00/0xff (uniform: ~0.8%; a small
      fixed-point number: all of them)."""
    r = run
    bound = chi_square_bound()
    s = r.sharings[0]["shares"]
    big = {"s{}".format(j): s[j] for j in range(3)}
    big.update({"s{}+s{}".format(i, (i + 1) % 3): wrapping_sum(s[i], s[(i + 1) % 3])
                for i in range(3)})
    for j in range(3):
        big["weights w{}".format(j)] = np.concatenate([w["shares"][j].reshape(-1)
                                                       for w in r.weights])
    for name, a in big.items():
        f, chi = bit_frequencies(a), chi_square_bytes(a)
        print("{:>15}: bit frequencies {:.3f}..{:.3f}, chi-square {:.0f} (bound {:.0f})".format(
            name, f.min(), f.max(), chi, bound))
        assert np.all(np.abs(f - 0.5) <= 0.1), (name, f)
        assert chi < bound, (name, chi)
    clear = {"input": r.sharings[0]["encoded"],
             "weights": np.concatenate([w["encoded"].reshape(-1) for w in r.weights])}
    for name, a in clear.items():
        f, chi = bit_frequencies(a), chi_square_bytes(a)
        print("{:>15}: bit frequencies {:.3f}..{:.3f}, chi-square {:.0f} (clear)".format(
            name, f.min(), f.max(), chi))
        assert chi > 10 * bound, name
        if name == "input":  # pixels in [0, 1]: the high bits are never set
            assert np.any(np.abs(f - 0.5) > 0.1)

    def top_bytes_extreme(a):
        # the clear answer, logits times 2^32 (an untruncated product), stays below 2^40:
        # its top three bytes are 0x00 or 0xFF
        top = np.frombuffer(np.ascontiguousarray(a).tobytes(), np.uint8).reshape(-1, 8)[:, 5:]
        return float(np.isin(top, [0, 255]).mean())

    y = output_shares(r, 0)
    small = {"y{}".format(j): y[j] for j in range(3)}
    small.update({"y{}+y{}".format(i, (i + 1) % 3): wrapping_sum(y[i], y[(i + 1) % 3])
                  for i in range(3)})
    for name, a in small.items():
        f = bit_frequencies(a).mean()
        assert abs(f - 0.5) <= 0.1, (name, f)
        assert top_bytes_extreme(a) <= 0.25, (name, top_bytes_extreme(a))
    assert top_bytes_extreme(reconstruct(y)) == 1.0


def test_workers_run_our_kernels_and_listen_where_they_should(run):
    """- Each worker process has privatekeras' kernel library (pk_ops.so: ChaCha20 CSPRNG,
      ABY3 bit ops, the mesh's send and receive) and the loopback bind() interposer
      (pk_loopback.so) mapped;
    - each listens on exactly three ports: its compute port Q_i and its mesh port N_i on
      127.0.0.1 only, and its API port R_i where its --hosts entry says (localhost: loopback
      addresses), nothing else;
    - no graph crosses between workers: each traces the step itself from the model's public
      spec and runs its own part, so nothing on a compute link (either way, at any time, raw
      or de-framed) names a traced function (``__inference_...``) or one of our ops
      (protobuf field ``op`` = tag 0x12, length, a name "Pk..."), and nothing on any link
      between workers (compute or mesh, either way) names a stock TensorFlow random or seed
      op;
    - workers 1 and 2 run our mesh ops themselves: each sent both other workers mesh frames,
      which only our PkMeshSend kernel writes."""
    import tensorflow as tf
    from privatekeras.deploy.listening import is_loopback

    r = run
    for i, w in enumerate(WORKERS):
        assert r.kernels in r.maps[w], "worker {} has not loaded {}".format(i, r.kernels)
        assert r.shim in r.maps[w], "worker {} runs without the loopback interposer".format(i)
        listening = r.audit.listening[w]
        assert {port for _, _, port in listening} == {r.R[i], r.Q[i], r.N[i]}, (w, listening)
        for port in (r.Q[i], r.N[i]):
            assert {s for s in listening if s[2] == port} == {("ipv4", "127.0.0.1", port)}, (
                w, port, listening)
        assert all(is_loopback(family, address) for family, address, _ in listening)
    for party in ("owner", "client"):
        assert r.audit.listening[party] == set(), (party, r.audit.listening[party])

    def op_field(name):
        return b"\x12" + bytes([len(name)]) + name.encode()

    def our_ops(data):
        """The names of our ops (Pk..., CamelCase) that ``data`` holds as an op field."""
        out = set()
        for m in re.finditer(rb"\x12([\x03-\x7f])Pk", data):
            name = data[m.start() + 2:m.start() + 2 + m.group(1)[0]]
            if re.fullmatch(rb"Pk[A-Z][A-Za-z0-9]*", name):
                out.add(name.decode())
        return out

    # control: the search finds our ops among a node's fields
    assert our_ops(b"\x0a\x05seeds" + op_field("PkSecureSeed") + op_field("PkMeshSend")
                   + op_field("Const")) == {"PkSecureSeed", "PkMeshSend"}
    stock = [n for n in dir(tf.raw_ops)
             if re.search("Random|Seed|Stateless|Multinomial|TruncatedNormal|Rng|Shuffle", n)]
    assert "RandomUniformInt" in stock and "StatelessRandomUniformV2" in stock
    graphs = []  # what each worker sent another as a graph over TensorFlow's runtime
    for j in range(3):
        for i in range(3):
            if i == j:
                continue
            sent = b"".join(h.data for h in sent_between(r, j, i))
            assert not [n for n in stock if op_field(n) in sent], (j, i)
            compute = b"".join(h.data for h in sent_between(r, j, i, kinds=("compute",)))
            functions = sorted(set(re.findall(rb"__inference_[A-Za-z0-9_]+", compute)))
            if our_ops(compute) or functions:
                links = [(c, d) for c in r.conns if c.link == "compute"
                         for d in ("to_worker", "from_worker") if directed(c, d, j, i)]
                when = [t for c, d in links for t, chunk in c.chunks[d]
                        if our_ops(chunk) or b"__inference_" in chunk]
                graphs.append(
                    "worker {} sent worker {} graphs over TensorFlow's runtime (compute, {:,} "
                    "bytes in all): functions {}, naming our ops {}; in chunks that arrived "
                    "{:.2f}..{:.2f} s into the run (model shared at {:.2f} s)".format(
                        j, i, sum(c.nbytes(d) for c, d in links),
                        [f.decode() for f in functions], sorted(our_ops(compute)),
                        min(when, default=r.t_start) - r.t_start,
                        max(when, default=r.t_start) - r.t_start, r.t_shared - r.t_start))
    for j in (1, 2):
        for i in {0, 1, 2} - {j}:
            frames = [f for k, c in enumerate(r.conns) if c.link == "mesh"
                      for d in ("to_worker", "from_worker") if directed(c, d, j, i)
                      for f in r.mesh[(k, d)].frames]
            assert frames, (j, i)
    assert not graphs, "\n".join(graphs)


def test_identical_queries_get_fresh_masks_and_fresh_answer_shares(run):
    """ABY3's pairwise PRF keys are drawn afresh in every step. Queries 1 and 2 carry
    byte-identical shares (the client reuses one share set), so everything the workers hold
    for them is identical; still:

    - no random-looking 64-byte chunk (>= 40 distinct byte values: masked shares, PRF
      output; one every 64 bytes, so any repeated region of 127 bytes is caught) of the
      worker-to-worker payloads of one step (the mesh frames' tensors and the compute links'
      HTTP/2 DATA) occurs anywhere in the other step's payloads:
      every mask is new (keys made once would replay the same zero shares, so the
      first products' re-sharing and truncation messages would repeat byte for byte);
    - each of the answer shares y_0, y_1, y_2 differs in every element between the two
      queries, while both reconstruct to the same logits (up to truncation noise)."""
    r = run
    a, b = SAME_FROM, SAME_FROM + 1
    for i in range(3):
        sa, sb = submits(r, i)[a], submits(r, i)[b]
        assert [t.data for t in sa.shares] == [t.data for t in sb.shares]
        assert sa.query_id != sb.query_id
    payloads = [worker_payload(r, r.queries[q]["t_start"], r.queries[q]["t_end"])
                for q in (a, b)]
    chunks = [[c for p in payload for c in random_looking_chunks(p)] for payload in payloads]
    repeated = [found([Haystack(p) for p in payloads[1 - k]], chunks[k]) for k in (0, 1)]
    print("random-looking 64-byte chunks in the worker-to-worker payloads: step {} {:,}, "
          "step {} {:,}; found in the other step: {:,} / {:,}".format(
              a, len(chunks[0]), b, len(chunks[1]), len(repeated[0]), len(repeated[1])))
    assert min(len(c) for c in chunks) > 1000
    ya, yb = output_shares(r, a), output_shares(r, b)
    same = {j: int(np.sum(ya[j] == yb[j])) for j in range(3)}
    print("answer shares y_0, y_1, y_2: elements equal between the two queries: {}".format(same))
    assert not repeated[0] and not repeated[1] and not any(same.values()), (
        "identical queries: {} / {} random-looking chunks of the worker-to-worker payloads "
        "repeat, answer-share elements equal: {}".format(len(repeated[0]), len(repeated[1]),
                                                          same))
    np.testing.assert_allclose(reconstruct(ya) / ANSWER_SCALE, reconstruct(yb) / ANSWER_SCALE,
                               atol=1e-3)


