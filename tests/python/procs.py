"""Real processes for load and fault tests: owners and clients whose output lines are
time-stamped as they arrive, so tests can wait for a line and measure how fast things fail."""

import subprocess
import sys
import threading
import time

from conftest import SCRIPTS, child_env


class Proc:
    """A script under tests/python/scripts, its output collected line by line."""

    def __init__(self, script, args):
        self.cmd = [sys.executable, str(SCRIPTS / script)] + [str(a) for a in args]
        self.p = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=child_env())
        self.lines = []  # (time.time(), line)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    @property
    def output(self):
        return "\n".join(line for _, line in self.lines)

    def find(self, prefix):
        """(arrival time, line) of the first line starting with ``prefix``, or None."""
        return next(((t, line) for t, line in self.lines if line.startswith(prefix)), None)

    def wait_for(self, prefix, timeout):
        """Wait for a line starting with ``prefix``; fails with the output so far."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(prefix)
            if found:
                return found
            if self.p.poll() is not None:
                self._reader.join(5)
                found = self.find(prefix)
                if found:
                    return found
                break
            time.sleep(0.05)
        raise AssertionError("no {!r} line from {} (rc={}):\n{}".format(
            prefix, self.cmd[1], self.p.poll(), self.output[-5000:]))

    def wait(self, timeout):
        """Wait for exit; kill and fail on timeout. Returns the exit code."""
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError("{} did not exit within {} s:\n{}".format(
                self.cmd[1], timeout, self.output[-5000:])) from None
        self._reader.join(5)
        return rc

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()
