"""The proxy model: procedural videos, training, sampling, evaluation, MSAD behind the proxy's seam."""
