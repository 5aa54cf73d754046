"""``python -m npsam ...``: the npsam command line (npsam.cli)."""

import sys

from npsam.cli import main

sys.exit(main())
