"""vit-scale: pretrain Vision Transformers at scale and transfer them to small benchmarks."""

__version__ = "0.1.0"
