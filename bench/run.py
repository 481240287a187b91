"""Benchmark of private predictions (`make bench`): latency, throughput, traffic, accuracy,
the serving path around the private step, and the cost of authenticated links across hosts,
side by side with plaintext Keras and the previous release, all measured in the same run.

Measured on the real product: three worker processes, a model owner and a client on loopback.
For each batch size x client (Python, R) it starts fresh processes, sends queries of
Fashion-MNIST test images to the tutorial CNN, and prints one JSON line; the previous release
(a git worktree of --previous, default 1e7b994) answers the same images at the same batch
sizes (Python client) in between. With root and `ip netns`, bench/netns.py (per-query cost of
stunnel links between five network namespaces) and bench/links.py (ping-pong through stunnel
vs the previous release's Python relays) follow. Then a summary table with the targets.
Everything also goes to OUT: results.jsonl, report.md, latency.png, netns.json, links.json,
tutorial_cnn.keras and one log per process (logs/). Progress goes to stderr.
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
import tempfile
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
PREVIOUS = "1e7b994"  # the last landed commit before issue 9 ("workers are servers")
WITHDRAWN = {"securenn": "withdrawn in this release: its private compare leaks ReLU inputs' "
                         "high bits to worker 2 (docs/security.md); not measured"}


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


def log(msg):
    print("bench: " + msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Targets and method: see report.md in --out.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batches 1 and 8, 6 queries, 64 accuracy images, 12,000 "
                        "training images, short links runs (overrides those options)")
    p.add_argument("--protocols", default="aby3",
                   help="comma-separated; only aby3 is offered (securenn: withdrawn, noted "
                        "in the report, not run)")
    p.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--paths", default="python,r", help="clients: python, r")
    p.add_argument("--queries", type=int, default=30,
                   help="queries per configuration (the first is reported apart)")
    p.add_argument("--max-images", type=int, default=256,
                   help="fewer queries at large batches: at most this many images per "
                        "configuration (not counting the accuracy run), at least 2 queries")
    p.add_argument("--accuracy-images", type=int, default=1000,
                   help="test images queried at the largest batch, first client (and by "
                        "the previous release)")
    p.add_argument("--train-images", type=int, default=60000)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--reuse-model", action="store_true",
                   help="reuse OUT/tutorial_cnn.keras instead of training again")
    p.add_argument("--previous", default=PREVIOUS, metavar="REV",
                   help="git revision of the previous release, measured in the same run "
                        "(default %(default)s)")
    p.add_argument("--no-previous", action="store_true",
                   help="do not measure the previous release")
    p.add_argument("--only", choices=("all", "aby3", "ckks"), default="all",
                   help="ckks: only the CKKS rows (one server, bench/ckks.py; a minute); "
                        "aby3: everything but them; all (default): both")
    p.add_argument("--links", choices=("auto", "on", "off"), default="auto",
                   help="links across network namespaces (bench/netns.py, bench/links.py): "
                        "auto runs them when root with `ip netns` and stunnel4 (default)")
    a = p.parse_args(argv)
    if a.quick:
        a.batches, a.queries, a.max_images = "1,8", 6, 48
        a.accuracy_images, a.train_images = 64, 12000
    a.protocols = a.protocols.split(",")
    a.batches = sorted(int(b) for b in a.batches.split(","))
    a.paths = a.paths.split(",")
    for name, values, allowed in (("protocol", a.protocols, ("aby3", "securenn")),
                                  ("path", a.paths, ("python", "r"))):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error("unknown {} {} (choose from {})".format(name, bad, ", ".join(allowed)))
    a.withdrawn = [x for x in a.protocols if x in WITHDRAWN]
    a.protocols = [x for x in a.protocols if x not in WITHDRAWN]
    if not a.protocols:
        p.error("nothing to measure: {}".format("; ".join(
            "{} is {}".format(x, WITHDRAWN[x]) for x in a.withdrawn)))
    if any(b < 1 for b in a.batches) or a.queries < 2 or a.accuracy_images < 1:
        p.error("batches must be >= 1, --queries >= 2, --accuracy-images >= 1")
    return a


def configurations(a, previous=True):
    """(release, protocol, batch, path, images to query) for every configuration, in run
    order: per batch size, this release's clients, then the previous release (Python client,
    the same images as this release's Python client)."""
    out = []
    for protocol in a.protocols:
        for batch in a.batches:
            for i, path in enumerate(a.paths):
                count = batch * max(2, min(a.queries, a.max_images // batch))
                if batch == a.batches[-1] and i == 0:
                    count = max(count, a.accuracy_images, 2 * batch)
                out.append(("this", protocol, batch, path, count))
                if previous and i == 0:
                    out.append(("previous", protocol, batch, "python", count))
            if previous and "python" not in a.paths:
                count = batch * max(2, min(a.queries, a.max_images // batch))
                out.append(("previous", protocol, batch, "python", count))
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
    args = sockets.cmdline(pid)
    return args is not None and sockets.is_worker_cmdline(args)


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


def child_env(pythonpath=None):
    """The children's environment: ``pythonpath`` (default: this release's inst/python)
    first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [pythonpath or os.path.join(ROOT, "inst", "python"),
                    env.get("PYTHONPATH", "")] if p)
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


# -- the previous release -------------------------------------------------------------------
class Previous:
    """The previous release in a temporary git worktree, its kernels built into this venv
    (their directory is keyed by a digest of their sources, so both releases' libraries sit
    side by side). ``reason`` says why it is not available (then nothing else works)."""

    def __init__(self, rev):
        self.rev, self.commit, self.reason = rev, None, None
        self.tmp = self.src = None

    @property
    def label(self):
        return "previous release ({})".format(self.commit[:7] if self.commit else self.rev)

    def _git(self, *args, timeout=300):
        return subprocess.run(["git", "-C", ROOT] + list(args), capture_output=True,
                              text=True, timeout=timeout)

    def setup(self):
        """Check out and build; returns True when it can be measured, else sets ``reason``."""
        if shutil.which("git") is None:
            self.reason = "previous release not available (no git history): git is not installed"
            return False
        res = self._git("rev-parse", "--verify", "--quiet", self.rev + "^{commit}")
        if res.returncode != 0:
            self.reason = ("previous release not available (no git history): commit {} is not "
                           "in this checkout".format(self.rev))
            return False
        self.commit = res.stdout.strip()
        self.tmp = tempfile.mkdtemp(prefix="privatekeras-bench-previous-")
        self.src = os.path.join(self.tmp, "src")
        log("previous release: git worktree of {} in {} ...".format(self.commit[:7], self.src))
        res = self._git("worktree", "add", "--detach", self.src, self.commit)
        if res.returncode != 0:
            self.reason = "previous release not available: git worktree add failed: {}".format(
                (res.stderr or res.stdout).strip()[-500:])
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = self.src = None
            return False
        for needed in ("bench/owner.py", "bench/client.py", "bench/child.py",
                       "inst/python/privatekeras/serving.py"):
            if not os.path.exists(os.path.join(self.src, needed)):
                self.reason = "previous release {} has no {}: cannot measure it".format(
                    self.commit[:7], needed)
                return False
        log("previous release: building its kernels into this venv (once) ...")
        res = subprocess.run([sys.executable, "-m", "privatekeras.kernels", "build"],
                             env=self.env(), capture_output=True, text=True, timeout=1800,
                             cwd=self.src)
        if res.returncode != 0:
            self.reason = "previous release's kernels did not build:\n{}".format(
                (res.stdout + res.stderr)[-2000:])
            return False
        return True

    def env(self):
        return child_env(os.path.join(self.src, "inst", "python"))

    @property
    def bench_dir(self):
        return os.path.join(self.src, "bench")

    def close(self):
        if self.src is not None:
            res = self._git("worktree", "remove", "--force", self.src)
            if res.returncode != 0:
                shutil.rmtree(self.src, ignore_errors=True)
                self._git("worktree", "prune")
            self.src = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


# -- one configuration ----------------------------------------------------------------------
def ensure_kernels(env):
    """Build the kernels of the sources in ``env``'s PYTHONPATH if they are missing (a no-op
    taking half a second when they are there: their directory is keyed by a digest of the
    sources, so an edit of the working tree during a long run needs a build)."""
    res = subprocess.run([sys.executable, "-m", "privatekeras.kernels", "build"], env=env,
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise BenchError("the secure kernels do not build:\n{}".format(
            (res.stdout + res.stderr)[-2000:]))
    if "compiling" in res.stdout + res.stderr:
        log("  (the kernels' sources changed: rebuilt them)")


def run_config(a, release, protocol, batch, path, count, env, logs, previous=None):
    """Run one configuration in fresh processes; returns its measurements as a dict."""
    if release == "this":
        ensure_kernels(env)
    tag = "{}-{}-b{}-{}".format(release, protocol, batch, path)
    hosts = free_hosts()
    n_queries = -(-count // batch)
    pairs = R_PAIRS if path == "r" and batch == 1 else 0
    steps_path = os.path.join(logs, tag + "-steps.json")
    if os.path.exists(steps_path):
        os.remove(steps_path)
    owner_args = [os.path.join(a.out, "tutorial_cnn.keras"), ",".join(hosts), protocol,
                  str(batch), str(n_queries + pairs)]
    # Worker 0 (this release) or the old owner (previous release) appends the traced step's
    # ops, rounds and messages here (privatekeras/mpc/graphstats.py).
    graph_path = os.path.join(logs, tag + "-graph.jsonl")
    if os.path.exists(graph_path):
        os.remove(graph_path)
    env = dict(env, PRIVATEKERAS_STEP_STATS=graph_path)
    if release == "previous":
        owner_cmd = [sys.executable, os.path.join(HERE, "prev_owner.py"), previous.bench_dir,
                     steps_path] + owner_args
        bench_dir = previous.bench_dir
    else:
        owner_cmd = [sys.executable, os.path.join(HERE, "owner.py")] + owner_args + [steps_path]
        bench_dir = HERE
    owner = Child("model owner", owner_cmd, os.path.join(logs, tag + "-owner.log"), env)
    client, workers = None, set()
    t0 = time.monotonic()
    try:
        log("  starting workers on {} ...".format(", ".join(hosts)))
        workers = {int(p) for p in owner.expect("WORKERS", 300)[0].split(",")}
        compute = set()
        for pid in workers:
            compute |= sockets.compute_ports(sockets.cmdline(pid) or [])
        client_args = [",".join(hosts), str(batch), str(count),
                       os.path.join(a.out, "images.npy"), os.path.join(logs, tag + ".npz")]
        cmd = ([sys.executable, os.path.join(bench_dir, "client.py")] if path == "python" else
               ["Rscript", os.path.join(HERE, "client.R")]) + client_args + (
                   [str(pairs)] if path == "r" else [])
        log("  sharing the model; starting the {} client ...".format(report.PATH_NAMES[path]))
        client = Child("{} client".format(report.PATH_NAMES[path]), cmd,
                       os.path.join(logs, tag + "-client.log"), env)
        start_s, share_s = (float(v) for v in owner.expect("SHARED", 600))
        client.expect("CONNECTED", 300)
        owner.send("SERVE")
        owner.expect("SERVING", 60)
        client.send("GO")
        log("  first query after serve() starts ...")
        client.expect("SNAP", 600)
        ours = sorted(workers | {owner.proc.pid, client.proc.pid})
        before = sockets.snapshot(ours)
        client.send("OK")
        log("  {} more queries of {} image(s) ...".format(n_queries - 1, batch))
        client.expect("SNAP", 120 + 10 * n_queries * batch)
        after = sockets.snapshot(ours)
        owner.send("STOP")  # the owner stops the workers only after serve() and this
        client.send("OK")
        client.expect("DONE", 120 + 2 * pairs)
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
    try:
        with open(steps_path) as f:
            steps = json.load(f)
    except (OSError, ValueError):
        steps = []
    if len(steps) != n_queries + pairs:
        log("  {}: {} step times for {} queries: no serving-path figure".format(
            tag, len(steps), n_queries + pairs))
        steps = []
    rows = [min(batch, count - i) for i in range(0, count, batch)]
    detail = []
    moved = sockets.traffic(before, after, workers, compute or None, detail)
    with open(os.path.join(logs, tag + "-traffic.json"), "w") as f:
        json.dump({"workers": sorted(workers), "compute_ports": sorted(compute),
                   "totals": moved, "sockets": detail}, f, indent=1)
    result = {"release": release, "protocol": protocol, "batch": batch, "path": path,
              "queries": n_queries}
    if release == "previous":
        result["commit"] = previous.commit
    result.update(report.latency_stats(seconds, rows))
    result.update(report.step_stats(seconds, steps[:n_queries]))
    plain = np.load(os.path.join(a.out, "plain_logits.npy"))[:count]
    result.update(report.accuracy_stats(logits, plain))
    per = max(1, n_queries - 1)
    result.update({
        "bytes_between_workers_per_query": moved["between_workers"] / per,
        "bytes_workers_control_per_query": moved["workers_control"] / per,
        "bytes_workers_parties_per_query": moved["with_others"] / per,
        "owner_start_s": start_s, "owner_share_s": share_s,
        "wall_s": time.monotonic() - t0,
    })
    if pairs:
        result["r_layer_overhead_ms"] = 1e3 * float(np.median(got["paired"]))
    result.update(graph_stats(graph_path))
    return result


def graph_stats(path):
    """The single-query step's graph counts (``step_ops``, ``step_rounds``, ...), or nothing
    when the step was not counted."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return {}
    row = next((r for r in rows if r.get("group", 1) == 1), None)
    if row is None:
        return {}
    return {"step_" + k: row[k] for k in ("ops", "mesh_ops", "rounds", "messages",
                                          "message_bytes", "ops_per_party", "parties")
            if k in row}


# -- links across hosts -----------------------------------------------------------------------
def links_unavailable():
    """None when the links benchmarks can run here, else the reason."""
    if os.geteuid() != 0:
        return "not root (network namespaces need root)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if not (shutil.which("stunnel4") or shutil.which("stunnel")):
        return "stunnel4 is not installed"
    probe = "pkbenchprobe{}".format(os.getpid())
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return "cannot create a network namespace: {}".format(res.stderr.strip())
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def run_script(name, cmd, log_path, env, timeout):
    """Run a helper benchmark (bench/netns.py, bench/links.py) in its own session, its
    progress (stderr) shown and logged; returns the JSON objects of its stdout lines. Its
    temporary files go to a directory of its own (TMPDIR), removed afterwards."""
    objects = []
    tmp = tempfile.mkdtemp(prefix="pkb-")
    env = dict(env, TMPDIR=tmp)
    try:
        return _run_script(name, cmd, log_path, env, timeout, objects)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_script(name, cmd, log_path, env, timeout, objects):
    with open(log_path, "w", buffering=1) as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                text=True, bufsize=1, start_new_session=True, cwd=ROOT,
                                stdin=subprocess.DEVNULL)

        def progress():
            for line in proc.stderr:
                logf.write(line)
                if line.startswith(("netns bench:", "links bench:")):
                    print("bench:   " + line.rstrip(), file=sys.stderr, flush=True)

        reader = threading.Thread(target=progress, daemon=True)
        reader.start()
        expired = threading.Event()

        def expire():
            expired.set()
            _interrupt(proc)

        timer = threading.Timer(timeout, expire)
        timer.start()
        try:
            for line in proc.stdout:
                logf.write(line)
                line = line.strip()
                if line.startswith("{"):
                    try:
                        objects.append(json.loads(line))
                    except ValueError:
                        pass
            rc = proc.wait()
        except BaseException:
            _interrupt(proc)
            raise
        finally:
            timer.cancel()
            reader.join(5)
    if rc != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-1500:]
        raise BenchError("{} exited with code {}{}; last lines of {}:\n{}".format(
            name, rc, " (timed out after {:.0f} s)".format(timeout) if expired.is_set() else "",
            log_path, tail))
    return objects


def _interrupt(proc):
    """SIGINT first (the scripts' `finally:` deletes their namespaces), then harder."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def links(a, env, logs):
    """bench/netns.py and bench/links.py, when they can run; returns a dict for the report."""
    out = {"netns": None, "links": None, "notes": []}
    if a.links == "off":
        out["notes"].append("links across hosts not measured (--links off)")
        return out, True
    reason = links_unavailable()
    if reason:
        out["notes"].append("links across hosts not measured: {}".format(reason))
        return out, a.links == "auto"
    ok = True
    netns_py = os.path.join(HERE, "netns.py")
    if not os.path.exists(netns_py):
        out["notes"].append("bench/netns.py is not there: the per-query cost of links was not "
                            "measured")
        ok = False
    else:
        args = (["--queries", "8", "--warmup", "2", "--rounds", "1", "--train-images", "4000"]
                if a.quick else ["--queries", "25", "--warmup", "5", "--rounds", "2"])
        log("links: per-query latency, loopback vs five network namespaces linked by stunnel "
            "(bench/netns.py {}) ...".format(" ".join(args)))
        t0 = time.monotonic()
        try:
            objs = run_script("bench/netns.py", [sys.executable, netns_py] + args + [
                "--out", os.path.join(a.out, "netns.json")], os.path.join(logs, "netns.log"),
                env, timeout=1800)
            summary = next((o for o in objs if "summary" in o), None)
            if summary is None:
                raise BenchError("bench/netns.py printed no summary")
            out["netns"] = {"setups": [o for o in objs if "setup" in o], "summary": summary,
                            "seconds": time.monotonic() - t0}
            log("  links cost per query {:+.1f} ms (latency median, netns-stunnel - loopback)"
                .format(summary["links_cost_latency_median_ms"]))
        except BenchError as exc:
            log("links: bench/netns.py FAILED: {}".format(exc))
            out["notes"].append("bench/netns.py failed: {}".format(str(exc).splitlines()[0]))
            ok = False
    links_py = os.path.join(HERE, "links.py")
    if os.path.exists(links_py):
        args = ["--round-trips", "300", "--repeat", "1"] if a.quick else \
            ["--round-trips", "1000", "--repeat", "3"]
        log("links: 64-byte ping-pong, stunnel vs the previous release's Python relays "
            "(bench/links.py {}) ...".format(" ".join(args)))
        t0 = time.monotonic()
        try:
            objs = run_script("bench/links.py", [sys.executable, links_py] + args,
                              os.path.join(logs, "links.log"), env, timeout=900)
            out["links"] = {"variants": [o for o in objs if "variant" in o],
                            "seconds": time.monotonic() - t0}
            if os.path.abspath(a.out) != DEFAULT_OUT:  # links.py writes bench/out/links.json
                with open(os.path.join(a.out, "links.json"), "w") as f:
                    json.dump(out["links"]["variants"], f, indent=1)
                    f.write("\n")
        except BenchError as exc:
            log("links: bench/links.py FAILED: {}".format(exc))
            out["notes"].append("bench/links.py failed: {}".format(str(exc).splitlines()[0]))
            ok = False
    return out, ok


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
        rows.append({"release": "plaintext", "protocol": "plaintext", "batch": b,
                     "path": "keras", "queries": len(pob),
                     "median_ms": 1e3 * float(np.median(pob)),
                     "p90_ms": 1e3 * float(np.percentile(pob, 90)),
                     "images_per_s": b / float(np.mean(pob)),
                     "plaintext_call_ms": 1e3 * float(np.median(t["call_s"]))})
    return info, rows


def ckks_rows(a, env, logs, notes):
    """The CKKS rows (bench/ckks.py): ``(markdown, ok)``; a failure is a note, not the end."""
    import ckks

    try:
        rows = ckks.run(a.out, env, logs, quick=a.quick)
    except Exception as exc:  # noqa: BLE001 - reported, the rest of the report stands
        notes.append("CKKS rows failed: {}".format(str(exc).splitlines()[0]))
        log(notes[-1])
        return None, False
    return ckks.table(rows) + "\n\n" + ckks.targets_table(rows) + "\n\n" + ckks.METHOD, True


def run_ckks_only(a, env, logs):
    """``--only ckks``: the CKKS rows alone, printed and written to OUT/ckks.md."""
    notes = []
    md, ok = ckks_rows(a, env, logs, notes)
    if not ok:
        return 1
    with open(os.path.join(a.out, "ckks.md"), "w") as f:
        f.write("# privatekeras benchmark: CKKS rows\n\n" + md + "\n")
    print(md)
    print("bench: report {}".format(os.path.join(a.out, "ckks.md")))
    return 0


def main(argv=None):
    a = parse_args(argv)
    started, t0, load0 = datetime.datetime.now(), time.monotonic(), os.getloadavg()[0]
    os.makedirs(a.out, exist_ok=True)
    logs = os.path.join(a.out, "logs")
    os.makedirs(logs, exist_ok=True)
    env = child_env()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally:` cleans up
    configs = configurations(a)
    results, notes, complete = [], [], True
    stages = {}  # what took how long (seconds), for the report
    previous = None if a.no_previous else Previous(a.previous)
    prev_info = {"rev": a.previous, "commit": None,
                 "reason": "previous release not measured (--no-previous)" if a.no_previous
                 else None}
    links_info = {"netns": None, "links": None, "notes": []}
    if a.only == "ckks":
        return run_ckks_only(a, env, logs)
    for x in a.withdrawn:
        notes.append("{}: {}".format(report.PROTOCOL_NAMES.get(x, x), WITHDRAWN[x]))
        log(notes[-1])
    ckks_md = None
    try:
        if "r" in a.paths:
            check_r(env)
        stage = time.monotonic()
        info, plain_rows = plaintext(a, env, [c[4] for c in configs])
        stages["plaintext Keras (training, reference logits, timings)"] = \
            time.monotonic() - stage
        stage = time.monotonic()
        if previous is not None and not previous.setup():
            log(previous.reason)
            prev_info["reason"] = previous.reason
        if previous is not None:
            stages["previous release: worktree and kernels"] = time.monotonic() - stage
        if previous is not None:
            prev_info["commit"] = previous.commit
        if previous is None or previous.reason:
            configs = [c for c in configs if c[0] != "previous"]
        with open(os.path.join(a.out, "results.jsonl"), "w") as jsonl:
            for row in plain_rows:
                print(json.dumps(row), flush=True)
                jsonl.write(json.dumps(row) + "\n")
            for i, (release, protocol, batch, path, count) in enumerate(configs):
                log("[{}/{}] {}: {} batch {}, {} client, {} images".format(
                    i + 1, len(configs), "this release" if release == "this" else
                    previous.label, report.PROTOCOL_NAMES[protocol], batch,
                    report.PATH_NAMES[path], count))
                try:
                    r = run_config(a, release, protocol, batch, path, count,
                                   env if release == "this" else previous.env(), logs,
                                   previous)
                except BenchError as exc:
                    if release == "this":
                        raise
                    log("  the previous release FAILED here (going on without it): "
                        "{}".format(exc))
                    notes.append("previous release, batch {}: failed: {}".format(
                        batch, str(exc).splitlines()[0]))
                    complete = False
                    continue
                plain = next(p for p in plain_rows if p["batch"] == batch)
                r["plaintext_ms"] = plain["median_ms"]
                r["ratio"] = r["median_ms"] / plain["median_ms"]
                log("  median {:.1f} ms, step {} ms, serving path {} ms, first query {:.1f} s, "
                    "argmax {:.1%}, {:.0f} s".format(
                        r["median_ms"], report.fmt(r.get("step_median_ms"), "{:.1f}"),
                        report.fmt(r.get("serving_path_ms"), "{:.1f}"), r["first_query_s"],
                        r["argmax_agreement"], r["wall_s"]))
                results.append(r)
                key = "{} configurations".format("this release's" if release == "this"
                                                 else "previous release's")
                stages[key] = stages.get(key, 0.0) + r["wall_s"]
                print(json.dumps(r), flush=True)
                jsonl.write(json.dumps(r) + "\n")
                jsonl.flush()
        if previous is not None:
            previous.close()
        links_info, ok = links(a, env, logs)
        complete = complete and ok
        for name, key in (("bench/netns.py", "netns"), ("bench/links.py", "links")):
            if links_info.get(key):
                stages[name] = links_info[key]["seconds"]
        for note in links_info["notes"]:
            log(note)
        if a.only == "all":
            stage = time.monotonic()
            ckks_md, ok = ckks_rows(a, env, logs, notes)
            complete = complete and ok
            stages["CKKS (one server)"] = time.monotonic() - stage
    except BenchError as exc:
        log("FAILED: {}".format(exc))
        return 1
    except KeyboardInterrupt:
        log("interrupted; every process started has been stopped")
        return 130
    finally:
        if previous is not None:
            previous.close()

    minutes, secs = divmod(int(time.monotonic() - t0), 60)
    machine = report.machine_info()
    machine.update({"TensorFlow / Keras": "{} / {}".format(info["tensorflow"], info["keras"]),
                    "model": "tutorial CNN, 1 epoch on {} Fashion-MNIST images, test accuracy "
                             "{:.1%}".format(info["train_images"], info["test_accuracy"]),
                    "load average (1 min) at start / end": "{:.1f} / {:.1f} (other programs "
                    "share these cores)".format(load0, os.getloadavg()[0])})
    report.write_report(results + plain_rows, a.out, machine, {
        "date": started.strftime("%Y-%m-%d %H:%M"), "duration": "{} min {} s".format(minutes, secs),
        "command": " ".join(["bench/run.py"] + [shlex.quote(x) for x in (argv or sys.argv[1:])]),
        "previous": prev_info, "links": links_info, "notes": notes, "stages": stages,
        "ckks_md": ckks_md})
    everything = results + plain_rows
    print()
    print(report.side_by_side(everything, prev_info))
    print()
    print(report.targets_table(everything, links_info, prev_info))
    print()
    print(report.links_table(links_info))
    if ckks_md:
        print()
        print(ckks_md)
    for note in notes + ([prev_info["reason"]] if prev_info["reason"] else []):
        print("note: " + note)  # (the links' notes are in the table above)
    print()
    if not a.quick and a.out == DEFAULT_OUT:
        # The plot the README embeds, regenerated by every full `make bench`.
        shutil.copyfile(os.path.join(a.out, "latency.png"), os.path.join(HERE, "latency.png"))
    print("bench: time per stage: {}".format(", ".join(
        "{} {:.0f} s".format(k, v) for k, v in stages.items())))
    print("bench: done in {} min {} s; report {}{}".format(
        minutes, secs, os.path.join(a.out, "report.md"),
        "" if complete else " (some parts failed: see the notes)"))
    return 0 if results and complete else 1


if __name__ == "__main__":
    sys.exit(main())
