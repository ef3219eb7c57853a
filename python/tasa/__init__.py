"""tasa: task-aware mixed-precision weight quantization of LLMs."""
__version__ = "0.1.0"
