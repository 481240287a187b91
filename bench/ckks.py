"""CKKS rows of `make bench` (also alone: ``bench/run.py --only ckks`` or ``python
bench/ckks.py``): encrypted predictions on one server.

Three processes, as in real use: the CKKS server (``privatekeras worker --scheme ckks``,
started by ``privatekeras.Server.start()``), the model owner (this process: it shares the
model and holds the serving call open from a thread; it takes no part in any query) and a
client (``bench/ckks_client.py``, a process of its own), all on loopback. Two models:

* **Iris**: a binomial ``glm()`` (virginica vs the rest) fitted in R on ``datasets::iris``
  (through ``Rscript``), served from its coefficients; all 150 rows;
* **30 features**: a Keras logistic regression (Normalization + Dense(1, sigmoid)) on a
  synthetic 30-feature table of 1000 rows.

For each: key generation in the client (TenSEAL context and secret key), one warm-up query
(the server checks the client's new context), then batch 1 (one row per query) and batch
"all rows" (every row in one query), wall time of ``query()`` in the client (encrypt, send,
evaluate, return, decrypt); bytes the client sent per row (context and ciphertexts) and
received; the error of the decrypted linear predictor vs plaintext and class agreement.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = {"iris_all_ms": 1000.0, "iris_one_ms": 30.0}


def log(msg):
    print("bench: ckks: " + msg, file=sys.stderr, flush=True)


def iris_glm(env):
    """(features, coefficients, intercept, plaintext eta) of R's binomial glm on iris."""
    script = (
        'fit <- suppressWarnings(glm(I(Species == "virginica") ~ Sepal.Length + Sepal.Width + '
        'Petal.Length + Petal.Width, family = binomial, data = iris)); '
        'x <- as.matrix(iris[, 1:4]); '
        'cat(paste0("{\\"coef\\": [", paste(sprintf("%.17g", coef(fit)), '
        'collapse = ","), "], \\"x\\": [", paste(sprintf("%.17g", t(x)), collapse = ","), '
        '"], \\"eta\\": [", paste(sprintf("%.17g", predict(fit)), collapse = ","), "]}"))')
    res = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True, env=env,
                         timeout=120)
    if res.returncode != 0:
        raise RuntimeError("Rscript could not fit the iris glm: " + res.stderr[-500:])
    data = json.loads(res.stdout)
    coef = np.array(data["coef"])
    return (np.array(data["x"]).reshape(150, 4), coef[1:, None], coef[:1],
            np.array(data["eta"])[:, None])


def tabular_keras(rows=1000, d=30):
    import keras

    keras.utils.set_random_seed(11)
    rng = np.random.default_rng(11)
    x = rng.normal(loc=5.0, scale=3.0, size=(rows, d)).astype("float32")
    w = rng.normal(size=d)
    y = ((x - 5.0) @ w + rng.normal(scale=1.0, size=rows) > 0).astype("float32")
    norm = keras.layers.Normalization()
    norm.adapt(x)
    model = keras.Sequential([keras.Input((d,)), norm,
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    model.fit(x, y, epochs=10, verbose=0)
    last = model.layers[-1]
    last.activation = keras.activations.linear
    eta = np.asarray(model.predict(x, verbose=0), np.float64)
    last.activation = keras.activations.sigmoid
    return model, x.astype(np.float64), eta


def measure(name, model, x, plain_eta, env, logs, queries, input_range):
    """Serve ``model`` on a fresh server and run the client process on ``x``."""
    import privatekeras as pk

    sys.path.insert(0, HERE)
    from run import free_hosts  # noqa: E402

    host = free_hosts()[0]
    server = pk.Server(host).start()
    tmp = tempfile.mkdtemp(prefix="pk-bench-ckks-")
    try:
        shared = pk.share(model, server, input_range=input_range)
        thread = threading.Thread(target=shared.serve, daemon=True)
        thread.start()
        np.save(os.path.join(tmp, "x.npy"), x)
        np.save(os.path.join(tmp, "eta.npy"), plain_eta)
        with open(os.path.join(logs, "ckks_client_{}.log".format(name)), "w") as log_file:
            res = subprocess.run(
                [sys.executable, os.path.join(HERE, "ckks_client.py"), "--host", host,
                 "--x", os.path.join(tmp, "x.npy"), "--eta", os.path.join(tmp, "eta.npy"),
                 "--queries", str(queries)], stdout=subprocess.PIPE, stderr=log_file,
                text=True, env=env, timeout=900)
        if res.returncode != 0:
            raise RuntimeError("the CKKS client failed (see {})".format(log_file.name))
        row = json.loads(res.stdout.strip().splitlines()[-1])
        shared.stop()
        thread.join(30)
        row.update(model=name, params=shared.public_spec["ckks"],
                   describe=pk.ckks.describe(shared.public_spec["ckks"]))
        return row
    finally:
        server.stop()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def run(out_dir, env, logs, quick=False):
    """Measure both models; returns the rows (dicts), also written to OUT/ckks.json."""
    queries = 10 if quick else 40
    rows = []
    log("Iris: fitting R's glm ...")
    x, coef, intercept, eta = iris_glm(env)
    import privatekeras as pk

    glm = pk.ckks.LinearModel(coef, intercept, link="logit",
                              feature_names=["Sepal.Length", "Sepal.Width", "Petal.Length",
                                             "Petal.Width"], name="iris glm (binomial)")
    rows.append(measure("iris", glm, x, eta, env, logs, queries, input_range=(0, 10)))
    log(summary(rows[-1]))
    log("30 features: training a Keras logistic regression ...")
    model, x30, eta30 = tabular_keras()
    rows.append(measure("tabular30", model, x30, eta30, env, logs, queries,
                        input_range=(-20, 30)))
    log(summary(rows[-1]))
    with open(os.path.join(out_dir, "ckks.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def summary(r):
    return ("{}: {} rows; keys {:.0f} ms; batch 1 median {:.1f} ms; all rows {:.1f} ms; {:.0f} "
            "bytes sent per row at batch 1, {:.0f} at all rows; max |eta error| {:.1e}; "
            "classes {:.1%}".format(r["model"], r["rows"], r["keygen_ms"], r["one_median_ms"],
                                    r["all_median_ms"], r["one_bytes_per_row"],
                                    r["all_bytes_per_row"], r["max_abs_error"],
                                    r["class_agreement"]))


def table(rows):
    """Markdown: one column per model."""
    if not rows:
        return "(CKKS not measured)"
    head = "| CKKS, one server, Python client | " + " | ".join(
        "{} ({} rows, {} features)".format(r["model"], r["rows"], r["features"]) for r in rows)
    lines = [head + " |", "|---|" + "---|" * len(rows)]

    def line(label, fmt):
        lines.append("| {} | {} |".format(label, " | ".join(fmt(r) for r in rows)))

    line("parameters", lambda r: r["describe"])
    line("key generation (client)", lambda r: "{:.1f} ms".format(r["keygen_ms"]))
    line("public context sent", lambda r: "{} bytes".format(r["context_bytes"]))
    line("batch 1: median / p90 latency", lambda r: "{:.1f} / {:.1f} ms".format(
        r["one_median_ms"], r["one_p90_ms"]))
    line("all rows in one query: median latency", lambda r: "{:.1f} ms ({:.0f} rows/s)".format(
        r["all_median_ms"], r["rows"] / r["all_median_ms"] * 1e3))
    line("bytes sent per row: batch 1 / all rows", lambda r: "{:.0f} kB / {:.2f} kB".format(
        r["one_bytes_per_row"] / 1e3, r["all_bytes_per_row"] / 1e3))
    line("bytes received per query: batch 1 / all rows", lambda r: "{:.0f} kB / {:.0f} kB".format(
        r["one_bytes_received"] / 1e3, r["all_bytes_received"] / 1e3))
    line("first query after key generation", lambda r: "{:.1f} ms".format(r["warmup_ms"]))
    line("max abs error of eta vs plaintext / classes", lambda r: "{:.1e} / {:.1%}".format(
        r["max_abs_error"], r["class_agreement"]))
    return "\n".join(lines)


def targets_table(rows):
    iris = next((r for r in rows if r["model"] == "iris"), None)
    if iris is None:
        return ""
    out = ["| target (issue 12) | measured | wanted | |", "|---|---|---|---|"]
    for label, value, want in (("Iris, all 150 rows end to end after key set-up",
                                iris["all_median_ms"], TARGETS["iris_all_ms"]),
                               ("Iris, one row end to end", iris["one_median_ms"],
                                TARGETS["iris_one_ms"])):
        out.append("| {} | {:.1f} ms | <= {:.0f} ms | {} |".format(
            label, value, want, "PASS" if value <= want else "MISS"))
    out.append("| Iris, class agreement with R's predict() | {:.1%} | 100 % | {} |".format(
        iris["class_agreement"], "PASS" if iris["class_agreement"] == 1.0 else "MISS"))
    return "\n".join(out)


METHOD = """\
- Three processes on loopback: the CKKS server (`privatekeras worker --scheme ckks`, spawned
  by `Server.start()`), the model owner (the bench process: `share()`, then `serve()` from a
  thread) and the client (`bench/ckks_client.py`). Iris: R's `glm(I(Species == "virginica") ~
  ., binomial)` on `datasets::iris` (fitted by `Rscript`), all 150 rows; 30 features: a Keras
  Normalization + Dense(1, sigmoid) trained on a synthetic table of 1000 rows.
- Latency: wall time of the client's `query()` (encrypt each feature column, Submit and Fetch
  over mutual TLS, the server's evaluation, decrypt), after key generation and one warm-up
  query (the server checks a new client context once); batch 1 cycles through the rows, "all
  rows" sends every row in one query (one ciphertext per feature).
- Key generation: the client's TenSEAL context and secret key for the served parameters
  (median of 5). Bytes: what the client serializes (its public context and ciphertexts) per
  query, divided by the rows; gRPC/TLS framing not included.
- Error: decrypted linear predictor vs plaintext (R's `predict()` / Keras); classes: sign of
  the linear predictor.
"""


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(HERE, "out"))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    sys.path.insert(0, HERE)
    from run import child_env  # noqa: E402

    logs = os.path.join(a.out, "logs")
    os.makedirs(logs, exist_ok=True)
    rows = run(a.out, child_env(), logs, a.quick)
    print(table(rows))
    print()
    print(targets_table(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "inst", "python"))
    sys.exit(main())
