"""Capture TCP payloads in this network namespace (AF_PACKET) until stdin closes.

Run inside a namespace (``ip netns exec NS python capture.py [IFACE]``); prints one JSON
summary: payload bytes and packets per TCP port, how often each plaintext marker occurs in
any payload, and how many payloads start like a TLS application-data record.
"""
import json
import select
import socket
import struct
import sys

MARKERS = [b"/job:", b"EagerService", b"tensorflow", b"privatekeras", b"device:CPU"]
iface = sys.argv[1] if len(sys.argv) > 1 else None
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
if iface:
    sock.bind((iface, 0))
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
print("CAPTURING", flush=True)
ports, markers, tls_app, payload_bytes, packets = {}, {m.decode(): 0 for m in MARKERS}, 0, 0, 0
while True:
    ready, _, _ = select.select([sock, sys.stdin], [], [])
    if sys.stdin in ready and not sys.stdin.buffer.read1(1):
        break
    if sock not in ready:
        continue
    frame = sock.recv(65600)
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":  # IPv4 only
        continue
    ip = frame[14:]
    ihl = (ip[0] & 15) * 4
    if ip[9] != 6:  # TCP
        continue
    total = struct.unpack("!H", ip[2:4])[0]
    tcp = ip[ihl:total]
    sport, dport = struct.unpack("!HH", tcp[:4])
    payload = tcp[(tcp[12] >> 4) * 4:]
    if not payload:
        continue
    packets += 1
    payload_bytes += len(payload)
    for port in (sport, dport):
        ports[port] = ports.get(port, 0) + len(payload)
    for m in MARKERS:
        markers[m.decode()] += payload.count(m)
    if payload[:3] == b"\x17\x03\x03":
        tls_app += 1
print(json.dumps({"packets": packets, "payload_bytes": payload_bytes, "ports": ports,
                  "markers": markers, "tls_app_records": tls_app}), flush=True)
