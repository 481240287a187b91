"""End to end, with real processes: three workers, a model owner and a client.

Private logits are compared with plaintext Keras on 100 Fashion-MNIST test images: argmax
must agree on every image and logits within LOGIT_ATOL.
"""

import json
import subprocess
import sys
import time

import numpy as np

from conftest import (LOGIT_ATOL, N_IMAGES, SCRIPTS, SECURENN_LOGIT_ATOL, TALLY, Flow,
                      child_env, free_hosts)


def _compare(private, plain, atol=LOGIT_ATOL):
    assert private.shape == plain.shape
    agreement = (private.argmax(1) == plain.argmax(1)).mean()
    err = np.abs(private - plain).max()
    print("argmax agreement {:.1%}, max abs logit error {:.4f}".format(agreement, err))
    assert agreement == 1.0
    assert err < atol


def test_batch1_from_keras_file_matches_plaintext(models, tmp_path):
    out = tmp_path / "logits.npy"
    flow = Flow(["--model", str(models / "tutorial.keras"), "--num-requests", str(N_IMAGES)],
                ["--images", str(models / "images.npy"), "--out", str(out),
                 "--input-shape", "1,28,28,1", "--output-shape", "1,10"]).check()
    assert "SECURE_RANDOMNESS True" in flow.owner_out
    assert "SERVED {}".format(N_IMAGES) in flow.owner_out
    _compare(np.load(out), np.load(models / "tutorial_logits.npy"))


def test_batch8_from_model_object_matches_plaintext(models, tmp_path):
    out = tmp_path / "logits.npy"
    batches = -(-N_IMAGES // 8)  # 100 images: 12 full batches and one padded
    Flow(["--model", str(models / "tutorial.keras"), "--as-object", "--batch-size", "8",
          "--num-requests", str(batches)],
         ["--images", str(models / "images.npy"), "--out", str(out), "--rows-per-query",
          str(N_IMAGES), "--input-shape", "8,28,28,1", "--output-shape", "8,10"]).check()
    _compare(np.load(out), np.load(models / "tutorial_logits.npy"))


def test_securenn_matches_plaintext(models, tmp_path):
    """SecureNN on the BatchNormalization/MaxPooling/strided-conv model, batch 4."""
    out = tmp_path / "logits.npy"
    n = 40
    np.save(tmp_path / "images.npy", np.load(models / "images.npy")[:n])
    flow = Flow(["--model", str(models / "bn.keras"), "--as-object", "--batch-size", "4",
                 "--num-requests", str(n // 4), "--protocol", "securenn"],
                ["--images", str(tmp_path / "images.npy"), "--out", str(out),
                 "--rows-per-query", "8", "--input-shape", "4,28,28,1",
                 "--output-shape", "4,10"]).check()
    assert "protocol=securenn" in flow.owner_out
    _compare(np.load(out), np.load(models / "bn_logits.npy")[:n], SECURENN_LOGIT_ATOL)


def test_pond_is_not_offered():
    from privatekeras.backends import check_protocol

    try:
        check_protocol("pond")
    except ValueError as exc:
        assert "wrong predictions" in str(exc)
    else:
        raise AssertionError("pond was accepted")


def test_batchnorm_maxpool_softmax_model_matches_plaintext(models, tmp_path):
    out = tmp_path / "logits.npy"
    Flow(["--model", str(models / "bn.keras"), "--as-object", "--batch-size", "4",
          "--num-requests", str(N_IMAGES // 4)],
         ["--images", str(models / "images.npy"), "--out", str(out), "--rows-per-query", "20",
          "--input-shape", "4,28,28,1", "--output-shape", "4,10"]).check()
    _compare(np.load(out), np.load(models / "bn_logits.npy"))


def test_bad_inputs_get_one_clear_error_and_lose_nothing(models, tmp_path):
    out = tmp_path / "report.json"
    flow = Flow(["--model", str(models / "tutorial.keras"), "--num-requests", "1"],
                ["--mode", "bad", "--images", str(models / "images.npy"), "--out", str(out),
                 "--input-shape", "1,28,28,1", "--output-shape", "1,10"]).check()
    report = json.loads(out.read_text())
    expected = {
        "wrong_shape": "has shape (1, 27, 28, 1)",
        "wrong_rank": "has shape (28, 28)",
        "string_dtype": "numeric",
        "bool_dtype": "numeric",
        "nan": "NaN or infinite",
        "inf": "NaN or infinite",
        "huge": "fixed-point",
        "empty_batch": "empty batch",
    }
    for name, fragment in expected.items():
        TALLY["bad inputs tried"] += 1
        assert report[name]["error"] == "InputError", (name, report[name])
        assert fragment in report[name]["message"], (name, report[name]["message"])
        TALLY["bad inputs rejected"] += 1
    # The server answered exactly one query (the good one), and answered it right.
    assert "SERVED 1" in flow.owner_out
    plain = np.load(models / "tutorial_logits.npy")[:1]
    np.testing.assert_allclose(np.array(report["after"]), plain, atol=LOGIT_ATOL)


QUERY_AFTER_STOP = r"""
import sys, threading, time
import numpy as np
import privatekeras as pk
cluster = pk.Cluster(sys.argv[1].split(",")).start()
shared = pk.share(sys.argv[2], cluster)  # traces and warms up the private step
server = threading.Thread(target=shared.serve, kwargs={"num_requests": 1})
server.start()  # this process is the model owner and, below, also a client
client = pk.connect(cluster, (1, 28, 28, 1), (1, 10), timeout=5)
x = np.load(sys.argv[3])[:1]
print("ANSWER", client.query(x)[0].argmax(), flush=True)
server.join()
for what, stop in (("shared.stop()", shared.stop), ("cluster.stop()", cluster.stop)):
    stop()
    t = time.monotonic()
    try:
        client.query(x)
        print("NO ERROR after", what)
    except pk.PrivateKerasError as e:
        print("AFTER {}: {} in {:.1f} s: {}".format(what, type(e).__name__,
                                                   time.monotonic() - t, e), flush=True)
"""


def test_query_after_stop_is_a_clear_error(models):
    out = subprocess.run([sys.executable, "-c", QUERY_AFTER_STOP, ",".join(free_hosts()),
                          str(models / "tutorial.keras"), str(models / "images.npy")],
                         env=child_env(), capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr[-3000:]
    assert "ANSWER" in out.stdout, text
    lines = {line.split(":")[0]: line for line in out.stdout.splitlines()
             if line.startswith("AFTER")}
    for what, error, fragment in (("shared.stop()", "NotServingError", "no model is being served any more"),
                                  ("cluster.stop()", "WorkerUnavailableError", "cannot reach")):
        TALLY["bad inputs tried"] += 1
        line = lines.get("AFTER " + what, "")
        assert error in line and fragment in line, text
        assert float(line.split(" in ")[1].split()[0]) < 10, line
        TALLY["bad inputs rejected"] += 1


def test_query_without_a_served_model_fails_within_the_timeout():
    code = (
        "import time, numpy as np, privatekeras as pk, sys\n"
        "c = pk.Cluster(sys.argv[1].split(',')).start()\n"
        "client = pk.connect(c, (1, 28, 28, 1), (1, 10), timeout=3)\n"
        "t = time.monotonic()\n"
        "try:\n    client.query(np.zeros((1, 28, 28, 1)))\n"
        "except pk.NotServingError as e:\n    print('NOT SERVING', round(time.monotonic() - t, 1), e)\n"
        "c.stop()\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, ",".join(free_hosts())], env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert "NOT SERVING" in out.stdout, out.stdout + out.stderr[-3000:]
    waited = float(out.stdout.split("NOT SERVING")[1].split()[0])
    assert waited < 10, waited
    assert "no model is being served" in out.stdout
    assert time.monotonic() - t0 < 90


def test_connecting_to_workers_that_are_not_running_fails_within_the_timeout():
    code = (
        "import time, privatekeras as pk, sys\n"
        "c = pk.Cluster(sys.argv[1].split(','), auto_managed=False)\n"
        "t = time.monotonic()\n"
        "try:\n    pk.connect(c, (1, 28, 28, 1), (1, 10), timeout=3)\n"
        "except pk.WorkerUnavailableError as e:\n"
        "    print('UNREACHABLE', round(time.monotonic() - t, 1), e)\n")
    out = subprocess.run([sys.executable, "-c", code, ",".join(free_hosts())], env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert "UNREACHABLE" in out.stdout, out.stdout + out.stderr[-3000:]
    assert float(out.stdout.split("UNREACHABLE")[1].split()[0]) < 10
    assert "is the cluster started?" in out.stdout


def test_syft_tutorial_scripts_run_unchanged_but_for_the_import(models, tmp_path):
    import keras

    weights = tmp_path / "short-conv-fashion.weights.h5"
    keras.models.load_model(models / "tutorial.keras").save_weights(weights)
    hosts = ",".join(free_hosts())
    serve = subprocess.Popen([sys.executable, str(SCRIPTS / "syft_serve.py"), str(weights), hosts],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=child_env())
    client = subprocess.run([sys.executable, str(SCRIPTS / "syft_client.py"),
                             str(models / "images.npy"), hosts], capture_output=True, text=True,
                            env=child_env(), timeout=300)
    serve_out = serve.communicate(timeout=120)[0]
    assert client.returncode == 0, client.stdout + client.stderr[-3000:]
    assert serve.returncode == 0 and "SYFT SERVE DONE" in serve_out, serve_out[-3000:]
    lines = [line for line in client.stdout.splitlines() if line.startswith("Actual:")]
    plain = np.load(models / "tutorial_logits.npy")[:3].argmax(1)
    labels = np.load(models / "labels.npy")[:3]
    assert lines == ["Actual: {}, predicted: {}".format(a, p) for a, p in zip(labels, plain)]
