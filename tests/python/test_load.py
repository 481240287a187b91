"""Load with real processes: many sequential queries and 8 concurrent clients against one
served model, each query a distinct image. Nothing may be lost, duplicated or mixed up:
every client's answers must be the plaintext Keras logits of its own images, in order.

CI runs a smaller load; `make stress` (PRIVATEKERAS_STRESS=1) runs 1000 sequential queries
and 8 clients x 50 queries.
"""

import os

import numpy as np
import pytest

from conftest import LOGIT_ATOL, TALLY, free_hosts
from procs import Proc

STRESS = os.environ.get("PRIVATEKERAS_STRESS") == "1"
MAX_GROUP = int(os.environ.get("PRIVATEKERAS_LOAD_MAX_GROUP", "4"))  # 1: no grouping
SEQUENTIAL = 1000 if STRESS else 120
CLIENTS = 8
PER_CLIENT = 50 if STRESS else 10


@pytest.fixture(scope="module")
def distinct_images(models, fashion, tmp_path_factory):
    """Enough distinct test images for every query, with their plaintext Keras logits."""
    import keras

    n = SEQUENTIAL + CLIENTS * PER_CLIENT
    (_, _), (x_test, _) = fashion
    images = x_test[:n]
    assert len({img.tobytes() for img in images}) == n, "test images must be distinct"
    d = tmp_path_factory.mktemp("load")
    np.save(d / "images.npy", images)
    model = keras.models.load_model(models / "tutorial.keras")
    return (d / "images.npy", model.predict(images, batch_size=100, verbose=0),
            models / "tutorial.keras")


def _tally(results, plain):
    """Count answered and correct queries; returns the rows that were wrong."""
    wrong = []
    for res in results:
        got, idx = res["logits"], res["idx"]
        answered = ~np.isnan(got).any(axis=1)
        ok = answered & (np.abs(got - plain[idx]).max(axis=1) <= LOGIT_ATOL) & (
            got.argmax(axis=1) == plain[idx].argmax(axis=1))
        TALLY["queries sent"] += len(idx)
        TALLY["queries answered"] += int(answered.sum())
        TALLY["queries correct"] += int(ok.sum())
        wrong += [int(i) for i in idx[~ok]]
    return wrong


def test_sequential_then_concurrent_clients_get_exactly_their_own_answers(
        distinct_images, tmp_path):
    images, plain, model = distinct_images
    h = ",".join(free_hosts())
    total = SEQUENTIAL + CLIENTS * PER_CLIENT
    # Up to 4 waiting queries are evaluated together in one private step: the sequential
    # client is answered one query at a time, the concurrent ones mostly in (padded) groups.
    owner = Proc("owner_serve.py", ["--hosts", h, "--model", model, "--num-requests", total,
                                    "--max-group", MAX_GROUP])
    clients = []
    try:
        owner.wait_for("SERVING", 300)
        seq = Proc("load_client.py", ["--hosts", h, "--images", images, "--start", 0,
                                      "--count", SEQUENTIAL, "--out", tmp_path / "seq.npz"])
        assert seq.wait(60 + 2 * SEQUENTIAL) == 0, seq.output[-3000:]
        clients = [Proc("load_client.py", [
            "--hosts", h, "--images", images, "--start", SEQUENTIAL + k * PER_CLIENT,
            "--count", PER_CLIENT, "--out", tmp_path / "c{}.npz".format(k)])
            for k in range(CLIENTS)]
        for c in clients:
            assert c.wait(120 + 3 * CLIENTS * PER_CLIENT) == 0, c.output[-3000:]
        assert owner.wait(120) == 0, owner.output[-3000:]
        # The owner answered exactly as many queries as were sent: none lost, none twice.
        assert "SERVED {}".format(total) in owner.output, owner.output[-2000:]
        # serve() reports each private step; fewer steps than queries: some were grouped.
        steps = [line for _, line in owner.lines if line.startswith("privatekeras: answered")]
        if MAX_GROUP > 1:
            assert len(steps) < total, len(steps)
        results = [np.load(tmp_path / "seq.npz")] + [
            np.load(tmp_path / "c{}.npz".format(k)) for k in range(CLIENTS)]
        wrong = _tally(results, plain)  # counted first: the stress summary shows failures too
        for res in results:
            assert str(res["error"]) == "", str(res["error"])
        assert not wrong, "wrong or missing answers for images {}".format(wrong[:20])
        seq_lat = results[0]["latency"]
        print("sequential: median {:.1f} ms, p90 {:.1f} ms over {} queries".format(
            1e3 * np.median(seq_lat), 1e3 * np.percentile(seq_lat, 90), len(seq_lat)))
        conc = np.concatenate([r["latency"] for r in results[1:]])
        print("8 concurrent clients: median {:.1f} ms per query; {} private steps for {} "
              "queries".format(1e3 * np.median(conc), len(steps), total))
    finally:
        for c in clients:
            c.kill()
        owner.kill()

