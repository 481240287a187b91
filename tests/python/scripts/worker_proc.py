"""A worker started by hand, as on a separate host (`python -m privatekeras.worker`)."""
import sys

from privatekeras.worker import main

sys.exit(main(sys.argv[1:]))
