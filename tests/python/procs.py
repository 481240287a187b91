"""Real processes for load and fault tests: owners and clients whose output lines are
time-stamped as they arrive (``time.time``), so tests can wait for a line and measure how
fast things fail."""

import subprocess
import sys
import time

from conftest import SCRIPTS, child_env
from netns import Lines


class Proc(Lines):
    """A script under tests/python/scripts, its output collected line by line."""

    def __init__(self, script, args):
        self.cmd = [sys.executable, str(SCRIPTS / script)] + [str(a) for a in args]
        super().__init__(subprocess.Popen(self.cmd, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True,
                                          env=child_env()), clock=time.time)

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
