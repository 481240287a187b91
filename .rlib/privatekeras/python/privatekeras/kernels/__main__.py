"""``python -m privatekeras.kernels build|path|check``."""

import argparse
import sys

from .build import build, default_library_path, find_library


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m privatekeras.kernels")
    parser.add_argument("command", choices=["build", "path", "check"])
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args(argv)
    if args.command == "path":
        print(default_library_path())
        return 0
    if args.command == "check":
        path = find_library()
        print(path or "missing: {}".format(default_library_path()))
        return 0 if path else 1
    if find_library() and not args.force:
        print("privatekeras: secure kernels already built: {}".format(find_library()))
        return 0
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
