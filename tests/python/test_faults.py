"""Faults with real processes: a worker killed mid-serve, clients dying mid-query, the model
owner killed. Every failure must be a clear error within seconds, never a hang, and what
survives must go on answering correctly."""

import os
import signal
import time

import numpy as np

from conftest import LOGIT_ATOL, TALLY, free_hosts, worker_pids
from procs import Proc
from test_cluster import _listen_addresses

from privatekeras.cluster import _free_loopback_ports

FAIL_WITHIN = 10.0  # seconds from a fault to a clear error in every waiting process


def _ports(hosts):
    return [int(h.split(":")[1]) for h in hosts]


def _failure(line):
    """``(unix time, phase, message)`` of a load_client ``QUERY FAILED`` line."""
    words = line.split()
    return float(words[3]), words[8].rstrip(":"), line.split(": ", 1)[1]


def _failures(clients, killed_at):
    """``(phase, message, line)`` of each client's failed query after a fault injected at
    ``killed_at`` (time.time), each reported within FAIL_WITHIN seconds of it."""
    out = []
    for c in clients:
        _, line = c.wait_for("QUERY FAILED", 60)
        failed_at, phase, message = _failure(line)
        assert failed_at - killed_at < FAIL_WITHIN, line
        out.append((phase, message, line))
    return out


def _wait_answered(owner, n):
    """Wait until the owner's serve() has reported ``n`` answered queries."""
    deadline = time.monotonic() + 120
    while sum(line.startswith("privatekeras: answered") for _, line in owner.lines) < n:
        assert owner.p.poll() is None, owner.output[-3000:]
        assert time.monotonic() < deadline, owner.output[-3000:]
        time.sleep(0.05)


def test_worker_killed_mid_serve_then_restart_in_the_same_process(models, tmp_path):
    hosts = free_hosts()
    h = ",".join(hosts)
    owner = Proc("owner_serve.py", ["--hosts", h, "--model", models / "tutorial.keras",
                                    "--restart-after-fault"])
    clients = []
    try:
        pids = [int(p) for p in owner.wait_for("WORKERS", 120)[1].split()[1:]]
        owner.wait_for("SERVING", 240)
        assert owner.find("SERVE FAILED") is None, owner.output[-8000:]  # share() failed
        clients = [Proc("load_client.py", ["--hosts", h, "--images", models / "images.npy",
                                           "--start", 10 * k, "--count", 100000,
                                           "--out", tmp_path / "c{}.npz".format(k)])
                   for k in range(3)]
        for c in clients:
            c.wait_for("CONNECTED", 120)
        _wait_answered(owner, 6)
        # Hold the query in flight: with worker 2 paused, the step being evaluated cannot end,
        # so its client waits for its answer (steps take ~15 ms and a Submit about as long:
        # without the pause, all three clients may be caught submitting); the others wait on
        # their Submit to worker 2. Then worker 1 dies, and worker 2 goes on.
        os.kill(pids[2], signal.SIGSTOP)
        time.sleep(0.5)
        killed_at = time.time()
        os.kill(pids[1], signal.SIGKILL)
        os.kill(pids[2], signal.SIGCONT)
        TALLY["faults injected"] += 1

        # Every client: a clear error within FAIL_WITHIN seconds, then it exits. One that
        # was waiting for its answer (all three workers held its shares) is told a worker is
        # unavailable; one caught between queries may instead be told serving failed.
        phases = []
        for c, (phase, message, line) in zip(clients, _failures(clients, killed_at)):
            phases.append(phase)
            if phase == "fetch":
                assert message.startswith("WorkerUnavailableError") and "worker" in message, line
            else:
                assert message.startswith(("WorkerUnavailableError", "NotServingError")), line
                assert "worker" in message, line
            assert c.wait(60) == 0, c.output[-3000:]
        assert "fetch" in phases, phases  # 3 busy clients: at least one was waiting
        # The owner: serve() raises a clear error within FAIL_WITHIN seconds ...
        t, line = owner.wait_for("SERVE FAILED", 60)
        assert t - killed_at < FAIL_WITHIN, (t - killed_at, line)
        assert "WorkerUnavailableError" in line and "worker1" in line, line
        # ... stop() ends every worker process and frees every port ...
        owner.wait_for("STOPPED", 30)
        assert not set(pids) & set(worker_pids())
        assert all(_listen_addresses(p) == [] for p in _ports(hosts))
        # ... and the same process starts the cluster again and serves again.
        owner.wait_for("RESTARTED", 120)
        owner.wait_for("SERVING", 240)
        again = Proc("load_client.py", ["--hosts", h, "--images", models / "images.npy",
                                        "--start", 50, "--count", 1, "--out", tmp_path / "a.npz"])
        assert again.wait(180) == 0, again.output[-3000:]
        assert owner.wait(120) == 0, owner.output[-3000:]
        assert "SERVED AGAIN 1" in owner.output
        got = np.load(tmp_path / "a.npz")
        assert str(got["error"]) == "", (again.output[-3000:], owner.output[-12000:])
        plain = np.load(models / "tutorial_logits.npy")[50:51]
        np.testing.assert_allclose(got["logits"], plain, atol=LOGIT_ATOL)
        assert got["logits"].argmax() == plain.argmax()
        TALLY["faults survived"] += 1
    finally:
        for c in clients:
            c.kill()
        owner.kill()


def test_clients_dying_mid_query_do_not_wedge_serving(served, tmp_path):
    """Clients that die with their shares on one or two workers only, between submitting
    and fetching, or after fetching from one worker (against the session's served model):
    only the complete queries are evaluated, and the next client is answered correctly.
    (That stopping does not wait for the dead clients' fetches is checked when the session's
    owner stops: Served.close.)"""
    h = ",".join(served.hosts)
    before = served.answered()
    ways = ["submit-0", "submit-12", "no-fetch", "fetch-0"]
    for k, how in enumerate(ways):
        dying = Proc("load_client.py", ["--hosts", h, "--images", served.images_path,
                                        "--start", k, "--count", 1, "--die", how,
                                        "--out", tmp_path / "d.npz"])
        assert dying.wait(120) == 3, dying.output[-3000:]
        assert "DYING " + how in dying.output
        TALLY["faults injected"] += 1
    # no-fetch and fetch-0 were complete: evaluated; the partial ones never are.
    deadline = time.monotonic() + 60
    while served.answered() - before < 2:
        assert time.monotonic() < deadline, served.answered() - before
        time.sleep(0.05)
    # The next client is answered, with its own answers.
    nxt = Proc("load_client.py", ["--hosts", h, "--images", served.images_path,
                                  "--start", 20, "--count", 3, "--timeout", 30,
                                  "--out", tmp_path / "n.npz"])
    assert nxt.wait(120) == 0, nxt.output[-3000:] + served.owner.output[-3000:]
    got = np.load(tmp_path / "n.npz")
    assert str(got["error"]) == ""
    plain = served.plain[20:23]
    np.testing.assert_allclose(got["logits"], plain, atol=LOGIT_ATOL)
    assert (got["logits"].argmax(1) == plain.argmax(1)).all()
    time.sleep(1.0)  # a partial query, had it been evaluated late, would show here
    assert served.answered() - before == 2 + 3
    TALLY["faults survived"] += len(ways)


def _start_external_workers(hosts):
    """Three workers started by hand (as on their own hosts), with credentials made first as
    `privatekeras pki --hosts` does."""
    from privatekeras.deploy.pki import make_local

    make_local(hosts)
    free = ["127.0.0.1:{}".format(p) for p in _free_loopback_ports(6, avoid=_ports(hosts))]
    return [Proc("worker_proc.py", ["--hosts", ",".join(hosts), "--index", i,
                                    "--compute", ",".join(free[:3]),
                                    "--mesh", ",".join(free[3:])]) for i in range(3)]


def test_model_owner_killed_clients_get_a_clear_error(models, tmp_path):
    """Owner of external workers killed mid-serve: serving ends with it (its Serve call is
    gone), waiting clients get OwnerUnavailableError and a later client NotServingError, and
    the workers live on. Owner of its own cluster killed: its workers die with it and
    clients get WorkerUnavailableError."""
    from privatekeras.deploy.pki import remove_local

    for external in (True, False):
        hosts = free_hosts()
        h = ",".join(hosts)
        workers = _start_external_workers(hosts) if external else []
        owner, clients = None, []
        try:
            for w in workers:
                w.wait_for("READY", 120)
            owner = Proc("owner_serve.py", ["--hosts", h, "--model", models / "tutorial.keras"]
                         + (["--external"] if external else []))
            owner.wait_for("SERVING", 240)
            clients = [Proc("load_client.py", ["--hosts", h, "--images", models / "images.npy",
                                               "--start", 10 * k, "--count", 100000,
                                               "--timeout", 120,
                                               "--out", tmp_path / "o{}.npz".format(k)])
                       for k in range(3)]
            for c in clients:  # connected before the kill: connecting retries until --timeout
                c.wait_for("CONNECTED", 120)
            _wait_answered(owner, 6)
            killed_at = time.time()
            owner.kill()
            TALLY["faults injected"] += 1
            phases = []
            for c, (phase, message, line) in zip(clients, _failures(clients, killed_at)):
                phases.append(phase)
                if not external:  # the workers die with the owner (or just after it)
                    gone = ("WorkerUnavailableError", "OwnerUnavailableError")
                    assert message.startswith(gone + ("NotServingError",)), line
                    assert phase == "submit" or message.startswith(gone), line
                elif phase == "fetch":
                    assert message.startswith("OwnerUnavailableError"), line
                    assert "model owner" in message, line
                else:  # between queries: serving had already ended when it submitted
                    assert message.startswith(("OwnerUnavailableError", "NotServingError")), line
                    assert "model owner" in message, line
                assert c.wait(60) == 0, c.output[-3000:]
            assert "fetch" in phases, phases
            if external:
                # The workers live on; a client that comes later is told nothing is served.
                assert all(w.p.poll() is None for w in workers)
                later = Proc("load_client.py", ["--hosts", h, "--images", models / "images.npy",
                                                "--count", 1, "--timeout", 3,
                                                "--out", tmp_path / "later.npz"])
                t, line = later.wait_for("QUERY FAILED", 60)
                _, phase, message = _failure(line)
                assert message.startswith("NotServingError"), line
                assert "no model is being served" in message, line
                assert float(line.split()[5]) < FAIL_WITHIN, line
                assert later.wait(30) == 0
            TALLY["faults survived"] += 1
        finally:
            for p in clients + [owner] + workers:
                if p is not None:
                    p.kill()
            if external:
                remove_local(hosts)
