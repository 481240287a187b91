"""End to end, with real processes: three workers, a model owner and a client.

Private logits are compared with plaintext Keras on Fashion-MNIST test images: argmax must
agree on every image and logits within LOGIT_ATOL.
"""

import json
import subprocess
import sys
import time

import numpy as np

import privatekeras as pk
from conftest import LOGIT_ATOL, N_IMAGES, SCRIPTS, TALLY, Flow, child_env, free_hosts, rejects


def _compare(private, plain, atol=LOGIT_ATOL):
    assert private.shape == plain.shape
    agreement = (private.argmax(1) == plain.argmax(1)).mean()
    err = np.abs(private - plain).max()
    print("argmax agreement {:.1%}, max abs logit error {:.4f}".format(agreement, err))
    assert agreement == 1.0
    assert err < atol


def test_batch1_from_keras_file_matches_plaintext(served, tmp_path):
    """The session's model (shared from its .keras file): 100 images from a client process,
    and worker 0's board counts exactly 100 answered queries."""
    out = tmp_path / "logits.npy"
    before = served.answered()
    client = subprocess.run(
        [sys.executable, str(SCRIPTS / "client.py"), "--hosts", ",".join(served.hosts),
         "--images", str(served.images_path), "--out", str(out), "--input-shape", "1,28,28,1",
         "--output-shape", "1,10"], capture_output=True, text=True, env=child_env(),
        timeout=300)
    assert client.returncode == 0, client.stdout[-3000:] + client.stderr[-3000:]
    assert served.answered() - before == N_IMAGES
    _compare(np.load(out), served.plain)


def test_batch8_from_model_object_matches_plaintext(models, tmp_path):
    out = tmp_path / "logits.npy"
    batches = -(-N_IMAGES // 8)  # 100 images: 12 full batches and one padded
    flow = Flow(["--model", str(models / "tutorial.keras"), "--as-object", "--batch-size", "8",
                 "--num-requests", str(batches)],
                ["--images", str(models / "images.npy"), "--out", str(out), "--rows-per-query",
                 str(N_IMAGES), "--input-shape", "8,28,28,1", "--output-shape", "8,10"]).check()
    assert "SERVED {}".format(batches) in flow.owner_out
    _compare(np.load(out), np.load(models / "tutorial_logits.npy"))


def test_batchnorm_maxpool_softmax_model_matches_plaintext(models, tmp_path):
    out = tmp_path / "logits.npy"
    flow = Flow(["--model", str(models / "bn.keras"), "--as-object", "--batch-size", "4",
                 "--num-requests", str(N_IMAGES // 4)],
                ["--images", str(models / "images.npy"), "--out", str(out), "--rows-per-query",
                 "20", "--input-shape", "4,28,28,1", "--output-shape", "4,10"]).check()
    assert "SERVED {}".format(N_IMAGES // 4) in flow.owner_out
    _compare(np.load(out), np.load(models / "bn_logits.npy"))


def test_securenn_is_refused_naming_the_leak(models):
    """SecureNN is withdrawn (its private compare hands worker 2 unpermuted zero-test
    values); asking for it fails before anything is sent to a worker."""
    cluster = pk.Cluster(free_hosts())  # never started: the refusal comes first
    for protocol in ("securenn", "SecureNN"):
        with rejects(ValueError, match="withdrawn") as err:
            pk.share(str(models / "tutorial.keras"), cluster, protocol=protocol)
        msg = str(err.value)
        assert "worker 2" in msg and "unpermuted" in msg and "'aby3'" in msg, msg
    assert not cluster.running


def test_pond_and_unknown_protocols_are_not_offered(models):
    from privatekeras.owner import check_protocol

    assert check_protocol("ABY3") == "aby3"
    with rejects(ValueError, match="wrong predictions"):
        check_protocol("pond")
    with rejects(ValueError, match="unknown protocol"):
        pk.share(str(models / "tutorial.keras"), pk.Cluster(free_hosts()), protocol="spdz")


def test_bad_inputs_get_one_clear_error_and_lose_nothing(served, tmp_path):
    out = tmp_path / "report.json"
    before = served.answered()
    client = subprocess.run(
        [sys.executable, str(SCRIPTS / "client.py"), "--hosts", ",".join(served.hosts),
         "--mode", "bad", "--images", str(served.images_path), "--out", str(out),
         "--input-shape", "1,28,28,1", "--output-shape", "1,10"],
        capture_output=True, text=True, env=child_env(), timeout=300)
    assert client.returncode == 0, client.stdout[-3000:] + client.stderr[-3000:]
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
    # The workers answered exactly one query (the good one), and answered it right.
    assert served.answered() - before == 1
    np.testing.assert_allclose(np.array(report["after"]), served.plain[:1], atol=LOGIT_ATOL)


def test_client_with_the_wrong_shapes_is_told_what_is_served(served):
    """A client connected with shapes that do not fit the served model gets an InputError
    naming both, and sends nothing."""
    before = served.answered()
    client = pk.connect(served.cluster(), (1, 32, 32, 3), (1, 10), timeout=10)
    with rejects(pk.InputError, match=r"takes inputs of shape \(1, 28, 28, 1\)"):
        client.query(np.zeros((1, 32, 32, 3)))
    client = pk.connect(served.cluster(), (1, 28, 28, 1), (1, 5), timeout=10)
    with rejects(pk.InputError, match=r"returns \(1, 10\)"):
        client.query(np.zeros((1, 28, 28, 1)))
    assert served.answered() == before


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
print("SERVED", shared.served, flush=True)
for what, stop in (("shared.stop()", shared.stop), ("cluster.stop()", cluster.stop)):
    stop()
    t = time.monotonic()
    try:
        client.query(x)
        print("NO ERROR after", what)
    except Exception as e:
        print("AFTER {}: {} in {:.1f} s: {}".format(what, type(e).__name__,
                                                   time.monotonic() - t, e), flush=True)
"""


def test_query_after_stop_is_a_clear_error(models):
    out = subprocess.run([sys.executable, "-c", QUERY_AFTER_STOP, ",".join(free_hosts()),
                          str(models / "tutorial.keras"), str(models / "images.npy")],
                         env=child_env(), capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr[-3000:]
    plain = np.load(models / "tutorial_logits.npy")[0].argmax()
    assert "ANSWER {}".format(plain) in out.stdout, text
    assert "SERVED 1" in out.stdout, text
    lines = {line.split(":")[0]: line for line in out.stdout.splitlines()
             if line.startswith("AFTER")}
    # After cluster.stop() the workers are gone and so are the cluster's throw-away
    # credentials: either is a clear error, and says what to do.
    expected = {
        "shared.stop()": [("NotServingError", "no model is being served")],
        "cluster.stop()": [("WorkerUnavailableError", "worker"),
                           ("CredentialsError", "start it with Cluster.start()")],
    }
    for what, errors in expected.items():
        TALLY["bad inputs tried"] += 1
        line = lines.get("AFTER " + what, "")
        assert any(": {} in".format(e) in line and f in line for e, f in errors), text
        assert float(line.split(" in ")[1].split()[0]) < 10, line
        TALLY["bad inputs rejected"] += 1


def test_query_without_a_served_model_fails_within_the_timeout():
    code = (
        "import time, numpy as np, privatekeras as pk, sys\n"
        "c = pk.Cluster(sys.argv[1].split(',')).start()\n"
        "client = pk.connect(pk.Cluster(c.hosts, auto_managed=False), (1, 28, 28, 1), (1, 10),"
        " timeout=3)\n"
        "t = time.monotonic()\n"
        "try:\n    client.query(np.zeros((1, 28, 28, 1)))\n"
        "except pk.NotServingError as e:\n"
        "    print('NOT SERVING', round(time.monotonic() - t, 1), e)\n"
        "c.stop()\n")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, ",".join(free_hosts())], env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert "NOT SERVING" in out.stdout, out.stdout + out.stderr[-3000:]
    waited = float(out.stdout.split("NOT SERVING")[1].split()[0])
    assert waited < 10, waited
    assert "no model is being served" in out.stdout
    assert time.monotonic() - t0 < 90


CONNECT_TO_NOTHING = r"""
import sys, time
import privatekeras as pk
from privatekeras.deploy.pki import make_local, remove_local
hosts = sys.argv[1].split(",")
c = pk.Cluster(hosts, auto_managed=False)
for case in ("no credentials", "credentials, no workers"):
    if case == "credentials, no workers":
        make_local(hosts)  # as `privatekeras pki --hosts` does before workers start by hand
    t = time.monotonic()
    try:
        pk.connect(c, (1, 28, 28, 1), (1, 10), timeout=3)
        print("CONNECTED?!", case)
    except pk.PrivateKerasError as e:
        print("FAILED {} | {} | {:.1f} | {}".format(case, type(e).__name__,
                                                    time.monotonic() - t, e), flush=True)
remove_local(hosts)
"""


def test_connecting_to_workers_that_are_not_running_fails_within_the_timeout(tmp_path):
    env = dict(child_env(), PRIVATEKERAS_RUNTIME_DIR=str(tmp_path / "run"))
    out = subprocess.run([sys.executable, "-c", CONNECT_TO_NOTHING, ",".join(free_hosts())],
                         env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr[-3000:]
    failed = {line.split(" | ")[0][len("FAILED "):]: line.split(" | ")
              for line in out.stdout.splitlines() if line.startswith("FAILED")}
    # Without this cluster's credentials: told to start the cluster (or use a hosts file).
    _, kind, seconds, msg = failed["no credentials"]
    assert kind == "CredentialsError" and "Cluster.start()" in msg, text
    assert float(seconds) < 10
    # With credentials but nothing listening: unreachable within the timeout.
    _, kind, seconds, msg = failed["credentials, no workers"]
    assert kind == "WorkerUnavailableError" and "is the cluster started?" in msg, text
    assert float(seconds) < 10
    assert issubclass(pk.ClusterError, pk.PrivateKerasError)


def test_syft_tutorial_scripts_run_unchanged_but_for_the_import(models, tmp_path):
    import keras

    weights = tmp_path / "short-conv-fashion.weights.h5"
    keras.models.load_model(models / "tutorial.keras").save_weights(weights)
    hosts = ",".join(free_hosts())
    serve = subprocess.Popen([sys.executable, str(SCRIPTS / "syft_serve.py"), str(weights), hosts],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=child_env())
    try:
        client = subprocess.run([sys.executable, str(SCRIPTS / "syft_client.py"),
                                 str(models / "images.npy"), hosts], capture_output=True,
                                text=True, env=child_env(), timeout=300)
        serve_out = serve.communicate(timeout=120)[0]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.communicate()
    assert client.returncode == 0, client.stdout + client.stderr[-3000:]
    assert serve.returncode == 0 and "SYFT SERVE DONE" in serve_out, serve_out[-3000:]
    lines = [line for line in client.stdout.splitlines() if line.startswith("Actual:")]
    plain = np.load(models / "tutorial_logits.npy")[:3].argmax(1)
    labels = np.load(models / "labels.npy")[:3]
    assert lines == ["Actual: {}, predicted: {}".format(a, p) for a, p in zip(labels, plain)]

