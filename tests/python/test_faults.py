"""Faults with real processes: a worker killed mid-serve, a client dying mid-query, the
model owner killed. Every failure must be a clear error within seconds, never a hang."""

import os
import signal
import time

import numpy as np

from conftest import LOGIT_ATOL, TALLY, free_hosts, worker_pids
from procs import Proc
from test_cluster import _listen_addresses

FAIL_WITHIN = 10.0  # seconds from a fault to a clear error in every waiting process


def _ports(hosts):
    return [int(h.split(":")[1]) for h in hosts]


def test_worker_killed_mid_serve_then_restart_in_the_same_process(models, tmp_path):
    hosts = free_hosts()
    h = ",".join(hosts)
    owner = Proc("owner_serve.py", ["--hosts", h, "--model", models / "tutorial.keras",
                                    "--restart-after-fault"])
    clients = []
    try:
        pids = [int(p) for p in owner.wait_for("WORKERS", 120)[1].split()[1:]]
        owner.wait_for("SERVING", 180)
        clients = [Proc("load_client.py", ["--hosts", h, "--images", models / "images.npy",
                                           "--start", 10 * k, "--count", 100000,
                                           "--out", tmp_path / "c{}.npz".format(k)])
                   for k in range(2)]
        for c in clients:
            c.wait_for("CONNECTED", 120)
        while sum(line.startswith("privatekeras: answered") for _, line in owner.lines) < 4:
            assert owner.p.poll() is None, owner.output[-3000:]
            time.sleep(0.1)
        killed_at = time.time()
        os.kill(pids[1], signal.SIGKILL)
        TALLY["faults injected"] += 1

        # Every waiting client: a clear error within FAIL_WITHIN seconds, then it exits.
        for c in clients:
            t, line = c.wait_for("QUERY FAILED", 60)
            failed_at = float(line.split()[3])
            assert failed_at - killed_at < FAIL_WITHIN, line
            assert "WorkerUnavailableError" in line and "worker" in line, line
            assert c.wait(60) == 0, c.output[-3000:]
        # The owner: serve() raises a clear error within FAIL_WITHIN seconds ...
        t, line = owner.wait_for("SERVE FAILED", 60)
        assert t - killed_at < FAIL_WITHIN, (t - killed_at, line)
        assert "WorkerUnavailableError" in line, line
        # ... stop() ends every worker process and frees every port ...
        owner.wait_for("STOPPED", 30)
        assert not set(pids) & set(worker_pids())
        assert all(_listen_addresses(p) == [] for p in _ports(hosts))
        # ... and the same process starts the cluster again and serves again.
        owner.wait_for("RESTARTED", 120)
        owner.wait_for("SERVING", 180)
        again = Proc("load_client.py", ["--hosts", h, "--images", models / "images.npy",
                                        "--start", 50, "--count", 1, "--out", tmp_path / "a.npz"])
        assert again.wait(180) == 0, again.output[-3000:]
        assert owner.wait(120) == 0, owner.output[-3000:]
        assert "SERVED AGAIN 1" in owner.output
        got = np.load(tmp_path / "a.npz")["logits"]
        plain = np.load(models / "tutorial_logits.npy")[50:51]
        np.testing.assert_allclose(got, plain, atol=LOGIT_ATOL)
        TALLY["faults survived"] += 1
    finally:
        for c in clients:
            c.kill()
        owner.kill()


def test_a_client_dying_mid_query_does_not_wedge_the_queue(models, tmp_path):
    h = ",".join(free_hosts())
    stop = tmp_path / "stop"
    owner = Proc("owner_serve.py", ["--hosts", h, "--model", models / "tutorial.keras",
                                    "--stop-file", stop])
    try:
        owner.wait_for("SERVING", 180)
        # One client dies after its ticket with its shares on worker 0 only (the owner must
        # drop that query, not wait for it), one right after a complete query and ticket.
        for k, how in enumerate(["mid-put", "after-ticket"]):
            dying = Proc("load_client.py", ["--hosts", h, "--images", models / "images.npy",
                                            "--start", k, "--count", 1, "--die", how,
                                            "--out", tmp_path / "d.npz"])
            assert dying.wait(120) == 3, dying.output[-3000:]
            assert "DYING" in dying.output
            TALLY["faults injected"] += 1
        # The next client is answered, with its own answers.
        nxt = Proc("load_client.py", ["--hosts", h, "--images", models / "images.npy",
                                      "--start", 20, "--count", 2, "--timeout", 30,
                                      "--out", tmp_path / "n.npz"])
        assert nxt.wait(120) == 0, nxt.output[-3000:] + owner.output[-3000:]
        got = np.load(tmp_path / "n.npz")
        assert str(got["error"]) == ""
        plain = np.load(models / "tutorial_logits.npy")[20:22]
        np.testing.assert_allclose(got["logits"], plain, atol=LOGIT_ATOL)
        assert "dropped a query of client" in owner.output  # the incomplete one
        # Stopping does not wait forever for the dead client's acknowledgment.
        stop.write_text("stop")
        assert owner.wait(60) == 0, owner.output[-3000:]
        assert "SERVED 5" in owner.output  # 2 attach queries + 1 orphan + 2
        TALLY["faults survived"] += 2
    finally:
        owner.kill()


def _start_external_workers(hosts):
    return [Proc("worker_proc.py", ["--hosts", ",".join(hosts), "--index", i]) for i in range(3)]


def test_model_owner_killed_clients_get_a_clear_error(models, tmp_path):
    """Owner of an external cluster killed mid-serve: its heartbeat stops and waiting
    clients get OwnerUnavailableError; owner of its own cluster killed: its workers die with
    it and clients get WorkerUnavailableError."""
    for external in (True, False):
        hosts = free_hosts()
        h = ",".join(hosts)
        workers = _start_external_workers(hosts) if external else []
        owner = client = None
        try:
            for w in workers:
                w.wait_for("READY", 120)
            owner = Proc("owner_serve.py", ["--hosts", h, "--model", models / "tutorial.keras"]
                         + (["--external"] if external else []))
            owner.wait_for("SERVING", 180)
            client = Proc("load_client.py", ["--hosts", h, "--images", models / "images.npy",
                                             "--count", 100000, "--timeout", 120,
                                             "--out", tmp_path / "o.npz"])
            while sum(line.startswith("privatekeras: answered") for _, line in owner.lines) < 3:
                assert owner.p.poll() is None, owner.output[-3000:]
                time.sleep(0.1)
            killed_at = time.time()
            owner.kill()
            TALLY["faults injected"] += 1
            t, line = client.wait_for("QUERY FAILED", 60)
            failed_at = float(line.split()[3])
            want = "OwnerUnavailableError" if external else "WorkerUnavailableError"
            assert want in line, line
            assert failed_at - killed_at < FAIL_WITHIN, line
            assert client.wait(60) == 0
            TALLY["faults survived"] += 1
        finally:
            for p in [client, owner] + workers:
                if p is not None:
                    p.kill()
