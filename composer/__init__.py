"""Backbones, the adapter layer, adapter types, file formats and rendering."""
