"""Benchmark of private predictions (`make bench`): latency, throughput, traffic, accuracy.

Measured on the real product: three worker processes, a model owner and a client on loopback.

For each protocol x batch size x client (Python, R) it starts fresh processes, sends queries
of Fashion-MNIST test images to the tutorial CNN, and prints one JSON line; then a summary
table with the issue's targets. Everything also goes to OUT: results.jsonl, report.md,
latency.png, tutorial_cnn.keras and one log per process (logs/). Progress goes to stderr.
"""

import argparse
import datetime
import json
import os
import queue
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import report  # noqa: E402
import sockets  # noqa: E402


# Extra R-client queries at batch 1, each timed in R and inside the Python core.
R_PAIRS = 20
DEFAULT_OUT = os.path.join(HERE, "out")


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def log(msg):
    print("bench: " + msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Targets and method: see report.md in --out.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: ABY3 only, batches 1 and 8, 6 queries, 64 accuracy "
                        "images, 12,000 training images (overrides those options)")
    p.add_argument("--protocols", default="aby3,securenn", help="comma-separated")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--paths", default="python,r", help="clients: python, r")
    p.add_argument("--queries", type=int, default=40,
                   help="queries per configuration (the first is reported apart)")
    p.add_argument("--max-images", type=int, default=384,
                   help="fewer queries at large batches: at most this many images per "
                        "configuration (not counting the accuracy run), at least 2 queries")
    p.add_argument("--accuracy-images", type=int, default=1000,
                   help="test images queried by ABY3 at the largest batch, first client")
    p.add_argument("--train-images", type=int, default=60000)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--reuse-model", action="store_true",
                   help="reuse OUT/tutorial_cnn.keras instead of training again")
    a = p.parse_args(argv)
    if a.quick:
        a.protocols, a.batches, a.queries, a.max_images = "aby3", "1,8", 6, 48
        a.accuracy_images, a.train_images = 64, 12000
    a.protocols = a.protocols.split(",")
    a.batches = sorted(int(b) for b in a.batches.split(","))
    a.paths = a.paths.split(",")
    for name, values, allowed in (("protocol", a.protocols, ("aby3", "securenn")),
                                  ("path", a.paths, ("python", "r"))):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error("unknown {} {} (choose from {})".format(name, bad, ", ".join(allowed)))
    if any(b < 1 for b in a.batches) or a.queries < 2 or a.accuracy_images < 1:
        p.error("batches must be >= 1, --queries >= 2, --accuracy-images >= 1")
    return a


def configurations(a):
    """(protocol, batch, path, images to query) for every configuration, in run order."""
    out = []
    for protocol in a.protocols:
        for batch in a.batches:
            for i, path in enumerate(a.paths):
                count = batch * max(2, min(a.queries, a.max_images // batch))
                if protocol == "aby3" and batch == a.batches[-1] and i == 0:
                    count = max(count, a.accuracy_images, 2 * batch)
                out.append((protocol, batch, path, count))
    return out


# -- child processes ----------------------------------------------------------------------
class Child:
    """A child process in its own session. Its ``@@`` stdout lines arrive in a queue; all of
    its output also goes to a log file."""

    def __init__(self, name, cmd, log_path, env):
        self.name, self.log_path = name, log_path
        open(log_path, "w").close()
        self._log = open(log_path, "a", buffering=1)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, text=True, bufsize=1,
                                     start_new_session=True, cwd=ROOT)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._log.write(line)
            if line.startswith("@@"):
                self.lines.put(line.split()[1:])
        self.lines.put(None)

    def tail(self, n=25):
        with open(self.log_path, errors="replace") as f:
            lines = f.read().splitlines()[-n:]
        return "\n".join("    " + line for line in lines)

    def expect(self, word, timeout):
        """Wait for ``@@ word ...`` and return its fields; a clear error otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError("{} did not say {} within {:.0f} s; last lines of {}:\n{}".format(
                    self.name, word, timeout, self.log_path, self.tail())) from None
            if item is None:
                rc = self.proc.wait()
                raise BenchError("{} exited with code {} before saying {}; last lines of {}:\n"
                                 "{}".format(self.name, rc, word, self.log_path, self.tail()))
            if item and item[0] == word:
                return item[1:]

    def send(self, word):
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout):
        """Wait for a normal exit; an error if it fails or takes too long."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise BenchError("{} did not exit within {:.0f} s".format(self.name, timeout)) from None
        if rc:
            raise BenchError("{} exited with code {}; last lines of {}:\n{}".format(
                self.name, rc, self.log_path, self.tail()))

    def kill(self):
        """End the process group: SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()


def kill_workers(pids, timeout=15):
    """SIGKILL worker processes that outlived their owner (checked by command line)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline and _is_worker(pid):
            time.sleep(0.2)  # the owner's cluster.stop() or their parent-death signal
        if _is_worker(pid):
            log("killing leftover worker {}".format(pid))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _is_worker(pid):
    try:
        with open("/proc/{}/cmdline".format(pid), "rb") as f:
            return b"privatekeras.worker" in f.read()
    except OSError:
        return False


def free_hosts():
    """Three consecutive free loopback ports, as 'localhost:port' strings."""
    while True:
        base = random.randrange(20000, 40000, 3)
        if all(_port_free(p) for p in (base, base + 1, base + 2)):
            return ["localhost:{}".format(p) for p in (base, base + 1, base + 2)]


def _port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [os.path.join(ROOT, "inst", "python"), env.get("PYTHONPATH", "")] if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("R_LIBS", os.path.join(ROOT, ".rlib"))
    env.setdefault("RETICULATE_PYTHON", sys.executable)
    return env


def check_r(env):
    """Fail early, and clearly, if the R client cannot run."""
    try:
        res = subprocess.run(["Rscript", "-e", "library(privatekeras)"], env=env,
                             capture_output=True, text=True, timeout=120)
    except OSError:
        raise BenchError("the R client needs Rscript on PATH (or leave r out of --paths)") from None
    if res.returncode:
        raise BenchError("the R package privatekeras does not load (R_LIBS={}): run `make "
                         "r-install` first\n{}".format(env.get("R_LIBS"), res.stderr[-1500:]))


# -- one configuration ----------------------------------------------------------------------
def run_config(a, protocol, batch, path, count, env, logs):
    """Run one configuration in fresh processes; returns its measurements as a dict."""
    tag = "{}-b{}-{}".format(protocol, batch, path)
    hosts = free_hosts()
    n_queries = -(-count // batch)
    pairs = R_PAIRS if path == "r" and batch == 1 else 0
    owner = Child("model owner", [sys.executable, os.path.join(HERE, "owner.py"),
                                  os.path.join(a.out, "tutorial_cnn.keras"), ",".join(hosts),
                                  protocol, str(batch), str(n_queries + pairs)],
                  os.path.join(logs, tag + "-owner.log"), env)
    client, workers = None, set()
    t0 = time.monotonic()
    try:
        log("  starting workers on {} ...".format(", ".join(hosts)))
        workers = {int(p) for p in owner.expect("WORKERS", 300)[0].split(",")}
        client_args = [",".join(hosts), str(batch), str(count),
                       os.path.join(a.out, "images.npy"), os.path.join(logs, tag + ".npz")]
        cmd = ([sys.executable, os.path.join(HERE, "client.py")] if path == "python" else
               ["Rscript", os.path.join(HERE, "client.R")]) + client_args + (
                   [str(pairs)] if path == "r" else [])
        log("  sharing the model; starting the {} client ...".format(report.PATH_NAMES[path]))
        client = Child("{} client".format(report.PATH_NAMES[path]), cmd,
                       os.path.join(logs, tag + "-client.log"), env)
        start_s, share_s = (float(v) for v in owner.expect("SHARED", 300))
        client.expect("CONNECTED", 300)
        owner.send("SERVE")
        owner.expect("SERVING", 60)
        client.send("GO")
        log("  first query after serve() starts ...")
        client.expect("SNAP", 600)
        before = sockets.snapshot()
        client.send("OK")
        log("  {} more queries of {} image(s) ...".format(n_queries - 1, batch))
        client.expect("SNAP", 120 + 10 * n_queries * batch)
        after = sockets.snapshot()
        client.send("OK")
        client.expect("DONE", 120)
        client.finish(60)
        owner.expect("SERVED", 120)
        owner.finish(120)
    finally:
        for child in (client, owner):
            if child is not None:
                child.kill()
        kill_workers(workers)

    got = np.load(os.path.join(logs, tag + ".npz"))
    seconds, logits = got["seconds"], got["logits"]
    if len(seconds) != n_queries or logits.shape != (count, 10):
        raise BenchError("{}: the client returned {} timings and logits of shape {}, expected "
                         "{} and {}".format(tag, len(seconds), logits.shape, n_queries,
                                            (count, 10)))
    rows = [min(batch, count - i) for i in range(0, count, batch)]
    between, others = sockets.traffic(before, after, workers)
    result = {"protocol": protocol, "batch": batch, "path": path, "queries": n_queries}
    result.update(report.latency_stats(seconds, rows))
    plain = np.load(os.path.join(a.out, "plain_logits.npy"))[:count]
    result.update(report.accuracy_stats(logits, plain))
    result.update({
        "bytes_between_workers_per_query": between / (n_queries - 1),
        "bytes_workers_parties_per_query": others / (n_queries - 1),
        "owner_start_s": start_s, "owner_share_s": share_s,
        "wall_s": time.monotonic() - t0,
    })
    if pairs:
        result["r_layer_overhead_ms"] = 1e3 * float(np.median(got["paired"]))
    return result


# -- the whole run ----------------------------------------------------------------------------
def plaintext(a, env, counts):
    """Train (or reuse) the model, save reference logits, time plaintext Keras."""
    cmd = [sys.executable, os.path.join(HERE, "plain.py"), "--out", a.out,
           "--images", str(max(counts)), "--batches", ",".join(map(str, a.batches)),
           "--train-images", str(a.train_images)] + (["--reuse-model"] if a.reuse_model else [])
    log("plaintext Keras: train the tutorial CNN, reference logits, plaintext timings ...")
    res = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    for line in res.stderr.splitlines():
        if line.startswith("bench:"):
            print(line, file=sys.stderr, flush=True)
    if res.returncode:
        raise BenchError("the plaintext step failed (exit {}):\n{}".format(
            res.returncode, res.stderr[-3000:]))
    with open(os.path.join(a.out, "plain.json")) as f:
        info = json.load(f)
    rows = []
    for b in a.batches:
        t = info["timings"][str(b)]
        pob = np.array(t["predict_on_batch_s"])
        rows.append({"protocol": "plaintext", "batch": b, "path": "keras",
                     "queries": len(pob), "median_ms": 1e3 * float(np.median(pob)),
                     "p90_ms": 1e3 * float(np.percentile(pob, 90)),
                     "images_per_s": b / float(np.mean(pob)),
                     "plaintext_call_ms": 1e3 * float(np.median(t["call_s"]))})
    return info, rows


def main(argv=None):
    a = parse_args(argv)
    started, t0, load0 = datetime.datetime.now(), time.monotonic(), os.getloadavg()[0]
    os.makedirs(a.out, exist_ok=True)
    logs = os.path.join(a.out, "logs")
    os.makedirs(logs, exist_ok=True)
    env = child_env()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally:` cleans up
    configs = configurations(a)
    results = []
    try:
        if "r" in a.paths:
            check_r(env)
        info, plain_rows = plaintext(a, env, [c[3] for c in configs])
        with open(os.path.join(a.out, "results.jsonl"), "w") as jsonl:
            for row in plain_rows:
                print(json.dumps(row), flush=True)
                jsonl.write(json.dumps(row) + "\n")
            for i, (protocol, batch, path, count) in enumerate(configs):
                log("[{}/{}] {} batch {}, {} client, {} images".format(
                    i + 1, len(configs), report.PROTOCOL_NAMES[protocol], batch,
                    report.PATH_NAMES[path], count))
                r = run_config(a, protocol, batch, path, count, env, logs)
                plain = next(p for p in plain_rows if p["batch"] == batch)
                r["plaintext_ms"] = plain["median_ms"]
                r["ratio"] = r["median_ms"] / plain["median_ms"]
                log("  median {:.1f} ms, first query {:.1f} s, argmax {:.1%}, {:.0f} s".format(
                    r["median_ms"], r["first_query_s"], r["argmax_agreement"], r["wall_s"]))
                results.append(r)
                print(json.dumps(r), flush=True)
                jsonl.write(json.dumps(r) + "\n")
                jsonl.flush()
    except BenchError as exc:
        log("FAILED: {}".format(exc))
        return 1
    except KeyboardInterrupt:
        log("interrupted; every process started has been stopped")
        return 130

    minutes, secs = divmod(int(time.monotonic() - t0), 60)
    machine = report.machine_info()
    machine.update({"TensorFlow / Keras": "{} / {}".format(info["tensorflow"], info["keras"]),
                    "model": "tutorial CNN, 1 epoch on {} Fashion-MNIST images, test accuracy "
                             "{:.1%}".format(info["train_images"], info["test_accuracy"]),
                    "load average (1 min) at start / end": "{:.1f} / {:.1f} (other programs "
                    "share these cores)".format(load0, os.getloadavg()[0])})
    report.write_report(results + plain_rows, a.out, machine, {
        "date": started.strftime("%Y-%m-%d %H:%M"), "duration": "{} min {} s".format(minutes, secs),
        "command": " ".join(["bench/run.py"] + [shlex.quote(x) for x in (argv or sys.argv[1:])])})
    print()
    print(report.table(results + plain_rows))
    print()
    print(report.targets_table(results))
    print()
    if not a.quick and a.out == DEFAULT_OUT:
        # The plot the README embeds, regenerated by every full `make bench`.
        shutil.copyfile(os.path.join(a.out, "latency.png"), os.path.join(HERE, "latency.png"))
    print("bench: done in {} min {} s; report {}".format(
        minutes, secs, os.path.join(a.out, "report.md")))
    return 1 if not results else 0


if __name__ == "__main__":
    sys.exit(main())
