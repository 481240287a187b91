"""The loopback interposer (pk_loopback.so) fails closed, and privatekeras.deploy.listening
reads what a process really listens on.

bind(): each case starts a small Python child with the interposer in LD_PRELOAD; the child
binds one TCP socket, listens, reports the outcome on stdout and then waits for its stdin to
close, so that the test can look at the child's sockets in /proc while it still holds them.

accept(): an echo server (and a real TensorFlow server) runs with the interposer preloaded,
and clients run as this user or as another uid (nobody, 65534: those tests need root). A
refused client must see its connection closed without a byte from the server, and the server
must never get it from accept."""

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest

from conftest import child_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="LD_PRELOAD and /proc are Linux features")

PORTS_VAR = "PRIVATEKERAS_CONFINE_PORTS"

# argv: family (4/6/unix/unspec), address, port. Prints "LISTEN <address> <port>",
# "BOUND" (a unix socket) or "ERR <errno name>".
CHILD = r"""
import ctypes, errno, socket, struct, sys
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "unix":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(host)
    print("BOUND", flush=True)
elif kind == "unspec":
    # bind() as C code calls it (found through the global scope, so the preload sees it):
    # family AF_UNSPEC with address 0.0.0.0 on an AF_INET socket.
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    libc = ctypes.CDLL(None, use_errno=True)
    addr = struct.pack("=H", socket.AF_UNSPEC) + struct.pack("!H", port) + bytes(12)
    if libc.bind(s.fileno(), ctypes.c_char_p(addr), len(addr)) != 0:
        print("ERR", errno.errorcode[ctypes.get_errno()], flush=True)
        sys.exit(0)
    s.listen()
    print("LISTEN", *s.getsockname()[:2], flush=True)
else:
    s = socket.socket(socket.AF_INET6 if kind == "6" else socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        print("ERR", errno.errorcode.get(e.errno, e.errno), flush=True)
        sys.exit(0)
    s.listen()
    print("LISTEN", *s.getsockname()[:2], flush=True)
sys.stdin.read()
"""


@pytest.fixture(scope="module")
def shim():
    from privatekeras.kernels.build import build, loopback_library_path

    path = loopback_library_path()
    if not os.path.exists(path):
        build(verbose=False)
    assert os.path.exists(path), path
    return path


def _no_core_dumps():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _env(shim, confine_ports):
    env = child_env()
    env.pop("LD_PRELOAD", None)
    env.pop(PORTS_VAR, None)
    if shim is not None:
        env["LD_PRELOAD"] = shim
    if confine_ports is not None:
        env[PORTS_VAR] = confine_ports
    return env


@contextlib.contextmanager
def child(shim, kind, host, port, confine_ports=None):
    """A child that binds (kind, host, port) with ``shim`` preloaded (None: without it);
    yields (process, first line of its output split into words)."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, host, str(port)],
                            env=_env(shim, confine_ports), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_no_core_dumps)
    try:
        line = proc.stdout.readline().split()
        if not line:
            proc.wait(timeout=30)
            raise AssertionError("child said nothing (rc={}): {}".format(
                proc.returncode, proc.stderr.read()[-2000:]))
        yield proc, line
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def outcome(shim, kind, host, port, confine_ports=None):
    with child(shim, kind, host, port, confine_ports) as (_, line):
        return line


def free_port():
    """A TCP port free on every address, IPv4 and IPv6."""
    while True:
        with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as s:
            s.bind(("::" if socket.has_ipv6 else "0.0.0.0", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port


def can_bind(family, host):
    try:
        with socket.socket(family) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def local_address(family, probe):
    """This machine's address on the route towards ``probe`` (no packet is sent), or None
    when it has none or it is a loopback address."""
    import ipaddress

    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            address = s.getsockname()[0]
    except OSError:
        return None
    if ipaddress.ip_address(address).is_loopback or not can_bind(family, address):
        return None
    return address


def listening(pid):
    from privatekeras.deploy.listening import listening_sockets

    return listening_sockets(pid)


# ---------------------------------------------------------------------------------------------
# Every bind confined (PRIVATEKERAS_CONFINE_PORTS unset or empty).

@pytest.mark.parametrize("confine_ports", [None, ""])
def test_ipv4_wildcard_becomes_loopback(shim, confine_ports):
    from privatekeras.deploy.listening import check_confined

    port = free_port()
    with child(shim, "4", "0.0.0.0", port, confine_ports) as (proc, line):
        assert line == ["LISTEN", "127.0.0.1", str(port)]
        assert listening(proc.pid) == [("ipv4", "127.0.0.1", port)]
        assert check_confined([port], pid=proc.pid) == [("ipv4", "127.0.0.1", port)]


def test_ipv4_loopback_addresses_pass_unchanged(shim):
    port = free_port()
    with child(shim, "4", "127.0.0.2", port) as (proc, line):
        assert line == ["LISTEN", "127.0.0.2", str(port)]
        assert listening(proc.pid) == [("ipv4", "127.0.0.2", port)]


def test_ipv6_wildcard_is_refused(shim):
    assert outcome(shim, "6", "::", free_port()) == ["ERR", "EADDRNOTAVAIL"]


def test_ipv4_mapped_wildcard_is_refused(shim):
    """::ffff:0.0.0.0 on an IPv6 socket listens on every IPv4 address: refused."""
    if not can_bind(socket.AF_INET6, "::ffff:0.0.0.0"):
        pytest.skip("no IPv6 sockets here")
    assert outcome(shim, "6", "::ffff:0.0.0.0", free_port()) == ["ERR", "EADDRNOTAVAIL"]


@pytest.mark.parametrize("host,expected", [("::1", "::1"),
                                           ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
                                           ("::ffff:127.1.2.3", "::ffff:127.1.2.3")])
def test_ipv6_loopback_addresses_pass_unchanged(shim, host, expected):
    if not can_bind(socket.AF_INET6, host):
        pytest.skip("cannot bind {} here".format(host))
    port = free_port()
    with child(shim, "6", host, port) as (proc, line):
        assert line == ["LISTEN", expected, str(port)]
        assert listening(proc.pid) == [("ipv6", expected, port)]


def test_other_ipv6_addresses_are_refused(shim):
    address = local_address(socket.AF_INET6, "2001:db8::1")
    if address is None:
        pytest.skip("this machine has no non-loopback IPv6 address")
    assert outcome(shim, "6", address, free_port()) == ["ERR", "EADDRNOTAVAIL"]


def test_af_unspec_wildcard_is_refused(shim):
    """Linux binds an AF_INET socket to 0.0.0.0 when given family AF_UNSPEC and address
    0.0.0.0; under the interposer that is refused."""
    port = free_port()
    with child(None, "unspec", "", port) as (proc, line):  # what it would do unconfined
        assert line == ["LISTEN", "0.0.0.0", str(port)]
    assert outcome(shim, "unspec", "", free_port()) == ["ERR", "EAFNOSUPPORT"]


def test_unix_sockets_pass_unchanged(shim, tmp_path):
    assert outcome(shim, "unix", str(tmp_path / "sock"), 0) == ["BOUND"]


# ---------------------------------------------------------------------------------------------
# A non-loopback address of this machine.

def test_non_loopback_address_refused_when_confined_and_allowed_on_other_ports(shim):
    address = local_address(socket.AF_INET, "192.0.2.1")
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    port, other = free_port(), free_port()
    assert outcome(shim, "4", address, port) == ["ERR", "EADDRNOTAVAIL"]
    assert outcome(shim, "4", address, port, confine_ports=str(port)) == ["ERR",
                                                                          "EADDRNOTAVAIL"]
    with child(shim, "4", address, port, confine_ports=str(other)) as (proc, line):
        assert line == ["LISTEN", address, str(port)]
        assert listening(proc.pid) == [("ipv4", address, port)]


# ---------------------------------------------------------------------------------------------
# PRIVATEKERAS_CONFINE_PORTS names the ports to confine.

def test_only_the_listed_ports_are_confined(shim):
    listed, listed2, unlisted = free_port(), free_port(), free_port()
    ports = "{},{}".format(listed, listed2)
    with child(shim, "4", "0.0.0.0", unlisted, confine_ports=ports) as (proc, line):
        assert line == ["LISTEN", "0.0.0.0", str(unlisted)]
        assert listening(proc.pid) == [("ipv4", "0.0.0.0", unlisted)]
    for port in (listed, listed2):
        with child(shim, "4", "0.0.0.0", port, confine_ports=ports) as (proc, line):
            assert line == ["LISTEN", "127.0.0.1", str(port)]
            assert listening(proc.pid) == [("ipv4", "127.0.0.1", port)]
        assert outcome(shim, "6", "::", port, confine_ports=ports) == ["ERR", "EADDRNOTAVAIL"]


@pytest.mark.parametrize("value", ["abc", "4000,", ",4000", "4000,,4001", "0", "65536",
                                   "40 00", " 4000", "-1", "4000;4001", "+4000",
                                   "99999999999999999999999"])
def test_malformed_confine_ports_aborts(shim, value):
    proc = subprocess.run([sys.executable, "-c", "print('ran')"], env=_env(shim, value),
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=_no_core_dumps)
    assert proc.returncode == -signal.SIGABRT, (proc.returncode, proc.stdout, proc.stderr)
    assert "ran" not in proc.stdout
    assert "malformed PRIVATEKERAS_CONFINE_PORTS" in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------
# privatekeras.deploy.listening.check_confined

def test_check_confined_passes_for_a_loopback_listener():
    from privatekeras.deploy.listening import check_confined

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert check_confined([port]) == [("ipv4", "127.0.0.1", port)]
        assert check_confined(port, pid=os.getpid()) == [("ipv4", "127.0.0.1", port)]


def test_check_confined_raises_for_a_wildcard_listener_without_the_preload():
    from privatekeras.deploy.listening import check_confined
    from privatekeras.errors import ClusterError

    port = free_port()
    with child(None, "4", "0.0.0.0", port) as (proc, line):
        assert line == ["LISTEN", "0.0.0.0", str(port)]
        with pytest.raises(ClusterError, match=r"port {} listens on 0\.0\.0\.0".format(port)):
            check_confined([port], pid=proc.pid)


def test_check_confined_raises_when_nothing_listens():
    from privatekeras.deploy.listening import check_confined
    from privatekeras.errors import ClusterError

    port = free_port()
    with pytest.raises(ClusterError, match="listens on none of the ports"):
        check_confined([port])
    with pytest.raises(ClusterError, match="no ports given"):
        check_confined([])
    with pytest.raises(ClusterError, match="cannot read"):
        check_confined([port], pid=2 ** 22 + 1)  # above Linux's largest pid


def test_listening_sockets_decodes_ipv6_and_ignores_other_states():
    from privatekeras.deploy.listening import listening_sockets

    if not can_bind(socket.AF_INET6, "::1"):
        pytest.skip("no IPv6 loopback here")
    with socket.socket(socket.AF_INET6) as s, socket.socket() as bound_only:
        s.bind(("::1", 0))
        s.listen()
        bound_only.bind(("127.0.0.1", 0))  # bound, not listening: not reported
        mine = listening_sockets()
        assert ("ipv6", "::1", s.getsockname()[1]) in mine
        assert all(port != bound_only.getsockname()[1] for _, _, port in mine)


# ---------------------------------------------------------------------------------------------
# accept(): a connection to a confined port is kept only when the connecting socket belongs to
# the listening process's own (effective) uid.

NOBODY = 65534
# Clients and servers that run as another uid use the system interpreter: any user can run it
# (a virtual environment may sit where nobody cannot read it).
SYSTEM_PYTHON = "/usr/bin/python3"

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="running a process as another uid needs root and /usr/bin/python3")

REFUSED = ("EOF", "RESET")  # what a refused client reads: end of stream or a reset, no data

# argv: family (4/6), address, port, mode. Accepts in a thread and echoes one message per
# connection; prints "LISTEN", then "ACCEPT <peer address> <peer port>" for every connection
# accept returned, and "COUNT <n>" once its stdin closes. Modes: "blocking" (socket.accept,
# i.e. accept4 on a blocking listener), "nonblocking" (a selector loop: accept4 on a
# non-blocking listener until EAGAIN, as gRPC does) and "libc-accept" (libc's accept() called
# as C code calls it).
ECHO_SERVER = r"""
import ctypes, selectors, socket, sys, threading
family, host, port, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(16)
accepted = 0

def echo(conn, peer):
    global accepted
    accepted += 1
    print("ACCEPT", peer[0], peer[1], flush=True)
    with conn:
        conn.settimeout(30)
        conn.sendall(conn.recv(1024))

def blocking():
    while True:
        echo(*s.accept())

def libc_accept():
    libc = ctypes.CDLL(None, use_errno=True)
    while True:
        fd = libc.accept(s.fileno(), None, None)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "accept")
        conn = socket.socket(fileno=fd)
        echo(conn, conn.getpeername())

def nonblocking():
    s.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(s, selectors.EVENT_READ)
    while True:
        selector.select()
        while True:
            try:
                conn, peer = s.accept()
            except BlockingIOError:
                break
            echo(conn, peer)

loops = {"blocking": blocking, "nonblocking": nonblocking, "libc-accept": libc_accept}
threading.Thread(target=loops[mode], daemon=True).start()
print("LISTEN", flush=True)
sys.stdin.read()
print("COUNT", accepted, flush=True)
"""

# argv: address, port, connections. Each connection sends "ping <i>" and prints what came
# back: "ECHO ping <i>", "EOF", "RESET" or "TIMEOUT".
ECHO_CLIENT = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as c:
        c.settimeout(20)
        c.connect((host, port))
        try:
            c.sendall(b"ping %d" % i)
            data = c.recv(1024)
            print("ECHO " + data.decode() if data else "EOF", flush=True)
        except (ConnectionResetError, BrokenPipeError):
            print("RESET", flush=True)
        except socket.timeout:
            print("TIMEOUT", flush=True)
"""


def _as_user(uid):
    """A preexec_fn that makes the child run as ``uid`` (group ``uid``, no supplementary
    groups), without core dumps."""
    def drop():
        _no_core_dumps()
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    return drop


def _interpreter(uid):
    return sys.executable if uid is None else SYSTEM_PYTHON


def _popen(argv, env, uid=None, **kwargs):
    return subprocess.Popen(argv, env=env, cwd="/",
                            preexec_fn=_no_core_dumps if uid is None else _as_user(uid),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def run_client(host, port, uid=None, connections=1):
    """What each of ``connections`` connections of an echo client (run as ``uid``; None: this
    process's uid) read back."""
    proc = subprocess.run([_interpreter(uid), "-c", ECHO_CLIENT, host, str(port),
                           str(connections)], env=_env(None, None), cwd="/",
                          preexec_fn=_no_core_dumps if uid is None else _as_user(uid),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


class EchoServer:
    """An echo server child with the interposer preloaded (``shim``; None: without it)."""

    def __init__(self, shim, family, host, port, mode="blocking", confine_ports=None,
                 uid=None):
        self.port = port
        self.proc = _popen([_interpreter(uid), "-c", ECHO_SERVER, family, host, str(port), mode],
                           _env(shim, confine_ports), uid)
        line = self.proc.stdout.readline().strip()
        if line != "LISTEN":
            self.proc.kill()
            raise AssertionError("echo server did not start ({!r}): {}".format(
                line, self.proc.communicate(timeout=30)[1][-2000:]))

    def finish(self):
        """Stops the server; returns (peers accept returned, count, stderr)."""
        out, err = self.proc.communicate(input="", timeout=60)
        lines = out.splitlines()
        assert lines and lines[-1].startswith("COUNT "), (out, err)
        peers = [line.split()[1:] for line in lines if line.startswith("ACCEPT ")]
        return peers, int(lines[-1].split()[1]), err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@contextlib.contextmanager
def echo_server(*args, **kwargs):
    server = EchoServer(*args, **kwargs)
    try:
        yield server
    finally:
        server.kill()


def refusal_lines(stderr):
    return [line for line in stderr.splitlines()
            if line.startswith("privatekeras pk_loopback.so: refused a connection")]


def refused_for_uid(stderr, port, uid, server_uid=None):
    """The refusal lines that name ``port`` and the connecting ``uid``."""
    server_uid = os.geteuid() if server_uid is None else server_uid
    tail = ": uid {}, not this process's uid {}".format(uid, server_uid)
    return [line for line in refusal_lines(stderr)
            if " to port {} from ".format(port) in line and line.endswith(tail)]


# (server family, server address, client address): IPv4; IPv6 loopback (/proc/net/tcp6); an
# IPv6 listener on the IPv4-mapped loopback with an IPv4 client (the client's socket is in
# /proc/net/tcp, the accepted socket's peer is ::ffff:127.0.0.1); an IPv4 listener with an
# IPv6 client connecting to ::ffff:127.0.0.1 (the client's socket is in /proc/net/tcp6).
ADDRESSES = [("4", "127.0.0.1", "127.0.0.1"), ("6", "::1", "::1"),
             ("6", "::ffff:127.0.0.1", "127.0.0.1"), ("4", "127.0.0.1", "::ffff:127.0.0.1")]
MODES = ["blocking", "nonblocking", "libc-accept"]


def _skip_without(host):
    if ":" in host and not can_bind(socket.AF_INET6, host):
        pytest.skip("cannot bind {} here".format(host))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family,host,client_host", ADDRESSES)
def test_same_user_client_is_served(shim, family, host, client_host, mode):
    _skip_without(host)
    port = free_port()
    with echo_server(shim, family, host, port, mode, confine_ports=str(port)) as server:
        assert run_client(client_host, port, connections=2) == ["ECHO ping 0", "ECHO ping 1"]
        peers, count, err = server.finish()
    assert count == 2 and len(peers) == 2, (peers, err)
    assert refusal_lines(err) == []


@needs_root
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family,host,client_host", ADDRESSES)
def test_other_uid_is_refused_and_the_server_keeps_accepting(shim, family, host, client_host,
                                                             mode):
    _skip_without(host)
    port = free_port()
    with echo_server(shim, family, host, port, mode, confine_ports=str(port)) as server:
        refused = run_client(client_host, port, uid=NOBODY)
        served = run_client(client_host, port)
        peers, count, err = server.finish()
    assert len(refused) == 1 and refused[0] in REFUSED, (refused, err)
    assert served == ["ECHO ping 0"], (served, err)
    # accept never returned nobody's connection: only this user's one was counted
    assert count == 1 and len(peers) == 1, (peers, err)
    assert len(refused_for_uid(err, port, NOBODY)) == 1, err


@needs_root
@pytest.mark.parametrize("confine_ports", [None, ""])
def test_every_port_is_filtered_without_a_port_list(shim, confine_ports):
    port = free_port()
    with echo_server(shim, "4", "127.0.0.1", port, confine_ports=confine_ports) as server:
        assert run_client("127.0.0.1", port, uid=NOBODY)[0] in REFUSED
        assert run_client("127.0.0.1", port) == ["ECHO ping 0"]
        peers, count, err = server.finish()
    assert count == 1, (peers, err)
    assert len(refused_for_uid(err, port, NOBODY)) == 1, err


@needs_root
def test_ports_not_in_the_list_are_not_filtered(shim):
    port, other = free_port(), free_port()
    with echo_server(shim, "4", "127.0.0.1", port, confine_ports=str(other)) as server:
        assert run_client("127.0.0.1", port, uid=NOBODY) == ["ECHO ping 0"]
        peers, count, err = server.finish()
    assert count == 1 and len(peers) == 1, (peers, err)
    assert refusal_lines(err) == []


@needs_root
def test_only_the_first_ten_refusals_are_logged(shim):
    port = free_port()
    with echo_server(shim, "4", "127.0.0.1", port, confine_ports=str(port)) as server:
        outcomes = run_client("127.0.0.1", port, uid=NOBODY, connections=12)
        peers, count, err = server.finish()
    assert len(outcomes) == 12 and all(o in REFUSED for o in outcomes), outcomes
    assert count == 0, (peers, err)
    lines = refusal_lines(err)
    assert len(lines) == 10, err
    assert len(refused_for_uid(err, port, NOBODY)) == 9
    assert lines[-1].endswith(" (further refusals are not logged)"), lines[-1]


@needs_root
def test_root_is_refused_by_a_server_of_another_user(shim):
    """The uids must be equal: root connecting to a worker that runs as nobody is refused."""
    import shutil
    import tempfile

    directory = tempfile.mkdtemp(prefix="pk-loopback-")
    try:
        os.chmod(directory, 0o755)  # the server runs as nobody and must load the library
        copy = os.path.join(directory, "pk_loopback.so")
        shutil.copy(shim, copy)
        os.chmod(copy, 0o755)
        port = free_port()
        with echo_server(copy, "4", "127.0.0.1", port, confine_ports=str(port),
                         uid=NOBODY) as server:
            refused = run_client("127.0.0.1", port)  # as root
            served = run_client("127.0.0.1", port, uid=NOBODY)
            peers, count, err = server.finish()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert refused[0] in REFUSED, (refused, err)
    assert served == ["ECHO ping 0"], (served, err)
    assert count == 1, (peers, err)
    assert len(refused_for_uid(err, port, os.geteuid(), server_uid=NOBODY)) == 1, err


def test_a_connection_whose_client_is_gone_is_refused(shim):
    """Fail closed: when the connecting socket is no longer in /proc/net/tcp (its owner closed
    it before the server accepted), its owner is unknown and the connection is refused, even
    though it came from this user."""
    port = free_port()
    with echo_server(shim, "4", "127.0.0.1", port, confine_ports=str(port)) as server:
        os.kill(server.proc.pid, signal.SIGSTOP)  # the connection waits in the backlog
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.sendall(b"gone")
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert run_client("127.0.0.1", port) == ["ECHO ping 0"]
        peers, count, err = server.finish()
    assert count == 1, (peers, err)
    unknown = [line for line in refusal_lines(err)
               if line.endswith("no open socket with that address in /proc/self/net/tcp or "
                                "tcp6 (uid unknown)")]
    assert len(unknown) == 1, err


# ---------------------------------------------------------------------------------------------
# A real TensorFlow gRPC server (what a worker runs on its compute port).

TF_SERVER = r"""
import sys
import tensorflow as tf
port = int(sys.argv[1])
cluster = tf.train.ClusterSpec({"pk": ["127.0.0.1:%d" % port]})
server = tf.distribute.Server(cluster, job_name="pk", task_index=0, protocol="grpc", start=True)
print("READY", flush=True)
sys.stdin.read()
"""

# argv: port, [hold]. Sends the HTTP/2 client preface and an empty SETTINGS frame, then prints
# what the server sent first: "SETTINGS" (an HTTP/2 SETTINGS frame), "EOF", "RESET",
# "TIMEOUT" or "OTHER <bytes>". With "hold", prints "CONNECTED" once connected and sends only
# after a line on stdin.
H2_PROBE = r"""
import socket, sys
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
if len(sys.argv) > 2:
    print("CONNECTED", flush=True)
    sys.stdin.readline()
try:
    c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
    head = b""
    while len(head) < 9:
        data = c.recv(9 - len(head))
        if not data:
            break
        head += data
    if not head:
        print("EOF", flush=True)
    elif len(head) == 9 and head[3] == 4:
        print("SETTINGS", flush=True)
    else:
        print("OTHER", head.hex(), flush=True)
except (ConnectionResetError, BrokenPipeError):
    print("RESET", flush=True)
except socket.timeout:
    print("TIMEOUT", flush=True)
"""

# argv: port. An eager client of the server (TensorFlow's own remote execution).
EAGER_CLIENT = r"""
import sys
import tensorflow as tf
tf.config.experimental_connect_to_host("127.0.0.1:" + sys.argv[1], job_name="pk")
with tf.device("/job:pk/replica:0/task:0/device:CPU:0"):
    x = tf.constant([1.0, 2.0, 3.0]) * 2.0
print("RESULT", x.numpy().tolist(), x.device, flush=True)
"""


def h2_probe(port, uid=None):
    proc = subprocess.run([_interpreter(uid), "-c", H2_PROBE, str(port)], env=_env(None, None),
                          cwd="/", preexec_fn=_no_core_dumps if uid is None else _as_user(uid),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@contextlib.contextmanager
def tf_server(shim, port):
    """A TensorFlow gRPC server on ``port`` with the interposer preloaded and confined to that
    port, as a worker runs it; yields the process (its stderr is read after the block)."""
    proc = _popen([sys.executable, "-c", TF_SERVER, str(port)], _env(shim, str(port)))
    try:
        line = proc.stdout.readline().strip()
        if line != "READY":
            proc.kill()
            raise AssertionError("TensorFlow server did not start ({!r}): {}".format(
                line, proc.communicate(timeout=60)[1][-3000:]))
        yield proc
    finally:
        if proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.stderr_text = proc.stderr.read()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            stream.close()


@needs_root
def test_tensorflow_server_serves_its_user_and_refuses_another_uid(shim):
    port = free_port()
    with tf_server(shim, port) as server:
        assert h2_probe(port) == "SETTINGS"
        eager = subprocess.run([sys.executable, "-c", EAGER_CLIENT, str(port)],
                               env=_env(None, None), capture_output=True, text=True,
                               timeout=300)
        assert eager.returncode == 0, eager.stderr[-3000:]
        assert "RESULT [2.0, 4.0, 6.0] /job:pk/replica:0/task:0/device:CPU:0" in eager.stdout
        refused = h2_probe(port, uid=NOBODY)
        assert h2_probe(port) == "SETTINGS"  # still serving after the refusal
    assert refused in REFUSED, (refused, server.stderr_text[-3000:])
    assert len(refused_for_uid(server.stderr_text, port, NOBODY)) == 1, server.stderr_text


@needs_root
def test_tensorflow_server_serves_a_connection_queued_behind_a_refused_one(shim):
    """gRPC accepts on a non-blocking, edge-triggered listener until EAGAIN. The refused
    connection must not hide the ones queued behind it (it would, if accept failed with
    ECONNABORTED: gRPC then waits for the next new connection)."""
    port = free_port()
    with tf_server(shim, port) as server:
        os.kill(server.pid, signal.SIGSTOP)  # both connections wait in the backlog, in order
        try:
            other = _popen([SYSTEM_PYTHON, "-c", H2_PROBE, str(port), "hold"],
                           _env(None, None), NOBODY)
            assert other.stdout.readline().strip() == "CONNECTED"
            mine = _popen([sys.executable, "-c", H2_PROBE, str(port), "hold"],
                          _env(None, None))
            assert mine.stdout.readline().strip() == "CONNECTED"
        finally:
            os.kill(server.pid, signal.SIGCONT)
        mine_out = mine.communicate(input="\n", timeout=60)[0].strip()
        other_out = other.communicate(input="\n", timeout=60)[0].strip()
    assert mine_out == "SETTINGS", (mine_out, server.stderr_text[-3000:])
    assert other_out in REFUSED, (other_out, server.stderr_text[-3000:])
    assert len(refused_for_uid(server.stderr_text, port, NOBODY)) == 1, server.stderr_text
