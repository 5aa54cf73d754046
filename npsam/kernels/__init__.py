"""What the official code takes from PyTorch, written in NumPy: ``nn`` (the
modules of ``torch.nn``), ``ops`` (the kernels of ``torch.nn.functional``),
``resize`` (bilinear interpolation and PIL's resize) and ``checks`` (argument
checks shared by the public entry points)."""
