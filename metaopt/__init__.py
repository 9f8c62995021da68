"""metaopt: meta-learned optimizers and learned update rules for PyTorch."""
__version__ = "0.1.0"
