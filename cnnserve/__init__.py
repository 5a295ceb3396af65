"""cnnserve: CNN image classification, from PyTorch training to ONNX served by BentoML."""

__version__ = "0.1.0"
