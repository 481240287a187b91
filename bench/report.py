"""Turn benchmark results into figures: per-configuration statistics, the summary table,
the issue's targets (PASS/MISS), ``report.md`` and the latency plot. No TensorFlow here.

A result is one dict per configuration (one JSON line of ``results.jsonl``); plaintext Keras
rows have ``protocol == "plaintext"``.
"""

import datetime
import os
import platform
import subprocess

import numpy as np

PROTOCOL_NAMES = {"aby3": "ABY3", "securenn": "SecureNN", "plaintext": "plaintext Keras"}
PATH_NAMES = {"python": "Python", "r": "R", "keras": "-"}


def latency_stats(seconds, rows_per_query):
    """Median / p90 per query (ms) and images per second over the queries after the first.

    The first query is reported on its own (it includes tracing); ``rows_per_query`` are the
    real images in each query (the last one may be a padded, partial batch).
    """
    steady = np.asarray(seconds[1:], dtype=float)
    rows = np.asarray(rows_per_query[1:], dtype=float)
    return {
        "median_ms": 1e3 * float(np.median(steady)),
        "p90_ms": 1e3 * float(np.percentile(steady, 90)),
        "images_per_s": float(rows.sum() / steady.sum()),
        "first_query_s": float(seconds[0]),
    }


def accuracy_stats(logits, plain):
    """Max abs logit error and argmax agreement of private vs plaintext Keras logits."""
    return {
        "max_abs_logit_error": float(np.abs(logits - plain).max()),
        "argmax_agreement": float((logits.argmax(1) == plain.argmax(1)).mean()),
        "accuracy_images": int(len(logits)),
    }


def _find(results, protocol, batch, path):
    for r in results:
        if (r["protocol"], r["batch"], r["path"]) == (protocol, batch, path):
            return r
    return None


def targets(results):
    """The issue's targets: list of (what, measured, target, "PASS" / "MISS" / "n/a")."""
    out = []

    def add(what, value, fmt, target, ok):
        out.append((what, "-" if value is None else fmt.format(value), target,
                    "n/a" if value is None else ("PASS" if ok(value) else "MISS")))

    aby3_b1 = _find(results, "aby3", 1, "python") or _find(results, "aby3", 1, "r")
    add("ABY3 batch-1 median latency", aby3_b1 and aby3_b1["median_ms"], "{:.1f} ms",
        "<= 20 ms", lambda v: v <= 20)
    add("ABY3 batch-1 latency / plaintext", aby3_b1 and aby3_b1.get("ratio"), "{:.1f}x",
        "<= 15x", lambda v: v <= 15)
    aby3 = [r for r in results if r["protocol"] == "aby3"]
    best = max(aby3, key=lambda r: r["images_per_s"]) if aby3 else None
    add("ABY3 throughput (best batch{})".format(" {}".format(best["batch"]) if best else ""),
        best and best["images_per_s"], "{:.0f} images/s", ">= 150 images/s",
        lambda v: v >= 150)
    add("ABY3 batch-1 first query", aby3_b1 and aby3_b1["first_query_s"], "{:.1f} s",
        "<= 5 s", lambda v: v <= 5)
    py, r = _find(results, "aby3", 1, "python"), _find(results, "aby3", 1, "r")
    add("R overhead over Python (ABY3 batch 1, R median - Python median)",
        (r["median_ms"] - py["median_ms"]) if py and r else None, "{:+.1f} ms", "<= 2 ms",
        lambda v: v <= 2)
    add("R overhead, timed in R and in the core per query (ABY3 batch 1, median)",
        r and r.get("r_layer_overhead_ms"), "{:+.2f} ms", "<= 2 ms", lambda v: v <= 2)
    acc = max(aby3, key=lambda x: (x["accuracy_images"], x["batch"])) if aby3 else None
    add("ABY3 argmax agreement (batch {}, {} images)".format(
        acc["batch"], acc["accuracy_images"]) if acc else "ABY3 argmax agreement",
        acc and 100 * acc["argmax_agreement"], "{:.1f} %", "100 % on 1000 images",
        lambda v: v == 100)
    if acc and acc["accuracy_images"] < 1000:
        out[-1] = out[-1][:3] + ("n/a (< 1000 images)",)
    return out


def _bytes(n):
    if n is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return "{:.2f} {}".format(n / scale, unit)
    return "{:.0f} B".format(n)


def _num(v, fmt):
    return "-" if v is None else fmt.format(v)


def table(results):
    """The summary table, as Markdown."""
    head = ("| protocol | batch | client | median ms | p90 ms | images/s | first query s | "
            "between workers / query | max abs logit error | argmax agreement | "
            "plaintext ms | × plaintext |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in results:
        private = r["protocol"] != "plaintext"
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            PROTOCOL_NAMES.get(r["protocol"], r["protocol"]), r["batch"],
            PATH_NAMES.get(r["path"], r["path"]), _num(r["median_ms"], "{:.1f}"),
            _num(r["p90_ms"], "{:.1f}"), _num(r["images_per_s"], "{:.0f}"),
            _num(r.get("first_query_s"), "{:.1f}"),
            _bytes(r.get("bytes_between_workers_per_query")),
            _num(r.get("max_abs_logit_error"), "{:.4f}"),
            "{:.1f} % ({})".format(100 * r["argmax_agreement"], r["accuracy_images"])
            if private else "-",
            _num(r.get("plaintext_ms"), "{:.2f}"), _num(r.get("ratio"), "{:.0f}×")))
    return "\n".join(lines)


def targets_table(results):
    lines = ["| target | measured | wanted | |", "|---|---|---|---|"]
    lines += ["| {} | {} | {} | {} |".format(*t) for t in targets(results)]
    return "\n".join(lines)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_info():
    """CPU model, cores, RAM, OS and versions of this machine, as a dict of strings."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "?")
    mem = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal:")), 0)
    osname = next((line.split("=", 1)[1].strip('"') for line in
                   _read("/etc/os-release").splitlines() if line.startswith("PRETTY_NAME=")),
                  platform.system())
    try:
        res = subprocess.run(["Rscript", "--version"], capture_output=True, text=True,
                             timeout=30)
        rver = (res.stdout + res.stderr).strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        rver = "not found"
    return {
        "cpu": cpu, "cores": str(os.cpu_count()), "ram": "{:.0f} GB".format(mem / 2**20),
        "os": "{} (Linux {})".format(osname, platform.release()),
        "python": platform.python_version(), "r": rver,
    }


def plot(results, png_path):
    """Median latency per query vs batch size, private vs plaintext, log y; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    styles = {"aby3": "C0", "securenn": "C1", "plaintext": "C2"}
    series = sorted({(r["protocol"], r["path"]) for r in results},
                    key=lambda k: (list(styles).index(k[0]) if k[0] in styles else 9, k[1]))
    for protocol, path in series:
        rows = sorted((r for r in results if (r["protocol"], r["path"]) == (protocol, path)),
                      key=lambda r: r["batch"])
        label = PROTOCOL_NAMES.get(protocol, protocol) + (
            "" if path == "keras" else " ({} client)".format(PATH_NAMES.get(path, path)))
        r_client = path == "r"
        ax.plot([r["batch"] for r in rows], [r["median_ms"] for r in rows],
                marker="s" if r_client else "o", fillstyle="none" if r_client else "full",
                color=styles.get(protocol), linestyle="--" if r_client else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({r["batch"] for r in results})
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size (images per query)")
    ax.set_ylabel("median latency per query (ms, log scale)")
    ax.set_title("Private (3 workers, loopback) vs plaintext Keras")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def write_report(results, out_dir, machine, extra=None):
    """Write ``report.md`` and ``latency.png`` into ``out_dir``; returns the report's text."""
    extra = extra or {}
    plot(results, os.path.join(out_dir, "latency.png"))
    mach = ["| | |", "|---|---|"] + ["| {} | {} |".format(k, v) for k, v in machine.items()]
    text = "\n\n".join([
        "# privatekeras benchmark",
        "Run {} ({}), command: `{}`.".format(
            extra.get("date", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")),
            extra.get("duration", "?"), extra.get("command", "bench/run.py")),
        "## Machine\n\n" + "\n".join(mach),
        "## Results\n\n" + table(results),
        "## Targets (issue 4)\n\n" + targets_table(results),
        "![latency per query vs batch](latency.png)",
        "## How it was measured\n\n" + METHOD,
    ]) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text


METHOD = """\
- Each row is a fresh set of processes: three workers and a model owner (`bench/owner.py`:
  `Cluster.start()`, `share()`, `serve()`), and one client (`bench/client.py`, or
  `bench/client.R` through the R package), all on loopback. The model is the tutorial CNN
  trained for one epoch on Fashion-MNIST; queries are the first Fashion-MNIST test images.
- Latency is the wall time of one `query()` call in the client (Python `time.perf_counter`,
  R `Sys.time`): median and 90th percentile over all queries but the first. Images/s are the
  images of those queries divided by their total time (one query at a time).
- First query: the client is connected before the owner calls `serve()`; it sends its first
  query as soon as `serve()` is called, and this is the time until its answer. `share()`
  traces the private step and runs it once on zeros (its time is in `results.jsonl` as the
  owner's share seconds), so this includes the client's own first-call costs and serve()'s
  start, not tracing.
- Bytes between workers per query: read from the operating system, not from the code.
  `ss -tinpHO state established` (iproute2) lists every TCP socket with its owning process and
  the kernel's `bytes_acked` counter. Snapshots are taken after the first query and after the
  last; for each socket owned by a worker process whose peer socket is owned by another worker
  process, the counter's increase is summed (each direction counted once, at its sender) and
  divided by the number of queries in between. Traffic between the workers and the owner or
  client (shares in and out, control) is in `results.jsonl` as
  `bytes_workers_parties_per_query`.
- R overhead: the issue's figure is the R client's median minus the Python client's (two
  runs, minutes apart: on shared cores, load drift can dominate it). The R client at batch 1
  also sends 20 extra queries, each timed in R around `query(client, x)` and in Python
  around the core's `client.query()` that it calls; the median difference is the R layer's
  own cost (argument checks, R <-> NumPy conversions), free of network and load noise.
- Accuracy: the private logits of every image queried are compared with plaintext Keras
  (`model.predict`) on the same images: max abs logit error and argmax agreement.
- Plaintext: measured in the same run, in its own process before any cluster starts: median
  of 50 calls of `model.predict_on_batch(x)` at the same batch size (the baseline of the
  ratio; `model(x)` eager calls are in `results.jsonl` as `plaintext_call_ms`).
"""
