"""The QuantSparse checkpoint: its format and validation, the converter, what a foreign file is."""
