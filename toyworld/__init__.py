"""Toy world: procedural scenes, the ground-truth evaluator, the bundled toy model."""
