"""Which TCP sockets a process listens on, read from Linux's /proc, and a check that the
ones on given ports are confined to loopback.

A socket is owned by a process when one of the entries of ``/proc/<pid>/fd`` is a link to
``socket:[<inode>]``; its address and state come from the line with that inode in
``/proc/<pid>/net/tcp`` (IPv4) or ``/proc/<pid>/net/tcp6`` (IPv6), which list the sockets
of the process's network namespace. There the local address is hexadecimal, as the kernel's
32-bit words printed in host byte order (little-endian on x86: ``0100007F`` is 127.0.0.1),
the port is hexadecimal in host order, and state ``0A`` is LISTEN.
"""

import ipaddress
import numbers
import os
import socket
import struct

from ..errors import ClusterError

_TCP_LISTEN = "0A"
_TABLES = (("ipv4", "tcp", socket.AF_INET), ("ipv6", "tcp6", socket.AF_INET6))


def _socket_inodes(pid):
    """The inodes of the sockets among the open file descriptors of process ``pid``."""
    fd_dir = "/proc/{}/fd".format(pid)
    inodes = set()
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:  # closed since listdir
            continue
        if target.startswith("socket:[") and target.endswith("]"):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def _decode_address(hex_address, family):
    """The text form of an address as /proc/net/tcp{,6} prints it (32-bit words in host
    order)."""
    words = [int(hex_address[i:i + 8], 16) for i in range(0, len(hex_address), 8)]
    raw = b"".join(struct.pack("=I", w) for w in words)
    return socket.inet_ntop(family, raw)


def listening_sockets(pid=None):
    """The TCP sockets in LISTEN state owned by process ``pid`` (default: this process).

    Returns a list of ``(family, address, port)`` tuples, family ``"ipv4"`` or ``"ipv6"``,
    the address as text (``"127.0.0.1"``, ``"::"``, ``"::ffff:127.0.0.1"``), sorted by port,
    family and address. Raises ``FileNotFoundError`` when there is no such process and
    ``PermissionError`` when its file descriptors cannot be read.
    """
    pid = os.getpid() if pid is None else int(pid)
    inodes = _socket_inodes(pid)
    found = set()
    for family, table, af in _TABLES:
        try:
            with open("/proc/{}/net/{}".format(pid, table)) as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:  # e.g. no IPv6 in this kernel
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN or int(fields[9]) not in inodes:
                continue
            hex_address, hex_port = fields[1].split(":")
            found.add((family, _decode_address(hex_address, af), int(hex_port, 16)))
    return sorted(found, key=lambda s: (s[2], s[0], s[1]))


def is_loopback(family, address):
    """True for 127.0.0.0/8, ::1 and the IPv4-mapped ::ffff:127.0.0.0/104."""
    ip = ipaddress.ip_address(address)
    if family == "ipv6" and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_confined(ports, pid=None):
    """Check that process ``pid`` (default: this one) listens on ``ports`` on loopback only.

    ``ports`` is a port number or an iterable of them. Raises
    :class:`privatekeras.errors.ClusterError`, naming the port and address, when a listening
    socket on one of ``ports`` has an address other than 127.0.0.0/8, ::1 or
    ::ffff:127.0.0.0/104; also when none of ``ports`` is listening at all (a check of
    nothing does not pass), when ``ports`` is empty, or when the process's sockets cannot be
    read. Otherwise returns the list of ``(family, address, port)`` it checked.
    """
    wanted = {int(ports)} if isinstance(ports, numbers.Integral) else {int(p) for p in ports}
    who = "process {}".format(os.getpid() if pid is None else pid)
    if not wanted:
        raise ClusterError("check_confined: no ports given for {}, so nothing would be "
                           "checked".format(who))
    try:
        sockets = listening_sockets(pid)
    except OSError as exc:
        raise ClusterError("cannot read the listening sockets of {}: {}".format(who, exc)) from exc
    checked = [s for s in sockets if s[2] in wanted]
    if not checked:
        raise ClusterError(
            "{} listens on none of the ports {}: nothing to check (is it running, and is this "
            "the right process?)".format(who, sorted(wanted)))
    exposed = [s for s in checked if not is_loopback(s[0], s[1])]
    if exposed:
        raise ClusterError(
            "{} is not confined to loopback: {}. Anyone who reaches these addresses can "
            "connect; start it with the bind() interposer pk_loopback.so preloaded (see "
            "privatekeras.deploy.confine)".format(
                who, "; ".join("port {} listens on {} ({})".format(port, address, family)
                               for family, address, port in exposed)))
    return checked
