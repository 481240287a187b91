"""Listening TCP sockets of the current network namespace (for the multi-host tests)."""


def _listening(table, decode):
    out = []
    try:
        with open(table) as f:
            rows = f.readlines()[1:]
    except FileNotFoundError:  # no IPv6 in this kernel
        return out
    for line in rows:
        fields = line.split()
        if fields[3] == "0A":  # TCP_LISTEN
            ip, port = fields[1].split(":")
            out.append("{}:{}".format(decode(ip), int(port, 16)))
    return sorted(out)


def listening():
    """This network namespace's listening IPv4 TCP sockets, as 'ip:port' (/proc/net/tcp)."""
    return _listening("/proc/self/net/tcp",
                      lambda ip: ".".join(str(int(ip[i:i + 2], 16)) for i in (6, 4, 2, 0)))


def listening6():
    """This network namespace's listening IPv6 TCP sockets, as '[ip]:port' (/proc/net/tcp6)."""
    import ipaddress
    import struct

    def decode(ip):
        words = struct.unpack("<4I", bytes.fromhex(ip))  # four host-order 32-bit words
        return "[{}]".format(ipaddress.IPv6Address(struct.pack(">4I", *words)))

    return _listening("/proc/self/net/tcp6", decode)
