"""The benchmark harness's cheap parts: its command line and run plan, worker recognition,
the socket-traffic arithmetic, the step / serving-path statistics and the report writer on
synthetic results. The benchmark itself is run by `make bench`."""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "bench")
sys.path.insert(0, BENCH)

import report  # noqa: E402
import sockets  # noqa: E402


def _run_module():
    import importlib

    return importlib.import_module("run")


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--quick", "--protocols", "--batches", "--paths", "--queries",
                   "--accuracy-images", "--previous", "--no-previous", "--links"):
        assert option in out.stdout


def test_securenn_is_withdrawn_and_the_plan_alternates_releases():
    run = _run_module()
    a = run.parse_args(["--protocols", "aby3,securenn", "--batches", "8,1",
                        "--queries", "5", "--accuracy-images", "20"])
    assert a.protocols == ["aby3"] and a.withdrawn == ["securenn"]
    plan = run.configurations(a)
    assert [c[:4] for c in plan] == [
        ("this", "aby3", 1, "python"), ("previous", "aby3", 1, "python"),
        ("this", "aby3", 1, "r"),
        ("this", "aby3", 8, "python"), ("previous", "aby3", 8, "python"),
        ("this", "aby3", 8, "r")]
    counts = {(c[0], c[2], c[3]): c[4] for c in plan}
    # the previous release queries exactly the images this release's Python client does
    assert counts[("previous", 8, "python")] == counts[("this", 8, "python")] == 40
    assert counts[("this", 8, "r")] == 40 and counts[("this", 1, "python")] == 5
    assert all(c[0] == "this" for c in run.configurations(a, previous=False))
    with pytest.raises(SystemExit):
        run.parse_args(["--protocols", "securenn"])


def test_worker_processes_and_compute_ports_from_the_command_line():
    new = [b"/venv/bin/python", b"-m", b"privatekeras", b"worker", b"--hosts",
           b"localhost:1,localhost:2,localhost:3", b"--index", b"0", b"--compute",
           b"127.0.0.1:4100,127.0.0.1:4101,127.0.0.1:4102", b""]
    old = ["/venv/bin/python", "-m", "privatekeras.worker", "--hosts", "a:1,a:2,a:3"]
    assert sockets.is_worker_cmdline(new) and sockets.is_worker_cmdline(old)
    assert not sockets.is_worker_cmdline(["python", "bench/owner.py", "privatekeras"])
    assert not sockets.is_worker_cmdline(["python", "-m", "privatekeras", "pki"])
    assert sockets.compute_ports(new) == {4100, 4101, 4102}
    assert sockets.compute_ports(["x", "--compute=127.0.0.1:7,[::1]:8"]) == {7, 8}
    assert sockets.compute_ports(["--compute", "127.0.0.1:7", "--mesh=127.0.0.1:9",
                                  "--index", "1"]) == {7, 9}
    assert sockets.compute_ports(old) == set()
    assert sockets.cmdline(os.getpid())[0]  # this process
    assert sockets.cmdline(2 ** 22 + 12345) is None


def test_traffic_counts_worker_to_worker_bytes_once_per_sender():
    w0, w1, owner = ("127.0.0.1", 4000), ("127.0.0.1", 4001), ("127.0.0.1", 50000)
    eph = ("127.0.0.1", 40000)  # worker 1's end of its connection to worker 0
    before = {(w0, eph): ({10}, 100), (eph, w0): ({11}, 50), (owner, w1): ({99}, 7)}
    after = {(w0, eph): ({10}, 400), (eph, w0): ({11}, 250), (owner, w1): ({99}, 17),
             (w1, owner): ({11}, 5), (("127.0.0.1", 40001), w1): ({10}, 30)}
    got = sockets.traffic(before, after, workers={10, 11, 12})
    assert got["between_workers"] == 300 + 200 + 30  # the last socket is new: from zero
    assert got["with_others"] == 10 + 5
    assert got["workers_control"] == 0


def test_traffic_splits_compute_ports_from_the_workers_api_calls():
    c0, c1 = ("127.0.0.1", 4100), ("127.0.0.1", 4101)  # compute ports
    api0 = ("127.0.0.1", 30000)  # worker 0's API port
    e1, e2, e3, e4 = (("127.0.0.1", p) for p in (50001, 50002, 50003, 50004))
    after = {
        (e1, c1): ({10}, 1000), (c1, e1): ({11}, 900),  # worker 0 -> worker 1's TF server
        (e2, api0): ({11}, 70), (api0, e2): ({10}, 30),  # worker 1's "arrived" note
        (e3, c0): ({10}, 500), (c0, e3): ({10}, 400),  # worker 0 to its own TF server
        (e4, api0): ({77}, 60), (api0, e4): ({10}, 40),  # a client's Submit / Fetch
    }
    got = sockets.traffic({}, after, workers={10, 11, 12}, compute={4100, 4101, 4102})
    assert got == {"between_workers": 1900, "workers_control": 100, "with_others": 100,
                   "within_worker": 900}


def test_step_stats_serving_path():
    seconds = [5.0, 0.050, 0.060, 0.052]  # the first query is left out
    steps = [4.0, 0.040, 0.051, 0.041]
    got = report.step_stats(seconds, steps)
    assert got["step_median_ms"] == pytest.approx(41.0)
    assert got["serving_path_ms"] == pytest.approx(52.0 - 41.0)
    assert got["serving_path_paired_ms"] == pytest.approx(10.0)
    assert report.step_stats(seconds, []) == {}
    with pytest.raises(ValueError):
        report.step_stats(seconds, steps[:2])


def synthetic_results():
    rows = []
    for release, scale in (("this", 1.0), ("previous", 1.6)):
        for batch in (1, 8, 32):
            for path, extra in (("python", 0.0), ("r", 1.5)):
                if release == "previous" and path == "r":
                    continue
                median = scale * (40 + 25 * batch) + extra
                rows.append({
                    "release": release, "protocol": "aby3", "batch": batch, "path": path,
                    "queries": 10, "median_ms": median, "p90_ms": median * 1.1,
                    "images_per_s": 1000.0 * batch / median,
                    "first_query_s": 4.0 if release == "this" else 6.0,
                    "step_median_ms": median - (1.5 if release == "this" else 10.0),
                    "serving_path_ms": 1.5 if release == "this" else 10.0,
                    "max_abs_logit_error": 0.006, "argmax_agreement": 1.0,
                    "accuracy_images": 1000 if batch == 32 and path == "python" else 10,
                    "bytes_between_workers_per_query": 3e6 * batch,
                    "bytes_workers_parties_per_query": 2e4 * batch,
                    "plaintext_ms": 1.0, "ratio": median})
                if release == "previous":
                    rows[-1]["commit"] = "1e7b994b71c77e1b5218e3ff6852ae7f5afb310f"
    rows += [{"release": "plaintext", "protocol": "plaintext", "batch": b, "path": "keras",
              "queries": 50, "median_ms": 1.0 + b / 16, "p90_ms": 1.2,
              "images_per_s": 900.0 * b} for b in (1, 8, 32)]
    return rows


PREVIOUS = {"rev": "1e7b994", "commit": "1e7b994b71c77e1b5218e3ff6852ae7f5afb310f",
            "reason": None}
LINKS = {
    "netns": {"setups": [
        {"setup": "loopback", "queries": 80, "latency_median_ms": 60.0, "latency_p90_ms": 70.0,
         "step_median_ms": 58.0, "around_step_median_ms": 2.0},
        {"setup": "netns-stunnel", "queries": 80, "latency_median_ms": 64.0,
         "latency_p90_ms": 75.0, "step_median_ms": 61.0, "around_step_median_ms": 3.0}],
        "summary": {"links_cost_latency_median_ms": 4.0, "links_cost_in_step_ms": 3.0,
                    "links_cost_around_step_ms": 1.0}},
    "links": {"variants": [
        {"variant": "direct", "median_us": 10.0, "p90_us": 14.0, "round_trips": 1000,
         "runs": 3},
        {"variant": "stunnel", "median_us": 51.0, "p90_us": 61.0, "round_trips": 1000,
         "runs": 3},
        {"variant": "python-relay", "median_us": 111.0, "p90_us": 159.0,
         "round_trips": 1000, "runs": 3}]},
    "notes": []}


def test_targets_on_synthetic_results():
    got = {t[0]: t for t in report.targets(synthetic_results(), LINKS, PREVIOUS)}
    serving = next(v for k, v in got.items() if k.startswith("Serving path around"))
    assert serving[1:] == ("1.5 ms", "<= 2 ms", "PASS", "10.0 ms (MISS)")
    links = next(v for k, v in got.items() if k.startswith("Authenticated links"))
    assert links[1:4] == ("+4.0 ms", "<= 5 ms", "PASS") and "55-100 ms" in links[4]
    assert got["ABY3 batch-1 median latency"][1:4] == ("65.0 ms", "<= 20 ms", "MISS")
    assert got["ABY3 batch-1 median latency"][4] == "104.0 ms (MISS)"
    assert got["R overhead over Python (ABY3 batch 1, R median - Python median)"][3] == "PASS"
    assert got["R overhead, timed in R and in the core per query (ABY3 batch 1, median)"][3] \
        == "n/a"
    assert got["ABY3 batch-1 first query"][3:] == ("PASS", "6.0 s (MISS)")
    assert got["ABY3 argmax agreement (batch 32, 1000 images)"][3] == "PASS"


def test_targets_without_previous_release_or_links():
    this = [r for r in synthetic_results() if r["release"] != "previous"]
    missing = {"rev": "1e7b994", "commit": None,
               "reason": "previous release not available (no git history): ..."}
    got = {t[0]: t for t in report.targets(this, {"netns": None}, missing)}
    links = next(v for k, v in got.items() if k.startswith("Authenticated links"))
    assert links[1:4] == ("-", "<= 5 ms", "n/a")
    assert got["ABY3 batch-1 median latency"][4] == "not measured"


# matplotlib 3.9 calls pyparsing names that pyparsing 3.3 deprecates: not ours to fix.
QUIET_PLOT = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@QUIET_PLOT
def test_report_and_plot_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    text = report.write_report(synthetic_results(), str(tmp_path), {"cpu": "test", "cores": "2"},
                               {"previous": PREVIOUS, "links": LINKS,
                                "notes": ["SecureNN: withdrawn"]})
    assert (tmp_path / "latency.png").stat().st_size > 1000
    assert (tmp_path / "report.md").read_text() == text
    assert "| plaintext Keras | previous release (1e7b994) | this release |" in text
    assert "| 1 | serving path around the step (latency - step) | - | 10.0 ms | 1.5 ms |" in text
    assert "| previous release (1e7b994) | ABY3 | 32 | Python |" in text
    assert "| this release | ABY3 | 8 | R |" in text
    assert "| plaintext Keras | plaintext Keras | 8 | - |" in text
    assert "previous release: Python TLS relays | 111 µs" in text
    assert "**+4.0 ms**" in text and "SecureNN: withdrawn" in text
    assert "ss -tinpeHO" in text


@QUIET_PLOT
def test_report_without_previous_release(tmp_path):
    pytest.importorskip("matplotlib")
    this = [r for r in synthetic_results() if r["release"] != "previous"]
    reason = "previous release not available (no git history): git is not installed"
    text = report.write_report(this, str(tmp_path), {"cpu": "test"}, {
        "previous": {"rev": "1e7b994", "commit": None, "reason": reason},
        "links": {"netns": None, "links": None,
                  "notes": ["links across hosts not measured: not root"]}})
    assert reason in text and "not root" in text
    assert "| 1 | median latency | 1.1 ms | - | 65.0 ms |" in text


def test_previous_release_missing_is_reported_not_fatal(monkeypatch):
    run = _run_module()
    prev = run.Previous("0" * 40)
    assert prev.setup() is False
    assert prev.reason.startswith("previous release not available (no git history)")
    prev.close()
    monkeypatch.setattr(run.shutil, "which", lambda name: None)
    prev = run.Previous("1e7b994")
    assert prev.setup() is False and "git is not installed" in prev.reason
    prev.close()
