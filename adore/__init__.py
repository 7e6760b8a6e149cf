"""ADORE: adaptive token release for a fixed-size KV cache (see ../shared/ADORE.md)."""

__version__ = "0.1.0"
