"""Backbones: one file per model family (sdxl, flux)."""
