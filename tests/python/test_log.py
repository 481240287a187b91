"""privatekeras' messages go through one `privatekeras` logger, which set_verbosity() (and R's
options(privatekeras.verbose)) controls; importing privatekeras or TensorFlow through it prints
nothing of TensorFlow's native start-up lines. Each case runs in a fresh Python process whose
stderr is read."""

import subprocess
import sys

import pytest

from conftest import child_env

NATIVE = ("I0000", "W0000", "oneDNN", "cpu_feature_guard", "absl::InitializeLog")


def python(code, unset_tf_log_level=False):
    env = child_env()
    if unset_tf_log_level:
        env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)


def test_messages_are_logged_and_set_verbosity_silences_them():
    code = "\n".join([
        "import logging, privatekeras as pk",
        "from privatekeras.log import say, warn",
        "say('progress one')",
        "warn('a warning')",
        "assert pk.set_verbosity(False) == logging.INFO",
        "say('progress two')",
        "warn('a second warning')",
        "pk.set_verbosity('quiet')",
        "warn('a third warning')",
        "pk.set_verbosity(True)",
        "say('progress three')",
        "pk.set_verbosity('DEBUG')",
        "assert logging.getLogger('privatekeras').level == logging.DEBUG",
    ])
    out = python(code)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert lines == ["privatekeras: progress one", "privatekeras: a warning",
                     "privatekeras: a second warning", "privatekeras: progress three"]
    assert out.stdout == ""


def test_set_verbosity_refuses_nonsense():
    import privatekeras as pk

    for bad in ("loud", -1, 2.5, [True]):
        with pytest.raises(ValueError, match="verbose must be"):
            pk.set_verbosity(bad)


def test_an_application_logging_config_wins():
    code = "\n".join([
        "import logging, sys",
        "logging.basicConfig(stream=sys.stdout, format='app %(name)s %(levelname)s %(message)s')",
        "h = logging.StreamHandler(sys.stdout)",
        "logging.getLogger('privatekeras').addHandler(h)",
        "logging.getLogger('privatekeras').setLevel(logging.WARNING)",
        "from privatekeras.log import say, warn",
        "say('hidden')",
        "warn('shown')",
    ])
    out = python(code)
    assert out.returncode == 0, out.stderr
    assert "hidden" not in out.stdout + out.stderr
    assert "shown" in out.stdout and "privatekeras: shown" not in out.stderr


def test_tensorflow_native_start_up_lines_stay_out():
    # TF_CPP_MIN_LOG_LEVEL unset, as in a user's shell: importing privatekeras first keeps
    # TensorFlow's C++ start-up lines (oneDNN, CPU features) out of the user's terminal.
    code = "\n".join([
        "import privatekeras",
        "import tensorflow as tf",
        "tf.constant(1.0) + 1.0",
    ])
    out = python(code, unset_tf_log_level=True)
    assert out.returncode == 0, out.stderr
    assert not [line for line in out.stderr.splitlines() if any(n in line for n in NATIVE)], \
        out.stderr
    # Without privatekeras they do appear (so the check above can fail).
    bare = python("import tensorflow as tf\ntf.constant(1.0) + 1.0", unset_tf_log_level=True)
    assert any(n in bare.stderr for n in NATIVE), bare.stderr
