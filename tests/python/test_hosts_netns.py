"""Workers on separate hosts, for real: five Linux network namespaces on one bridge.

Three worker hosts, the model owner's host and a client's host (tests/python/netns.py). One
hosts file and its certificates (``privatekeras pki --config``); on each worker host
``privatekeras worker --config hosts.toml --name workerN`` starts that worker's stunnel links,
its TensorFlow server on 127.0.0.1:<compute_port> and its API. The owner
(``Cluster.from_config(path, "owner")``) shares a small CNN trained on Fashion-MNIST and
serves; a client (``Cluster.from_config(path, "alice")``) queries it from its own host, and
the private logits are compared with plaintext Keras.

Then what must not be possible, each check with a control that shows it can fail:
* no worker's compute or mesh port is reachable from the owner's or the client's host, and
  nothing but the ``api`` and ``link`` ports listens on a worker's bridge-facing address (``ss``);
* only TLS crosses the bridge: the mesh's frames and notes, which a capture of worker0's
  loopback finds in clear (between worker 0 and its end of the links), and TensorFlow's
  plaintext gRPC markers appear in no frame on the bridge;
* a worker's API refuses a client certificate of another CA, a peer with no certificate and
  plain TCP;
* a worker's stunnel link refuses a client's (and the owner's) certificate: only workers link;
* a stopped worker gives the client and the owner WorkerUnavailableError within 30 s.

Needs root (namespaces) and Debian's stunnel4; skipped with the reason otherwise.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import LOGIT_ATOL, SCRIPTS, TALLY, child_env
from netns import (API_PORT, CLUSTER_HOSTS, COMPUTE, LINK_PORT, MESH, NAMES, WORKERS, Net,
                   hosts_toml, is_loopback, netns_unavailable, stunnel_unavailable)

PY = sys.executable
N_QUERIES = 12
# TensorFlow's gRPC in clear would carry the first four; the mesh's links carry the last three
# in clear between a worker and its end of the stunnel links (a frame's magic and int64 dtype,
# the notes).
MESH_MARKERS = ("PKM1\t\x00\x00\x00", '{"go":', '{"arrived":"')
PLAINTEXT_MARKERS = ("/job:", "device:CPU", "EagerService", "tensorflow") + MESH_MARKERS
FAIL_WITHIN = 30.0  # seconds for a stopped worker to become a clear error


def _unavailable():
    if os.geteuid() != 0:
        return "network namespaces (five hosts on one machine) need root"
    return netns_unavailable() or stunnel_unavailable()


_reason = _unavailable()
pytestmark = pytest.mark.skipif(_reason is not None, reason="separate hosts are simulated with "
                                "network namespaces and stunnel4 links: {}".format(_reason))


def _tail(path, n=4000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _json_line(text):
    return json.loads(text.strip().splitlines()[-1])


def _as_v4(address):
    """'::ffff:10.0.0.1' -> '10.0.0.1' (gRPC listens on IPv6 sockets that accept IPv4)."""
    return address[7:] if address.startswith("::ffff:") else address


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, fashion):
    """A small CNN trained briefly on Fashion-MNIST; test images and plaintext Keras logits."""
    import keras

    keras.utils.set_random_seed(7)
    (x_train, y_train), (x_test, _) = fashion
    L = keras.layers
    model = keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(6, 3, strides=2),
                              L.AveragePooling2D(2), L.ReLU(), L.Flatten(), L.Dense(10)],
                             name="small_cnn")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[:6000], y_train[:6000], epochs=1, batch_size=64, verbose=0)
    d = tmp_path_factory.mktemp("small_cnn")
    model.save(d / "small.keras")
    images = x_test[:N_QUERIES]
    np.save(d / "images.npy", images)
    np.save(d / "plain.npy", model.predict(images, verbose=0))
    return d


class Hosts:
    """The running five-host cluster: net, hosts file path and config, logs, worker procs."""

    def worker_log(self, host):
        return _tail(self.d / "{}.log".format(NAMES[host]), 10 ** 6)

    def stunnel_log(self, host):
        """The log of the stunnel that ``host``'s worker started (next to its config file)."""
        for pid in subprocess.run(["ip", "netns", "pids", self.net.ns(host)],
                                  capture_output=True, text=True).stdout.split():
            try:
                with open("/proc/{}/cmdline".format(pid), "rb") as f:
                    cmd = [c.decode() for c in f.read().split(b"\0") if c]
            except OSError:
                continue
            if cmd and os.path.basename(cmd[0]).startswith("stunnel"):
                conf = cmd[-1]
                return _tail(os.path.join(os.path.dirname(conf), "stunnel-{}.log".format(
                    NAMES[host])), 10 ** 6)
        raise AssertionError("no stunnel process in {}'s namespace".format(host))


@pytest.fixture(scope="module")
def booting(tmp_path_factory):
    """Five hosts, the hosts file and its certificates, the three workers starting."""
    from privatekeras.deploy.hosts import load

    d = tmp_path_factory.mktemp("hosts")
    net = Net(CLUSTER_HOSTS)
    try:
        path = d / "hosts.toml"
        path.write_text(hosts_toml(net.addresses))
        env = child_env()
        out = subprocess.run([PY, "-m", "privatekeras", "pki", "--config", str(path)],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        procs = {}
        for host in WORKERS:
            log = open(d / "{}.log".format(NAMES[host]), "w")
            procs[host] = net.popen(host, [PY, "-m", "privatekeras", "worker", "--config",
                                           str(path), "--name", NAMES[host]],
                                    env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            log.close()
        h = Hosts()
        h.net, h.path, h.config, h.d, h.procs = net, path, load(path), d, procs
        yield h
    finally:
        net.close()


@pytest.fixture(scope="module")
def hosts(booting, small_model):
    """The five hosts with their workers READY (they start while the model trains)."""
    h = booting
    deadline = time.monotonic() + 180
    for host in WORKERS:
        while "READY" not in h.worker_log(host):
            dead = {k: p.returncode for k, p in h.procs.items() if p.poll() is not None}
            assert not dead and time.monotonic() < deadline, (
                "workers did not start (exited: {}); log of {}:\n{}".format(
                    dead, NAMES[host], h.worker_log(host)[-4000:]))
            time.sleep(0.2)
    return h


def _run_flow(h, model_dir, out):
    """Owner and client in their namespaces; returns (owner Lines, client Lines)."""
    env = child_env()
    owner = h.net.lines("own", [PY, str(SCRIPTS / "hosts_owner.py"), "--config", str(h.path),
                                "--name", "owner", "--model", str(model_dir / "small.keras"),
                                "--num-requests", str(N_QUERIES)], env)
    client = h.net.lines("cli", [PY, str(SCRIPTS / "hosts_client.py"), "--config", str(h.path),
                                 "--name", "alice", "--images", str(model_dir / "images.npy"),
                                 "--out", str(out)], env)
    try:
        assert client.finish(400) == 0, "client failed:\n{}\nOWNER:\n{}".format(
            client.output[-4000:], owner.output[-4000:])
        assert owner.finish(120) == 0, "owner failed:\n" + owner.output[-4000:]
    except subprocess.TimeoutExpired:
        for p in (owner, client):
            p.p.kill()
        raise AssertionError("owner/client timed out\nOWNER:\n{}\nCLIENT:\n{}\nWORKER0:\n{}"
                             .format(owner.output[-3000:], client.output[-3000:],
                                     h.worker_log("w0")[-3000:])) from None
    return owner, client


def test_private_predictions_across_hosts_match_keras_and_only_tls_crosses(hosts, small_model,
                                                                           tmp_path):
    h = hosts
    env = child_env()
    # Every frame on the hub (the bridge and its ports: all traffic between hosts), and, as
    # the control that the search works, worker0's loopback, where its mesh links run in clear
    # to the local ends of the stunnel links.
    captures = {where: h.net.lines(host, [PY, str(SCRIPTS / "capture.py")] + iface, env)
                for where, host, iface in (("bridge", "hub", []), ("w0-loopback", "w0", ["lo"]))}
    for c in captures.values():
        c.wait_for("CAPTURING", 30)
    out = tmp_path / "logits.npy"
    t0 = time.monotonic()
    owner, client = _run_flow(h, small_model, out)
    flow_seconds = time.monotonic() - t0
    time.sleep(0.5)  # let the captures read what is queued
    summaries = {}
    for where, c in captures.items():
        assert c.finish(30) == 0, c.output[-2000:]
        summaries[where] = _json_line(c.output)

    # The answers are plaintext Keras's.
    private, plain = np.load(out), np.load(small_model / "plain.npy")
    err = float(np.abs(private - plain).max())
    info = json.loads((tmp_path / "logits.npy.json").read_text())
    steps = json.loads(owner.find("STEPS")[1].split(" ", 1)[1])
    print("five hosts: max abs logit error {:.2g}; client latency median {:.1f} ms; private "
          "step median {:.1f} ms; owner+client flow {:.0f} s".format(
              err, 1000 * np.median(info["seconds"][1:]), 1000 * np.median(steps),
              flow_seconds))
    assert (private.argmax(1) == plain.argmax(1)).all(), (private.argmax(1), plain.argmax(1))
    assert err < LOGIT_ATOL, err
    assert owner.find("SERVED {}".format(N_QUERIES)), owner.output[-3000:]
    assert len(steps) == N_QUERIES and all(s > 0 for s in steps), steps
    # The owner and the client accept no connections (no TensorFlow server, no API); the
    # client did not even import TensorFlow.
    for when in ("LISTENING ", "LISTENING-AFTER "):
        assert owner.find(when)[1].split()[1:] == [], owner.output[-3000:]
    assert info["listening"] == [], info["listening"]
    assert info["tensorflow_imported"] is False

    bridge, control = summaries["bridge"], summaries["w0-loopback"]
    print("bridge:", bridge)
    print("worker0 loopback:", control)
    assert bridge["payload_bytes"] > 10000 and bridge["tls_app_records"] > 0, bridge
    assert not any(bridge["markers"].values()), bridge["markers"]
    ports = {int(p) for p in bridge["ports"]}
    assert {API_PORT, LINK_PORT} <= ports, ports  # the API and the links both carried data
    assert all(p in (API_PORT, LINK_PORT) or p >= 32768 for p in ports), ports
    assert not ports & (set(COMPUTE.values()) | set(MESH.values())), ports
    for marker in MESH_MARKERS:  # the control: the same search finds them in clear
        assert control["markers"][marker] > 0, control
    assert set(PLAINTEXT_MARKERS) <= set(bridge["markers"]), bridge["markers"]

    # The links carried the workers' traffic, each end showing the peer's worker certificate.
    log = h.stunnel_log("w0")
    assert "CN=worker1, OU=worker" in log and "CN=worker2, OU=worker" in log, log[-3000:]


_CONNECT = r"""
import json, socket, sys
out = []
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        out.append([target, "connected"])
    except OSError as exc:
        out.append([target, type(exc).__name__])
print(json.dumps(out))
"""


def _connect_from(h, src, targets):
    out = h.net.run(src, [PY, "-c", _CONNECT] + targets, child_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return dict(_json_line(out.stdout))


def _outside(h, w):
    """What listens in worker host ``w`` beyond loopback, as sorted (IPv4 address, port)."""
    return sorted((_as_v4(a), p) for a, p in h.net.listening(w) if not is_loopback(a))


def test_no_compute_port_is_reachable_from_the_owner_or_client_host(hosts):
    h = hosts
    loopback_ports = sorted(list(COMPUTE.values()) + list(MESH.values()))
    # The control: a stray listener on worker2's bridge address at a compute port is seen by
    # both checks below (the connect succeeds; ss lists it beyond loopback).
    stray_at = "{}:{}".format(h.net.addresses["w2"], COMPUTE["w2"])
    stray = h.net.lines("w2", [PY, "-c", "import socket, sys; s = socket.socket(); "
                               "s.bind(({!r}, {})); s.listen(); print('LISTENING', flush=True); "
                               "sys.stdin.read()".format(h.net.addresses["w2"], COMPUTE["w2"])],
                        child_env())
    try:
        stray.wait_for("LISTENING", 30)
        assert _connect_from(h, "cli", [stray_at]) == {stray_at: "connected"}
        assert (h.net.addresses["w2"], COMPUTE["w2"]) in _outside(h, "w2")
    finally:
        stray.finish(10)

    for src in ("own", "cli"):
        targets = ["{}:{}".format(h.net.addresses[w], port) for w in WORKERS
                   for port in loopback_ports + [API_PORT, LINK_PORT]]
        results = _connect_from(h, src, targets)
        assert sorted(results) == sorted(targets), results
        for target, result in results.items():
            if int(target.rsplit(":", 1)[1]) in loopback_ports:
                assert result == "ConnectionRefusedError", (src, target, result)
            else:  # the API and the link of every worker are reachable
                assert result == "connected", (src, target, result)
    # What listens in each worker's namespace: beyond loopback, only its API and its link;
    # on loopback, its own TensorFlow server and mesh, and the local ends of its links.
    for w in WORKERS:
        assert _outside(h, w) == [(h.net.addresses[w], API_PORT),
                                  (h.net.addresses[w], LINK_PORT)], (w, h.net.listening(w))
        inside = sorted(p for a, p in h.net.listening(w) if is_loopback(a))
        assert inside == loopback_ports, (w, h.net.listening(w))


def test_a_workers_api_refuses_peers_without_a_certificate_of_the_cluster(hosts, tmp_path):
    from privatekeras.deploy import pki

    h = hosts
    other_ca = pki.make_ca(subject="another CA")
    cert, key = pki.issue(other_ca[0], other_ca[1], "alice", "client")
    pki.write_public(tmp_path / "alice.crt", cert)
    pki.write_private(tmp_path / "alice.key", key)
    alice = h.config.party("alice")
    peers = {
        "the cluster's alice": {"cert": alice.cert, "key": alice.key},  # the control
        "alice by another CA": {"cert": str(tmp_path / "alice.crt"),
                                "key": str(tmp_path / "alice.key")},
        "no certificate": {},
        "plain TCP": {"plain": True},
    }
    attempts = [(w, what, dict(args, address=h.config.worker(NAMES[w]).api_address,
                               worker=NAMES[w], ca=h.config.ca))
                for w in WORKERS for what, args in peers.items()]
    out = h.net.run("cli", [PY, str(SCRIPTS / "netns_api_probe.py"),
                            json.dumps([a for _, _, a in attempts])], child_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    for (worker, what, _), result in zip(attempts, _json_line(out.stdout)):
        if what == "the cluster's alice":
            assert result["ok"], (worker, result)
            continue
        TALLY["bad inputs tried"] += 1
        assert not result["ok"], "{} accepted {}: {}".format(worker, what, result)
        assert result["code"] == "UNAVAILABLE" and result["seconds"] < 10, (what, result)
        assert result["raises"] in ("AccessDeniedError", "WorkerUnavailableError"), result
        TALLY["bad inputs rejected"] += 1


def _link_probe(h, worker, *args):
    address = h.config.worker(NAMES[worker]).link_address
    out = h.net.run("cli", [PY, str(SCRIPTS / "tls_probe.py"), "--address", address, "--ca",
                            h.config.ca] + list(args), child_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return _json_line(out.stdout)


def test_only_workers_may_use_a_workers_link(hosts):
    h = hosts
    party = h.config.party
    # The control: worker0's certificate gets through worker1's link to its TensorFlow server
    # (an HTTP/2 SETTINGS frame comes back), so the probe can tell "refused" from "through".
    good = _link_probe(h, "w1", "--cert", party("worker0").cert, "--key", party("worker0").key)
    assert good["ok"] and good["version"] == "TLSv1.3", good
    for what, args in {"a client's certificate": ["--cert", party("alice").cert,
                                                  "--key", party("alice").key],
                       "the owner's certificate": ["--cert", party("owner").cert,
                                                   "--key", party("owner").key],
                       "no certificate": [],
                       "plain TCP": ["--plain"],
                       "worker0's certificate over TLS 1.2": [
                           "--cert", party("worker0").cert, "--key", party("worker0").key,
                           "--tls12"]}.items():
        TALLY["bad inputs tried"] += 1
        result = _link_probe(h, "w1", *args)
        assert not result["ok"] and result["reply"] == "", (what, result)
        TALLY["bad inputs rejected"] += 1
    log = h.stunnel_log("w1")
    assert "Rejected by CERT at depth=0: CN=alice, OU=client" in log, log[-3000:]
    assert "Rejected by CERT at depth=0: CN=owner, OU=owner" in log, log[-3000:]


_CONNECT_LATE = r"""
import sys, time
import privatekeras as pk
cluster = pk.Cluster.from_config(sys.argv[1], "alice")
t = time.monotonic()
try:
    pk.connect(cluster, (1, 28, 28, 1), (1, 10), timeout=5)
    print("CONNECTED")
except pk.WorkerUnavailableError as exc:
    print("UNAVAILABLE {:.1f} {}".format(time.monotonic() - t, exc))
"""


def test_a_stopped_worker_gives_a_clear_error_not_a_hang(hosts, small_model, tmp_path):
    """Last in this module: it kills worker2 (SIGKILL; its stunnel goes with it)."""
    h = hosts
    env = child_env()
    owner = h.net.lines("own", [PY, str(SCRIPTS / "hosts_owner.py"), "--config", str(h.path),
                                "--name", "owner", "--model",
                                str(small_model / "small.keras")], env)
    client = h.net.lines("cli", [PY, str(SCRIPTS / "hosts_client.py"), "--config", str(h.path),
                                 "--name", "alice", "--images", str(small_model / "images.npy"),
                                 "--out", str(tmp_path / "before.npy"), "--then-wait"], env)
    try:
        client.wait_for("WAITING", 300)  # served, and answered, while all three ran
        TALLY["faults injected"] += 1
        killed = time.monotonic()
        h.procs["w2"].send_signal(signal.SIGKILL)
        h.procs["w2"].wait(10)
        client.send("query again")
        t_client, line = client.wait_for("ERROR", FAIL_WITHIN + 15)
        print("client:", line)
        assert line.split()[2] == "WorkerUnavailableError" and "worker2" in line, line
        assert t_client - killed < FAIL_WITHIN, t_client - killed
        t_owner, line = owner.wait_for("ERROR", FAIL_WITHIN + 15)
        print("owner, {:.1f} s after the kill: {}".format(t_owner - killed, line))
        assert line.split()[1] == "WorkerUnavailableError" and "worker2" in line, line
        assert t_owner - killed < FAIL_WITHIN, t_owner - killed
        assert client.finish(30) == 0 and owner.finish(30) == 0
        # A client that connects now is told which worker is missing, after its timeout.
        out = h.net.run("cli", [PY, "-c", _CONNECT_LATE, str(h.path)], env, timeout=120)
        print("new client:", out.stdout.strip())
        assert out.stdout.startswith("UNAVAILABLE") and "worker2" in out.stdout, (
            out.stdout + out.stderr[-3000:])
        assert float(out.stdout.split()[1]) < FAIL_WITHIN
        TALLY["faults survived"] += 1
    finally:
        for p in (owner, client):
            if p.p.poll() is None:
                p.p.kill()
