"""Weights and files: PyTorch checkpoints read without PyTorch or pickle code
(``checkpoint``), safetensors, ONNX files (``onnx_proto``, ``onnx_import``),
Hugging Face keys (``hf``), conversion (``convert``) and photos (``image_io``)."""
