"""Seams: the mechanisms composition methods plug into, shared by several of them and by no backbone family.

`streams`: one denoiser call run once per stream (each its own active adapters) in one batched forward, the
predictions blended by per-pixel weights. `attention`: capture of cross-attention maps while the denoiser runs
(the family-specific processors come from the backbone, `Backbone.attention_capture`).
"""
