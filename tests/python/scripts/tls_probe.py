"""Knock on a worker's stunnel link: TLS 1.3 with a given certificate (or none), or plain TCP.

Sends the HTTP/2 client preface and an empty SETTINGS frame, as TensorFlow's gRPC client
would, and reads what comes back. Prints JSON: ``ok`` (the reply starts with an HTTP/2
SETTINGS frame, i.e. the link let us through to the worker's TensorFlow server), TLS version,
the reply's first bytes (hex) and any error.
"""
import argparse
import json
import socket
import ssl

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"

p = argparse.ArgumentParser()
p.add_argument("--address", required=True)
p.add_argument("--ca", required=True)
p.add_argument("--cert")
p.add_argument("--key")
p.add_argument("--server-name", default="worker")
p.add_argument("--plain", action="store_true", help="no TLS: send the preface in clear")
p.add_argument("--tls12", action="store_true", help="offer TLS 1.2 only")
a = p.parse_args()
host, port = a.address.rsplit(":", 1)
out = {"ok": False, "reply": ""}
try:
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.settimeout(10)
    if not a.plain:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if a.tls12:
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        else:
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(a.ca)
        if a.cert:
            ctx.load_cert_chain(a.cert, a.key)
        sock = ctx.wrap_socket(sock, server_hostname=a.server_name)
        out["version"] = sock.version()
    sock.sendall(PREFACE)
    reply = b""
    while len(reply) < 9:
        chunk = sock.recv(9 - len(reply))
        if not chunk:
            break
        reply += chunk
    out["reply"] = reply.hex()
    out["ok"] = len(reply) == 9 and reply[3] == 0x04  # frame type 4: SETTINGS
except (OSError, ssl.SSLError) as exc:
    out["error"] = "{}: {}".format(type(exc).__name__, exc)
print(json.dumps(out), flush=True)
