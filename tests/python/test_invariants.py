"""Security invariants of the private step, read off the graph worker 0 traced, and of who
talks to whom while a model is served.

One module-scoped run with real processes: workers 1 and 2 are ``python -m privatekeras worker``
processes; worker 0 is run by test code (scripts/privacy_worker0.py builds
``privatekeras.worker.WorkerServer`` from a ``WorkerConfig`` itself) so that the step it traces
can be read in its own process; a model owner (scripts/privacy_owner.py) shares a small CNN
and serves one query from a client
(scripts/privacy_client.py). A socket audit samples the sockets of all five processes
throughout.

Why worker 0 is not run inside the pytest process itself: a worker's TensorFlow server must be
confined to loopback, which takes the bind() interposer preloaded when the process starts
(LD_PRELOAD); in the pytest process TensorFlow's server binds the wildcard address ``[::]`` --
every interface, running any graph sent to it -- for as long as the process lives, because
TensorFlow can neither stop that server nor take the process's eager context out of the
cluster again (it would stay a cluster member for every later test of the session). The
harness process runs the same library code, under the interposer, with the inspection code
next to the server.
"""

import collections
import json
import os
import re
import sys
import time

import numpy as np
import pytest

from conftest import SCRIPTS, child_env

sys.path.insert(0, str(SCRIPTS))
from privacy_net import (Haystack, Lines, Names, SocketAudit, found, free_ports,  # noqa: E402
                         make_credentials, maps, popen, stop, wait_for, windows, worker_cmd)

WORKERS = ("w0", "w1", "w2")


class Run:
    """What the run recorded."""


def small_model(path):
    """A small CNN with the tutorial's kinds of private step (strided convolution, ReLU --
    ABY3's bit decomposition and B2A conversion --, average pooling, flatten, dense), quicker
    to trace than the tutorial's. Keras' random initial weights (in the fixed-point range)
    will do."""
    import keras

    L = keras.layers
    keras.Sequential([keras.Input((12, 12, 1), batch_size=1), L.Conv2D(4, 3, strides=2),
                      L.ReLU(), L.AveragePooling2D(2), L.Flatten(), L.Dense(10)]).save(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import pickle

    from privatekeras.deploy.confine import interposer_env
    from privatekeras.kernels.build import default_library_path, loopback_library_path

    t_start = time.monotonic()
    r = Run()
    # The libraries the workers load as they start (the kernels' path names their source).
    r.kernels = os.path.realpath(default_library_path())
    r.shim = os.path.realpath(loopback_library_path())
    d = tmp_path_factory.mktemp("invariants")
    small_model(d / "small.keras")
    np.save(d / "image.npy", np.random.default_rng(7).uniform(0, 1, (1, 12, 12, 1)))
    A = free_ports(3)
    Q = free_ports(3, avoid=A)
    M = free_ports(3, avoid=A + Q)  # the mesh ports
    api = ["localhost:{}".format(p) for p in A]
    compute = ["127.0.0.1:{}".format(p) for p in Q]
    mesh = ["127.0.0.1:{}".format(p) for p in M]
    env = child_env()
    env["PRIVATEKERAS_RUNTIME_DIR"] = str(d / "runtime")
    make_credentials(env["PRIVATEKERAS_RUNTIME_DIR"], api)
    worker0_env = interposer_env(env)  # what the worker entry point re-executes itself with
    worker0_env["PRIVATEKERAS_CONFINE_PORTS"] = "{},{}".format(Q[0], M[0])

    names = Names()
    procs, out, audit = {}, {}, None
    py = sys.executable
    try:
        audit = SocketAudit(names)
        commands = {
            "w0": ([py, str(SCRIPTS / "privacy_worker0.py"), "--hosts", ",".join(api),
                    "--compute", ",".join(compute), "--mesh", ",".join(mesh),
                    "--report", str(d / "step.json")], worker0_env),
            "w1": (worker_cmd(api, 1, compute, mesh=mesh), env),
            "w2": (worker_cmd(api, 2, compute, mesh=mesh), env),
        }
        for name, (cmd, e) in commands.items():
            procs[name] = popen(cmd, e)
            names.pids[name] = procs[name].pid
            out[name] = Lines(procs[name])

        def report(what=""):
            return "{}\n{}".format(what, "\n".join(
                "--- {} (rc {}):\n{}".format(name, p.poll(), out[name].text())
                for name, p in procs.items()))

        workers = [procs[w] for w in WORKERS]
        wait_for("workers ready", lambda: all(out[w].first("READY") for w in WORKERS),
                 workers, 180, report)
        r.t_ready = time.monotonic() - t_start
        h = ["--hosts", ",".join(api)]
        for name, cmd in (
                ("owner", [py, str(SCRIPTS / "privacy_owner.py")] + h + [
                    "--model", str(d / "small.keras"), "--num-requests", "1",
                    "--out", str(d / "owner.pkl")]),
                ("client", [py, str(SCRIPTS / "privacy_client.py")] + h + [
                    "--image", str(d / "image.npy"), "--queries", "1", "--classes", "10",
                    "--out", str(d / "client.pkl")])):
            if name == "client":  # once the model is shared; it waits for serving itself
                wait_for("model shared", lambda: out["owner"].first("RECORD SHARED"),
                         workers + [procs["owner"]], 300, report)
            procs[name] = popen(cmd, env)
            names.pids[name] = procs[name].pid
            out[name] = Lines(procs[name])
        wait_for("owner and client done", lambda: procs["owner"].poll() is not None and
                 procs["client"].poll() is not None, workers, 300, report)
        assert procs["owner"].returncode == 0 and procs["client"].returncode == 0, report(
            "owner/client failed")
        wait_for("worker 0's report", lambda: out["w0"].first("REPORT"), workers, 60, report)
        audit.sample()
        r.maps = {w: maps(procs[w].pid) for w in WORKERS}
    finally:
        if audit is not None:
            audit.stop()
        stop([p for name, p in procs.items() if name not in WORKERS])
        stop([p for name, p in procs.items() if name in WORKERS])
        for lines in out.values():
            lines.join(5)
        for p in procs.values():
            p.stdout.close()
    with open(d / "step.json") as f:
        r.step = json.load(f)
    with open(d / "owner.pkl", "rb") as f:
        r.owner = pickle.load(f)
    with open(d / "client.pkl", "rb") as f:
        r.client = pickle.load(f)
    r.audit, r.A, r.Q, r.M = audit, A, Q, M
    r.owner_output = out["owner"].text()
    r.elapsed = time.monotonic() - t_start
    return r


def _canonical(device):
    import tensorflow as tf

    return tf.DeviceSpec.from_string(device).to_string() if device else ""


def _stock_random_ops():
    import tensorflow as tf

    stock = [n for n in dir(tf.raw_ops)
             if re.search("Random|Seed|Stateless|Multinomial|TruncatedNormal|Rng|Shuffle", n)]
    assert "RandomUniformInt" in stock and "StatelessRandomUniformV2" in stock
    return stock


def _producers(node_input):
    """The node name a NodeDef input refers to ("name", "name:1", "^name" for control)."""
    return node_input.lstrip("^").split(":")[0]


def test_every_op_of_the_step_runs_on_one_of_the_three_workers(run):
    """The traced step takes four arguments, the int64 step id and each worker's int64
    input rows (each worker's part is fed the step id and its own rows), and captures nothing
    from outside the step. Every other op of its graph is placed on one of the three
    workers' devices, so nothing runs anywhere else, and worker i's input rows are read only
    by worker i's ops; ops in the functions it calls (while-loop bodies) carry no device or a
    worker's device (a body runs on the device of the loop op that calls it, itself placed on
    a worker)."""
    s = run.step
    devices = {_canonical(d) for d in s["devices"]}
    assert len(devices) == 3
    assert [a[1] for a in s["arguments"]] == ["int64"] * 4, s["arguments"]
    assert s["captured"] == 0
    arguments = {a[0].split(":")[0] for a in s["arguments"]}
    for i, (name, _) in enumerate(s["arguments"][1:]):
        readers = {_canonical(n["device"]) for n in s["nodes"]
                   if name.split(":")[0] in map(_producers, n["inputs"])}
        assert readers == {_canonical(s["devices"][i])}, (name, readers)
    placed = collections.Counter(_canonical(n["device"]) for n in s["nodes"]
                                 if n["name"] not in arguments)
    print("\nops of the step per device:", dict(placed))
    print("workers ready after {:.1f} s, run {:.1f} s; the owner's output:\n    {}".format(
        run.t_ready, run.elapsed, "\n    ".join(run.owner_output.splitlines()[-6:])))
    assert set(placed) == devices, placed
    assert sum(placed.values()) > 200  # a real step: hundreds of ops (486 on fused kernels)
    for name, body in s["functions"].items():
        assert {_canonical(n["device"]) for n in body} <= devices | {""}, name


def test_every_tensor_between_workers_goes_over_the_mesh(run):
    """The step's protocol messages are routed over the workers' mesh
    (privatekeras.mpc.routing): in the traced graph,

    - no data edge joins ops placed on two different workers: every tensor one worker's op
      takes from another worker's op is a PkMeshRecv's output; and no control edge either,
      and no op without a device but the step's arguments (so that each worker can run its
      own part alone, privatekeras.mpc.partition);
    - PkMeshSend and PkMeshRecv ops pair up one to one by ``edge``; the send sits on the
      device of the worker that produced its tensor (its input ``x`` is made there), the
      receive on the device of the worker its ``peer`` names, and each names the other's
      worker as its ``peer``;
    - both take the step id argument as their ``step``, so each execution's messages carry
      that execution's id;
    - every worker sends the worker before it (ABY3's re-sharing: worker i hands its masked
      product share to worker i - 1);
    - the graph stats count at least one message per routed edge.

    Prints the routed edges per (sender, receiver) pair, the control edges between workers
    (ordering only, no data) and what the routing leaves to TensorFlow: edges between an
    op without a device and a worker's op, and edges inside called functions."""
    s = run.step
    devices = [_canonical(d) for d in s["devices"]]
    worker = {d: i for i, d in enumerate(devices)}
    nodes = {n["name"]: n for n in s["nodes"]}
    arguments = {a[0].split(":")[0] for a in s["arguments"]}
    step_id = s["arguments"][0][0].split(":")[0]

    def party(name):
        return worker.get(_canonical(nodes[name]["device"]))

    crossing, control, unplaced = [], 0, 0
    for n in s["nodes"]:
        here = party(n["name"])
        for i in n["inputs"]:
            src = _producers(i)
            there = party(src)
            if i.startswith("^"):
                control += here is not None and there is not None and here != there
            elif here is None or there is None:
                unplaced += here != there and src not in arguments
            elif here != there and src not in arguments and nodes[src]["op"] != "PkMeshRecv":
                crossing.append((src, n["name"]))
    assert not crossing, "{} data edges between workers bypass the mesh, e.g. {}".format(
        len(crossing), crossing[:5])
    assert control == 0 and unplaced == 0, (control, unplaced)

    sends = collections.defaultdict(list)
    recvs = collections.defaultdict(list)
    for n in s["nodes"]:
        if n["op"] == "PkMeshSend":
            sends[n["edge"]].append(n)
        elif n["op"] == "PkMeshRecv":
            recvs[n["edge"]].append(n)
    assert sends and set(sends) == set(recvs), (sorted(sends), sorted(recvs))
    twice = [e for e in sends if len(sends[e]) != 1 or len(recvs[e]) != 1]
    assert not twice, [(sends[e], recvs[e]) for e in twice[:3]]
    pairs = collections.Counter()
    for edge in sorted(sends):
        send, recv = sends[edge][0], recvs[edge][0]
        frm, to = party(send["name"]), party(recv["name"])
        assert frm is not None and to is not None and frm != to, (send, recv)
        assert send["peer"] == to and recv["peer"] == frm, (send, recv)
        assert [_producers(i) for i in send["inputs"][:1]] == [step_id], send
        assert [_producers(i) for i in recv["inputs"][:1]] == [step_id], recv
        x = _producers(send["inputs"][1])
        assert party(x) == frm and x not in arguments, (send, nodes[x])
        pairs[(frm, to)] += 1
    assert {(i, (i - 1) % 3) for i in range(3)} <= set(pairs), pairs
    assert s["stats"]["messages"] >= len(sends), s["stats"]

    inside = 0  # data edges inside called functions between two workers' devices
    for body in s["functions"].values():
        placed = {n["name"]: _canonical(n["device"]) for n in body}
        inside += sum(1 for n in body for i in n["inputs"] if not i.startswith("^")
                      and placed.get(_producers(i)) and placed[n["name"]]
                      and placed[_producers(i)] != placed[n["name"]])
    print("\nrouted edges over the mesh: {} ({}); control edges between workers: {}; left to "
          "TensorFlow: {} data edges between an unplaced op and a worker's op, {} between "
          "workers inside called functions; stats: {}".format(
              len(sends), ", ".join("w{}->w{} {}".format(a, b, k)
                                    for (a, b), k in sorted(pairs.items())),
              control, unplaced, inside,
              {k: v for k, v in s["stats"].items() if k != "ops_by_type"}))
    assert inside == 0


def test_the_pairwise_prf_keys_are_drawn_inside_the_step(run):
    """ABY3's pairwise PRF keys are set up inside the traced step (``prot.reset()`` in the
    step), so every execution draws new keys: the step graph holds the three key seeds
    "pair-randomness-setup/seed<i>" as our PkSecureSeed kernel op, each on worker i's device,
    and each feeds PRF evaluations (PkSeededRandomUniform). Every PRF evaluation of the step
    takes its key from a PkSecureSeed op of the step, never from a placeholder or a captured
    tensor -- keys made once when the engine was built would be captured constants of the
    graph, and every query would reuse the same masks. A key that crosses between workers
    does so over the mesh: the walk goes from a PkMeshRecv to the tensor its PkMeshSend
    sent (the step id both take only names the message)."""
    s = run.step
    nodes = {n["name"]: n for n in s["nodes"]}
    sends = {n["edge"]: n for n in s["nodes"] if n["op"] == "PkMeshSend"}

    def inputs(n):
        """What ``n``'s value comes from: a PkMeshRecv's, its PkMeshSend's tensor."""
        if n["op"] == "PkMeshRecv":
            return [sends[n["edge"]]["name"]] + [i for i in n["inputs"] if i.startswith("^")]
        if n["op"] == "PkMeshSend":
            return n["inputs"][1:]
        return n["inputs"]

    consumers = collections.defaultdict(set)
    for n in s["nodes"]:
        for i in inputs(n):
            consumers[_producers(i)].add(n["name"])
    devices = [_canonical(d) for d in s["devices"]]
    seeds = {}
    for n in s["nodes"]:
        m = re.search(r"pair-randomness-setup/seed(\d)$", n["name"])
        if m:
            seeds[int(m.group(1))] = n
    assert sorted(seeds) == [0, 1, 2], sorted(seeds)

    def downstream(name):
        seen, todo = set(), [name]
        while todo:
            for c in consumers[todo.pop()]:
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        return seen

    for i, n in seeds.items():
        assert n["op"] == "PkSecureSeed" and _canonical(n["device"]) == devices[i], n
        assert any(nodes[c]["op"] == "PkSeededRandomUniform" for c in downstream(n["name"]))

    def upstream(name):
        seen, todo = {name}, [name]
        while todo:
            for i in inputs(nodes[todo.pop()]):
                p = _producers(i)
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        return seen

    prfs = [n for n in s["nodes"] if n["op"] == "PkSeededRandomUniform"]
    assert len(prfs) > 10
    for n in prfs:  # inputs: shape, seed (the key plus a public nonce), minval, maxval
        origins = {nodes[p]["op"] for p in upstream(_producers(n["inputs"][1]))}
        assert "PkSecureSeed" in origins and "Placeholder" not in origins, (n["name"], origins)
    print("\nPkSecureSeed ops in the step: {}, PkSeededRandomUniform: {}".format(
        sum(n["op"] == "PkSecureSeed" for n in s["nodes"]), len(prfs)))


def test_randomness_comes_only_from_our_csprng(run):
    """No stock TensorFlow random, seed or stateless-random op anywhere in the step (its
    graph and every function it calls); the randomness ops there are our kernels; and TF
    Encrypted in worker 0 draws from them (secure_randomness_active)."""
    s = run.step
    types = collections.Counter(n["op"] for n in s["nodes"])
    types.update(n["op"] for body in s["functions"].values() for n in body)
    stock = set(_stock_random_ops())
    assert not stock & set(types), stock & set(types)
    random_like = {t for t in types if re.search("Random|Seed", t)}
    assert random_like and all(t.startswith("Pk") for t in random_like), random_like
    assert types["PkSecureSeed"] >= 9  # pairwise and the two B2A key sets, 3 each
    assert s["secure_randomness_active"] is True


def test_nothing_of_a_query_flows_back_to_the_model_owner(run):
    """The owner's process (and the client's) runs no server: sampled throughout the run it
    never listens on any socket, and every connection it has goes to a worker's API port
    (a worker process at the other end), never to a compute or mesh port. Of the API, the
    owner only called owner methods, and nothing it received holds a window of the client's
    input shares, answer shares, input or answer."""
    r = run
    for party, least in (("owner", 10), ("client", 3)):  # the client lives a second or two
        assert r.audit.samples[party] >= least, r.audit.samples
        assert r.audit.listening[party] == set(), (party, r.audit.listening[party])
        links = r.audit.links[party]
        assert links and all(rport in r.A for _, rport, _ in links), (party, links)
        assert all(peer in WORKERS for _, _, peer in links), (party, links)
        assert not [link for link in links if link[1] in r.Q + r.M], (party, links)
    from privatekeras import wire

    messages = r.owner["messages"]
    assert {m["method"] for m in messages} <= {"Status", "Upload", "Prepare", "Serve",
                                               "StopServing"}
    for m in messages:
        assert "owner" in wire.METHODS[m["method"]][3]
    received = [Haystack(m["data"]) for m in messages if m["kind"] == "reply"]
    sharing = r.client["sharings"][0]
    client_replies = [m for m in r.client["messages"] if m["method"] == "Fetch"
                      and m["kind"] == "reply"]
    answer = [wire.array(t) for m in client_replies
              for t in wire.M.FetchReply.FromString(m["data"]).shares]
    assert len(answer) == 6
    needles = [n for a in list(sharing["shares"]) + [sharing["encoded"]] + answer
               for n in windows(a)]
    needles += windows(r.client["queries"][0]["logits"].astype(np.float32))
    assert len(needles) > 400
    assert not found(received, needles)


def test_workers_listen_where_the_cluster_says_and_compute_on_loopback_only(run):
    """Each worker (worker 0 run by the test's harness included) has our kernels and the
    loopback interposer mapped, and listens on exactly its API port (the Cluster hosts'
    port, loopback addresses for "localhost"), its compute port and its mesh port (both
    127.0.0.1 only); worker 0's harness confined (and checked) both of the latter."""
    from privatekeras.deploy.listening import is_loopback

    r = run
    assert r.step["confined_ports"] == [r.Q[0], r.M[0]], r.step["confined_ports"]
    for i, w in enumerate(WORKERS):
        assert r.kernels in r.maps[w], w
        assert r.shim in r.maps[w], w
        listening = r.audit.listening[w]
        assert {port for _, _, port in listening} == {r.A[i], r.Q[i], r.M[i]}, (w, listening)
        for port in (r.Q[i], r.M[i]):
            assert {s for s in listening if s[2] == port} == {("ipv4", "127.0.0.1", port)}, (
                w, port, listening)
        assert all(is_loopback(family, address) for family, address, _ in listening)
