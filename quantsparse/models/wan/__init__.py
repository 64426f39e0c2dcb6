"""Wan 2.1 / 2.2: dimensions and tensor names (``dims``), quantized layers (``layers``), the adapter."""
