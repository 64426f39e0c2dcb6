"""Sparse attention and SSAR: settings, masks, the masked kernel call, the residual cache, the per-run attention call."""
