"""The loopback bind() interposer (pk_loopback.so) fails closed, and
privatekeras.deploy.listening reads what a process really listens on.

Each case starts a small Python child with the interposer in LD_PRELOAD; the child binds one
TCP socket, listens, reports the outcome on stdout and then waits for its stdin to close, so
that the test can look at the child's sockets in /proc while it still holds them."""

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
