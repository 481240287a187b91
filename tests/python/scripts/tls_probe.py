"""Try a TLS 1.3 connection to a privatekeras tunnel with a given certificate (or none).

Prints JSON: ok (the tunnel answered its status byte), TLS version and cipher, or the error.
"""
import argparse
import json
import socket
import ssl

p = argparse.ArgumentParser()
p.add_argument("--address", required=True)
p.add_argument("--ca", required=True)
p.add_argument("--cert")
p.add_argument("--key")
p.add_argument("--plain", action="store_true", help="no TLS: send HTTP/2 preface bytes")
a = p.parse_args()
host, port = a.address.rsplit(":", 1)
out = {"ok": False}
try:
    raw = socket.create_connection((host, int(port)), timeout=10)
    raw.settimeout(10)
    if a.plain:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        out["reply"] = raw.recv(100).hex()
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(a.ca)
        if a.cert:
            ctx.load_cert_chain(a.cert, a.key)
        s = ctx.wrap_socket(raw, server_hostname="worker")
        out["version"], out["cipher"] = s.version(), s.cipher()[0]
        s.sendall(b"P")  # a probe: the tunnel answers one status byte if it accepts us
        reply = s.recv(1)
        out["ok"] = reply == b"\x01"
        out["reply"] = reply.hex()
except (OSError, ssl.SSLError) as exc:
    out["error"] = "{}: {}".format(type(exc).__name__, exc)
print(json.dumps(out), flush=True)
