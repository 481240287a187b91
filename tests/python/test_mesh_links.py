"""Who may join the workers' mesh (privatekeras.deploy.mesh), with real sockets and TLS.

Worker 1's mesh runs in a child process (the mesh kernels' state is per process); the test
dials it as different parties and asks the child which links its kernels hold. Only worker 0,
with its own certificate and the right hello, gets a link (worker 1 accepts only lower
indices); a client's or the owner's certificate, worker 2's (it never dials worker 1), a wrong
hello, or no TLS at all leave worker 1 with no link. The notes link (hello ``PKNOTE1``) admits
the same party only, hands each well-formed note to the worker and closes on a malformed one.
Then the dialing half: worker 0's mesh refuses a listener that presents a non-worker
certificate.
"""

import os
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from conftest import child_env

from privatekeras.cluster import _free_loopback_ports, local_worker_names
from privatekeras.deploy.pki import load_local, make_local

CHILD = textwrap.dedent("""
    import json
    import sys
    from privatekeras.deploy.mesh import Mesh
    from privatekeras.deploy.pki import load_local
    from privatekeras.kernels import mesh as kernels
    hosts, names, addresses, index = sys.argv[1].split(","), sys.argv[2].split(","), \\
        sys.argv[3].split(","), int(sys.argv[4])
    mesh = Mesh(index, names, addresses, int(addresses[index].rpartition(":")[2]),
                load_local(hosts, names[index]),
                on_note=lambda peer, note: print("NOTE", peer, json.dumps(note),
                                                 flush=True)).start()
    print("LISTENING", flush=True)
    for line in sys.stdin:
        print("ATTACHED", *[kernels.attached(p) for p in range(3)], flush=True)
""")


@pytest.fixture(scope="module")
def cluster_pki():
    runtime = tempfile.mkdtemp(prefix="pk-mesh-test-")
    saved = os.environ.get("PRIVATEKERAS_RUNTIME_DIR")
    os.environ["PRIVATEKERAS_RUNTIME_DIR"] = runtime
    try:
        hosts = ["localhost:{}".format(p) for p in _free_loopback_ports(3, [])]
        make_local(hosts)
        names = local_worker_names()
        creds = {role: load_local(hosts, role) for role in names + ["owner", "client"]}
        yield hosts, names, creds, runtime
    finally:
        if saved is None:
            del os.environ["PRIVATEKERAS_RUNTIME_DIR"]
        else:
            os.environ["PRIVATEKERAS_RUNTIME_DIR"] = saved


class Child:
    """Worker ``index``'s mesh in its own process."""

    def __init__(self, hosts, names, addresses, index, runtime):
        env = dict(child_env(), PRIVATEKERAS_RUNTIME_DIR=runtime)
        # its log (stderr) apart from its answers (stdout): log lines from the mesh's
        # threads would cut into an answer's line
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, ",".join(hosts), ",".join(names),
             ",".join(addresses), str(index)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, env=env)
        self.lines = []
        self._wait("LISTENING")

    def _wait(self, word, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip())
            if line.startswith(word):
                return line.split()[1:]
        raise AssertionError("no {} from the child:\n{}".format(word, "\n".join(self.lines)))

    def attached(self):
        self.proc.stdin.write("?\n")
        self.proc.stdin.flush()
        return [int(x) for x in self._wait("ATTACHED")]

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


def _context(creds):
    """A TLS client context presenting ``creds`` (files written to a private temp dir)."""
    from privatekeras.deploy.mesh import _tls_context

    return _tls_context(creds, server=False)


def _dial(port, creds, hello, server_name):
    """Dial worker 1's mesh port as ``creds``; returns what came back before the close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        tls = _context(creds).wrap_socket(sock, server_hostname=server_name)
        tls.sendall(hello)
        data = b""
        try:
            while True:
                chunk = tls.recv(64)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"\n"):
                    break
        except (ssl.SSLError, OSError):
            pass
        return data
    finally:
        sock.close()


def _worker1(cluster_pki):
    """Worker 1's mesh in a child process on fresh ports: (ports, names, creds, child)."""
    hosts, names, creds, runtime = cluster_pki
    ports = _free_loopback_ports(3, [])
    addresses = ["127.0.0.1:{}".format(p) for p in ports]
    return ports, names, creds, Child(hosts, names, addresses, 1, runtime)


def test_only_the_expected_worker_joins(cluster_pki):
    ports, names, creds, child = _worker1(cluster_pki)
    try:
        assert child.attached() == [0, 0, 0]
        # A client's and the owner's certificates: refused, no link.
        for role in ("client", "owner"):
            assert _dial(ports[1], creds[role], b"PKMESH1 0 1\n", names[1]) == b""
        # Worker 2 never dials worker 1 (the lower index dials); a wrong hello; a claim to be
        # someone else.
        assert _dial(ports[1], creds[names[2]], b"PKMESH1 2 1\n", names[1]) == b""
        assert _dial(ports[1], creds[names[0]], b"PKMESH1 0 2\n", names[1]) == b""
        assert _dial(ports[1], creds[names[0]], b"HELLO 0 1\n", names[1]) == b""
        assert _dial(ports[1], creds[names[2]], b"PKMESH1 0 1\n", names[1]) == b""
        # No TLS at all: a mesh frame's magic, straight away.
        with socket.create_connection(("127.0.0.1", ports[1]), timeout=10) as raw:
            raw.sendall(b"PKM1" + bytes(60))
            raw.settimeout(15)
            try:
                assert raw.recv(64) == b""
            except ConnectionResetError:
                pass
        assert child.attached() == [0, 0, 0]
        # The control: worker 0 with the right hello gets its link.
        assert _dial(ports[1], creds[names[0]], b"PKMESH1 0 1\n", names[1]) == b"OK\n"
        deadline = time.monotonic() + 10
        while child.attached()[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert child.attached()[0] != 0
        assert any("refused a mesh link" in line for line in child.lines + _drain(child))
    finally:
        child.stop()


def _dial_notes(port, creds, hello, server_name):
    """Dial as ``creds`` with ``hello``; the raw socket after the TLS handshake and the
    acceptor's ``OK``, or None when refused."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = _context(creds).wrap_socket(sock, server_hostname=server_name)
    tls.sendall(hello)
    try:
        answer = tls.recv(64)
    except (ssl.SSLError, OSError):
        answer = b""
    if answer != b"OK\n":
        sock.close()
        return None
    return tls.unwrap()


def test_the_notes_link_admits_worker_0_only_and_closes_on_a_malformed_note(cluster_pki):
    ports, names, creds, child = _worker1(cluster_pki)
    try:
        for role, hello in (("client", b"PKNOTE1 0 1\n"), ("owner", b"PKNOTE1 0 1\n"),
                            (names[2], b"PKNOTE1 2 1\n"), (names[0], b"PKNOTE1 0 2\n")):
            assert _dial_notes(ports[1], creds[role], hello, names[1]) is None, role
        link = _dial_notes(ports[1], creds[names[0]], b"PKNOTE1 0 1\n", names[1])
        assert link is not None
        with link:
            link.sendall(b'{"go":7,"session":"","model":"m","ids":[""]}\n')
            peer = child._wait("NOTE")[0]
            assert peer == "0" and child.lines[-1].endswith('"ids": [""]}'), child.lines[-3:]
            link.sendall(b"not json\n")
            link.settimeout(15)
            try:
                assert link.recv(64) == b""  # the child closed the link
            except ConnectionResetError:
                pass
        assert child.attached() == [0, 0, 0]  # notes are no kernel link
        assert any("malformed note" in line for line in child.lines + _drain(child))
    finally:
        child.stop()


def _drain(child):
    """Stop the child; its answers not read yet and its whole log, as lines."""
    child.proc.kill()
    out, _ = child.proc.communicate(timeout=10)
    child.log.seek(0)
    return out.splitlines() + child.log.read().splitlines()


def test_a_dialing_worker_refuses_a_listener_that_is_not_the_worker(cluster_pki):
    """Worker 0 dials worker 1's address, where a server with the owner's certificate
    listens: the handshake fails (the certificate does not name worker 1), worker 0 never
    sends its hello and never links."""
    from privatekeras.deploy.mesh import _tls_context

    hosts, names, creds, runtime = cluster_pki
    ports = _free_loopback_ports(3, [])
    addresses = ["127.0.0.1:{}".format(p) for p in ports]
    server_ctx = _tls_context(creds["owner"], server=True)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", ports[1]))
    listener.listen(4)
    heard = []

    def serve():
        listener.settimeout(60)
        try:
            while len(heard) < 2:
                conn, _ = listener.accept()
                try:
                    tls = server_ctx.wrap_socket(conn, server_side=True)
                    tls.settimeout(5)
                    heard.append(tls.recv(64))
                except (ssl.SSLError, OSError) as exc:
                    heard.append(type(exc).__name__)
                finally:
                    conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    child = Child(hosts, names, addresses, 0, runtime)
    try:
        thread.join(60)
        assert len(heard) >= 1, child.lines
        assert all(not isinstance(h, bytes) or b"PKMESH1" not in h for h in heard), heard
        assert child.attached() == [0, 0, 0]
    finally:
        child.stop()
        listener.close()
