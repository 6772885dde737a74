"""Model families, one module each, registered in `genlab.registry.MODELS` (which imports them on first use)."""
