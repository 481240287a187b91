"""Workers as real processes: start, loopback binding, credentials, bad configurations, stop
by PID."""

import os
import socket

import pytest

import privatekeras as pk
from conftest import free_hosts, rejects, worker_pids


def _listen_addresses(port):
    """Local addresses listening on ``port`` (any process), from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, p = local.split(":")
                if state == "0A" and int(p, 16) == port:
                    found.append(addr)
    return found


def test_start_binds_loopback_only_and_stop_ends_workers():
    from privatekeras.deploy.listening import is_loopback, listening_sockets
    from privatekeras.deploy.pki import local_dir

    hosts = free_hosts()
    cluster = pk.Cluster(hosts)
    assert "stopped" in repr(cluster)
    cluster.start()
    try:
        assert cluster.running and len(cluster.pids) == 3
        assert "running" in repr(cluster) and "on this machine" in repr(cluster)
        assert set(cluster.pids) <= set(worker_pids())
        # Each worker listens on three ports, all on loopback only: its API (the address it
        # was given), its TensorFlow compute port and its mesh port (which no owner or client
        # is told).
        compute = set()
        for host, pid in zip(hosts, cluster.pids):
            api = int(host.split(":")[1])
            sockets = listening_sockets(pid)
            assert sockets and all(is_loopback(f, a) for f, a, _ in sockets), (host, sockets)
            ports = {p for _, _, p in sockets}
            assert api in ports and len(ports) == 3, (host, sockets)
            compute |= ports - {api}
        assert len(compute) == 6 and not compute & {int(h.split(":")[1]) for h in hosts}
        # The throw-away credentials: a private per-user directory, not a /tmp name.
        creds = local_dir(cluster._local_key())
        assert os.stat(creds).st_mode & 0o777 == 0o700
        assert not creds.startswith("/tmp/") or "PRIVATEKERAS_RUNTIME_DIR" in os.environ
        boards = cluster.status("owner")
        assert [b.worker for b in boards] == ["worker0", "worker1", "worker2"]
        assert all(b.state == "empty" for b in boards)
        cluster.start()  # idempotent while running
        assert cluster.running
    finally:
        pids = cluster.pids
        cluster.stop()
    assert not cluster.running
    assert not set(pids) & set(worker_pids())
    for h in hosts:
        assert _listen_addresses(int(h.split(":")[1])) == []
    assert not os.path.exists(creds), "stop() leaves the throw-away credentials behind"


@pytest.mark.parametrize("hosts,match", [
    (["localhost:4000", "localhost:4001"], "exactly 3 workers"),
    (["localhost:4000"] * 4, "exactly 3 workers"),
    (["localhost:4000", "localhost", "localhost:4002"], "has no port"),
    (["localhost:4000", "localhost:x", "localhost:4002"], "port must be a number"),
    (["localhost:4000", "localhost:4000", "localhost:4002"], "distinct"),
    (["localhost:4000", "localhost:99999", "localhost:4002"], "port must be a number"),
])
def test_bad_cluster_configurations(hosts, match):
    with rejects(pk.ClusterError, match=match):
        pk.Cluster(hosts)


def test_port_in_use_is_a_clear_error():
    hosts = free_hosts()
    busy = socket.socket()
    busy.bind(("127.0.0.1", int(hosts[1].split(":")[1])))
    busy.listen(1)
    try:
        with rejects(pk.PortInUseError, match="already in use"):
            pk.Cluster(hosts).start()
    finally:
        busy.close()


def test_two_clusters_on_overlapping_ports():
    hosts = free_hosts()
    first = pk.Cluster(hosts).start()
    try:
        other = [hosts[2], "localhost:{}".format(int(hosts[2].split(":")[1]) + 1),
                 "localhost:{}".format(int(hosts[2].split(":")[1]) + 2)]
        with rejects(pk.PortInUseError, match=hosts[2].split(":")[1]):
            pk.Cluster(other).start()
        assert first.running
    finally:
        first.stop()


def test_external_cluster_cannot_be_started():
    cluster = pk.Cluster(free_hosts(), auto_managed=False)
    with pytest.raises(pk.ClusterError, match="not auto-managed"):
        cluster.start()


def test_worker_dies_with_its_owner():
    """A killed model owner leaves no workers behind (PR_SET_PDEATHSIG)."""
    import subprocess
    import sys
    import time

    from conftest import child_env

    code = ("import privatekeras as pk, sys, time\n"
            "c = pk.Cluster(sys.argv[1].split(',')).start()\n"
            "print('PIDS', *c.pids, flush=True)\ntime.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", code, ",".join(free_hosts())],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=child_env())
    line = ""
    while not line.startswith("PIDS"):
        line = owner.stdout.readline()
        assert line, "owner died before starting its workers"
    pids = [int(p) for p in line.split()[1:]]
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and set(pids) & set(worker_pids()):
        time.sleep(0.1)
    assert not set(pids) & set(worker_pids())
    owner.stdout.close()
