"""Separate "hosts" on one machine: Linux network namespaces joined by a private bridge.

Each host is a network namespace with its own loopback and one veth link (``eth0``) into a
hub namespace that holds the bridge, so nothing is added to the machine's own network
namespace. Names carry this process's PID, and :meth:`Net.close` ends every process started
in the hosts and deletes the namespaces.
"""

import os
import signal
import subprocess
import time

SUBNET = "10.231.0"


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


class Net:
    """A hub namespace with a bridge, and one namespace per host with an address on it."""

    def __init__(self, hosts):
        """``hosts``: {short name: last octet of its address in 10.231.0.0/24}."""
        self.prefix = "pk{}".format(os.getpid())
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
