"""Workers on separate hosts, linked by privatekeras' mutual-TLS tunnels.

Five network namespaces stand in for five hosts (three workers, the model owner, a client),
joined by a private bridge. Every TensorFlow server stays on its host's loopback; each host
runs ``python -m privatekeras.tunnel`` from one hosts file. A real model trained on
Fashion-MNIST is shared and served through the tunnels and its private logits are compared
with plaintext Keras; then the negative checks: peers without a valid certificate are
refused, worker ports cannot be reached from another host, and what crosses the links is TLS,
not TensorFlow's plaintext gRPC.
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import LOGIT_ATOL, SCRIPTS, child_env
from netns import Net, netns_unavailable

HOSTS = {"w0": 1, "w1": 2, "w2": 3, "own": 10, "cli": 11}
WORKERS = ["w0", "w1", "w2"]
TUNNEL_PORT = 7000
TF_PORTS = {"w0": 4000, "w1": 4001, "w2": 4002, "own": 4100, "cli": 4101}
NAMES = {"w0": "worker0", "w1": "worker1", "w2": "worker2", "own": "owner", "cli": "alice"}
N_QUERIES = 12
PY = sys.executable

_reason = netns_unavailable()
needs_netns = pytest.mark.skipif(_reason is not None, reason="network namespaces are needed to "
                                 "stand in for separate hosts: {}".format(_reason))


def _hosts_toml(addresses):
    lines = ['[cluster]', 'ca = "pki/ca.crt"', '']
    for w in WORKERS:
        lines += ['[[workers]]', 'name = "{}"'.format(NAMES[w]),
                  'tunnel = "{}:{}"'.format(addresses[w], TUNNEL_PORT),
                  'tf_port = {}'.format(TF_PORTS[w]), '']
    lines += ['[owner]', 'name = "owner"', 'tf_port = {}'.format(TF_PORTS["own"]), '',
              '[[clients]]', 'name = "alice"', 'tf_port = {}'.format(TF_PORTS["cli"]), '']
    return "\n".join(lines)


def _wait_for(path, text, procs, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                if text in f.read():
                    return
        except OSError:
            pass
        for p in procs:
            if p.poll() is not None:
                raise AssertionError("{} exited with {} before {!r}:\n{}".format(
                    p.args, p.returncode, text, _tail(path)))
        time.sleep(0.2)
    raise AssertionError("no {!r} in {} after {} s:\n{}".format(text, path, timeout,
                                                                _tail(path)))


def _tail(path, n=3000):
    try:
        with open(path) as f:
            return f.read()[-n:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small CNN trained briefly on real Fashion-MNIST, its test images and Keras logits."""
    import keras

    from privatekeras.data import load_fashion_mnist

    keras.utils.set_random_seed(7)
    (x_train, y_train), (x_test, _) = load_fashion_mnist()
    L = keras.layers
    model = keras.Sequential([keras.Input((28, 28, 1)), L.Conv2D(4, 3, strides=2), L.ReLU(),
                              L.Flatten(), L.Dense(10)], name="tiny_cnn")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[:4000], y_train[:4000], epochs=1, batch_size=64, verbose=0)
    d = tmp_path_factory.mktemp("tiny")
    model.save(d / "tiny.keras")
    images = x_test[:N_QUERIES]
    np.save(d / "images.npy", images)
    np.save(d / "plain.npy", model.predict(images, verbose=0))
    return d


@pytest.fixture(scope="module")
def cluster_net(tmp_path_factory):
    """Five namespaces; a worker and its tunnel in each worker namespace; the owner's and the
    client's tunnels in theirs. Yields (net, config path, log dir)."""
    from privatekeras.hosts import load
    from privatekeras.tunnel import make_pki

    d = tmp_path_factory.mktemp("hosts")
    net = Net(HOSTS)
    try:
        config = d / "hosts.toml"
        config.write_text(_hosts_toml(net.addresses))
        make_pki(load(config))
        env = child_env()
        procs = {}
        for host in HOSTS:
            name = NAMES[host]
            log = open(d / "tunnel-{}.log".format(name), "w")
            procs["tunnel-" + name] = net.popen(
                host, [PY, "-m", "privatekeras.tunnel", "--config", str(config), "--name", name],
                env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
        for host in WORKERS:
            name = NAMES[host]
            log = open(d / "{}.log".format(name), "w")
            procs[name] = net.popen(
                host, [PY, "-m", "privatekeras.worker", "--config", str(config), "--name", name],
                env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            log.close()
        for host in HOSTS:
            _wait_for(d / "tunnel-{}.log".format(NAMES[host]), "READY tunnel", procs.values())
        for host in WORKERS:
            _wait_for(d / "{}.log".format(NAMES[host]), "READY", procs.values())
        net.started = procs
        yield net, config, d
    finally:
        net.close()


@needs_netns
def test_private_predictions_through_tunnels(cluster_net, tiny_model, tmp_path):
    net, config, logs = cluster_net
    env = child_env()
    # Capture every frame crossing the bridge (all links between hosts), and, as a control
    # that the detector works, worker0's own loopback, where TensorFlow speaks in clear.
    captures = {
        "links": net.popen("hub", [PY, str(SCRIPTS / "capture.py")], env, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True),
        "w0-loopback": net.popen("w0", [PY, str(SCRIPTS / "capture.py"), "lo"], env,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True),
    }
    for c in captures.values():
        assert c.stdout.readline().strip() == "CAPTURING"

    out = tmp_path / "logits.npy"
    wrap = [PY, "-m", "privatekeras.loopback", PY]
    owner = net.popen("own", wrap + [str(SCRIPTS / "hosts_owner.py"), "--config", str(config),
                                     "--name", "owner", "--model",
                                     str(tiny_model / "tiny.keras"),
                                     "--num-requests", str(N_QUERIES)],
                      env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = net.popen("cli", wrap + [str(SCRIPTS / "hosts_client.py"), "--config", str(config),
                                      "--name", "alice", "--images",
                                      str(tiny_model / "images.npy"), "--out", str(out)],
                       env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client_out = client.communicate(timeout=400)[0]
        owner_out = owner.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        for p in (client, owner):
            p.kill()
        raise AssertionError("flow timed out\nOWNER:\n{}\nCLIENT:\n{}\nTUNNEL w0:\n{}".format(
            owner.communicate()[0][-3000:], client.communicate()[0][-3000:],
            _tail(logs / "tunnel-worker0.log"))) from None
    summaries = {}
    for key, c in captures.items():
        summaries[key] = json.loads(c.communicate(input="", timeout=30)[0].strip().splitlines()[-1])
    assert client.returncode == 0 and owner.returncode == 0, (
        "owner rc={} client rc={}\nOWNER:\n{}\nCLIENT:\n{}".format(
            owner.returncode, client.returncode, owner_out[-4000:], client_out[-4000:]))

    # The answers: the same as plaintext Keras.
    private, plain = np.load(out), np.load(tiny_model / "plain.npy")
    err = np.abs(private - plain).max()
    timings = json.loads((tmp_path / "logits.npy.json").read_text())
    print("through tunnels: max abs logit error {:.4f}, median {:.1f} ms/query".format(
        err, 1000 * np.median(timings["seconds"][1:])))
    assert (private.argmax(1) == plain.argmax(1)).all()
    assert err < LOGIT_ATOL
    assert "SERVED {}".format(N_QUERIES) in owner_out

    # The owner's and client's own TensorFlow servers listened on loopback only.
    assert "LOOPBACK_ACTIVE True" in owner_out, owner_out[-2000:]
    owner_listen = owner_out.split("LISTENING", 1)[1].splitlines()[0].split()
    assert "127.0.0.1:{}".format(TF_PORTS["own"]) in owner_listen
    for listen in (owner_listen, timings["listening"]):
        assert all(a.startswith("127.") for a in listen), listen

    # What crossed the links: TLS to the tunnel port only, no TensorFlow plaintext. The
    # control capture on worker0's loopback shows the same markers are there in clear.
    links, control = summaries["links"], summaries["w0-loopback"]
    print("captured on the links:", links)
    assert links["payload_bytes"] > 10000, links
    # Every TCP payload went to or from a tunnel port (the other end: an ephemeral port).
    assert all(int(p) == TUNNEL_PORT or int(p) >= 32768 for p in links["ports"]), links["ports"]
    assert str(TUNNEL_PORT) in links["ports"]
    for port in TF_PORTS.values():
        assert str(port) not in links["ports"], (port, links["ports"])
    assert links["tls_app_records"] > 0
    assert not any(links["markers"].values()), links["markers"]
    assert control["markers"]["/job:"] > 0 and control["markers"]["device:CPU"] > 0, control

    # Every tunnel used TLS 1.3 with mutual authentication.
    log = _tail(logs / "tunnel-worker0.log", 200000)
    assert "accepted owner from" in log and "accepted alice from" in log, log[-3000:]
    assert "accepted worker1 from" in log or "accepted worker2 from" in log
    assert "TLSv1.3" in log


def _probe(net, host, address, *extra):
    out = net.run(host, [PY, str(SCRIPTS / "tls_probe.py"), "--address", address] + list(extra),
                  child_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_netns
def test_peers_without_a_valid_certificate_are_refused(cluster_net, tmp_path):
    from privatekeras.hosts import load
    from privatekeras.tunnel import issue_cert, make_ca

    net, config, logs = cluster_net
    cfg = load(config)
    ca = cfg.ca
    address = "{}:{}".format(net.addresses["w0"], TUNNEL_PORT)
    log_path = logs / "tunnel-worker0.log"
    refused_before = _tail(log_path, 10 ** 7).count("refused")

    # A certificate of the cluster's CA is accepted (the probe itself works) ...
    good = _probe(net, "cli", address, "--ca", ca, "--cert", cfg.party("alice").cert,
                  "--key", cfg.party("alice").key)
    assert good["ok"] and good["version"] == "TLSv1.3", good

    # ... but not: no certificate; one from another CA claiming a party's name; one from the
    # cluster's CA for a name the hosts file does not list; plain TCP.
    other_ca = tmp_path / "other"
    make_ca(str(other_ca / "ca.crt"), str(other_ca / "ca.key"))
    issue_cert(str(other_ca / "ca.crt"), str(other_ca / "ca.key"), "alice",
               str(other_ca / "alice.crt"), str(other_ca / "alice.key"))
    ca_key = os.path.splitext(ca)[0] + ".key"
    issue_cert(ca, ca_key, "mallory", str(tmp_path / "mallory.crt"), str(tmp_path / "mallory.key"))
    attempts = {
        "no certificate": ["--ca", ca],
        "other CA": ["--ca", ca, "--cert", str(other_ca / "alice.crt"),
                     "--key", str(other_ca / "alice.key")],
        "unlisted name": ["--ca", ca, "--cert", str(tmp_path / "mallory.crt"),
                          "--key", str(tmp_path / "mallory.key")],
        "plain TCP": ["--ca", ca, "--plain"],
    }
    for what, args in attempts.items():
        result = _probe(net, "cli", address, *args)
        assert not result["ok"], (what, result)
        assert result.get("reply", "") == "", (what, result)  # not one byte from TensorFlow
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = _tail(log_path, 10 ** 7)
        if log.count("refused") - refused_before >= len(attempts):
            break
        time.sleep(0.2)
    assert log.count("refused") - refused_before >= len(attempts), log[-3000:]
    assert "'mallory' is not allowed" in log
    assert "certificate" in log.split("refused", 1 + refused_before)[-1]


@needs_netns
def test_worker_ports_are_not_reachable_from_other_hosts(cluster_net):
    net, config, logs = cluster_net
    code = ("import socket, sys\n"
            "try:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)\n"
            "    print('CONNECTED')\n"
            "except OSError as e:\n    print('FAILED', type(e).__name__)\n")
    for w in WORKERS:
        for port in TF_PORTS.values():
            out = net.run("own", [PY, "-c", code, net.addresses[w], str(port)], child_env())
            assert out.stdout.startswith("FAILED"), (w, port, out.stdout, out.stderr)
    # Inside each worker's host, only the tunnel listens beyond loopback.
    for w in WORKERS:
        out = net.run(w, [PY, "-c", "import netinfo; print(' '.join(netinfo.listening()))"],
                      dict(child_env(), PYTHONPATH=str(SCRIPTS) + os.pathsep +
                           child_env()["PYTHONPATH"]))
        listen = out.stdout.split()
        assert "127.0.0.1:{}".format(TF_PORTS[w]) in listen, (w, listen)
        beyond = [a for a in listen if not a.startswith("127.")]
        assert beyond == ["{}:{}".format(net.addresses[w], TUNNEL_PORT)], (w, listen)



@needs_netns
def test_a_stopped_worker_gives_a_clear_error_not_a_hang(cluster_net):
    """Run last among the network tests: it stops worker2. Its peers' tunnels close their
    loopback port for it, so a client gets WorkerUnavailableError within its timeout."""
    net, config, logs = cluster_net
    worker2 = net.started["worker2"]
    worker2.terminate()
    worker2.wait(10)
    _wait_for(logs / "tunnel-alice.log", "worker2 is down", [], timeout=30)
    code = ("import sys, time, privatekeras as pk\n"
            "c = pk.Cluster.from_config(sys.argv[1], 'alice')\n"
            "t = time.monotonic()\n"
            "try:\n    pk.connect(c, (1, 28, 28, 1), (1, 10), timeout=5)\n"
            "except pk.WorkerUnavailableError as e:\n"
            "    print('UNAVAILABLE', round(time.monotonic() - t, 1), e)\n")
    out = net.run("cli", [PY, "-m", "privatekeras.loopback", PY, "-c", code, str(config)],
                  child_env(), timeout=120)
    assert "UNAVAILABLE" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "127.0.0.1:4002" in out.stdout
    assert float(out.stdout.split("UNAVAILABLE")[1].split()[0]) < 15

# -- the hosts file and certificates (no network needed) ----------------------------------
GOOD = """
[cluster]
ca = "pki/ca.crt"
[[workers]]
name = "worker0"
tunnel = "10.0.0.1:7000"
tf_port = 4000
[[workers]]
name = "worker1"
tunnel = "10.0.0.2:7000"
tf_port = 4001
[[workers]]
name = "worker2"
tunnel = "10.0.0.3:7000"
tf_port = 4002
[owner]
name = "owner"
tf_port = 4100
[[clients]]
name = "alice"
tf_port = 4101
"""


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.replace('ca = "pki/ca.crt"', ""), "cluster.ca is missing"),
    (lambda t: t.replace("tf_port = 4001", 'tf_port = "4001"'), "workers[1].tf_port must be"),
    (lambda t: t.replace("tf_port = 4002", "tf_port = 4000"), "tf_port 4000 is used by both"),
    (lambda t: t.replace('tunnel = "10.0.0.3:7000"', 'tunnel = "10.0.0.3"'),
     "workers[2].tunnel must be 'host:port'"),
    (lambda t: t.replace('tunnel = "10.0.0.1:7000"', 'tunnel = "127.0.0.1:7000"'),
     "workers[0].tunnel 127.0.0.1:7000 is a loopback address"),
    (lambda t: t.replace('name = "alice"', 'name = "worker0"'), "'worker0' is used twice"),
    (lambda t: t.replace('name = "alice"', 'name = "al ice"'), "clients[0].name must be"),
    (lambda t: t.replace("tf_port = 4100", "tf_port = 4100\nport = 1"),
     "owner: unknown field(s) port"),
    (lambda t: t[:t.index("[[workers]]\nname = \"worker2\"")],
     "must list exactly 3 workers (three-party computation), got 2"),
    (lambda t: t + "[[workers]\n", "not valid TOML"),
])
def test_bad_hosts_files_name_the_field(tmp_path, edit, fragment):
    from privatekeras.hosts import ConfigError, load

    path = tmp_path / "hosts.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert fragment in str(info.value), str(info.value)


def test_hosts_file_gives_clusters_and_worker_arguments(tmp_path):
    import privatekeras as pk
    from privatekeras.hosts import ConfigError, worker_args

    path = tmp_path / "hosts.toml"
    path.write_text(GOOD)
    with pytest.warns(RuntimeWarning, match="ALL network interfaces"):
        cluster = pk.Cluster.from_config(path, "alice")  # this test process is not confined
    assert cluster.hosts == ["127.0.0.1:4000", "127.0.0.1:4001", "127.0.0.1:4002"]
    assert cluster.local_address == "127.0.0.1:4101" and not cluster.auto_managed
    assert worker_args(path, "worker2") == (cluster.hosts, 2, "pk")
    with pytest.raises(ConfigError, match="is a worker"):
        pk.Cluster.from_config(path, "worker1")
    with pytest.raises(ConfigError, match="no party named 'bob'"):
        pk.Cluster.from_config(path, "bob")


def test_pki_keys_are_private_and_certificates_chain_to_the_ca(tmp_path):
    from privatekeras.hosts import load
    from privatekeras.tunnel import make_pki

    path = tmp_path / "hosts.toml"
    path.write_text(GOOD)
    config = load(path)
    written = make_pki(config)
    assert len(written) == 2 + 2 * 5
    for f in written:
        mode = os.stat(f).st_mode & 0o777
        assert mode == (0o600 if f.endswith(".key") else mode), (f, oct(mode))
    for party in config.parties:
        out = subprocess.run(["openssl", "verify", "-CAfile", config.ca, party.cert],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        subject = subprocess.run(["openssl", "x509", "-in", party.cert, "-noout", "-subject"],
                                 capture_output=True, text=True).stdout
        assert "CN = {}".format(party.name) in subject
    assert make_pki(config) == []  # idempotent: nothing is re-issued
