"""A client needs numpy and grpcio (and protobuf), not TensorFlow: in a fresh virtual
environment with exactly those, pinned as in inst/python/requirements.txt, a client process
gets correct answers from a model served by an owner in the full environment.

The environment is made once per test session (python3 -m venv from the system Python, then
that venv's pip). If pip cannot install the three packages (no network, no local mirror),
the tests are skipped with pip's own words as the reason.
"""

import json
import os
import re
import subprocess

import numpy as np
import pytest

from conftest import LOGIT_ATOL, PYDIR, ROOT, SCRIPTS, TALLY

CLIENT_PACKAGES = ("numpy", "grpcio", "protobuf")
HEAVY = ("tensorflow", "keras", "tf_encrypted", "cryptography", "tf2onnx", "onnx", "h5py")
SYSTEM_PYTHON = "/usr/bin/python3"


def _pins():
    """``name==version`` for the client's packages, from the project's lock."""
    pins = {}
    with open(os.path.join(ROOT, "inst", "python", "requirements.txt")) as f:
        for line in f:
            m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", line.strip())
            if m and m.group(1).lower() in CLIENT_PACKAGES:
                pins[m.group(1).lower()] = "{}=={}".format(m.group(1), m.group(2))
    assert sorted(pins) == sorted(CLIENT_PACKAGES), "requirements.txt must pin {}".format(
        CLIENT_PACKAGES)
    return [pins[name] for name in CLIENT_PACKAGES]


def _clean_env(venv):
    """The environment of a process run with the venv's interpreter: privatekeras from the
    source tree and nothing else added (no PYTHONPATH, PYTHONHOME or VIRTUAL_ENV of ours);
    where to find the local cluster's credentials stays as it is."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP",
                        "PYTHONUSERBASE")}
    env["PYTHONPATH"] = PYDIR
    env["PYTHONNOUSERSITE"] = "1"
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    return env


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory):
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("{} is missing: cannot make a client environment".format(SYSTEM_PYTHON))
    venv = tmp_path_factory.mktemp("client-venv") / "venv"
    made = subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, "python3 -m venv failed:\n" + made.stdout + made.stderr
    pins = _pins()
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", "--no-input"] + pins,
                         capture_output=True, text=True, timeout=600, env=_clean_env(venv))
    if pip.returncode != 0:
        pytest.skip("pip could not install the client's packages {} (network?): {}".format(
            pins, (pip.stdout + pip.stderr).strip()[-800:]))
    return venv


def _run(venv, args, **kw):
    return subprocess.run([str(venv / "bin" / "python")] + args, capture_output=True,
                          text=True, env=_clean_env(venv), **kw)


def test_the_client_environment_has_no_tensorflow(client_venv):
    """The environment is what a client gets: the three packages (and their own
    dependencies), privatekeras importable from source, TensorFlow not importable."""
    pinned = {p.split("==")[0].lower(): p.split("==")[1] for p in _pins()}
    listed = _run(client_venv, ["-m", "pip", "list", "--format=json"], timeout=120)
    assert listed.returncode == 0, listed.stderr
    have = {d["name"].lower(): d["version"] for d in json.loads(listed.stdout)}
    for name, version in pinned.items():
        assert have.get(name) == version, (name, have.get(name), version)
    for name in HEAVY:
        assert name.replace("_", "-") not in have and name not in have, (name, sorted(have))
    tf = _run(client_venv, ["-c", "import tensorflow"], timeout=120)
    assert tf.returncode != 0 and "No module named 'tensorflow'" in tf.stderr, tf.stderr
    probe = _run(client_venv, ["-c", "import json, sys, privatekeras; "
                                     "print(privatekeras.__file__); print(json.dumps(sorted("
                                     "{m.split('.')[0] for m in sys.modules})))"], timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    where, modules = probe.stdout.splitlines()[:2]
    assert where.startswith(PYDIR), where
    loaded = set(json.loads(modules))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_a_client_without_tensorflow_gets_correct_answers(client_venv, served, tmp_path):
    out = tmp_path / "answers.npz"
    before = served.answered()
    n = 10
    run = _run(client_venv, [str(SCRIPTS / "client_env_client.py"), "--hosts",
                             ",".join(served.hosts), "--images", str(served.images_path),
                             "--start", "60", "--count", str(n), "--out", str(out)],
               timeout=300)
    assert run.returncode == 0, (
        "the client failed in an environment without TensorFlow:\n" + run.stdout[-2000:]
        + run.stderr[-4000:])
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["prefix"] == str(client_venv), report["prefix"]
    for when in ("after_import", "after_queries"):
        assert not set(report[when]) & set(HEAVY), (when, sorted(set(report[when]) & set(HEAVY)))
    got = np.load(out)
    plain = served.plain[60:60 + n]
    TALLY["queries sent"] += n
    TALLY["queries answered"] += n
    assert (got["logits"].argmax(1) == plain.argmax(1)).all(), (got["logits"], plain)
    np.testing.assert_allclose(got["logits"], plain, atol=LOGIT_ATOL)
    TALLY["queries correct"] += n
    # The tutorial model ends in a linear Dense: predict_proba() returns what model.predict()
    # does, the logits (the final-activation rule; sigmoid/softmax models in test_layers.py).
    np.testing.assert_allclose(got["proba"], plain[:2], atol=LOGIT_ATOL)
    assert served.answered() - before == n + 2
