"""The model owner's process of one benchmark configuration, for the previous release.

Runs the previous release's own ``bench/owner.py`` (from its git worktree, on its own
``privatekeras``: run.py puts the worktree's ``inst/python`` on PYTHONPATH) after wrapping
its ``SharedModel._run`` (the private step of one group of queries, in the old
``privatekeras/serving.py``) with a timer. The run time of each step of the ``serve()`` call
goes to STEPS_OUT (a JSON list of seconds, in query order), measured the way this release's
worker 0 measures its own (around the step function's call only), so "latency - step" means
the same for both. After ``serve()`` it waits for STOP from run.py before the old owner
stops the workers, as this release's owner does. The wrapper is bench instrumentation only;
the previous release is not changed.

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

    serving.SharedModel._run = timed_run
    serving.SharedModel.serve = timed_serve
    import owner  # the previous release's bench/owner.py

    sys.argv = [os.path.join(old_bench, "owner.py")] + sys.argv[3:]
    try:
        owner.main()
    finally:
        with open(steps_out, "w") as f:
            json.dump(steps, f)


if __name__ == "__main__":
    main()
