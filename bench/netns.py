"""What authenticated links across hosts cost per query, measured side by side in one run.

Two setups serve the same model (the 2020 tutorial CNN, batch 1) to one client:

* ``loopback``: everything on this machine's loopback: a plain local ``Cluster`` started by
  the model owner's process (three worker processes), and a client process;
* ``netns-stunnel``: five Linux network namespaces on a bridge (tests/python/netns.py): three
  worker hosts (``privatekeras worker --config hosts.toml --name workerN``: the workers'
  TensorFlow traffic goes through stunnel's TLS 1.3 links), the owner's host and the
  client's host (they call the workers' APIs, gRPC with mutual TLS, across the bridge).

For each: warm-up queries, then ``--queries`` timed queries; client-side latency (median, p90)
and the private step's own run time as worker 0 reports it to the owner
(``SharedModel.step_seconds``), so latency - step is the serving path around the private step.
With ``--rounds`` > 1 the two setups alternate (a, b, a, b, ...) and the figures pool all
rounds. Around the timed queries it also reads the CPU time of the workers (and of their
stunnels) and, across the bridge, the hub's packet and byte counters: per-query figures that
a busy machine disturbs much less than latencies (the load average is recorded too).

Prints one JSON line per setup, then a JSON summary whose differences (netns-stunnel -
loopback) are what the links cost per query; writes everything to bench/out/netns.json.
Progress goes to stderr. Needs root (namespaces) and stunnel4::

    sudo .venv/bin/python bench/netns.py [--queries 40] [--warmup 5] [--rounds 2] [--untrained]

Internal sub-commands, run in the setups' processes: ``train``, ``owner``, ``client``.
"""

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYDIR = os.path.join(ROOT, "inst", "python")
TESTS = os.path.join(ROOT, "tests", "python")
OUT = os.path.join(HERE, "out", "netns.json")
PY = sys.executable
sys.path.insert(0, TESTS)
from netns import NAMES, WORKERS  # noqa: E402  (the five-host layout, shared with the test)

PREVIOUS_RELAYS_MS = [55, 100]  # the previous release's Python TLS relays, per query
TARGET_MS = 5.0  # issue 9: authenticated links across namespaces, per query


def log(msg):
    print("netns bench: " + msg, file=sys.stderr, flush=True)


# -- sub-commands run in the setups' processes --------------------------------------------------
def train(args):
    """Save the tutorial CNN (trained, or untrained weights), test images and Keras logits."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, TESTS)
    import keras
    import numpy as np
    from conftest import tutorial_cnn

    from privatekeras.data import load_fashion_mnist

    keras.utils.set_random_seed(2026)
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    model = tutorial_cnn(keras)
    accuracy = None
    if args.train_images > 0:
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(x_train[:args.train_images], y_train[:args.train_images], epochs=1,
                  batch_size=64, verbose=0)
        accuracy = float(model.evaluate(x_test[:2000], y_test[:2000], verbose=0)[1])
    os.makedirs(args.dir, exist_ok=True)
    model.save(os.path.join(args.dir, "tutorial_cnn.keras"))
    images = x_test[:args.images]
    np.save(os.path.join(args.dir, "images.npy"), images)
    np.save(os.path.join(args.dir, "plain.npy"), model.predict(images, batch_size=64, verbose=0))
    with open(os.path.join(args.dir, "model.json"), "w") as f:
        json.dump({"train_images": args.train_images, "test_accuracy_2000": accuracy}, f)
    print("TRAINED", json.dumps({"train_images": args.train_images, "accuracy": accuracy}),
          flush=True)


def _free_hosts():
    """Three consecutive free loopback ports as 'localhost:port' strings."""
    while True:
        base = random.randrange(20000, 40000, 3)
        ok = True
        for port in (base, base + 1, base + 2):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
        if ok:
            return ["localhost:{}".format(p) for p in (base, base + 1, base + 2)]


def owner(args):
    """Share the model (on a local cluster it starts, or on a hosts file's workers), serve
    ``--num-requests`` queries, print the private steps' run times."""
    import privatekeras as pk

    if args.config:
        cluster = pk.Cluster.from_config(args.config, args.name)
    else:
        cluster = pk.Cluster(_free_hosts()).start()
    try:
        print("HOSTS", ",".join(cluster.hosts), flush=True)
        shared = pk.share(args.model, cluster)
        print("SHARED", flush=True)
        served = shared.serve(num_requests=args.num_requests, idle_timeout=600)
        print("STEPS", json.dumps({"served": served, "step_seconds": shared.step_seconds}),
              flush=True)
    finally:
        cluster.stop()


def client(args):
    """Query warm-up + timed queries, one image each; print latencies and the worst error."""
    import numpy as np

    import privatekeras as pk

    if args.config:
        cluster = pk.Cluster.from_config(args.config, args.name)
    else:
        cluster = pk.Cluster(args.hosts.split(","))
    images, plain = np.load(args.images), np.load(args.plain)
    conn = pk.connect(cluster, (1, 28, 28, 1), (1, 10), timeout=600)
    seconds, errors = [], []
    for i in range(args.warmup + args.queries):
        if i == args.warmup:  # the bench reads its counters now
            print("WARM", flush=True)
            sys.stdin.readline()
        k = i % len(images)
        t = time.perf_counter()
        logits = conn.query(images[k:k + 1])
        seconds.append(time.perf_counter() - t)
        errors.append(float(np.abs(logits - plain[k:k + 1]).max()))
        if logits.argmax() != plain[k].argmax():
            raise SystemExit("query {}: private argmax {} != Keras {}".format(
                i, logits.argmax(), plain[k].argmax()))
    print("TIMED", flush=True)
    sys.stdin.readline()
    conn.query(images[:1])  # one more, untimed: the owner serves (and its workers live) until now
    conn.close()
    print("RESULT", json.dumps({"seconds": seconds, "max_abs_error": max(errors)}), flush=True)


# -- the two setups -------------------------------------------------------------------------------
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PYDIR, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def _json_after(lines, word, timeout):
    return json.loads(lines.wait_for(word + " ", timeout)[1].split(" ", 1)[1])


def _one_run(setup, start, model_dir, args, counters):
    """Run owner and client of one setup; ``start(role, cmd)`` starts a process as Lines;
    ``counters(hosts)`` reads CPU (and traffic) counters just before and after the timed
    queries. Returns (client result, owner steps, (counters before, after))."""
    n = args.warmup + args.queries + 1  # the client's last query comes after the counters
    base = [PY, os.path.abspath(__file__)]
    model = os.path.join(model_dir, "tutorial_cnn.keras")
    own = start("owner", base + ["owner", "--model", model, "--num-requests", str(n)])
    procs = [("owner", own)]
    try:
        hosts = own.wait_for("HOSTS ", 300)[1].split()[1]
        own.wait_for("SHARED", 600)
        cli = start("client", base + ["client", "--hosts", hosts, "--images",
                                      os.path.join(model_dir, "images.npy"), "--plain",
                                      os.path.join(model_dir, "plain.npy"), "--warmup",
                                      str(args.warmup), "--queries", str(args.queries)])
        procs.append(("client", cli))
        cli.wait_for("WARM", 900)
        before = counters(hosts)
        cli.send("GO")
        cli.wait_for("TIMED", 900)
        after = counters(hosts)
        cli.send("BYE")
        result = _json_after(cli, "RESULT", 120)
        steps = _json_after(own, "STEPS", 120)
        for role, p in procs:
            if p.finish(120) != 0:
                raise SystemExit("{} {} exited with {}:\n{}".format(
                    setup, role, p.p.returncode, p.output[-3000:]))
    except BaseException:
        for _, p in procs:
            if p.p.poll() is None:
                p.p.kill()
        for role, p in procs:
            sys.stderr.write("--- {} {} output:\n{}\n".format(setup, role, p.output[-3000:]))
        raise
    if steps["served"] != n or len(steps["step_seconds"]) != n:
        raise SystemExit("{}: served {} queries, {} step times, expected {}".format(
            setup, steps["served"], len(steps["step_seconds"]), n))
    return result, steps["step_seconds"], (before, after)


def _cmdline(pid):
    try:
        with open("/proc/{}/cmdline".format(pid), "rb") as f:
            return [c.decode("utf-8", "replace") for c in f.read().split(b"\0") if c]
    except OSError:
        return []


def _cpu_seconds(pids):
    """User + system CPU seconds used so far by these processes (/proc/PID/stat)."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/{}/stat".format(pid)) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / os.sysconf("SC_CLK_TCK")


def _local_counters(hosts):
    """CPU seconds of the three workers of the local cluster ``hosts`` (found by cmdline)."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    workers = [p for p in pids if "worker" in _cmdline(p) and hosts in " ".join(_cmdline(p))]
    if len(workers) != 3:
        raise SystemExit("found {} worker processes of {}, expected 3: {}".format(
            len(workers), hosts, [(p, _cmdline(p)) for p in pids if "worker" in _cmdline(p)]))
    return {"cpu": {"workers": _cpu_seconds(workers)}}


def _netns_counters(net):
    """CPU seconds of the workers and of their stunnels (the processes in the worker hosts'
    namespaces), and {interface: stats64} of the hub's interfaces (veth "h<host>": rx is
    what <host> sent)."""
    out = net.run("hub", ["ip", "-s", "-j", "link", "show"], _env(), timeout=30)
    if out.returncode != 0:
        raise SystemExit("ip -s link in the hub failed: " + out.stderr)
    groups = {"workers": [], "stunnel": []}
    for host in WORKERS:
        pids = subprocess.run(["ip", "netns", "pids", net.ns(host)], capture_output=True,
                              text=True).stdout.split()
        for pid in map(int, pids):
            cmd = _cmdline(pid)
            if cmd and os.path.basename(cmd[0]).startswith("stunnel"):
                groups["stunnel"].append(pid)
            elif "worker" in cmd:
                groups["workers"].append(pid)
    if len(groups["workers"]) != 3 or len(groups["stunnel"]) != 3:
        raise SystemExit("expected 3 workers and 3 stunnels in the worker hosts, found "
                         "{}".format(groups))
    return {"cpu": {k: _cpu_seconds(v) for k, v in groups.items()},
            "links": {link["ifname"]: link["stats64"] for link in json.loads(out.stdout)}}


def _per_query(pairs, queries):
    """CPU ms per timed query (workers; stunnels), and packets and bytes per timed query
    between the workers (links and worker-to-worker API notes) and between the client and
    the workers, from the hub's counters."""
    n = queries * len(pairs)
    out = {}
    for group in pairs[0][0]["cpu"]:
        out["cpu_ms_" + group] = round(1e3 * sum(a["cpu"][group] - b["cpu"][group]
                                                 for b, a in pairs) / n, 2)
    if "links" not in pairs[0][0]:
        return out
    total = {"worker_to_worker_packets": 0, "worker_to_worker_bytes": 0,
             "client_packets": 0, "client_bytes": 0}
    for before, after in pairs:
        def delta(host, way, what):
            return (after["links"]["h" + host][way][what] -
                    before["links"]["h" + host][way][what])

        for what in ("packets", "bytes"):
            sent_by_workers = sum(delta(w, "rx", what) for w in WORKERS)
            to_owner_client = delta("cli", "tx", what) + delta("own", "tx", what)
            total["worker_to_worker_" + what] += sent_by_workers - to_owner_client
            total["client_" + what] += delta("cli", "rx", what) + delta("cli", "tx", what)
    out.update({k: round(v / n, 1) for k, v in total.items()})
    return out


def _figures(setup, runs, args, description):
    import numpy as np

    lat = np.concatenate([np.array(r["seconds"][args.warmup:]) for r, _, _ in runs]) * 1e3
    timed = slice(args.warmup, args.warmup + args.queries)
    step = np.concatenate([np.array(s[timed]) for _, s, _ in runs]) * 1e3
    around = lat - step  # each query's latency minus its own private step
    row = {
        "setup": setup,
        "what": description,
        "batch": 1,
        "queries": int(lat.size),
        "warmup_per_round": args.warmup,
        "rounds": len(runs),
        "latency_median_ms": round(float(np.median(lat)), 2),
        "latency_p90_ms": round(float(np.percentile(lat, 90)), 2),
        "step_median_ms": round(float(np.median(step)), 2),
        "step_p90_ms": round(float(np.percentile(step, 90)), 2),
        "around_step_median_ms": round(float(np.median(around)), 2),
        "around_step_p90_ms": round(float(np.percentile(around, 90)), 2),
        "round_latency_medians_ms": [round(1e3 * float(np.median(r["seconds"][args.warmup:])), 2)
                                     for r, _, _ in runs],
        "round_step_medians_ms": [round(1e3 * float(np.median(s[timed])), 2)
                                  for _, s, _ in runs],
        "max_abs_logit_error": max(r["max_abs_error"] for r, _, _ in runs),
    }
    row["per_query"] = _per_query([c for _, _, c in runs], args.queries)
    return row


def _start_workers(net, config, work, env):
    procs = {}
    for host in WORKERS:
        path = os.path.join(work, NAMES[host] + ".log")
        with open(path, "w") as out:
            procs[host] = net.popen(host, [PY, "-m", "privatekeras", "worker", "--config",
                                           config, "--name", NAMES[host]], env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    for host in WORKERS:
        path = os.path.join(work, NAMES[host] + ".log")
        while True:
            with open(path, errors="replace") as f:
                text = f.read()
            if "READY" in text:
                break
            if procs[host].poll() is not None or time.monotonic() > deadline:
                raise SystemExit("{} did not start:\n{}".format(NAMES[host], text[-3000:]))
            time.sleep(0.2)
    return procs


def run(args):
    sys.path.insert(0, TESTS)
    sys.path.insert(0, PYDIR)
    from netns import (CLUSTER_HOSTS, Lines, Net, hosts_toml, netns_unavailable,
                       stunnel_unavailable)

    if os.geteuid() != 0:
        raise SystemExit("netns bench: needs root (network namespaces)")
    reason = netns_unavailable() or stunnel_unavailable()
    if reason:
        raise SystemExit("netns bench: " + reason)
    env = _env()
    work = tempfile.mkdtemp(prefix="privatekeras-netns-bench-")
    model_dir = os.path.join(work, "model")
    train_images = 0 if args.untrained else args.train_images
    log("the tutorial CNN ({}) ...".format("untrained weights" if not train_images else
                                           "1 epoch on {} Fashion-MNIST images".format(
                                               train_images)))
    made = subprocess.run([PY, os.path.abspath(__file__), "train", "--dir", model_dir,
                           "--train-images", str(train_images), "--images",
                           str(args.warmup + args.queries)], env=env, capture_output=True,
                          text=True)
    if made.returncode != 0:
        raise SystemExit("training failed:\n" + made.stdout[-2000:] + made.stderr[-3000:])
    trained = json.loads(made.stdout.split("TRAINED ", 1)[1].splitlines()[0])
    model_what = "tutorial CNN, {}".format(
        "1 epoch on {} Fashion-MNIST images (test accuracy {:.3f})".format(
            train_images, trained["accuracy"]) if train_images else "untrained weights")

    net = Net(CLUSTER_HOSTS)
    try:
        config = os.path.join(work, "hosts.toml")
        with open(config, "w") as f:
            f.write(hosts_toml(net.addresses))
        made = subprocess.run([PY, "-m", "privatekeras", "pki", "--config", config], env=env,
                              capture_output=True, text=True)
        if made.returncode != 0:
            raise SystemExit("pki failed:\n" + made.stdout + made.stderr)
        log("starting the three workers in their namespaces ...")
        _start_workers(net, config, work, env)

        def local_start(role, cmd):
            return Lines(subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))

        def netns_start(role, cmd):
            host, name = ("own", "owner") if role == "owner" else ("cli", "alice")
            if role == "client":  # the hosts file instead of --hosts
                i = cmd.index("--hosts")
                cmd = cmd[:i] + cmd[i + 2:]
            return net.lines(host, cmd + ["--config", config, "--name", name], env)

        setups = [("loopback", local_start, _local_counters,
                   "3 workers, owner and client as processes on one machine's loopback (a "
                   "local Cluster)"),
                  ("netns-stunnel", netns_start, lambda hosts: _netns_counters(net),
                   "5 network namespaces on a bridge: 3 worker hosts linked by stunnel (TLS "
                   "1.3), owner and client hosts calling the workers' APIs (gRPC, mutual TLS)")]
        runs = {name: [] for name, _, _, _ in setups}
        load_before = os.getloadavg()[0]
        for r in range(args.rounds):
            for name, start, counters, _ in setups:
                log("round {}/{}: {} ...".format(r + 1, args.rounds, name))
                result, steps, traffic = _one_run(name, start, model_dir, args, counters)
                runs[name].append((result, steps, traffic))
                timed = sorted(result["seconds"][args.warmup:])
                log("round {} {}: latency median {:.1f} ms, step median {:.1f} ms".format(
                    r + 1, name, 1e3 * timed[len(timed) // 2],
                    1e3 * sorted(steps[args.warmup:-1])[len(timed) // 2]))
        load_after = os.getloadavg()[0]
    except BaseException:
        for host in WORKERS:
            path = os.path.join(work, NAMES[host] + ".log")
            try:
                with open(path, errors="replace") as f:
                    log("--- the end of {}:\n{}".format(path, f.read()[-3000:]))
            except OSError as exc:
                log("--- {}: {}".format(path, exc))
        log("kept " + work)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        net.close()

    rows = []
    for name, _, _, what in setups:
        row = _figures(name, runs[name], args, what)
        row["model"] = model_what
        rows.append(row)
        print(json.dumps(row), flush=True)
    a, b = rows
    summary = {
        "summary": "cost of authenticated links across hosts per query (netns-stunnel - "
                   "loopback), batch 1",
        "links_cost_latency_median_ms": round(b["latency_median_ms"] - a["latency_median_ms"], 2),
        "links_cost_latency_p90_ms": round(b["latency_p90_ms"] - a["latency_p90_ms"], 2),
        "links_cost_in_step_ms": round(b["step_median_ms"] - a["step_median_ms"], 2),
        "links_cost_around_step_ms": round(b["around_step_median_ms"] -
                                           a["around_step_median_ms"], 2),
        "around_step_ms": {"loopback": a["around_step_median_ms"],
                           "netns-stunnel": b["around_step_median_ms"]},
        "stunnel_cpu_ms_per_query": b["per_query"]["cpu_ms_stunnel"],
        "workers_cpu_ms_per_query": {"loopback": a["per_query"]["cpu_ms_workers"],
                                     "netns-stunnel": b["per_query"]["cpu_ms_workers"]},
        "worker_to_worker_bytes_per_query": b["per_query"]["worker_to_worker_bytes"],
        "target_ms": TARGET_MS,
        "previous_release_python_relays_ms": PREVIOUS_RELAYS_MS,
        "queries_per_setup": a["queries"],
        "rounds": args.rounds,
        "load_avg_1min": [round(load_before, 2), round(load_after, 2)],
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(json.dumps(summary), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"setups": rows, "summary": summary}, f, indent=1)
    log("wrote " + args.out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd")
    p.add_argument("--queries", type=int, default=40, help="timed queries per setup and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed queries first (each round)")
    p.add_argument("--rounds", type=int, default=2, help="a, b alternate this many times")
    p.add_argument("--train-images", type=int, default=12000)
    p.add_argument("--untrained", action="store_true",
                   help="untrained weights (the step's cost does not depend on their values)")
    p.add_argument("--out", default=OUT)
    t = sub.add_parser("train")
    t.add_argument("--dir", required=True)
    t.add_argument("--train-images", type=int, default=12000)
    t.add_argument("--images", type=int, default=45)
    for name in ("owner", "client"):
        s = sub.add_parser(name)
        s.add_argument("--config")
        s.add_argument("--name")
        s.add_argument("--hosts")
        if name == "owner":
            s.add_argument("--model", required=True)
            s.add_argument("--num-requests", type=int, required=True)
        else:
            s.add_argument("--images", required=True)
            s.add_argument("--plain", required=True)
            s.add_argument("--warmup", type=int, required=True)
            s.add_argument("--queries", type=int, required=True)
    args = p.parse_args(argv)
    if args.cmd is None:
        if args.queries < 1 or args.warmup < 0 or args.rounds < 1:
            p.error("--queries and --rounds must be >= 1, --warmup >= 0")
        return run(args)
    sys.path.insert(0, PYDIR)
    return {"train": train, "owner": owner, "client": client}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
