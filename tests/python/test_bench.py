"""The benchmark harness's cheap parts: its command line, the socket-traffic arithmetic and
the report writer on synthetic results. The benchmark itself is run by `make bench`."""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "bench")
sys.path.insert(0, BENCH)

import report  # noqa: E402
import sockets  # noqa: E402


def test_help_lists_the_options():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "run.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for option in ("--quick", "--protocols", "--batches", "--paths", "--queries",
                   "--accuracy-images"):
        assert option in out.stdout


def test_traffic_counts_worker_to_worker_bytes_once_per_sender():
    w0, w1, owner = ("127.0.0.1", 4000), ("127.0.0.1", 4001), ("127.0.0.1", 50000)
    eph = ("127.0.0.1", 40000)  # worker 1's end of its connection to worker 0
    before = {(w0, eph): ({10}, 100), (eph, w0): ({11}, 50), (owner, w1): ({99}, 7)}
    after = {(w0, eph): ({10}, 400), (eph, w0): ({11}, 250), (owner, w1): ({99}, 17),
             (w1, owner): ({11}, 5), (("127.0.0.1", 40001), w1): ({10}, 30)}
    between, others = sockets.traffic(before, after, workers={10, 11, 12})
    assert between == 300 + 200 + 30  # the last socket is new: counted from zero
    assert others == 10 + 5


def synthetic_results():
    rows = []
    for protocol, scale in (("aby3", 1.0), ("securenn", 2.5)):
        for batch in (1, 8, 32):
            for path, extra in (("python", 0.0), ("r", 1.5)):
                rows.append({
                    "protocol": protocol, "batch": batch, "path": path, "queries": 10,
                    "median_ms": scale * (100 + 25 * batch) + extra, "p90_ms": 300.0,
                    "images_per_s": 1000.0 * batch / (scale * (100 + 25 * batch)),
                    "first_query_s": 4.0, "max_abs_logit_error": 0.006,
                    "argmax_agreement": 1.0, "accuracy_images": 1000 if batch == 32 else 10,
                    "bytes_between_workers_per_query": 3e6 * batch,
                    "plaintext_ms": 1.0, "ratio": scale * (100 + 25 * batch)})
    rows += [{"protocol": "plaintext", "batch": b, "path": "keras", "queries": 50,
              "median_ms": 1.0 + b / 16, "p90_ms": 1.2, "images_per_s": 900.0 * b}
             for b in (1, 8, 32)]
    return rows


def test_targets_on_synthetic_results():
    got = {t[0]: t for t in report.targets(synthetic_results())}
    assert got["ABY3 batch-1 median latency"][1:] == ("125.0 ms", "<= 20 ms", "MISS")
    assert got["R overhead over Python (ABY3 batch 1, R median - Python median)"][3] == "PASS"
    assert got["R overhead, timed in R and in the core per query (ABY3 batch 1, median)"][3] == "n/a"
    assert got["ABY3 batch-1 first query"][3] == "PASS"
    assert got["ABY3 argmax agreement (batch 32, 1000 images)"][3] == "PASS"


def test_report_and_plot_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    text = report.write_report(synthetic_results(), str(tmp_path), {"cpu": "test", "cores": "2"})
    assert (tmp_path / "latency.png").stat().st_size > 1000
    assert (tmp_path / "report.md").read_text() == text
    assert "| SecureNN | 32 | R |" in text and "| plaintext Keras | 8 | - |" in text
    assert "ss -tinpHO" in text
