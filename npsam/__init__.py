"""npsam: Segment Anything in pure NumPy, reading the official state_dict."""

__version__ = "0.1.0"
