"""Weight-encoding retrieval (AutoLoRA) and hybrid catalog search."""
