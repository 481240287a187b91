"""The mesh: the three workers' own links, which carry the private step's protocol messages
and the workers' notes to each other.

Every pair of workers has two TCP connections; the lower-indexed worker dials, the other
accepts. Each worker listens on ``127.0.0.1:<mesh port>`` of its host only (the port is
confined like the compute port: the loopback interposer, :mod:`privatekeras.deploy.confine`,
refuses connections from other users' sockets); across hosts the stunnel links carry it
(:mod:`privatekeras.deploy.links`), as they carry the compute port.

A connection is authenticated before it carries anything: the two workers run mutual TLS 1.3
over it with their cluster certificates (the same credentials as their APIs: chained to the
cluster's CA, role ``worker``, the expected worker's name), the dialer names itself, the
worker it wants and the kind of link in one line, the acceptor answers ``OK``; then both end
TLS (close_notify). Beyond that handshake the streams have no TLS of their own: on one host
they are loopback between processes of one user; across hosts they run inside the stunnel
link's TLS. The two kinds of link:

* ``PKMESH1``, the **messages**: the socket is handed to the mesh kernels
  (:mod:`privatekeras.kernels.mesh`), which read and write the step's messages on it: what
  ABY3 sends between workers, shares and masked values, never anything in clear;
* ``PKNOTE1``, the **notes**: one JSON object per line, public bookkeeping only (which query's
  shares a worker holds; "go": run the step with this id on these queries). :meth:`Mesh.note`
  sends one; a reader thread per peer hands each received note to the worker
  (``on_note(peer, note)``).
"""

import json
import os
import socket
import ssl
import tempfile
import threading
import time

from ..errors import ClusterError
from ..log import say

HELLO = b"PKMESH1"  # the link carrying the step's messages (the kernels')
NOTE_HELLO = b"PKNOTE1"  # the link carrying the workers' notes
MAX_NOTE = 65536  # bytes in one note's line
NOTE_WAIT = 10.0  # how long a note waits for its link to come up
HANDSHAKE_TIMEOUT = 10.0
RETRY = 0.1  # seconds between dials while the peer does not listen yet
REPORT_EVERY = 5.0


def default_address(compute_address):
    """A worker's mesh address when none is given: the port after its compute port, on the
    same host (``127.0.0.1:4000`` -> ``127.0.0.1:4001``)."""
    host, _, port = compute_address.rpartition(":")
    return "{}:{}".format(host, int(port) + 1)


def _tls_context(credentials, server):
    """Mutual TLS 1.3 with this worker's certificate, peers chained to the cluster's CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=credentials.ca.decode("ascii"))
    if server:
        ctx.num_tickets = 0  # nothing after the handshake but our hello and its answer
    with tempfile.TemporaryDirectory(prefix="privatekeras-mesh-") as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        for path, data in ((cert, credentials.cert), (key, credentials.key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert, key)
    return ctx


def _subject(tls):
    """``(name, role)`` from the peer certificate of a TLS socket."""
    fields = dict(item for rdn in tls.getpeercert().get("subject", ()) for item in rdn)
    return fields.get("commonName"), fields.get("organizationalUnitName")


def _read_line(tls, limit=64):
    data = b""
    while not data.endswith(b"\n"):
        chunk = tls.recv(limit - len(data))
        if not chunk:
            raise ConnectionError("closed during the mesh handshake")
        data += chunk
        if len(data) >= limit and not data.endswith(b"\n"):
            raise ConnectionError("mesh handshake line too long")
    return data[:-1]


class Mesh:
    """Worker ``index``'s links to the two other workers. Cheap to construct; :meth:`start`
    listens and links in the background.

    Args:
        index: this worker (0, 1 or 2).
        names: the three workers' names (their certificates' CNs).
        addresses: the three workers' mesh addresses as the workers reach them.
        port: the port this worker listens on, on 127.0.0.1.
        credentials: this worker's credentials (:class:`privatekeras.deploy.pki.Credentials`).
        on_note: called as ``on_note(peer, note)`` for every note a peer sends (a dict, from
            the reader thread of that peer's link), and ``on_note(peer, None)`` when the link
            fails after it was up.
    """

    def __init__(self, index, names, addresses, port, credentials, on_note=None):
        self.index, self.names, self.addresses = index, list(names), list(addresses)
        self.port, self.credentials = port, credentials
        self._on_note = on_note or (lambda peer, note: None)
        self._closing = threading.Event()
        self._listener = None
        self._threads = []
        self._notes = {}  # peer -> its notes socket, while up
        self._notes_cv = threading.Condition()
        self._send_locks = {peer: threading.Lock() for peer in range(3)}

    @property
    def name(self):
        return self.names[self.index]

    def start(self):
        """Listen, accept the lower-indexed workers and dial the higher-indexed ones (in
        background threads, retrying until they answer). Returns self."""
        from ..kernels import mesh as kernels

        kernels.close()  # a fresh mesh in this process
        self._server_ctx = _tls_context(self.credentials, server=True)
        self._client_ctx = _tls_context(self.credentials, server=False)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", self.port))
        except OSError as exc:
            listener.close()
            raise ClusterError("{}: cannot listen for the other workers on 127.0.0.1:{} ({}): "
                               "choose another mesh port".format(self.name, self.port, exc))
        listener.listen(8)
        self._listener = listener
        say("%s: mesh links on 127.0.0.1:%d (workers only)", self.name, self.port)
        if self.index > 0:
            self._spawn(self._accept_loop, "accept")
        for peer in range(self.index + 1, 3):
            for hello in (HELLO, NOTE_HELLO):
                self._spawn(self._dial, "dial-{}".format(peer), peer, hello)
        return self

    def _spawn(self, target, what, *args):
        thread = threading.Thread(target=target, args=args, daemon=True,
                                  name="privatekeras-mesh-{}".format(what))
        thread.start()
        self._threads.append(thread)

    def close(self):
        """Stop linking and close every link (the mesh kernels fail what still waits)."""
        from ..kernels import mesh as kernels

        self._closing.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        kernels.close()
        with self._notes_cv:
            links, self._notes = list(self._notes.values()), {}
        for sock in links:
            _shut(sock)

    # -- notes ------------------------------------------------------------------------------
    def note(self, peer, **note):
        """Send ``note`` (JSON-able fields) to worker ``peer``; waits up to NOTE_WAIT s for
        the link to come up. Raises ClusterError when it cannot be sent."""
        line = json.dumps(note, separators=(",", ":")).encode() + b"\n"
        if len(line) > MAX_NOTE:
            raise ValueError("a note is limited to {} bytes".format(MAX_NOTE))
        deadline = time.monotonic() + NOTE_WAIT
        with self._notes_cv:
            while peer not in self._notes and not self._closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._notes_cv.wait(left)
            sock = self._notes.get(peer)
        if sock is None:
            raise ClusterError("{}: no link to {} for its notes".format(
                self.name, self.names[peer]))
        try:
            with self._send_locks[peer]:
                sock.sendall(line)
        except OSError as exc:
            self._notes_down(peer, sock)
            raise ClusterError("{}: the link to {} failed: {}".format(
                self.name, self.names[peer], exc)) from None

    def _read_notes(self, peer, sock):
        """Hand each note from ``peer`` to on_note, until the link ends or misbehaves."""
        stream = sock.makefile("rb")
        try:
            while True:
                line = stream.readline(MAX_NOTE)
                if not line.endswith(b"\n"):
                    if line:
                        say("%s: an overlong or cut note from %s: link closed", self.name,
                            self.names[peer])
                    break
                try:
                    note = json.loads(line)
                except ValueError:
                    note = None
                if not isinstance(note, dict):
                    say("%s: a malformed note from %s: link closed", self.name,
                        self.names[peer])
                    break
                self._on_note(peer, note)
        except OSError:
            pass
        finally:
            stream.close()
            if self._notes_down(peer, sock) and not self._closing.is_set():
                self._on_note(peer, None)

    def _notes_down(self, peer, sock):
        """Forget the notes link ``sock`` to ``peer``; True if it was the current one."""
        with self._notes_cv:
            current = self._notes.get(peer) is sock
            if current:
                del self._notes[peer]
        _shut(sock)
        return current

    # -- the two halves of the handshake --------------------------------------------------
    def _dial(self, peer, hello):
        """Connect to worker ``peer`` (retrying while it does not listen) for the link
        ``hello`` names, and hand the authenticated socket to the kernels or the notes."""
        host, _, port = self.addresses[peer].rpartition(":")
        host = host.strip("[]")
        last = 0.0
        while not self._closing.is_set():
            try:
                sock = socket.create_connection((host, int(port)), timeout=HANDSHAKE_TIMEOUT)
            except OSError as exc:
                if time.monotonic() - last > REPORT_EVERY:
                    say("%s: waiting for %s's mesh port %s (%s) ...", self.name,
                        self.names[peer], self.addresses[peer], exc)
                    last = time.monotonic()
                self._closing.wait(RETRY)
                continue
            try:
                tls = self._client_ctx.wrap_socket(sock, server_hostname=self.names[peer])
                name, role = _subject(tls)
                if name != self.names[peer] or role != "worker":
                    raise ssl.SSLError("the certificate names {!r} ({}), not worker {!r}".format(
                        name, role, self.names[peer]))
                tls.sendall(b"%s %d %d\n" % (hello, self.index, peer))
                if _read_line(tls) != b"OK":
                    raise ConnectionError("{} refused the mesh link".format(self.names[peer]))
                self._attach(peer, hello, tls.unwrap())
                return
            except (OSError, ssl.SSLError, ConnectionError) as exc:
                sock.close()
                say("%s: mesh link to %s failed: %s; retrying", self.name, self.names[peer],
                    exc)
                self._closing.wait(1.0)

    def _accept_loop(self):
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._accept, args=(sock,), daemon=True,
                             name="privatekeras-mesh-handshake").start()

    def _accept(self, sock):
        """Authenticate a dialing worker; hand the socket to the kernels, or close it."""
        sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = self._server_ctx.wrap_socket(sock, server_side=True)
            name, role = _subject(tls)
            words = _read_line(tls).split(b" ")
            peer = self.names.index(name) if name in self.names else -1
            if (role != "worker" or peer < 0 or peer >= self.index or len(words) != 3 or
                    words[0] not in (HELLO, NOTE_HELLO) or
                    words[1:] != [b"%d" % peer, b"%d" % self.index]):
                raise ConnectionError("refused a mesh link from {!r} ({}) saying {!r}".format(
                    name, role, b" ".join(words)))
            tls.sendall(b"OK\n")
            self._attach(peer, words[0], tls.unwrap())
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            say("%s: mesh: %s", self.name, exc)
            sock.close()

    def _attach(self, peer, hello, sock):
        from ..kernels import mesh as kernels

        sock.settimeout(None)  # blocking from now on
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hello == NOTE_HELLO:
            with self._notes_cv:
                old = self._notes.get(peer)
                self._notes[peer] = sock
                self._notes_cv.notify_all()
            if old is not None:
                _shut(old)
            self._spawn(self._read_notes, "notes-{}".format(peer), peer, sock)
            say("%s: notes link to %s up", self.name, self.names[peer])
            return
        try:
            kernels.attach(peer, sock)
        finally:
            sock.close()  # the kernels hold their own descriptor
        say("%s: mesh link to %s up", self.name, self.names[peer])


def _shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
