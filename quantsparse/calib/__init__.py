"""MSAD calibration: settings, activation store, capture, losses, one block, the whole model, export, provenance."""
