"""Tools around the model: the command line (``cli``), tracing a forward pass
(``trace``), ``explain``, ``crosscheck`` against other implementations,
overlays and progress bars."""
