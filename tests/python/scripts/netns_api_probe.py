"""Call Status on workers' APIs with given credentials, or none, or over plain TCP.

Takes one JSON argument: a list of attempts ``{"address", "worker" (the name its certificate
must carry), "ca", "cert", "key" (optional), "plain" (optional: plain TCP)}``. Prints one JSON
list, per attempt: ``ok``, the gRPC status code, the seconds the call took, and the
privatekeras exception the library would raise for it (``wire.translate``).
"""
import json
import sys
import time

import grpc

from privatekeras import wire

TIMEOUT = 10.0


def read(path):
    with open(path, "rb") as f:
        return f.read()


def attempt(a):
    if a.get("plain"):
        chan = grpc.insecure_channel(a["address"], options=[("grpc.enable_retries", 0)])
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(a["ca"]),
            private_key=read(a["key"]) if a.get("key") else None,
            certificate_chain=read(a["cert"]) if a.get("cert") else None)
        chan = grpc.secure_channel(a["address"], creds,
                                   options=[("grpc.ssl_target_name_override", a["worker"]),
                                            ("grpc.enable_retries", 0)])
    out = {"ok": False}
    t = time.monotonic()
    try:
        board = wire.Stub(chan).Status(wire.M.Empty(), timeout=TIMEOUT)
        out.update(ok=True, code="OK", state=board.state)
    except grpc.RpcError as exc:
        err = wire.translate(exc, a["worker"])
        out.update(code=exc.code().name, details=exc.details(), raises=type(err).__name__,
                   message=str(err))
    out["seconds"] = round(time.monotonic() - t, 3)
    chan.close()
    return out


print(json.dumps([attempt(a) for a in json.loads(sys.argv[1])]), flush=True)
