"""minillm: train GPT-style language models from scratch. See README.md."""
__version__ = "0.1.0"
