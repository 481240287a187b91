"""The workers' links through stunnel (privatekeras.deploy.links), for real.

Three network namespaces stand in for the three worker hosts, joined by a private bridge. On
each, a tiny line echo server on 127.0.0.1:<compute_port> stands in for TensorFlow and another
on 127.0.0.1:<mesh_port> for the mesh (each answers every line with its name and counts its
connections), and the worker's links run as ``python -m privatekeras.deploy.links``. Then:
every worker reaches both others' echo servers through 127.0.0.1:<their compute_port> and
127.0.0.1:<their mesh_port>, each the right one; what crosses the bridge is TLS to the link
port; peers with a certificate of another CA, of the wrong party or none at all, and plain
TCP, are refused before reaching the echo server; compute and mesh ports are not reachable
from another host.

The other tests need only stunnel (no namespaces): the config text, two workers' links on
this machine routing the compute and the mesh port (and the mesh service, selected by SNI,
checking certificates like the compute one), start-up errors, and that stunnel dies with the
process that started it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import SCRIPTS, child_env
from netns import Net, netns_unavailable
from privatekeras.deploy import pki
from privatekeras.deploy.hosts import ConfigError, load

PY = sys.executable
HOSTS = {"w0": 1, "w1": 2, "w2": 3}
NAMES = {"w0": "worker0", "w1": "worker1", "w2": "worker2"}
COMPUTE = {"w0": 4000, "w1": 4002, "w2": 4004}
MESH = {h: p + 1 for h, p in COMPUTE.items()}  # the default mesh_port: compute_port + 1
LINK_PORT, API_PORT = 7000, 5000
MARKER = "privatekeras link marker /job:worker device:CPU"


def _stunnel_missing():
    try:
        from privatekeras.deploy.links import find_stunnel

        find_stunnel()
    except Exception as exc:  # noqa: BLE001 - any reason is a reason to skip
        return str(exc)
    return None


_no_stunnel = _stunnel_missing()
needs_stunnel = pytest.mark.skipif(_no_stunnel is not None, reason=_no_stunnel or "")
if os.geteuid() != 0:
    _no_netns = "network namespaces (three worker hosts on one machine) need root"
else:
    _no_netns = netns_unavailable()
needs_hosts = pytest.mark.skipif(
    _no_netns is not None or _no_stunnel is not None,
    reason="needs root, `ip netns` and stunnel4: {}".format(_no_netns or _no_stunnel))

# A line echo server standing in for a worker's TensorFlow server: answers "<name> <line>"
# and keeps the number of connections it accepted in a file.
ECHO = r"""
import os, socket, sys, threading
name, port, count_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(16)
count = 0
def save():
    with open(count_path + ".tmp", "w") as f:
        f.write(str(count))
    os.replace(count_path + ".tmp", count_path)
def serve(conn):
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            conn.sendall(name.encode() + b" " + line)
save()
print("LISTENING", flush=True)
while True:
    conn, _ = srv.accept()
    count += 1
    save()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# Connect (plain TCP, or TLS 1.3 presenting CERT/KEY, '-' for none), send one line, print
# JSON: whether a whole line came back, and what. With a 9th argument, the TLS client sends
# that as its SNI ('-': none) and checks the server's certificate names SERVER_NAME itself.
PROBE = r"""
import json, socket, ssl, sys
host, port, line, mode, ca, cert, key, server_name = sys.argv[1:9]
sni = sys.argv[9] if len(sys.argv) > 9 else server_name
out = {"ok": False, "reply": "", "error": ""}
try:
    sock = socket.create_connection((host, int(port)), timeout=10)
    if mode == "tls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(ca)
        if cert != "-":
            ctx.load_cert_chain(cert, key)
        ctx.check_hostname = sni == server_name
        sock = ctx.wrap_socket(sock, server_hostname=None if sni == "-" else sni)
        subject = dict(kv for rdn in sock.getpeercert()["subject"] for kv in rdn)
        if subject["commonName"] != server_name:
            raise ssl.SSLError("the server is {}".format(subject["commonName"]))
        out["version"] = sock.version()
    sock.sendall(line.encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    out["reply"] = data.decode("utf-8", "replace").strip()
    out["ok"] = data.endswith(b"\n")
except (OSError, ssl.SSLError) as exc:
    out["error"] = "{}: {}".format(type(exc).__name__, exc)
print(json.dumps(out))
"""


def _hosts_toml(addresses, compute=COMPUTE, link_port=LINK_PORT, link_listen=None, mesh=None):
    lines = ["[cluster]", 'ca = "pki/ca.crt"', ""]
    for host in ("w0", "w1", "w2"):
        lines += ["[[workers]]", 'name = "{}"'.format(NAMES[host]),
                  'api = "{}:{}"'.format(addresses[host], API_PORT),
                  'link = "{}:{}"'.format(addresses[host], link_port),
                  "compute_port = {}".format(compute[host])]
        if mesh:
            lines.append("mesh_port = {}".format(mesh[host]))
        if link_listen and host in link_listen:
            lines.append('link_listen = "{}"'.format(link_listen[host]))
        lines.append("")
    lines += ["[owner]", 'name = "owner"', "", "[[clients]]", 'name = "alice"', ""]
    return "\n".join(lines)


def _tail(path, n=4000):
    try:
        with open(path) as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _wait_for(path, text, procs, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in _tail(path, 10 ** 6):
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError("{} exited with {} before {!r}:\n{}".format(
                    p.args, p.returncode, text, _tail(path)))
        time.sleep(0.1)
    raise AssertionError("no {!r} in {} after {} s:\n{}".format(text, path, timeout,
                                                                _tail(path)))


# -- three worker hosts --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Three namespaces, each with two echo servers (compute and mesh port) and its worker's
    links. Yields a namespace with net, config, d (work dir), count(host, channel)."""
    if _no_netns is not None or _no_stunnel is not None:
        pytest.skip("needs root, `ip netns` and stunnel4")
    d = tmp_path_factory.mktemp("links")
    net = Net(HOSTS)
    try:
        path = d / "hosts.toml"
        path.write_text(_hosts_toml(net.addresses))
        config = load(path)
        pki.make_pki(config)
        env = child_env()
        procs = []
        for host in HOSTS:
            name = NAMES[host]
            for echo, port in ((name, COMPUTE[host]), (name + "-mesh", MESH[host])):
                log = open(d / "echo-{}.log".format(echo), "w")
                procs.append(net.popen(host, [PY, "-c", ECHO, echo, str(port),
                                              str(d / "echo-{}.count".format(echo))],
                                       env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL))
                log.close()
            log = open(d / "links-{}.log".format(name), "w")
            procs.append(net.popen(host, [PY, "-m", "privatekeras.deploy.links", "--config",
                                          str(path), "--name", name, "--workdir",
                                          str(d / name)],
                                   env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL))
            log.close()
        for host in HOSTS:
            for echo in (NAMES[host], NAMES[host] + "-mesh"):
                _wait_for(d / "echo-{}.log".format(echo), "LISTENING", procs)
            _wait_for(d / "links-{}.log".format(NAMES[host]), "READY links", procs)

        class Hosts:
            pass

        h = Hosts()
        h.net, h.config, h.d = net, config, d
        h.count = lambda host, channel="compute": int((d / "echo-{}{}.count".format(
            NAMES[host], "-mesh" if channel == "mesh" else "")).read_text())
        h.stunnel_log = lambda host: d / NAMES[host] / "stunnel-{}.log".format(NAMES[host])
        yield h
    finally:
        net.close()


def _probe(h, host, address, line, mode="plain", cert="-", key="-", server_name="worker1"):
    addr, port = address.rsplit(":", 1)
    out = h.net.run(host, [PY, "-c", PROBE, addr, port, line, mode, h.config.ca, cert, key,
                           server_name], child_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_hosts
def test_every_worker_reaches_the_others_through_tls_links(hosts):
    h = hosts
    env = child_env()
    # Everything crossing the bridge, and (control: the detector works) worker0's loopback,
    # where the same bytes travel in clear between the echo server, stunnel and the probe.
    captures = {
        "bridge": h.net.popen("hub", [PY, str(SCRIPTS / "capture.py")], env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True),
        "w0-loopback": h.net.popen("w0", [PY, str(SCRIPTS / "capture.py"), "lo"], env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True),
    }
    for c in captures.values():
        assert c.stdout.readline().strip() == "CAPTURING"
    for channel in ("compute", "mesh"):  # starting the links probed nobody
        assert [h.count(host, channel) for host in HOSTS] == [0, 0, 0]

    for src in HOSTS:
        for dst in HOSTS:
            if src == dst:
                continue
            # each port reaches its own echo server (not the other channel's)
            for port, echo in ((COMPUTE[dst], NAMES[dst]), (MESH[dst], NAMES[dst] + "-mesh")):
                line = "{} from {} to {}".format(MARKER, NAMES[src], echo)
                result = _probe(h, src, "127.0.0.1:{}".format(port), line)
                assert result["ok"] and result["reply"] == "{} {}".format(echo, line), (
                    src, dst, port, result, _tail(h.stunnel_log(src)),
                    _tail(h.stunnel_log(dst)))
    time.sleep(0.5)  # let the captures read what is queued
    summaries = {k: json.loads(c.communicate(input="", timeout=30)[0].strip().splitlines()[-1])
                 for k, c in captures.items()}
    # Each echo server was reached exactly once by each of the two other workers.
    for channel in ("compute", "mesh"):
        assert [h.count(host, channel) for host in HOSTS] == [2, 2, 2], channel

    bridge, control = summaries["bridge"], summaries["w0-loopback"]
    print("captured on the bridge:", bridge)
    assert bridge["payload_bytes"] > 0 and bridge["tls_app_records"] > 0, bridge
    assert not any(bridge["markers"].values()), bridge["markers"]  # no plaintext crossed
    assert all(int(p) == LINK_PORT or int(p) >= 32768 for p in bridge["ports"]), bridge
    for port in list(COMPUTE.values()) + list(MESH.values()):
        assert str(port) not in bridge["ports"], (port, bridge["ports"])
    assert control["markers"]["privatekeras"] > 0 and control["markers"]["/job:"] > 0, control

    for host in HOSTS:  # stunnel logs at a level that shows the accepted peers
        log = _tail(h.stunnel_log(host), 10 ** 6)
        others = [NAMES[o] for o in HOSTS if o != host]
        for other in others:
            assert "Certificate accepted at depth=0: CN={}, OU=worker".format(other) in log, log
        # the mesh service, selected by the SNI its peers' links send
        assert "SNI: switched to service [{}-mesh-in]".format(NAMES[host]) in log, log


@needs_hosts
def test_peers_without_the_right_certificate_are_refused(hosts, tmp_path):
    h = hosts
    link = "{}:{}".format(h.net.addresses["w1"], LINK_PORT)
    party = h.config.party
    before = h.count("w1")
    # Control: worker0's own certificate, straight to worker1's link, reaches the echo server.
    good = _probe(h, "w0", link, "hello", "tls", party("worker0").cert, party("worker0").key)
    assert good["ok"] and good["reply"] == "worker1 hello" and good["version"] == "TLSv1.3", good
    time.sleep(0.3)
    assert h.count("w1") == before + 1

    foreign = pki.make_ca()
    cert, key = pki.issue(foreign[0], foreign[1], "worker0", "worker")
    fcert = pki.write_public(tmp_path / "foreign-worker0.crt", cert)
    fkey = pki.write_private(tmp_path / "foreign-worker0.key", key)
    attempts = {
        "another CA's certificate named worker0": ("tls", fcert, fkey),
        "a client's certificate of the cluster's CA": ("tls", party("alice").cert,
                                                       party("alice").key),
        "the owner's certificate": ("tls", party("owner").cert, party("owner").key),
        "worker1's own certificate (not one of its peers)": ("tls", party("worker1").cert,
                                                             party("worker1").key),
        "no certificate": ("tls", "-", "-"),
        "plain TCP": ("plain", "-", "-"),
    }
    for what, (mode, cert, key) in attempts.items():
        result = _probe(h, "w0", link, "hello", mode, cert, key)
        assert not result["ok"] and not result["reply"].startswith("worker1"), (what, result)
    time.sleep(0.5)
    assert h.count("w1") == before + 1, "a refused peer reached the echo server"
    log = _tail(h.stunnel_log("w1"), 10 ** 6)
    for refusal in ("CERT: Pre-verification error: unable to get local issuer certificate",
                    "Rejected by CERT at depth=0: CN=alice, OU=client",
                    "Rejected by CERT at depth=0: CN=owner, OU=owner",
                    "Rejected by CERT at depth=0: CN=worker1, OU=worker",
                    "peer did not return a certificate",
                    "wrong version number"):
        assert refusal in log, (refusal, log[-3000:])


@needs_hosts
def test_compute_and_mesh_ports_are_not_reachable_from_another_host(hosts):
    h = hosts
    loopback_ports = sorted(list(COMPUTE.values()) + list(MESH.values()))
    for src in HOSTS:
        for dst in HOSTS:
            if src == dst:
                continue
            for port in loopback_ports:
                result = _probe(h, src, "{}:{}".format(h.net.addresses[dst], port), "hi")
                assert not result["ok"] and "ConnectionRefused" in result["error"], (
                    src, dst, port, result)
    env = dict(child_env(), PYTHONPATH=str(SCRIPTS) + os.pathsep + child_env()["PYTHONPATH"])
    for host in HOSTS:  # only the link listens beyond loopback
        out = h.net.run(host, [PY, "-c", "import netinfo; print(' '.join(netinfo.listening()))"],
                        env)
        listening = out.stdout.split()
        assert sorted(a for a in listening if a.startswith("127.")) == sorted(
            "127.0.0.1:{}".format(p) for p in loopback_ports), (host, listening)
        assert [a for a in listening if not a.startswith("127.")] == [
            "{}:{}".format(h.net.addresses[host], LINK_PORT)], (host, listening)


# -- without namespaces: config text, start-up errors, lifetime ------------------------------------
def test_stunnel_config_for_a_worker(tmp_path):
    from privatekeras.deploy.links import stunnel_config

    path = tmp_path / "hosts.toml"
    path.write_text(_hosts_toml({"w0": "10.0.0.1", "w1": "fd00::2", "w2": "w2.example"},
                                link_listen={"w1": "[::]:7000"})
                    .replace('"fd00::2:', '"[fd00::2]:'))
    config = load(path)
    sections, current = {}, "global"
    for raw in stunnel_config(config, "worker1").splitlines():
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        sections.setdefault(current, []).append((key.strip(), value.strip()))
    assert list(sections) == ["global", "worker1-in", "worker1-mesh-in", "to-worker0",
                              "mesh-to-worker0", "to-worker2", "mesh-to-worker2"]
    assert sections["global"] == [("foreground", "yes"), ("pid", ""), ("syslog", "no"),
                                  ("debug", "notice")]
    pki_dir = str(tmp_path / "pki")
    files = [("cert", pki_dir + "/worker1.crt"), ("key", pki_dir + "/worker1.key"),
             ("CAfile", pki_dir + "/ca.crt")]
    tls = [("sslVersionMin", "TLSv1.3"), ("socket", "l:TCP_NODELAY=1"),
           ("socket", "r:TCP_NODELAY=1")]
    verify_peers = files + [("verifyChain", "yes"), ("requireCert", "yes"),
                            ("checkHost", "worker0"), ("checkHost", "worker2")] + tls
    assert sections["worker1-in"] == [("accept", ":::7000"),
                                      ("connect", "127.0.0.1:4002")] + verify_peers
    # The mesh: a secondary service on the same link port, selected by SNI; it inherits none
    # of the primary's settings, so it repeats every certificate check.
    assert sections["worker1-mesh-in"] == [("sni", "worker1-in:mesh.worker1"),
                                           ("connect", "127.0.0.1:4003")] + verify_peers
    assert sections["to-worker0"] == [("client", "yes"), ("accept", "127.0.0.1:4000"),
                                      ("connect", "10.0.0.1:7000"), ("sni", "")] + files + \
        [("verifyChain", "yes"), ("checkHost", "worker0")] + tls
    assert sections["mesh-to-worker0"] == [("client", "yes"), ("accept", "127.0.0.1:4001"),
                                           ("connect", "10.0.0.1:7000"),
                                           ("sni", "mesh.worker0")] + files + \
        [("verifyChain", "yes"), ("checkHost", "worker0")] + tls
    assert sections["to-worker2"][1:4] == [("accept", "127.0.0.1:4004"),
                                           ("connect", "w2.example:7000"), ("sni", "")]
    assert sections["mesh-to-worker2"][1:4] == [("accept", "127.0.0.1:4005"),
                                                ("connect", "w2.example:7000"),
                                                ("sni", "mesh.worker2")]
    # worker0's view: worker1's IPv6 link without brackets (stunnel's syntax).
    assert "connect = fd00::2:7000" in stunnel_config(config, "worker0")
    with pytest.raises(ConfigError, match="'alice' is the client, not a worker"):
        stunnel_config(config, "alice")


def test_links_print_cli(tmp_path):
    path = tmp_path / "hosts.toml"
    path.write_text(_hosts_toml({"w0": "10.0.0.1", "w1": "10.0.0.2", "w2": "10.0.0.3"}))
    out = subprocess.run([PY, "-m", "privatekeras.deploy.links", "--config", str(path),
                          "--name", "worker2", "--print"], capture_output=True, text=True,
                         env=child_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[worker2-in]" in out.stdout and "checkHost = worker1" in out.stdout
    assert "[worker2-mesh-in]" in out.stdout and "[mesh-to-worker0]" in out.stdout
    out = subprocess.run([PY, "-m", "privatekeras.deploy.links", "--config", str(path),
                          "--name", "bob", "--print"], capture_output=True, text=True,
                         env=child_env(), timeout=120)
    assert out.returncode == 2 and "no party named 'bob'" in out.stderr


def _free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _local_config(tmp_path):
    """A hosts file whose worker0 runs here: its link listens on loopback (nobody connects)."""
    link, c0, c1, c2, m0, m1, m2 = _free_ports(7)
    path = tmp_path / "hosts.toml"
    path.write_text(_hosts_toml({"w0": "10.0.0.1", "w1": "10.0.0.2", "w2": "10.0.0.3"},
                                compute={"w0": c0, "w1": c1, "w2": c2},
                                mesh={"w0": m0, "w1": m1, "w2": m2},
                                link_listen={"w0": "127.0.0.1:{}".format(link)}))
    config = load(path)
    pki.make_pki(config)
    return config, link, c1


def _alive(pid):
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except OSError:
        return False


@needs_stunnel
def test_links_start_listen_and_stop(tmp_path):
    from privatekeras.deploy.links import Links, _listening_ports

    config, link, c1 = _local_config(tmp_path)
    with Links.start(config, "worker0") as links:
        assert links.running and _alive(links.pid)
        ports = _listening_ports(links.pid)
        w1, w2 = config.workers[1:]
        assert ports == {link, c1, w1.mesh_port, w2.compute_port, w2.mesh_port}, ports
        assert oct(os.stat(links.config_path).st_mode & 0o777) == "0o600"
        assert os.path.exists(links.log_path)
        workdir, pid = links.workdir, links.pid
    assert not _alive(pid) and not os.path.exists(workdir)


def _pair_configs(tmp_path):
    """worker0's and worker1's links on this machine: two hosts files of one cluster (one
    PKI) that differ only in ports, since here both links and both workers' listeners share
    one loopback. In each, every worker's link is its link_listen on 127.0.0.1 (set after
    loading: the hosts file refuses a loopback ``link``, which no other host could reach)."""
    ports = iter(_free_ports(15))
    views = []
    for view in ("a", "b"):
        links = {"w0": next(ports), "w1": next(ports), "w2": next(ports)} if view == "a" \
            else views[0][1]
        compute = {host: next(ports) for host in HOSTS}
        mesh = {host: next(ports) for host in HOSTS}
        path = tmp_path / "hosts-{}.toml".format(view)
        path.write_text(_hosts_toml({"w0": "10.0.0.1", "w1": "10.0.0.2", "w2": "10.0.0.3"},
                                    compute=compute, mesh=mesh, link_listen={
                                        h: "127.0.0.1:{}".format(p) for h, p in links.items()}))
        views.append((path, links))
    configs = [load(path) for path, _ in views]
    for config in configs:
        for w in config.workers:
            w.link = w.link_listen
    pki.make_pki(configs[0])
    return configs


def _echo_here(name, port, count_path):
    proc = subprocess.Popen([PY, "-c", ECHO, name, str(port), str(count_path)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "LISTENING", name
    return proc


def _probe_here(port, line, mode="plain", cert="-", key="-", server_name="-", sni=None,
                ca="-"):
    out = subprocess.run([PY, "-c", PROBE, "127.0.0.1", str(port), line, mode, ca, cert, key,
                          server_name] + ([] if sni is None else [sni]),
                         capture_output=True, text=True, env=child_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_stunnel
def test_two_workers_links_carry_the_compute_and_the_mesh_port_each_to_its_own(tmp_path):
    """worker0's and worker1's links, both here: each side's 127.0.0.1:<peer's compute_port>
    reaches the peer's compute listener and 127.0.0.1:<peer's mesh_port> its mesh listener
    (echo servers that answer with their own names, so swapped routes fail), through the
    peer's one link port; the mesh service checks certificates like the compute one."""
    from privatekeras.deploy.links import Links

    a, b = _pair_configs(tmp_path)
    echoes = []
    try:
        # Each worker's own listeners, at its ports in its own view (a: worker0, b: worker1).
        for config, me in ((a, 0), (b, 1)):
            w = config.workers[me]
            for channel, port in (("compute", w.compute_port), ("mesh", w.mesh_port)):
                echoes.append(_echo_here("{}-{}".format(w.name, channel), port,
                                         tmp_path / "{}-{}.count".format(w.name, channel)))
        count = lambda name, channel: int(  # noqa: E731
            (tmp_path / "{}-{}.count".format(name, channel)).read_text())
        with Links.start(a, "worker0") as links0, Links.start(b, "worker1") as links1:
            for src, dst in ((a, b.workers[1]), (b, a.workers[0])):
                peer = src.worker(dst.name)  # the peer as this side sees it
                for channel, port in (("compute", peer.compute_port), ("mesh", peer.mesh_port)):
                    line = "{} from {} via 127.0.0.1:{}".format(MARKER, channel, port)
                    result = _probe_here(port, line)
                    assert result == {"ok": True, "error": "",
                                      "reply": "{}-{} {}".format(dst.name, channel, line)}, (
                        channel, port, result, _tail(links0.log_path),
                        _tail(links1.log_path))
            assert [count(n, c) for n in ("worker0", "worker1") for c in ("compute", "mesh")] \
                == [1, 1, 1, 1]

            # Straight to worker1's link with TLS: the SNI picks the service, the certificate
            # checks are the same on both.
            party, link = b.party, b.workers[1].link_listen[1]

            def tls(party_name, sni, cert_of=None):
                cert_of = party(cert_of or party_name)
                return _probe_here(link, "hello", "tls", cert_of.cert, cert_of.key,
                                   "worker1", sni, ca=b.ca)

            ok = {"mesh.worker1": "worker1-mesh hello", "-": "worker1-compute hello",
                  "worker1": "worker1-compute hello", "other.example": "worker1-compute hello"}
            for sni, reply in ok.items():  # controls: worker0 and worker2 are let in
                for who in ("worker0", "worker2"):
                    result = tls(who, sni)
                    assert result["ok"] and result["reply"] == reply, (who, sni, result)
            assert [count("worker1", c) for c in ("compute", "mesh")] == [1 + 6, 1 + 2]
            refused = {"a client's certificate": "alice", "the owner's": "owner",
                       "worker1's own (not one of its peers)": "worker1"}
            for what, who in refused.items():
                for sni in ("mesh.worker1", "-"):
                    result = tls(who, sni)
                    assert not result["ok"] and not result["reply"], (what, sni, result)
            no_cert = _probe_here(link, "hello", "tls", "-", "-", "worker1", "mesh.worker1",
                                  ca=b.ca)
            assert not no_cert["ok"] and not no_cert["reply"], no_cert
            time.sleep(0.5)
            assert [count("worker1", c) for c in ("compute", "mesh")] == [1 + 6, 1 + 2], \
                "a refused peer reached an echo server"
            log = _tail(links1.log_path, 10 ** 6)
        for expected in ("SNI: switched to service [worker1-mesh-in]",
                         "SNI: no servername received",
                         "SNI: no pattern matched servername: other.example",
                         "Rejected by CERT at depth=0: CN=alice, OU=client",
                         "Rejected by CERT at depth=0: CN=worker1, OU=worker",
                         "peer did not return a certificate"):
            assert expected in log, (expected, log[-3000:])
    finally:
        for echo in echoes:
            echo.kill()
            echo.wait()


@needs_stunnel
def test_links_report_a_port_in_use_with_stunnels_words(tmp_path):
    from privatekeras.deploy.links import Links

    config, link, c1 = _local_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", c1))
        taken.listen()
        with pytest.raises(Exception) as info:
            Links.start(config, "worker0", workdir=tmp_path / "w")
    msg = str(info.value)
    assert type(info.value).__name__ == "ClusterError"
    assert "stunnel for worker0 exited with code" in msg
    assert "another process already listens" in msg
    assert "127.0.0.1:{}: Address already in use".format(c1) in msg, msg


@needs_stunnel
def test_links_refuse_a_key_others_can_read(tmp_path):
    from privatekeras.deploy.links import Links

    config, _, _ = _local_config(tmp_path)
    key = config.party("worker0").key
    os.chmod(key, 0o640)
    with pytest.raises(pki.CredentialsError, match="chmod 600 {}".format(key)):
        Links.start(config, "worker0")


@needs_stunnel
def test_stunnel_dies_with_the_process_that_started_it(tmp_path):
    config, _, _ = _local_config(tmp_path)
    code = ("import sys, time\n"
            "from privatekeras.deploy.links import Links\n"
            "links = Links.start(sys.argv[1], 'worker0', workdir=sys.argv[2])\n"
            "print(links.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([PY, "-c", code, config.path, str(tmp_path / "links")],
                              stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        pid = int(parent.stdout.readline())
        assert _alive(pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid), "stunnel outlived its parent"
