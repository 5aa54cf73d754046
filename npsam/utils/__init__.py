"""Mirror of the official ``segment_anything/utils/``: ``amg.py`` (the automatic
mask generator's helpers), ``transforms.py`` (ResizeLongestSide) and ``onnx.py``
(SamOnnxModel)."""
