"""Bytes on the wire between processes, read from the OS with ``ss`` (iproute2).

``ss -tinpHO`` lists every established TCP socket on the machine with its owning process and
the kernel's counters; ``bytes_acked`` is how many bytes that socket has sent and had
acknowledged. A snapshot maps each socket owned by a process we care about to its counter;
the difference of two snapshots, summed over sockets, is the traffic in between. Sockets that
appear only in the second snapshot count from zero.
"""

import re
import subprocess

_PID = re.compile(r"pid=(\d+)")
_ACKED = re.compile(r"\bbytes_acked:(\d+)")


def _endpoint(text):
    """'127.0.0.1:4000', '[::1]:4000', '[::ffff:127.0.0.1]:4000' -> ('127.0.0.1', 4000)."""
    addr, _, port = text.rpartition(":")
    addr = addr.strip("[]")
    if addr.startswith("::ffff:"):
        addr = addr[len("::ffff:"):]
    if addr.endswith("%lo"):
        addr = addr[:-3]
    return addr, int(port)


def snapshot():
    """All established TCP sockets: {(local, peer): (pids, bytes_acked)}."""
    out = subprocess.run(["ss", "-tinpHO", "state", "established"], check=True,
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
        pids = frozenset(int(p) for p in _PID.findall(line))
        sockets[(local, peer)] = (pids, int(acked.group(1)) if acked else 0)
    return sockets


def traffic(before, after, workers):
    """Bytes sent between worker processes, and between workers and any other process.

    Args:
        before, after: two :func:`snapshot` results.
        workers: PIDs of the three worker processes.
    Returns:
        ``(between_workers, with_others)``: each socket's sent bytes counted once, both
        directions included. "Others" are the model owner and the client: on loopback both
        ends of their connections to our workers are visible.
    """
    owner_of = {key[0]: pids for key, (pids, _) in after.items()}
    between, with_others = 0, 0
    for (local, peer), (pids, acked) in after.items():
        old = before.get((local, peer), (None, 0))[1]
        sent = acked - old if acked >= old else acked  # a new socket on a reused port
        mine, theirs = bool(pids & workers), bool(owner_of.get(peer, frozenset()) & workers)
        if mine and theirs:
            between += sent
        elif mine or theirs:
            with_others += sent
    return between, with_others
