"""Separate "hosts" on one machine: Linux network namespaces joined by a private bridge.

Each host is a network namespace with its own loopback and one veth link (``eth0``) into a
hub namespace that holds the bridge, so nothing is added to the machine's own network
namespace. Names carry this process's PID (and a counter, so two nets of one process never
clash), and :meth:`Net.close` ends every process started in the hosts and deletes the
namespaces.

Also here: :meth:`Net.listening` (what listens in a host, read with ``ss -ltn``),
:class:`Lines` (a process in a host whose output lines are time-stamped as they arrive) and
:func:`stunnel_unavailable`.
"""

import ipaddress
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time

SUBNET = "10.231.0"
_counter = itertools.count()


def _ip(*args, check=True):
    proc = subprocess.run(["ip"] + list(args), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError("ip {} failed: {}".format(" ".join(args), proc.stderr.strip()))
    return proc


def netns_unavailable():
    """None when network namespaces can be created here, else the reason."""
    name = "pkprobe{}".format(os.getpid())
    try:
        proc = _ip("netns", "add", name, check=False)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if proc.returncode != 0:
        return "cannot create a network namespace: {}".format(proc.stderr.strip())
    _ip("netns", "del", name, check=False)
    return None


def stunnel_unavailable():
    """None when Debian's stunnel4 (or stunnel) is installed, else the reason."""
    if shutil.which("stunnel4") or shutil.which("stunnel") or \
            os.path.exists("/usr/bin/stunnel4"):
        return None
    return "stunnel4 is not installed (apt-get install stunnel4)"


def is_loopback(address):
    """True for a listening address (as ``ss`` prints it, port stripped) on loopback only:
    127.0.0.0/8, ::1 or an IPv4-mapped loopback address. Wildcards are not loopback."""
    host = address.strip("[]").split("%", 1)[0]
    if host == "*":
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if getattr(ip, "ipv4_mapped", None) is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def parse_ss(text):
    """``[(address, port)]`` of the listening TCP sockets in ``ss -Hltn`` output; addresses as
    ``ss`` prints them without brackets (``127.0.0.1``, ``::ffff:10.0.0.1``, ``*``, ``::``)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] != "LISTEN":
            continue
        host, _, port = fields[3].rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return sorted(out)


class Net:
    """A hub namespace with a bridge, and one namespace per host with an address on it."""

    def __init__(self, hosts):
        """``hosts``: {short name: last octet of its address in 10.231.0.0/24}."""
        n = next(_counter)
        self.prefix = "pk{}".format(os.getpid()) + ("" if n == 0 else "n{}".format(n))
        self.hub = self.prefix + "hub"
        self.addresses = {}
        self.namespaces = []
        self.procs = []
        try:
            self._add(self.hub)
            _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.hub, "link", "set", "br0", "up")
            for host, octet in hosts.items():
                ns = self.ns(host)
                self._add(ns)
                veth = "h" + host
                _ip("-n", self.hub, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                    "netns", ns)
                _ip("-n", self.hub, "link", "set", veth, "master", "br0", "up")
                address = "{}.{}".format(SUBNET, octet)
                _ip("-n", ns, "addr", "add", address + "/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.addresses[host] = address
        except BaseException:
            self.close()
            raise

    def _add(self, ns):
        _ip("netns", "add", ns)
        self.namespaces.append(ns)

    def ns(self, host):
        """The namespace name of ``host``."""
        return self.prefix + host

    def popen(self, host, cmd, env, **kwargs):
        """Start ``cmd`` inside ``host``'s namespace (``ip netns exec`` keeps the PID)."""
        ns = self.hub if host == "hub" else self.ns(host)
        proc = subprocess.Popen(["ip", "netns", "exec", ns] + list(cmd), env=env, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host, cmd, env, timeout=120):
        """Run ``cmd`` to completion inside ``host``'s namespace; returns CompletedProcess."""
        ns = self.hub if host == "hub" else self.ns(host)
        return subprocess.run(["ip", "netns", "exec", ns] + list(cmd), env=env, timeout=timeout,
                              capture_output=True, text=True)

    def listening(self, host):
        """The listening TCP sockets in ``host``'s namespace, ``[(address, port)]``, read with
        ``ss -Hltn`` (IPv4 and IPv6, whichever process owns them)."""
        ns = self.hub if host == "hub" else self.ns(host)
        proc = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn"], capture_output=True,
                              text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError("ss -Hltn in {} failed: {}".format(ns, proc.stderr.strip()))
        return parse_ss(proc.stdout)

    def lines(self, host, cmd, env, **kwargs):
        """Start ``cmd`` in ``host``'s namespace as a :class:`Lines` (stdin is a pipe)."""
        return Lines(self.popen(host, cmd, env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **kwargs))

    def close(self):
        """End our processes (by PID), then any left in our namespaces, then delete them."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in self.namespaces:
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only processes living in this run's own namespaces
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        self.namespaces = []


class Lines:
    """A process whose output lines are collected with their arrival time (``clock()``, by
    default ``time.monotonic``), so a test can wait for a line and measure when it came."""

    def __init__(self, proc, clock=time.monotonic):
        self.p, self.clock = proc, clock
        self.lines = []  # (clock(), line)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append((self.clock(), line.rstrip("\n")))

    @property
    def output(self):
        return "\n".join(line for _, line in self.lines)

    def text(self, tail=3000):
        """The last ``tail`` characters of the output."""
        return self.output[-tail:]

    def find(self, prefix):
        """(arrival time, line) of the first line starting with ``prefix``, or None."""
        return next(((t, line) for t, line in list(self.lines) if line.startswith(prefix)),
                    None)

    def join(self, timeout=None):
        """Wait for the output to end (the process closed it)."""
        self._reader.join(timeout)

    def first(self, prefix):
        """The first line starting with ``prefix``, or None."""
        found = self.find(prefix)
        return found and found[1]

    def wait_for(self, prefix, timeout):
        """(arrival time, line) of the first line starting with ``prefix``, waiting up to
        ``timeout`` s; AssertionError with the output so far if it does not come."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(prefix)
            if found:
                return found
            if self.p.poll() is not None:
                self._reader.join(5)
                found = self.find(prefix)
                if found:
                    return found
                raise AssertionError("{} exited with {} before a {!r} line:\n{}".format(
                    self.p.args, self.p.returncode, prefix, self.output[-6000:]))
            if time.monotonic() > deadline:
                raise AssertionError("no {!r} line from {} after {} s:\n{}".format(
                    prefix, self.p.args, timeout, self.output[-6000:]))
            time.sleep(0.05)

    def send(self, text):
        """Write a line to the process's stdin."""
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def finish(self, timeout):
        """Wait for the process to exit (close its stdin first); returns its exit code."""
        try:
            self.p.stdin.close()
        except OSError:
            pass
        rc = self.p.wait(timeout)
        self._reader.join(5)
        return rc


# -- a cluster on five hosts: three workers, the model owner and a client ---------------------
# (the multi-host test and bench/netns.py use the same layout)
CLUSTER_HOSTS = {"w0": 1, "w1": 2, "w2": 3, "own": 10, "cli": 11}  # last octets
WORKERS = ("w0", "w1", "w2")
NAMES = {"w0": "worker0", "w1": "worker1", "w2": "worker2", "own": "owner", "cli": "alice"}
API_PORT, LINK_PORT = 5000, 7000
COMPUTE = {"w0": 4000, "w1": 4002, "w2": 4004}
MESH = {h: p + 1 for h, p in COMPUTE.items()}  # the default mesh_port: compute_port + 1


def hosts_toml(addresses):
    """The hosts file of that cluster, given each worker host's address."""
    lines = ["[cluster]", 'ca = "pki/ca.crt"', ""]
    for host in WORKERS:
        lines += ["[[workers]]", 'name = "{}"'.format(NAMES[host]),
                  'api = "{}:{}"'.format(addresses[host], API_PORT),
                  'link = "{}:{}"'.format(addresses[host], LINK_PORT),
                  "compute_port = {}".format(COMPUTE[host]), ""]
    lines += ["[owner]", 'name = "owner"', "", "[[clients]]", 'name = "alice"', ""]
    return "\n".join(lines)
