"""``python -m npsam ...``: the npsam command line (npsam.tools.cli)."""

import sys

from npsam.tools.cli import main

sys.exit(main())
