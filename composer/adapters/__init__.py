"""The adapter layer: wrapped modules holding many resident adapters, and adapter types."""
