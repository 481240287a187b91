"""Listening TCP sockets of the current network namespace (for the tunnel tests)."""


def listening():
    """This network namespace's listening IPv4 TCP sockets, as 'ip:port' (/proc/net/tcp)."""
    out = []
    with open("/proc/self/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                ip, port = fields[1].split(":")
                ip = ".".join(str(int(ip[i:i + 2], 16)) for i in (6, 4, 2, 0))
                out.append("{}:{}".format(ip, int(port, 16)))
    return sorted(out)
