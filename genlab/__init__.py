"""genlab: a workbench for generative AI (train, sample, evaluate, serve)."""

__version__ = "0.1.0"
