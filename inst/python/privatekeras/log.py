"""privatekeras' progress and status messages: the ``privatekeras`` logger.

Messages go to standard error as ``privatekeras: ...`` lines unless the application configures
the ``privatekeras`` logger itself (``logging.getLogger("privatekeras").setLevel(...)`` or
handlers of its own), which then wins. :func:`set_verbosity` turns progress messages off and on
(R: ``options(privatekeras.verbose = FALSE)``).
"""

import logging
import sys

logger = logging.getLogger("privatekeras")


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (R and pytest replace it)."""

    def emit(self, record):
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never break the caller
            self.handleError(record)


def _default_handler():
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("privatekeras: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}


def set_verbosity(verbose=True):
    """Set how much privatekeras reports in this process; returns the previous level.

    ``verbose`` is True (progress and status, the default), False (warnings and errors only),
    ``"quiet"`` (nothing) or a :mod:`logging` level (``"WARNING"``, ``logging.DEBUG``, ...).
    Only this process's ``privatekeras`` logger changes: workers started by
    :meth:`privatekeras.Cluster.start` write their own logs to files.
    """
    if verbose is True:
        level = logging.INFO
    elif verbose is False or verbose is None:
        level = logging.WARNING
    elif isinstance(verbose, str) and verbose.lower() == "quiet":
        level = logging.CRITICAL + 1
    elif isinstance(verbose, str) and verbose.lower() in _LEVELS:
        level = _LEVELS[verbose.lower()]
    elif isinstance(verbose, int) and not isinstance(verbose, bool) and verbose >= 0:
        level = verbose
    else:
        raise ValueError("verbose must be True, False, 'quiet' or a logging level such as "
                         "'WARNING', got {!r}".format(verbose))
    _default_handler()
    previous = logger.level
    logger.setLevel(level)
    return previous


def say(message, *args):
    """Report progress or status (INFO)."""
    _default_handler()
    logger.info(message, *args)


def warn(message, *args):
    """Report something the user should act on (WARNING)."""
    _default_handler()
    logger.warning(message, *args)
