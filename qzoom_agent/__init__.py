"""qzoom-agent: Q-Zoom query-aware adaptive perception for Hugging Face VLMs."""

__version__ = "0.1.0"
