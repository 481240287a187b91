"""Helpers shared by the benchmark's owner and client processes (started by ``run.py``).

They talk to ``run.py`` in lines: ``@@ WORD fields...`` on stdout (anything else on stdout is
just logged) and one word per line on stdin when ``run.py`` tells them to go on.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported


def die_with_parent():
    """Ask Linux to SIGTERM this process when ``run.py`` dies, so nothing is left behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass
    # SIGTERM becomes SystemExit, so `finally:` blocks (cluster.stop()) run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def say(word, *fields):
    """Tell run.py something: one ``@@ WORD fields`` line on stdout."""
    print(" ".join(["@@", word] + [str(f) for f in fields]), flush=True)


def wait_for(word):
    """Block until run.py writes ``word`` on our stdin."""
    line = sys.stdin.readline()
    if line.strip() != word:
        raise SystemExit("expected {!r} from run.py on stdin, got {!r}".format(word, line))
