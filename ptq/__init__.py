"""ptq: post-training quantization experiments for torchvision Vision Transformers."""

__version__ = "0.1.0"
