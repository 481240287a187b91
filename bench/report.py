"""Turn benchmark results into figures: per-configuration statistics, the side-by-side table
(plaintext Keras | previous release | this release), the issues' targets (PASS/MISS, with the
previous release's figure next to this one's), the links section, ``report.md`` and the
latency plot. No TensorFlow here.

A result is one dict per configuration (one JSON line of ``results.jsonl``): ``release`` is
``"this"``, ``"previous"`` or ``"plaintext"`` (plaintext Keras rows also have ``protocol ==
"plaintext"``). ``links`` is what run.py gathered from bench/netns.py and bench/links.py;
``previous`` says which commit the previous release is and, if it was not measured, why.
"""

import datetime
import os
import platform
import subprocess

import numpy as np

PROTOCOL_NAMES = {"aby3": "ABY3", "securenn": "SecureNN", "plaintext": "plaintext Keras"}
PATH_NAMES = {"python": "Python", "r": "R", "keras": "-"}
RELEASE_NAMES = {"this": "this release", "previous": "previous release",
                 "plaintext": "plaintext Keras"}
# The previous release's Python TLS relays across hosts, per query: the README's figure
# (issue 9), not measured by this bench.
PREVIOUS_RELAYS_MS = (55, 100)
SERVING_PATH_TARGET_MS = 2.0
LINKS_TARGET_MS = 5.0


def latency_stats(seconds, rows_per_query):
    """Median / p90 per query (ms) and images per second over the queries after the first.

    The first query is reported on its own (it includes first-call costs); ``rows_per_query``
    are the real images in each query (the last one may be a padded, partial batch).
    """
    steady = np.asarray(seconds[1:], dtype=float)
    rows = np.asarray(rows_per_query[1:], dtype=float)
    return {
        "median_ms": 1e3 * float(np.median(steady)),
        "p90_ms": 1e3 * float(np.percentile(steady, 90)),
        "images_per_s": float(rows.sum() / steady.sum()),
        "first_query_s": float(seconds[0]),
    }


def step_stats(seconds, steps):
    """The private step and the serving path around it, over the queries after the first.

    ``seconds``: the client's latency of each query; ``steps``: the private step's run time
    of each of the same queries, in the same order (one client, one query at a time), or
    empty when they are not known. The serving path is median latency - median step (the
    headline); ``serving_path_paired_ms`` is the median of each query's own difference.
    """
    if len(steps) == 0:
        return {}
    if len(steps) != len(seconds):
        raise ValueError("{} step times for {} queries".format(len(steps), len(seconds)))
    lat = 1e3 * np.asarray(seconds[1:], dtype=float)
    step = 1e3 * np.asarray(steps[1:], dtype=float)
    return {
        "step_median_ms": float(np.median(step)),
        "step_p90_ms": float(np.percentile(step, 90)),
        "serving_path_ms": float(np.median(lat) - np.median(step)),
        "serving_path_paired_ms": float(np.median(lat - step)),
    }


def accuracy_stats(logits, plain):
    """Max abs logit error and argmax agreement of private vs plaintext Keras logits."""
    return {
        "max_abs_logit_error": float(np.abs(logits - plain).max()),
        "argmax_agreement": float((logits.argmax(1) == plain.argmax(1)).mean()),
        "accuracy_images": int(len(logits)),
    }


def _release(r):
    return r.get("release") or ("plaintext" if r["protocol"] == "plaintext" else "this")


def find(results, release, protocol, batch, path):
    for r in results:
        if (_release(r), r["protocol"], r["batch"], r["path"]) == (release, protocol, batch,
                                                                   path):
            return r
    return None


def fmt(v, spec):
    return "-" if v is None else spec.format(v)


def _bytes(n):
    if n is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return "{:.2f} {}".format(n / scale, unit)
    return "{:.0f} B".format(n)


def previous_label(previous):
    previous = previous or {}
    commit = previous.get("commit")
    return "previous release ({})".format(commit[:7] if commit else previous.get("rev", "?"))


# -- targets ---------------------------------------------------------------------------------
def targets(results, links=None, previous=None):
    """The issues' targets: a list of (what, measured, wanted, "PASS" / "MISS" / "n/a",
    previous release's figure); the status is this release's."""
    out = []
    this_rows = [r for r in results if _release(r) == "this"]
    prev_rows = [r for r in results if _release(r) == "previous"]
    not_measured = "not measured" if (previous or {}).get("reason") else "-"

    def add(what, getter, spec, wanted, ok, prev=None):
        """``getter(rows)`` picks the figure from one release's rows; ``prev``, when given,
        is the previous release's cell as text."""
        value = getter(this_rows)
        if prev is None:
            before = getter(prev_rows) if prev_rows else None
            prev = not_measured if before is None else "{} ({})".format(
                spec.format(before), "PASS" if ok(before) else "MISS")
        out.append((what, fmt(value, spec), wanted,
                    "n/a" if value is None else ("PASS" if ok(value) else "MISS"), prev))

    def b1(rows):
        return (find(rows, "this", "aby3", 1, "python") or find(rows, "this", "aby3", 1, "r")
                or find(rows, "previous", "aby3", 1, "python"))

    def b1_value(key):
        def get(rows):
            r = b1(rows)
            return None if r is None else r.get(key)
        return get

    add("Serving path around the private step (ABY3 batch 1, loopback: median latency - "
        "median step)", b1_value("serving_path_ms"), "{:.1f} ms",
        "<= {:g} ms".format(SERVING_PATH_TARGET_MS), lambda v: v <= SERVING_PATH_TARGET_MS)
    netns = (links or {}).get("netns")
    cost = netns["summary"].get("links_cost_latency_median_ms") if netns else None
    add("Authenticated links across network namespaces, per query (ABY3 batch 1: median "
        "latency, 5 namespaces with stunnel - loopback)", lambda rows: cost, "{:+.1f} ms",
        "<= {:g} ms".format(LINKS_TARGET_MS), lambda v: v <= LINKS_TARGET_MS,
        prev="{}-{} ms (Python TLS relays; README figure, not measured here)".format(
            *PREVIOUS_RELAYS_MS))
    add("ABY3 batch-1 median latency", b1_value("median_ms"), "{:.1f} ms", "<= 20 ms",
        lambda v: v <= 20)
    add("ABY3 batch-1 latency / plaintext", b1_value("ratio"), "{:.1f}x", "<= 15x",
        lambda v: v <= 15)

    def best(rows):
        return max(rows, key=lambda r: r["images_per_s"]) if rows else None

    this_best = best([r for r in results if _release(r) == "this" and r["protocol"] == "aby3"])
    add("ABY3 throughput (best batch{})".format(
        " {}".format(this_best["batch"]) if this_best else ""),
        lambda rows: best(rows) and best(rows)["images_per_s"], "{:.0f} images/s",
        ">= 150 images/s", lambda v: v >= 150)
    add("ABY3 batch-1 first query", b1_value("first_query_s"), "{:.1f} s", "<= 5 s",
        lambda v: v <= 5)
    # Issue 13: the private step near the floor.
    add("ABY3 batch-1 median latency (issue 13)", b1_value("median_ms"), "{:.1f} ms",
        "<= 30 ms", lambda v: v <= 30)

    def b32(rows):
        r = next((x for x in rows if x["protocol"] == "aby3" and x["batch"] == 32
                  and x["path"] == "python"), None)
        return None if r is None else r["images_per_s"]

    add("ABY3 batch-32 throughput (issue 13)", b32, "{:.0f} images/s", ">= 150 images/s",
        lambda v: v >= 150)
    add("ABY3 batch-1 private step: TensorFlow ops, the mesh's sends and receives included "
        "(issue 13)", b1_value("step_ops"), "{:.0f}", "<= 1000", lambda v: v <= 1000)
    py = find(results, "this", "aby3", 1, "python")
    r = find(results, "this", "aby3", 1, "r")
    add("R overhead over Python (ABY3 batch 1, R median - Python median)",
        lambda rows: (r["median_ms"] - py["median_ms"]) if py and r else None, "{:+.1f} ms",
        "<= 2 ms", lambda v: v <= 2, prev="-")
    add("R overhead, timed in R and in the core per query (ABY3 batch 1, median)",
        lambda rows: r and r.get("r_layer_overhead_ms"), "{:+.2f} ms", "<= 2 ms",
        lambda v: v <= 2, prev="-")

    def acc_row(rows):
        rows = [x for x in rows if x["protocol"] == "aby3"]
        return max(rows, key=lambda x: (x["accuracy_images"], x["batch"])) if rows else None

    acc = acc_row([x for x in results if _release(x) == "this"])
    add("ABY3 argmax agreement (batch {}, {} images)".format(
        acc["batch"], acc["accuracy_images"]) if acc else "ABY3 argmax agreement",
        lambda rows: acc_row(rows) and 100 * acc_row(rows)["argmax_agreement"], "{:.1f} %",
        "100 % on 1000 images", lambda v: v == 100)
    if acc and acc["accuracy_images"] < 1000:
        out[-1] = out[-1][:3] + ("n/a (< 1000 images)",) + out[-1][4:]
    return out


def targets_table(results, links=None, previous=None):
    lines = ["| target | this release | wanted | | {} |".format(previous_label(previous)),
             "|---|---|---|---|---|"]
    lines += ["| {} | {} | {} | {} | {} |".format(*t) for t in targets(results, links,
                                                                        previous)]
    return "\n".join(lines)


# -- tables ----------------------------------------------------------------------------------
SIDE_BY_SIDE = [
    ("median latency", "median_ms", "{:.1f} ms"),
    ("p90 latency", "p90_ms", "{:.1f} ms"),
    ("images/s", "images_per_s", "{:.0f}"),
    ("first query", "first_query_s", "{:.1f} s"),
    ("private step, median", "step_median_ms", "{:.1f} ms"),
    ("private step: TensorFlow ops (all parties)", "step_ops", "{:.0f}"),
    ("  of which the mesh's sends and receives", "step_mesh_ops", "{:.0f}"),
    ("private step: communication rounds", "step_rounds", "{:.0f}"),
    ("private step: messages between parties (Send/Recv pairs)", "step_messages", "{:.0f}"),
    ("serving path around the step (latency - step)", "serving_path_ms", "{:.1f} ms"),
    ("bytes between workers / query", "bytes_between_workers_per_query", None),
    ("bytes owner/client <-> workers / query", "bytes_workers_parties_per_query", None),
    ("max abs logit error", "max_abs_logit_error", "{:.4f}"),
    ("argmax agreement", "argmax_agreement", None),
]


def side_by_side(results, previous=None):
    """Plaintext Keras | previous release | this release, per batch size (ABY3, Python
    client), as Markdown."""
    lines = ["| batch | | plaintext Keras | {} | this release |".format(
        previous_label(previous)), "|---|---|---|---|---|"]
    batches = sorted({r["batch"] for r in results if _release(r) != "plaintext"})
    for batch in batches:
        cells = [find(results, "plaintext", "plaintext", batch, "keras"),
                 find(results, "previous", "aby3", batch, "python"),
                 find(results, "this", "aby3", batch, "python")]
        for what, key, spec in SIDE_BY_SIDE:
            row = []
            for r in cells:
                v = None if r is None else r.get(key)
                if v is None:
                    row.append("-")
                elif key == "argmax_agreement":
                    row.append("{:.1f} % ({})".format(100 * v, r["accuracy_images"]))
                elif spec is None:
                    row.append(_bytes(v))
                else:
                    row.append(spec.format(v))
            lines.append("| {} | {} | {} |".format(batch, what, " | ".join(row)))
    return "\n".join(lines)


def table(results):
    """Every configuration, as Markdown."""
    head = ("| release | protocol | batch | client | median ms | p90 ms | images/s | "
            "first query s | step ms | serving path ms | between workers / query | "
            "owner/client <-> workers / query | max abs logit error | argmax agreement | "
            "plaintext ms | × plaintext |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for r in results:
        private = r["protocol"] != "plaintext"
        lines.append("| " + " | ".join([
            RELEASE_NAMES.get(_release(r), _release(r)) + (
                " ({})".format(r["commit"][:7]) if r.get("commit") else ""),
            PROTOCOL_NAMES.get(r["protocol"], r["protocol"]), str(r["batch"]),
            PATH_NAMES.get(r["path"], r["path"]), fmt(r["median_ms"], "{:.1f}"),
            fmt(r["p90_ms"], "{:.1f}"), fmt(r["images_per_s"], "{:.0f}"),
            fmt(r.get("first_query_s"), "{:.1f}"), fmt(r.get("step_median_ms"), "{:.1f}"),
            fmt(r.get("serving_path_ms"), "{:.1f}"),
            _bytes(r.get("bytes_between_workers_per_query")),
            _bytes(r.get("bytes_workers_parties_per_query")),
            fmt(r.get("max_abs_logit_error"), "{:.4f}"),
            "{:.1f} % ({})".format(100 * r["argmax_agreement"], r["accuracy_images"])
            if private else "-",
            fmt(r.get("plaintext_ms"), "{:.2f}"), fmt(r.get("ratio"), "{:.0f}×")]) + " |")
    return "\n".join(lines)


def links_table(links):
    """The links section: bench/netns.py's per-query figures and bench/links.py's ping-pong,
    as Markdown (or what was not measured, and why)."""
    links = links or {}
    parts = []
    netns = links.get("netns")
    if netns:
        s = netns["summary"]
        lines = ["| setup | queries | latency median | latency p90 | private step median | "
                 "serving path around the step |", "|---|---|---|---|---|---|"]
        for row in netns["setups"]:
            lines.append("| {} | {} | {} | {} | {} | {} |".format(
                row["setup"], row.get("queries", "-"),
                fmt(row.get("latency_median_ms"), "{:.1f} ms"),
                fmt(row.get("latency_p90_ms"), "{:.1f} ms"),
                fmt(row.get("step_median_ms"), "{:.1f} ms"),
                fmt(row.get("around_step_median_ms"), "{:.1f} ms")))
        lines.append("")
        lines.append(
            "Cost of authenticated links per query (netns-stunnel - loopback, batch 1): "
            "**{:+.1f} ms** latency median ({:+.1f} ms in the private step, {:+.1f} ms around "
            "it); target <= {:g} ms. Previous release: {}-{} ms per query through its Python "
            "TLS relays (the README's figure, a constant: not measured in this run; "
            "bench/links.py below measures those relays' round trip in this run).".format(
                s.get("links_cost_latency_median_ms", float("nan")),
                s.get("links_cost_in_step_ms", float("nan")),
                s.get("links_cost_around_step_ms", float("nan")), LINKS_TARGET_MS,
                *PREVIOUS_RELAYS_MS))
        parts.append("\n".join(lines))
    lk = links.get("links")
    if lk and lk.get("variants"):
        names = {"direct": "plain TCP (no TLS, the floor)",
                 "stunnel": "this release: stunnel links (TLS 1.3)",
                 "python-relay": "previous release: Python TLS relays"}
        direct = next((v["median_us"] for v in lk["variants"] if v["variant"] == "direct"),
                      None)
        lines = ["| link between two worker namespaces | round trip median | p90 | over plain "
                 "TCP |", "|---|---|---|---|"]
        for v in lk["variants"]:
            lines.append("| {} | {:.0f} µs | {:.0f} µs | {} |".format(
                names.get(v["variant"], v["variant"]), v["median_us"], v["p90_us"],
                "-" if direct is None or v["variant"] == "direct" else
                "{:+.0f} µs".format(v["median_us"] - direct)))
        first = lk["variants"][0]
        lines.append("")
        lines.append("64-byte ping-pong on one TCP connection between worker0's and worker1's "
                     "namespaces (bench/links.py: {} round trips x {} connection(s) per link, "
                     "median run).".format(first.get("round_trips", "?"),
                                           first.get("runs", "?")))
        parts.append("\n".join(lines))
    notes = links.get("notes") or []
    if notes:
        parts.append("\n".join("- " + n for n in notes))
    return "\n\n".join(parts) if parts else "- links across hosts: not measured"


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


def plot(results, png_path, previous=None):
    """Median latency per query vs batch size, this release, the previous one and plaintext
    Keras, log y; writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    colors = {"this": "C0", "previous": "C1", "plaintext": "C2"}
    order = list(colors)
    series = sorted({(_release(r), r["protocol"], r["path"]) for r in results},
                    key=lambda k: (order.index(k[0]) if k[0] in order else 9, k[1], k[2]))
    for release, protocol, path in series:
        rows = sorted((r for r in results
                       if (_release(r), r["protocol"], r["path"]) == (release, protocol, path)),
                      key=lambda r: r["batch"])
        if release == "plaintext":
            label = "plaintext Keras"
        else:
            label = "{} {} ({} client)".format(
                previous_label(previous) if release == "previous" else "this release",
                PROTOCOL_NAMES.get(protocol, protocol), PATH_NAMES.get(path, path))
        r_client = path == "r"
        ax.plot([r["batch"] for r in rows], [r["median_ms"] for r in rows],
                marker="s" if r_client else "o", fillstyle="none" if r_client else "full",
                color=colors.get(release), linestyle="--" if r_client else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({r["batch"] for r in results})
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size (images per query)")
    ax.set_ylabel("median latency per query (ms, log scale)")
    ax.set_title("Private (3 workers, loopback) vs plaintext Keras")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


BASELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baseline.json")


def baseline_table(results, path=BASELINE):
    """The figures kept in the repo (bench/baseline.json: the previous release and this
    release before issue 13) next to this run's, as Markdown; None without the file."""
    import json

    try:
        with open(path) as f:
            kept = json.load(f)["releases"]
    except (OSError, ValueError, KeyError):
        return None
    b1 = find(results, "this", "aby3", 1, "python") or {}
    b32 = find(results, "this", "aby3", 32, "python") or {}
    now = {"step_ops": b1.get("step_ops"), "step_rounds": b1.get("step_rounds"),
           "step_messages": b1.get("step_messages"), "median_ms_batch1": b1.get("median_ms"),
           "step_ms_batch1": b1.get("step_median_ms"),
           "images_per_s_batch32": b32.get("images_per_s"),
           "bytes_between_workers_per_image": b1.get("bytes_between_workers_per_query")}
    rows = [("private step: TensorFlow ops (batch 1)", "step_ops", "{:.0f}"),
            ("private step: communication rounds", "step_rounds", "{:.0f}"),
            ("private step: messages between parties", "step_messages", "{:.0f}"),
            ("batch-1 median latency", "median_ms_batch1", "{:.1f} ms"),
            ("batch-1 private step (median)", "step_ms_batch1", "{:.1f} ms"),
            ("batch-32 images/s", "images_per_s_batch32", "{:.0f}"),
            ("bytes between workers per image (batch 1)", "bytes_between_workers_per_image",
             None)]
    head = " | ".join("{} ({})".format(k["name"], k["commit"]) for k in kept)
    lines = ["| | {} | this run |".format(head), "|---|" + "---|" * (len(kept) + 1)]
    for what, key, spec in rows:
        cells = [k.get(key) for k in kept] + [now[key]]
        lines.append("| {} | {} |".format(what, " | ".join(
            "-" if v is None else (_bytes(v) if spec is None else spec.format(v))
            for v in cells)))
    return "\n".join(lines)


def write_report(results, out_dir, machine, extra=None):
    """Write ``report.md`` and ``latency.png`` into ``out_dir``; returns the report's text.

    ``extra``: date, duration, command, previous (rev, commit, reason), links (from run.py),
    notes (strings)."""
    extra = extra or {}
    previous, links = extra.get("previous") or {}, extra.get("links") or {}
    plot(results, os.path.join(out_dir, "latency.png"), previous)
    mach = ["| | |", "|---|---|"] + ["| {} | {} |".format(k, v) for k, v in machine.items()]
    prev_line = previous.get("reason") or (
        "The previous release is git commit {} (the last before issue 9), measured in the same "
        "run from a temporary git worktree: same model file, images and batch sizes, ABY3, "
        "Python client.".format(previous["commit"]) if previous.get("commit") else None)
    notes = [n for n in (extra.get("notes") or [])]
    stages = extra.get("stages") or {}
    if stages:
        mach += ["| time per stage | {} |".format(", ".join(
            "{} {:.0f} s".format(k, v) for k, v in stages.items()))]
    text = "\n\n".join(x for x in [
        "# privatekeras benchmark",
        "Run {} ({}), command: `{}`.".format(
            extra.get("date", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")),
            extra.get("duration", "?"), extra.get("command", "bench/run.py")),
        "## Machine\n\n" + "\n".join(mach),
        "## Side by side (ABY3, Python client)\n\n" + (prev_line + "\n\n" if prev_line else "")
        + side_by_side(results, previous),
        "## Targets (issues 4, 9 and 13)\n\n" + targets_table(results, links, previous),
        ("## Kept figures (bench/baseline.json) and this run\n\n" + baseline_table(results))
        if baseline_table(results) else None,
        "## Links across hosts\n\n" + links_table(links),
        ("## CKKS: encrypted predictions on one server (issue 12)\n\n" + extra["ckks_md"])
        if extra.get("ckks_md") else None,
        "## Every configuration\n\n" + table(results),
        "![latency per query vs batch](latency.png)",
        "## Notes\n\n" + "\n".join("- " + n for n in notes) if notes else None,
        "## How it was measured\n\n" + METHOD,
    ] if x) + "\n"
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text


METHOD = """\
- Each row is a fresh set of processes on loopback: three workers (`python -m privatekeras
  worker`, spawned by `Cluster.start()` in the model owner's process `bench/owner.py`, which
  then calls `share()` and `serve()`), and one client (`bench/client.py`, or `bench/client.R`
  through the R package). Only the workers compute; owner and client call the workers' API
  (gRPC, mutual TLS). The model is the tutorial CNN trained for one epoch on Fashion-MNIST;
  queries are the first Fashion-MNIST test images.
- Latency is the wall time of one `query()` call in the client (Python `time.perf_counter`,
  R `Sys.time`): median and 90th percentile over all queries but the first. Images/s are the
  images of those queries divided by their total time (one query at a time).
- Private step: worker 0 times its part of each private step (the call of its part of the
  traced ABY3 step, from its input shares to its answer shares; it waits for the other two
  parts' messages, so this is the step as worker 0 sees it, after its "go" notes to workers 1
  and 2) and sends it to the owner with each answer (`SharedModel.step_seconds`). The serving path
  around the step is median latency - median step time over the same queries: the client's
  sharing and reconstruction, its API calls to the three workers, the workers agreeing that a
  query's shares are all there, and handing out the answer shares.
- Previous release: the last commit before issue 9, checked out into a temporary git
  worktree (removed at the end); its kernels are built into the same venv (their directory
  is keyed by a digest of their sources). Its own `bench/owner.py` and `bench/client.py` run
  on its own `privatekeras` (PYTHONPATH), with the same model file, images and batch sizes,
  ABY3, Python client, alternating with this release's runs. Its step time is measured by
  `bench/prev_owner.py`, which wraps the old `SharedModel._run` (the step function's call in
  the owner's process, which drove the workers then) with a timer; nothing else changes.
- First query: the client is connected before the owner calls `serve()`; it sends its first
  query as soon as `serve()` is called, and this is the time until its answer. `share()`
  traces the private step and runs it once on zeros (its time is in `results.jsonl` as the
  owner's share seconds), so this includes the client's own first-call costs and serve()'s
  start, not tracing.
- Bytes between workers per query: read from the operating system, not from the code.
  `ss -tinpeHO state established` (iproute2) lists every TCP socket with its owning process,
  its inode and the kernel's `bytes_acked` counter; the owners of our own processes' sockets
  are also read from their `/proc/PID/fd`. Snapshots are taken after the first query and
  after the last (the owner stops the workers only after that); for each socket owned by a
  worker process whose peer socket is owned by another worker process, on a compute or mesh
  port (named in the workers' command lines; this release's step runs over the mesh, the
  previous release's over the TensorFlow servers' compute ports), the counter's increase is summed (each direction counted
  once, at its sender) and divided by the number of queries in between. The workers' own
  API calls to each other (`bytes_workers_control_per_query`) and the traffic between the
  workers and the owner or client (this release: API calls with TLS; the previous release:
  TensorFlow traffic, as owner and client joined the cluster) are counted apart. Every
  socket's share is in `logs/*-traffic.json`.
- Links across hosts (root with `ip netns` and stunnel4 only): `bench/netns.py` serves the
  tutorial CNN at batch 1 with everything on loopback, then with three worker hosts, the
  owner's and the client's hosts in five network namespaces on a bridge (the workers'
  TensorFlow traffic through stunnel TLS 1.3 links, the API calls with gRPC's mutual TLS
  across the bridge); the difference of the median latencies is what the links cost per
  query. `bench/links.py` times a 64-byte ping-pong between two worker namespaces through
  stunnel and through the previous release's Python TLS relays. The previous release's
  55-100 ms per query is the README's figure, not measured in this run.
- R overhead: the issue's figure is the R client's median minus the Python client's (two
  runs, minutes apart: on shared cores, load drift can dominate it). The R client at batch 1
  also sends 20 extra queries, each timed in R around `query(client, x)` and in Python
  around the core's `client.query()` that it calls; the median difference is the R layer's
  own cost (argument checks, R <-> NumPy conversions), free of network and load noise.
- Ops, rounds and messages per step: counted on the traced step's TensorFlow graph (the
  whole step as each worker traces it, worker 0's reported: the three parts together; the previous release's owner's, where the owner process drove the step
  and counts as a fourth party) by `privatekeras/mpc/graphstats.py`: ops are the graph's
  operations over all parties; a message is a tensor (or control edge) that crosses from one
  party's device to another's (one Send/Recv pair at run time, counted once per producing
  tensor and receiving party), or one PkMeshSend/PkMeshRecv pair of the mesh (this release:
  the pairs are ops of the graph, counted in the ops and shown apart, and the issue's ops
  target counts them; TensorFlow's own Send/Recv pairs are inserted at run time and never
  were in the count); rounds are the longest chain of dependent crossings in the dependency
  graph. `bench/graph.py MODEL` gives the same counts in one process, no cluster.
- Accuracy: the private logits of every image queried are compared with plaintext Keras
  (`model.predict`) on the same images: max abs logit error and argmax agreement.
- Plaintext: measured in the same run, in its own process before any cluster starts: median
  of 50 calls of `model.predict_on_batch(x)` at the same batch size (the baseline of the
  ratio; `model(x)` eager calls are in `results.jsonl` as `plaintext_call_ms`).
"""
