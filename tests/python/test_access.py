"""Who may do what on a worker, with real processes: a served model (the session's `served`
cluster: three worker processes and a model-owner process) and real gRPC calls with real
certificates.

* A client that knows another client's query id cannot obtain that query's shares or answer
  from any worker, nor take the id over; the victim is answered correctly.
* The API has exactly the eight documented methods; nothing else answers.
* A client cannot call the owner's methods; an owner cannot submit or fetch; neither can
  call the workers' own methods; a worker cannot pose as another worker.
* A peer without a certificate of the cluster's CA (none, another CA's, plain TCP) is refused
  by every worker; a worker presenting another worker's name is refused by the caller.
After each attack the served model still answers correctly.
"""

import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

import privatekeras as pk
from conftest import LOGIT_ATOL, SCRIPTS, TALLY, child_env, rejects
from privatekeras import wire
from privatekeras.deploy import pki
from procs import Proc

DOCUMENTED = {
    "Status": ("worker", "owner", "client"),
    "Upload": ("owner",),
    "Prepare": ("owner",),
    "Serve": ("owner",),
    "StopServing": ("owner",),
    "Submit": ("client",),
    "Fetch": ("client",),
    "Trace": ("worker",),
}
REFUSED_WITHIN = 10.0


def _creds(served, name):
    return pki.load_local(served.cluster()._local_key(), name)


def _stubs(served, name):
    """A stub per worker, as party ``name`` (owner, client, worker0..2) of the cluster."""
    creds = _creds(served, name)
    cluster = served.cluster()
    return [wire.Stub(wire.channel(h, creds, n)) for h, n in zip(cluster.hosts,
                                                                  cluster.worker_names)]


def _call(method, request, streaming_reply=False, timeout=10):
    """Call; returns the reply, or raises the translated privatekeras error."""
    try:
        if streaming_reply:
            return list(method(request, timeout=timeout))
        return method(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise wire.translate(exc, "?") from None


def _requests(served):
    """A well-formed request for every method (what a party allowed to call it would send)."""
    board = served.cluster().status("owner")[0]
    spec = json.loads(board.spec_json)
    zeros = np.zeros(spec["input_shape"], dtype=np.int64)
    qid = os.urandom(16).hex()
    return {
        "Status": (wire.M.Empty(), False),
        "Upload": (iter([wire.M.UploadChunk(spec_json=board.spec_json)]), False),
        "Prepare": (wire.M.PrepareRequest(model_id=spec["model_id"]), True),
        "Serve": (wire.M.ServeRequest(unlimited=True), True),
        "StopServing": (wire.M.Empty(), False),
        "Submit": (wire.M.SubmitRequest(
            query_id=qid, model_id=spec["model_id"], session=board.session,
            shares=[wire.tensor(zeros)] * 2, fetch_digest=wire.digest(b"s" * 32)), False),
        "Fetch": (wire.M.FetchRequest(query_id=qid, fetch_secret=b"s" * 32), False),
        "Trace": (wire.M.PrepareRequest(model_id=spec["model_id"]), False),
    }


def test_the_api_is_exactly_the_eight_documented_methods(served):
    """A new method must be reviewed: this list and the module's table change together."""
    assert {name: roles for name, (_, _, _, roles) in wire.METHODS.items()} == DOCUMENTED
    for name in DOCUMENTED:
        assert "\n{}".format(name) in wire.__doc__, name  # the documented table
    # Nothing else answers, on any worker: not a method of ours, not gRPC reflection.
    creds = _creds(served, "client")
    for host, name in zip(served.cluster().hosts, served.cluster().worker_names):
        chan = wire.channel(host, creds, name)
        try:
            for path in ("/privatekeras.Worker/Run", "/privatekeras.Worker/Eval",
                         "/privatekeras.Worker/status",
                         "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                         "/tensorflow.eager.EagerService/Enqueue"):
                with pytest.raises(grpc.RpcError) as err:
                    chan.unary_unary(path)(b"", timeout=10)
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, (name, path)
        finally:
            chan.close()


def test_a_client_cannot_take_another_clients_query(served, tmp_path):
    h = ",".join(served.hosts)
    index = 7
    go = tmp_path / "go"
    victim = Proc("access_victim.py", ["--hosts", h, "--images", served.images_path,
                                       "--index", index, "--go", go,
                                       "--out", tmp_path / "victim.npy"])
    try:
        before = served.answered()
        qid = victim.wait_for("QID", 120)[1].split()[1]
        # Every worker holds the victim's shares, and worker 0 has evaluated the query: its
        # answer shares wait on all three workers for the victim's fetch.
        deadline = time.monotonic() + 60
        while served.answered() == before:
            assert time.monotonic() < deadline, "the victim's query was not evaluated"
            time.sleep(0.05)
        time.sleep(0.5)  # worker 0's Done note reaches workers 1 and 2
        attacker = subprocess.run([sys.executable, str(SCRIPTS / "access_attacker.py"),
                                   "--hosts", h, "--qid", qid], capture_output=True, text=True,
                                  env=child_env(), timeout=120)
        assert attacker.returncode == 0, attacker.stdout + attacker.stderr[-3000:]
        outcome = json.loads(attacker.stdout.strip().splitlines()[-1])
        assert sorted(outcome) == ["worker0", "worker1", "worker2"], outcome
        for worker, attempts in outcome.items():
            for what, result in attempts.items():
                TALLY["bad inputs tried"] += 1
                if what == "submit same id":
                    assert result == "InputError: query id already in use", (worker, result)
                else:
                    assert result.startswith("AccessDeniedError:"), (worker, what, result)
                    assert "wrong fetch secret" in result, (worker, what, result)
                TALLY["bad inputs rejected"] += 1
        # The victim, untouched, gets its own correct answer.
        go.touch()
        assert victim.wait(60) == 0, victim.output[-3000:]
        got = np.load(tmp_path / "victim.npy")
        plain = served.plain[index:index + 1]
        np.testing.assert_allclose(got, plain, atol=LOGIT_ATOL)
        assert got.argmax() == plain.argmax()
        # Once fetched, nothing of the query is left on any worker.
        for stub in _stubs(served, "client"):
            with rejects(pk.InputError, match="holds no query with this id"):
                _call(stub.Fetch, wire.M.FetchRequest(query_id=qid, fetch_secret=os.urandom(32)))
    finally:
        victim.kill()


def test_a_client_sees_shapes_only_on_the_board(served):
    for board in served.cluster().status("client"):
        spec = json.loads(board.spec_json) if board.spec_json else {}
        assert "layers" not in spec, board.worker
    spec = json.loads(served.cluster().status("client")[0].spec_json)
    assert spec["input_shape"] == [1, 28, 28, 1] and spec["output_shape"] == [1, 10]


@pytest.mark.parametrize("party", ["client", "owner", "worker1"])
def test_each_party_can_call_only_its_own_methods(served, party):
    """Every method its role may not call is refused by every worker with AccessDeniedError
    naming the roles allowed; the model keeps answering correctly."""
    role = "worker" if party.startswith("worker") else party
    stubs = _stubs(served, party)
    forbidden = [m for m, roles in DOCUMENTED.items() if role not in roles]
    assert forbidden
    for method in forbidden:
        for i, stub in enumerate(stubs):
            if party == "worker1" and i == 1:
                continue  # a worker does not call itself
            request, streaming = _requests(served)[method]
            t0 = time.monotonic()
            with rejects(pk.AccessDeniedError, match=r"{} may be called by {} only".format(
                    method, " or ".join(DOCUMENTED[method]))):
                _call(getattr(stub, method), request, streaming)
            assert time.monotonic() - t0 < REFUSED_WITHIN
    served.check_answers(first=10 + len(party), count=2)


def test_a_worker_cannot_pose_as_another_worker(served):
    """Only worker 0 may have a worker trace its part (checked against the caller's
    certificate); worker 0 itself refuses the call."""
    w1 = _stubs(served, "worker1")
    model_id = json.loads(served.cluster().status("owner")[0].spec_json)["model_id"]
    with rejects(pk.AccessDeniedError, match="'worker1' is not worker 0"):
        _call(w1[2].Trace, wire.M.PrepareRequest(model_id=model_id))
    with rejects(pk.PrivateKerasError, match="Trace goes to workers 1 and 2"):
        _call(w1[0].Trace, wire.M.PrepareRequest(model_id=model_id))
    served.check_answers(first=20, count=2)


def test_malformed_client_calls_are_refused(served):
    """A legitimate client sending malformed requests gets InputError, and nothing breaks."""
    stubs = _stubs(served, "client")
    board = served.cluster().status("client")[0]
    spec = json.loads(board.spec_json)
    good = np.zeros(spec["input_shape"], dtype=np.int64)

    def submit(stub, **kw):
        fields = dict(query_id=os.urandom(16).hex(), model_id=spec["model_id"],
                      session=board.session, shares=[wire.tensor(good)] * 2,
                      fetch_digest=wire.digest(b"x"))
        fields.update(kw)
        return _call(stub.Submit, wire.M.SubmitRequest(**fields))

    for stub in stubs:
        with rejects(pk.InputError, match="32 lowercase hex digits"):
            submit(stub, query_id="../../etc/passwd")
        with rejects(pk.InputError, match="32 lowercase hex digits"):
            submit(stub, query_id="A" * 32)
        with rejects(pk.InputError, match="fetch digest must be 32 bytes"):
            submit(stub, fetch_digest=b"short")
        with rejects(pk.InputError, match="expected 2 input shares"):
            submit(stub, shares=[wire.tensor(good)] * 3)
        with rejects(pk.InputError, match="the served model expects"):
            submit(stub, shares=[wire.tensor(np.zeros((1, 28, 28, 2), np.int64))] * 2)
        bad = wire.M.Tensor(shape=[1, 28, 28, 1], data=b"\0" * 7)
        with rejects(pk.InputError, match="does not match its shape"):
            submit(stub, shares=[bad, bad])
        with rejects(pk.NotServingError, match="replaced the served model"):
            submit(stub, model_id="0" * 16)
        with rejects(pk.InputError, match="holds no query"):
            _call(stub.Fetch, wire.M.FetchRequest(query_id="f" * 32, fetch_secret=b""))
    served.check_answers(first=30, count=2)


def _status_with(served, i, creds, name=None):
    """Status of worker ``i`` over a channel made with raw gRPC credentials (or plain TCP
    when ``creds`` is None); returns (ok, grpc status code, seconds)."""
    cluster = served.cluster()
    target = name or cluster.worker_names[i]
    opts = [("grpc.ssl_target_name_override", target), ("grpc.enable_retries", 0)]
    chan = (grpc.insecure_channel(cluster.hosts[i]) if creds is None else
            grpc.secure_channel(cluster.hosts[i], creds, options=opts))
    t0 = time.monotonic()
    try:
        wire.Stub(chan).Status(wire.M.Empty(), timeout=REFUSED_WITHIN)
        return True, grpc.StatusCode.OK, time.monotonic() - t0
    except grpc.RpcError as exc:
        return False, exc.code(), time.monotonic() - t0
    finally:
        chan.close()


def test_peers_without_a_certificate_of_the_cluster_ca_are_refused(served):
    mine = _creds(served, "client")
    other_ca, other_key = pki.make_ca(subject="someone else's CA")
    cert, key = pki.issue(other_ca, other_key, "client", "client")
    forged_owner = pki.issue(other_ca, other_key, "owner", "owner")
    peers = {
        # the control: the cluster's own client certificate is accepted
        "cluster client": grpc.ssl_channel_credentials(mine.ca, mine.key, mine.cert),
        "no certificate": grpc.ssl_channel_credentials(root_certificates=mine.ca),
        "another CA's client": grpc.ssl_channel_credentials(mine.ca, key, cert),
        "another CA's owner": grpc.ssl_channel_credentials(mine.ca, forged_owner[1],
                                                           forged_owner[0]),
        "plain TCP": None,
    }
    for what, creds in peers.items():
        for i in range(3):
            ok, code, seconds = _status_with(served, i, creds)
            if what == "cluster client":
                assert ok, (what, i, code)
                continue
            TALLY["bad inputs tried"] += 1
            assert not ok, "worker {} accepted a peer with {}".format(i, what)
            assert code == grpc.StatusCode.UNAVAILABLE, (what, i, code)  # refused, no hang
            assert seconds < REFUSED_WITHIN, (what, i, seconds)
            TALLY["bad inputs rejected"] += 1
    # The same through the library: a handshake failure is AccessDeniedError.
    foreign = pki.Credentials("client", "client", mine.ca, cert, key)
    cluster = served.cluster()
    stub = wire.Stub(wire.channel(cluster.hosts[0], foreign, cluster.worker_names[0]))
    try:
        with rejects((pk.AccessDeniedError, pk.WorkerUnavailableError)):
            _call(stub.Status, wire.M.Empty())
    finally:
        stub.close()
    served.check_answers(first=40, count=2)


def test_a_worker_with_another_workers_name_is_refused_by_the_caller(served):
    """A channel to worker 1's address that expects worker 0's certificate fails: worker 1
    presents its own name, so one worker cannot stand in for another."""
    mine = _creds(served, "client")
    creds = grpc.ssl_channel_credentials(mine.ca, mine.key, mine.cert)
    for i, wrong in ((1, "worker0"), (2, "worker1"), (0, "worker2"), (0, "owner")):
        ok, code, seconds = _status_with(served, i, creds, name=wrong)
        assert not ok and code == grpc.StatusCode.UNAVAILABLE, (i, wrong, code)
        assert seconds < REFUSED_WITHIN
        ok, code, _ = _status_with(served, i, creds)  # the right name: accepted
        assert ok, (i, code)
    served.check_answers(first=50, count=1)
