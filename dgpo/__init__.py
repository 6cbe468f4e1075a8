"""dgpo: RLVR on language models with DGPO and its baselines, on PyTorch Lightning."""

__version__ = "0.1.0"
