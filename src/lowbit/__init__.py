"""lowbit: a local LLM inference runtime with its own quantized container format."""

__version__ = "0.1.0"
