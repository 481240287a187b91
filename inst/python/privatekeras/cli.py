"""The ``privatekeras`` command::

    privatekeras worker ...   run one worker (privatekeras.deploy.worker_main)
    privatekeras pki ...      certificates: of a hosts file (--config), or a throw-away CA for
                              workers started by hand on one machine (--hosts)
    privatekeras links ...    the stunnel links of a worker on its own host (run by `worker`)
    privatekeras kernels ...  build or locate the secure kernels
"""

import sys

COMMANDS = {
    "worker": ("privatekeras.deploy.worker_main", "run one worker"),
    "pki": ("privatekeras.deploy.pki", "make a cluster's certificates"),
    "links": ("privatekeras.deploy.links", "run a worker host's stunnel links"),
    "kernels": ("privatekeras.kernels.__main__", "build or locate the secure kernels"),
}


def main(argv=None):
    """Dispatch ``privatekeras COMMAND ARGS...``; returns the exit status."""
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        from . import __version__

        print("privatekeras", __version__)
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: privatekeras COMMAND [ARGS...]   (or: python -m privatekeras ...)\n\n"
              "commands:")
        for name, (_, what) in COMMANDS.items():
            print("  {:<9} {}".format(name, what))
        print("\n`privatekeras COMMAND --help` describes a command; --version prints the "
              "version.")
        if argv and argv[0] not in ("-h", "--help"):
            print("privatekeras: unknown command {!r}".format(argv[0]), file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0
