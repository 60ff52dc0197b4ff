"""lmtune: fine-tune large language models from plain Python config files."""

__version__ = "0.1.0"
