"""HunyuanVideo: everything model-specific (key names, which Linears, dimensions) lives here."""
