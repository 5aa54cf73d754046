"""A tiny text progress bar for long work (image encoder, automatic masks).

    bar = ProgressBar("image encoder")
    sam.image_encoder(x, progress=bar)   # calls bar(done, total)
    bar.close()

The bar draws on stderr, redrawing one line with ``\\r``, only when stderr is
a terminal; otherwise (pipes, files, tests) it prints nothing at all. It
ends its line when done reaches total (or on ``close()``), so that a second
bar, or a second run of the same one, starts on a new line.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

WIDTH = 30  # characters of the bar itself


class ProgressBar:
    """``progress(done, total)`` callback drawing ``label [#####.....] done/total 3.1 s``."""

    def __init__(self, label: str, stream: Optional[TextIO] = None, enabled: Optional[bool] = None) -> None:
        self.label = label
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.drawn = False
        self.start = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        total = max(int(total), 1)
        done = min(max(int(done), 0), total)
        filled = WIDTH * done // total
        bar = "#" * filled + "." * (WIDTH - filled)
        seconds = time.monotonic() - self.start
        self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {seconds:.1f} s")
        self.drawn = True
        if done == total:  # finished: end the line (a later call starts a new one)
            self.close()
        self.stream.flush()

    def close(self) -> None:
        """End the line (only if the bar was drawn)."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
