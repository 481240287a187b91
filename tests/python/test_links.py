"""The workers' compute links through stunnel (privatekeras.deploy.links), for real.

Three network namespaces stand in for the three worker hosts, joined by a private bridge. On
each, a tiny line echo server on 127.0.0.1:<compute_port> stands in for TensorFlow (it
answers every line with its worker's name and counts its connections), and the worker's links
run as ``python -m privatekeras.deploy.links``. Then: every worker reaches both others' echo
servers through 127.0.0.1:<their compute_port>; what crosses the bridge is TLS; peers with a
certificate of another CA, of the wrong party or none at all, and plain TCP, are refused
before reaching the echo server; compute ports are not reachable from another host.

A few tests need only stunnel (no namespaces): the config text, start-up errors, and that
stunnel dies with the process that started it.
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
COMPUTE = {"w0": 4000, "w1": 4001, "w2": 4002}
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
# JSON: whether a whole line came back, and what.
PROBE = r"""
import json, socket, ssl, sys
host, port, line, mode, ca, cert, key, server_name = sys.argv[1:9]
out = {"ok": False, "reply": "", "error": ""}
try:
    sock = socket.create_connection((host, int(port)), timeout=10)
    if mode == "tls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(ca)
        if cert != "-":
            ctx.load_cert_chain(cert, key)
        sock = ctx.wrap_socket(sock, server_hostname=server_name)
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


def _hosts_toml(addresses, compute=COMPUTE, link_port=LINK_PORT, link_listen=None):
    lines = ["[cluster]", 'ca = "pki/ca.crt"', ""]
    for host in ("w0", "w1", "w2"):
        lines += ["[[workers]]", 'name = "{}"'.format(NAMES[host]),
                  'api = "{}:{}"'.format(addresses[host], API_PORT),
                  'link = "{}:{}"'.format(addresses[host], link_port),
                  "compute_port = {}".format(compute[host])]
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
    """Three namespaces, each with an echo server and its worker's links. Yields a
    namespace with net, config, d (work dir), count(host)."""
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
            log = open(d / "echo-{}.log".format(name), "w")
            procs.append(net.popen(host, [PY, "-c", ECHO, name, str(COMPUTE[host]),
                                          str(d / "echo-{}.count".format(name))],
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
            _wait_for(d / "echo-{}.log".format(NAMES[host]), "LISTENING", procs)
            _wait_for(d / "links-{}.log".format(NAMES[host]), "READY links", procs)

        class Hosts:
            pass

        h = Hosts()
        h.net, h.config, h.d = net, config, d
        h.count = lambda host: int((d / "echo-{}.count".format(NAMES[host])).read_text())
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
    assert [h.count(host) for host in HOSTS] == [0, 0, 0]  # starting the links probed nobody

    for src in HOSTS:
        for dst in HOSTS:
            if src == dst:
                continue
            line = "{} from {} to {}".format(MARKER, NAMES[src], NAMES[dst])
            result = _probe(h, src, "127.0.0.1:{}".format(COMPUTE[dst]), line)
            assert result["ok"] and result["reply"] == "{} {}".format(NAMES[dst], line), (
                src, dst, result, _tail(h.stunnel_log(src)), _tail(h.stunnel_log(dst)))
    time.sleep(0.5)  # let the captures read what is queued
    summaries = {k: json.loads(c.communicate(input="", timeout=30)[0].strip().splitlines()[-1])
                 for k, c in captures.items()}
    # Each echo server was reached exactly once by each of the two other workers.
    assert [h.count(host) for host in HOSTS] == [2, 2, 2]

    bridge, control = summaries["bridge"], summaries["w0-loopback"]
    print("captured on the bridge:", bridge)
    assert bridge["payload_bytes"] > 0 and bridge["tls_app_records"] > 0, bridge
    assert not any(bridge["markers"].values()), bridge["markers"]  # no plaintext crossed
    assert all(int(p) == LINK_PORT or int(p) >= 32768 for p in bridge["ports"]), bridge
    for port in COMPUTE.values():
        assert str(port) not in bridge["ports"], (port, bridge["ports"])
    assert control["markers"]["privatekeras"] > 0 and control["markers"]["/job:"] > 0, control

    for host in HOSTS:  # stunnel logs at a level that shows the accepted peers
        log = _tail(h.stunnel_log(host), 10 ** 6)
        others = [NAMES[o] for o in HOSTS if o != host]
        for other in others:
            assert "Certificate accepted at depth=0: CN={}, OU=worker".format(other) in log, log


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
def test_compute_ports_are_not_reachable_from_another_host(hosts):
    h = hosts
    for src in HOSTS:
        for dst in HOSTS:
            if src == dst:
                continue
            for port in COMPUTE.values():
                result = _probe(h, src, "{}:{}".format(h.net.addresses[dst], port), "hi")
                assert not result["ok"] and "ConnectionRefused" in result["error"], (
                    src, dst, port, result)
    env = dict(child_env(), PYTHONPATH=str(SCRIPTS) + os.pathsep + child_env()["PYTHONPATH"])
    for host in HOSTS:  # only the link listens beyond loopback
        out = h.net.run(host, [PY, "-c", "import netinfo; print(' '.join(netinfo.listening()))"],
                        env)
        listening = out.stdout.split()
        assert sorted(a for a in listening if a.startswith("127.")) == [
            "127.0.0.1:{}".format(p) for p in sorted(COMPUTE.values())], (host, listening)
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
    assert list(sections) == ["global", "worker1-in", "to-worker0", "to-worker2"]
    assert sections["global"] == [("foreground", "yes"), ("pid", ""), ("syslog", "no"),
                                  ("debug", "notice")]
    pki_dir = str(tmp_path / "pki")
    files = [("cert", pki_dir + "/worker1.crt"), ("key", pki_dir + "/worker1.key"),
             ("CAfile", pki_dir + "/ca.crt")]
    tls = [("sslVersionMin", "TLSv1.3"), ("socket", "l:TCP_NODELAY=1"),
           ("socket", "r:TCP_NODELAY=1")]
    assert sections["worker1-in"] == [("accept", ":::7000"), ("connect", "127.0.0.1:4001")] + \
        files + [("verifyChain", "yes"), ("requireCert", "yes"), ("checkHost", "worker0"),
                 ("checkHost", "worker2")] + tls
    assert sections["to-worker0"] == [("client", "yes"), ("accept", "127.0.0.1:4000"),
                                      ("connect", "10.0.0.1:7000")] + files + \
        [("verifyChain", "yes"), ("checkHost", "worker0")] + tls
    assert sections["to-worker2"][1:3] == [("accept", "127.0.0.1:4002"),
                                           ("connect", "w2.example:7000")]
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
    link, c0, c1, c2 = _free_ports(4)
    path = tmp_path / "hosts.toml"
    path.write_text(_hosts_toml({"w0": "10.0.0.1", "w1": "10.0.0.2", "w2": "10.0.0.3"},
                                compute={"w0": c0, "w1": c1, "w2": c2},
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
        assert {link, c1, config.workers[2].compute_port} <= ports
        assert oct(os.stat(links.config_path).st_mode & 0o777) == "0o600"
        assert os.path.exists(links.log_path)
        workdir, pid = links.workdir, links.pid
    assert not _alive(pid) and not os.path.exists(workdir)


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
