"""Bytes on the wire between processes, read from the OS with ``ss`` (iproute2).

``ss -tinpeHO`` lists every established TCP socket on the machine with its owning process, its
inode and the kernel's counters; ``bytes_acked`` is how many bytes that socket has sent and had
acknowledged. A snapshot maps each socket owned by a process we care about to its counter;
the difference of two snapshots, summed over sockets, is the traffic in between. Sockets that
appear only in the second snapshot count from zero.

Worker processes are recognised by their command line: ``python -m privatekeras worker ...``
(this release) or ``python -m privatekeras.worker ...`` (the previous one). A worker of this
release names the three compute ports (its TensorFlow server and its peers') after
``--compute`` and the three mesh ports (the links that carry the protocol's messages) after
``--mesh``; the private step's traffic is what the workers send each other on those ports.
"""

import os
import re
import subprocess

_PID = re.compile(r"pid=(\d+)")
_ACKED = re.compile(r"\bbytes_acked:(\d+)")
_INO = re.compile(r"\bino:(\d+)")


def _endpoint(text):
    """'127.0.0.1:4000', '[::1]:4000', '[::ffff:127.0.0.1]:4000' -> ('127.0.0.1', 4000)."""
    addr, _, port = text.rpartition(":")
    addr = addr.strip("[]")
    if addr.startswith("::ffff:"):
        addr = addr[len("::ffff:"):]
    if addr.endswith("%lo"):
        addr = addr[:-3]
    return addr, int(port)


def is_worker_cmdline(args):
    """True for a worker process's argument list (``/proc/PID/cmdline`` split at NULs):
    ``privatekeras`` followed by ``worker`` (this release) or ``privatekeras.worker``."""
    args = [a.decode(errors="replace") if isinstance(a, bytes) else a for a in args]
    for i, arg in enumerate(args):
        if arg == "privatekeras.worker":
            return True
        if arg == "privatekeras" and i + 1 < len(args) and args[i + 1] == "worker":
            return True
    return False


def compute_ports(args):
    """The worker-to-worker ports named after ``--compute`` and ``--mesh`` in a worker's
    argument list (empty when there are none, as in the previous release)."""
    args = [a.decode(errors="replace") if isinstance(a, bytes) else a for a in args]
    ports = set()
    for i, arg in enumerate(args):
        value = None
        if arg in ("--compute", "--mesh") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(("--compute=", "--mesh=")):
            value = arg.split("=", 1)[1]
        if value:
            for address in value.split(","):
                try:
                    ports.add(_endpoint(address.strip())[1])
                except ValueError:
                    pass
    return ports


def cmdline(pid):
    """A process's argument list, or None when it is gone."""
    try:
        with open("/proc/{}/cmdline".format(pid), "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return None


def socket_inodes(pid):
    """Inodes of the sockets a process holds open (from /proc/PID/fd), or an empty set."""
    inodes = set()
    base = "/proc/{}/fd".format(pid)
    try:
        names = os.listdir(base)
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(os.path.join(base, name))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def snapshot(pids=()):
    """All established TCP sockets: {(local, peer): (pids, bytes_acked)}.

    A socket's owners are what ``ss -p`` says plus, for the processes in ``pids``, what
    their /proc/PID/fd say (matched by inode), so our own processes' sockets are attributed
    even when ``ss`` names no process for them."""
    owners = {}
    for pid in pids:
        for inode in socket_inodes(pid):
            owners.setdefault(inode, set()).add(pid)
    out = subprocess.run(["ss", "-tinpeHO", "state", "established"], check=True,
                         capture_output=True, text=True).stdout
    sockets = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        # With a state filter ss omits the State column: Recv-Q Send-Q Local Peer ...
        try:
            local, peer = _endpoint(fields[2]), _endpoint(fields[3])
        except ValueError:
            continue
        acked = _ACKED.search(line)
        inode = _INO.search(line)
        found = {int(p) for p in _PID.findall(line)}
        if inode:
            found |= owners.get(int(inode.group(1)), set())
        sockets[(local, peer)] = (frozenset(found), int(acked.group(1)) if acked else 0)
    return sockets


def traffic(before, after, workers, compute=None, detail=None):
    """Bytes sent between worker processes, and between workers and any other process.

    Args:
        before, after: two :func:`snapshot` results.
        workers: PIDs of the three worker processes.
        compute: the workers' compute ports (this release), or None: then every connection
            between two worker processes counts as the private step's traffic (the
            previous release had no other).
    Returns:
        a dict of byte counts, each socket's sent bytes counted once at its sender, both
        directions included:

        - ``between_workers``: between two different worker processes, on a compute port
          (the private step);
        - ``workers_control``: between two different worker processes on any other port
          (this release: the workers' own API calls, e.g. "arrived" and "done" notes);
        - ``with_others``: between a worker and any other process: the model owner and the
          client (on loopback both ends of their connections to our workers are visible);
        - ``within_worker``: a worker process talking to itself (not reported).

        ``detail``, a list, receives one ``[local, peer, pids, peer's pids, bytes, kind]``
        per socket that sent anything (for the logs).
    """
    owner_of = {key[0]: pids for key, (pids, _) in after.items()}
    out = {"between_workers": 0, "workers_control": 0, "with_others": 0, "within_worker": 0}
    for (local, peer), (pids, acked) in after.items():
        old = before.get((local, peer), (None, 0))[1]
        sent = acked - old if acked >= old else acked  # a new socket on a reused port
        mine = pids & workers
        theirs = owner_of.get(peer, frozenset()) & workers
        kind = None
        if mine and theirs:
            if mine == theirs:
                kind = "within_worker"
            elif compute is None or local[1] in compute or peer[1] in compute:
                kind = "between_workers"
            else:
                kind = "workers_control"
        elif mine or theirs:
            kind = "with_others"
        if kind is not None:
            out[kind] += sent
        if detail is not None and sent:
            detail.append(["{}:{}".format(*local), "{}:{}".format(*peer), sorted(pids),
                           sorted(owner_of.get(peer, ())), sent, kind])
    return out
