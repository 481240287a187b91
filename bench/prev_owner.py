"""The model owner's process of one benchmark configuration, for the previous release.

Runs the previous release's own ``bench/owner.py`` (from its git worktree, on its own
``privatekeras``: run.py puts the worktree's ``inst/python`` on PYTHONPATH) after wrapping
its ``SharedModel._run`` (the private step of one group of queries, in the old
``privatekeras/serving.py``) with a timer. The run time of each step of the ``serve()`` call
goes to STEPS_OUT (a JSON list of seconds, in query order), measured the way this release's
worker 0 measures its own (around the step function's call only), so "latency - step" means
the same for both. After ``serve()`` it waits for STOP from run.py before the old owner
stops the workers, as this release's owner does. The wrapper is bench instrumentation only;
the previous release is not changed. When $PRIVATEKERAS_STEP_STATS names a file, the traced
step's ops, rounds and messages (counted by this release's
``privatekeras/mpc/graphstats.py``, loaded by path) are appended to it as one JSON line, as
this release's worker 0 does for its own step; the previous release's owner process, which
drove its step, counts as a fourth party there.

    python bench/prev_owner.py OLD_BENCH_DIR STEPS_OUT MODEL HOSTS PROTOCOL BATCH NUM_REQUESTS
"""

import functools
import json
import os
import sys
import time


def main():
    old_bench, steps_out = os.path.abspath(sys.argv[1]), sys.argv[2]
    here = os.path.dirname(os.path.abspath(__file__))
    # The previous release's child.py and owner.py, not this directory's.
    sys.path[:] = [old_bench] + [p for p in sys.path
                                 if os.path.abspath(p or os.curdir) != here]
    from privatekeras import serving  # the previous release's (PYTHONPATH)

    steps, timing = [], [False]
    run, serve = serving.SharedModel._run, serving.SharedModel.serve

    @functools.wraps(run)
    def timed_run(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return run(self, *args, **kwargs)
        finally:
            if timing[0]:  # not the warm-up run of share()
                steps.append(time.perf_counter() - t)

    @functools.wraps(serve)
    def timed_serve(self, *args, **kwargs):
        timing[0] = True
        try:
            answered = serve(self, *args, **kwargs)
        finally:
            timing[0] = False
        # Keep the workers up until run.py has read their socket counters (this release's
        # bench/owner.py waits for the same word).
        import child

        child.wait_for("STOP")
        return answered

    warm_up = serving.SharedModel.warm_up

    @functools.wraps(warm_up)
    def counted_warm_up(self, *args, **kwargs):
        out = warm_up(self, *args, **kwargs)
        path = os.environ.get("PRIVATEKERAS_STEP_STATS")
        if path and getattr(self, "traced", None) is not None:
            stats = _graphstats(here).step_stats(self.traced.graph)
            with open(path, "a") as f:
                f.write(json.dumps(dict(stats, group=1)) + "\n")
        return out

    serving.SharedModel._run = timed_run
    serving.SharedModel.serve = timed_serve
    serving.SharedModel.warm_up = counted_warm_up
    import owner  # the previous release's bench/owner.py

    sys.argv = [os.path.join(old_bench, "owner.py")] + sys.argv[3:]
    try:
        owner.main()
    finally:
        with open(steps_out, "w") as f:
            json.dump(steps, f)


def _graphstats(bench_dir):
    """This release's graph counter, loaded from its file (the previous release has none)."""
    import importlib.util

    path = os.path.join(os.path.dirname(bench_dir), "inst", "python", "privatekeras", "mpc",
                        "graphstats.py")
    spec = importlib.util.spec_from_file_location("pk_bench_graphstats", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
