"""privatekeras' progress and status messages: the ``privatekeras`` logger.

Messages go to standard error as ``privatekeras: ...`` lines unless the application configures
the ``privatekeras`` logger itself (``logging.getLogger("privatekeras").setLevel(...)`` or
handlers of its own), which then wins.
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


def say(message, *args):
    """Report progress or status (INFO)."""
    _default_handler()
    logger.info(message, *args)


def warn(message, *args):
    """Report something the user should act on (WARNING)."""
    _default_handler()
    logger.warning(message, *args)
