"""A worker started by hand, as on its own host: ``python -m privatekeras worker``.

Execs the real command (so the process is what an operator runs and what the leak check
looks for); the test makes the cluster's credentials first (``pki.make_local``).
Usage: worker_proc.py --hosts h0,h1,h2 --index I [--compute c0,c1,c2]
"""
import os
import sys

os.execv(sys.executable, [sys.executable, "-m", "privatekeras", "worker"] + sys.argv[1:])
