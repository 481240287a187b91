"""Capture TCP payloads in this network namespace (AF_PACKET) until stdin closes.

Run inside a namespace (``ip netns exec NS python capture.py [IFACE]``); prints ``CAPTURING``
once the socket is open, then, when stdin closes, one JSON summary:

- ``packets``, ``payload_bytes``: TCP segments with a payload (IPv4 and IPv6) and their bytes;
- ``ports``: payload bytes per TCP port (both ends of each segment counted);
- ``markers``: how often each plaintext marker occurs in any payload. TensorFlow's
  worker-to-worker gRPC shows ``/job:``, ``EagerService``, ``tensorflow``, ``device:CPU``;
  ``PRI * HTTP/2.0`` is the preface that opens every plaintext HTTP/2 connection (TensorFlow's
  gRPC, or an API without TLS); ``privatekeras`` names our service and modules; the mesh's
  links show their frames' header (magic ``PKM1`` and an int64 dtype) and their notes
  (``{"go":``, ``{"arrived":"``) once past their TLS handshake. None of them can occur in TLS
  records (but by a chance of about 2^-48 per byte position);
- ``tls_app_records`` / ``tls_handshake_records``: payloads that start like a TLS
  application-data / handshake record.
"""
import json
import select
import socket
import struct
import sys

MARKERS = [b"/job:", b"EagerService", b"tensorflow", b"privatekeras", b"device:CPU",
           b"PRI * HTTP/2.0", b"PKM1\x09\x00\x00\x00", b'{"go":', b'{"arrived":"']
ETH_IPV4, ETH_IPV6, TCP = b"\x08\x00", b"\x86\xdd", 6


def tcp_segment(frame):
    """The TCP segment carried by an Ethernet frame (IPv4, or IPv6 without extension
    headers), or None."""
    kind, ip = frame[12:14], frame[14:]
    if kind == ETH_IPV4 and len(ip) >= 20:
        if ip[9] != TCP:
            return None
        total = struct.unpack("!H", ip[2:4])[0]
        return ip[(ip[0] & 15) * 4:total]
    if kind == ETH_IPV6 and len(ip) >= 40:
        if ip[6] != TCP:
            return None
        return ip[40:40 + struct.unpack("!H", ip[4:6])[0]]
    return None


def main():
    iface = sys.argv[1] if len(sys.argv) > 1 else None
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    if iface:
        sock.bind((iface, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    print("CAPTURING", flush=True)
    ports, markers = {}, {m.decode(): 0 for m in MARKERS}
    summary = {"packets": 0, "payload_bytes": 0, "tls_app_records": 0,
               "tls_handshake_records": 0}
    while True:
        ready, _, _ = select.select([sock, sys.stdin], [], [])
        if sys.stdin in ready and not sys.stdin.buffer.read1(1):
            break
        if sock not in ready:
            continue
        tcp = tcp_segment(sock.recv(65600))
        if tcp is None or len(tcp) < 20:
            continue
        sport, dport = struct.unpack("!HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4:]
        if not payload:
            continue
        summary["packets"] += 1
        summary["payload_bytes"] += len(payload)
        for port in (sport, dport):
            ports[port] = ports.get(port, 0) + len(payload)
        for m in MARKERS:
            markers[m.decode()] += payload.count(m)
        if payload[:3] == b"\x17\x03\x03":
            summary["tls_app_records"] += 1
        elif payload[:2] == b"\x16\x03":
            summary["tls_handshake_records"] += 1
    summary.update(ports=ports, markers=markers)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
