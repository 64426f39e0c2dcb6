"""Model families: one adapter per family, found by a registry from a state dict's key shapes."""
