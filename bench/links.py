"""Latency of the workers' links: a 64-byte ping-pong between two worker hosts.

Needs root, `ip netns` and stunnel4. Three network namespaces stand in for the worker hosts
(tests/python/netns.py); a pong server on worker1's host answers every message, and a ping
client on worker0's host sends ROUND_TRIPS messages on one TCP connection (TCP_NODELAY) and
times each round trip, three ways:

* ``direct``: plain TCP to worker1's address (no TLS: the floor);
* ``stunnel``: to 127.0.0.1:<worker1's compute_port> on worker0's host, through both hosts'
  stunnel links (privatekeras.deploy.links, TLS 1.3);
* ``python-relay``: the same through the old Python TLS relays (privatekeras.tunnel, run
  as ``python -m ... tunnel``; taken from git history once it is gone from the working tree).

Prints one JSON line per variant and writes them all to bench/out/links.json::

    sudo .venv/bin/python bench/links.py [--round-trips 1000] [--repeat 3]

Internal sub-commands (run inside a namespace): ``pong ADDR...`` and ``ping HOST PORT``.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYDIR = os.path.join(ROOT, "inst", "python")
OUT = os.path.join(HERE, "out", "links.json")
PY = sys.executable
SIZE = 64
HOSTS = {"w0": 1, "w1": 2, "w2": 3}
NAMES = {"w0": "worker0", "w1": "worker1", "w2": "worker2"}
COMPUTE = {"w0": 4000, "w1": 4002, "w2": 4004}  # new links (stunnel); mesh ports: + 1
OLD_TF = {"w0": 4100, "w1": 4101, "w2": 4102}   # old relays (privatekeras.tunnel)
LINK_PORT, OLD_TUNNEL_PORT, DIRECT_PORT = 7000, 7100, 9000


def log(msg):
    print("links bench: " + msg, file=sys.stderr, flush=True)


# -- the two ends of the ping-pong --------------------------------------------------------------
def _recv_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed after {} of {} bytes".format(len(data), n))
        data += chunk
    return data


def pong(addresses):
    """Serve every 'host:port': send each SIZE-byte message straight back."""
    def answer(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                while True:
                    conn.sendall(_recv_exactly(conn, SIZE))
            except (ConnectionError, OSError):
                pass

    def listen(address):
        host, port = address.rsplit(":", 1)
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, int(port)))
        srv.listen(16)
        return srv

    servers = [listen(a) for a in addresses]
    print("PONG", flush=True)

    def accept(srv):
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    for srv in servers[1:]:
        threading.Thread(target=accept, args=(srv,), daemon=True).start()
    accept(servers[0])


def ping(host, port, round_trips, warmup, connect_timeout=60.0):
    """Time ``round_trips`` SIZE-byte round trips on one connection; prints JSON (µs)."""
    deadline = time.monotonic() + connect_timeout
    while True:  # the old relays open their local port only once the peer answers probes
        try:
            sock = socket.create_connection((host, port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"w" * SIZE)  # a link that cannot reach the pong server closes here
            _recv_exactly(sock, SIZE)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    message = os.urandom(SIZE)
    with sock:
        for _ in range(warmup):
            sock.sendall(message)
            _recv_exactly(sock, SIZE)
        times = []
        for _ in range(round_trips):
            t = time.perf_counter_ns()
            sock.sendall(message)
            reply = _recv_exactly(sock, SIZE)
            times.append(time.perf_counter_ns() - t)
            assert reply == message
    times.sort()
    print(json.dumps({"median_us": round(statistics.median(times) / 1000, 1),
                      "p90_us": round(times[int(0.9 * len(times)) - 1] / 1000, 1),
                      "min_us": round(times[0] / 1000, 1), "round_trips": round_trips}))


# -- the set-up ------------------------------------------------------------------------------------
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [PYDIR, env.get("PYTHONPATH", "")] if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _new_hosts_file(addresses):
    lines = ["[cluster]", 'ca = "pki/ca.crt"', ""]
    for h in ("w0", "w1", "w2"):
        lines += ["[[workers]]", 'name = "{}"'.format(NAMES[h]),
                  'api = "{}:5000"'.format(addresses[h]),
                  'link = "{}:{}"'.format(addresses[h], LINK_PORT),
                  "compute_port = {}".format(COMPUTE[h]), ""]
    return "\n".join(lines)


def _old_hosts_file(addresses):
    lines = ["[cluster]", 'ca = "oldpki/ca.crt"', ""]
    for h in ("w0", "w1", "w2"):
        lines += ["[[workers]]", 'name = "{}"'.format(NAMES[h]),
                  'tunnel = "{}:{}"'.format(addresses[h], OLD_TUNNEL_PORT),
                  "tf_port = {}".format(OLD_TF[h]), ""]
    return "\n".join(lines)


OLD_FILES = ("hosts.py", "tunnel.py")


def _old_relays(work):
    """``(PYTHONPATH entry, module)`` of the old Python relays: privatekeras.tunnel if it is
    still in the working tree, else its last version from git, copied into a package of its
    own (``pkold``, with a one-class stand-in for privatekeras.errors)."""
    here = os.path.join(PYDIR, "privatekeras")
    if all(os.path.exists(os.path.join(here, f)) for f in OLD_FILES):
        return PYDIR, "privatekeras.tunnel"

    def git(*args):
        return subprocess.run(["git", "-C", ROOT] + list(args), check=True,
                              capture_output=True).stdout

    path = "inst/python/privatekeras/tunnel.py"
    commit = git("rev-list", "-n", "1", "HEAD", "--", path).decode().strip()
    if subprocess.run(["git", "-C", ROOT, "cat-file", "-e", "{}:{}".format(commit, path)],
                      capture_output=True).returncode != 0:
        commit += "^"  # that commit deleted it: take its parent's version
    package = os.path.join(work, "old", "pkold")
    os.makedirs(package)
    for name in OLD_FILES:
        with open(os.path.join(package, name), "wb") as f:
            f.write(git("show", "{}:inst/python/privatekeras/{}".format(commit, name)))
    with open(os.path.join(package, "__init__.py"), "w") as f:
        f.write('"""The old Python TLS relays, for comparison."""\n')
    with open(os.path.join(package, "errors.py"), "w") as f:
        f.write("class ClusterError(Exception):\n    pass\n")
    log("old relays from git commit {}".format(commit))
    return os.path.dirname(package), "pkold.tunnel"


def _wait_line(path, text, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path) as f:
            if text in f.read():
                return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    with open(path) as f:
        raise SystemExit("no {!r} from {}:\n{}".format(text, proc.args, f.read()[-3000:]))


def run(args):
    sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
    sys.path.insert(0, PYDIR)
    from netns import Net, netns_unavailable

    if os.geteuid() != 0:
        raise SystemExit("links bench: needs root (network namespaces)")
    reason = netns_unavailable()
    if reason:
        raise SystemExit("links bench: " + reason)
    from privatekeras.deploy import pki
    from privatekeras.deploy.hosts import load
    from privatekeras.deploy.links import find_stunnel

    find_stunnel()
    import tempfile

    work = tempfile.mkdtemp(prefix="privatekeras-links-bench-")
    env = _env()
    net = Net(HOSTS)
    try:
        a = net.addresses
        new = os.path.join(work, "hosts.toml")
        with open(new, "w") as f:
            f.write(_new_hosts_file(a))
        pki.make_pki(load(new))
        old = os.path.join(work, "old-hosts.toml")
        with open(old, "w") as f:
            f.write(_old_hosts_file(a))
        old_path, old_module = _old_relays(work)
        old_env = dict(env, PYTHONPATH=old_path + os.pathsep + env["PYTHONPATH"])
        made = subprocess.run([PY, "-m", old_module, "pki", "--config", old], env=old_env,
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit("old relays' pki failed:\n" + made.stdout + made.stderr)

        def start(host, cmd, name, ready, env=env):
            path = os.path.join(work, name + ".log")
            with open(path, "w") as out:
                proc = net.popen(host, cmd, env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
            _wait_line(path, ready, proc)

        start("w1", [PY, __file__, "pong", "0.0.0.0:{}".format(DIRECT_PORT),
                     "127.0.0.1:{}".format(COMPUTE["w1"]), "127.0.0.1:{}".format(OLD_TF["w1"])],
              "pong", "PONG")
        for h in ("w0", "w1"):
            start(h, [PY, "-m", "privatekeras.deploy.links", "--config", new, "--name", NAMES[h],
                      "--workdir", os.path.join(work, NAMES[h])], "links-" + h, "READY links")
            start(h, [PY, "-m", old_module, "--config", old, "--name", NAMES[h]],
                  "relay-" + h, "READY tunnel", env=old_env)
        variants = [("direct", a["w1"], DIRECT_PORT),
                    ("stunnel", "127.0.0.1", COMPUTE["w1"]),
                    ("python-relay", "127.0.0.1", OLD_TF["w1"])]
        runs = {v[0]: [] for v in variants}
        load_before = os.getloadavg()[0]
        for i in range(args.repeat):
            for variant, host, port in variants:
                out = net.run("w0", [PY, __file__, "ping", host, str(port), "--round-trips",
                                     str(args.round_trips)], env, timeout=600)
                if out.returncode != 0:
                    raise SystemExit("ping {} failed:\n{}".format(variant, out.stderr[-3000:]))
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[variant].append(result)
                log("run {} {}: median {} us, p90 {} us".format(
                    i + 1, variant, result["median_us"], result["p90_us"]))
        results = []
        for variant, _, _ in variants:
            r = runs[variant]
            results.append({
                "variant": variant,
                "median_us": round(statistics.median(x["median_us"] for x in r), 1),
                "p90_us": round(statistics.median(x["p90_us"] for x in r), 1),
                "payload_bytes": SIZE, "round_trips": args.round_trips, "runs": len(r),
                "run_medians_us": [x["median_us"] for x in r],
                "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]})
        for r in results:
            print(json.dumps(r), flush=True)
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
        log("wrote " + OUT)
    finally:
        net.close()
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bench/links.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("pong")
    p.add_argument("addresses", nargs="+")
    p = sub.add_parser("ping")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--round-trips", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--round-trips", type=int, default=1000,
                        help="round trips per connection (default 1000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="connections per variant; the median run is reported (default 3)")
    args = parser.parse_args(argv)
    if args.command == "pong":
        pong(args.addresses)
    elif args.command == "ping":
        ping(args.host, args.port, args.round_trips, args.warmup)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
