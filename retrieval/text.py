"""The text side of LoRA retrieval: a prompt or a description as features of the base model's own CLIP text
encoders (frozen), which a small trained head (`retrieval.model.TextHead`) maps into the weight encoder's space.

Features: for each CLIP text encoder of the pipeline (SDXL: CLIP-L and bigG; FLUX: its CLIP; T5 is left out),
the mean of its last hidden states over the prompt's own tokens (start, end and padding excluded), and its
pooled state (the end token's, as CLIP pools); concatenated. A mean over tokens keeps words additive, so "red star" lies between "red" and
"star" as the head sees them: descriptions never seen in training still land near their parts.
"""

from __future__ import annotations

import torch

MAX_TOKENS = 77


def text_encoders(pipe) -> list[tuple[object, object]]:
    """(tokenizer, CLIP text model) pairs of a pipeline, in its order."""
    pairs = []
    for suffix in ("", "_2", "_3"):
        tokenizer = getattr(pipe, f"tokenizer{suffix}", None)
        model = getattr(pipe, f"text_encoder{suffix}", None)
        if tokenizer is not None and model is not None and "CLIP" in type(model).__name__:
            pairs.append((tokenizer, model))
    if not pairs:
        raise ValueError("the pipeline has no CLIP text encoder to read prompts with")
    return pairs


def feature_width(pipe) -> int:
    return sum(2 * model.config.hidden_size for _, model in text_encoders(pipe))


@torch.no_grad()
def text_features(pipe, texts: list[str]) -> torch.Tensor:
    """(len(texts), feature_width) float32 features of the texts (frozen encoders; no gradient)."""
    if not texts:
        raise ValueError("no text to encode")
    parts = []
    for tokenizer, model in text_encoders(pipe):
        tokens = tokenizer(
            list(texts), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        )
        ids = tokens.input_ids.to(model.device)
        mask = tokens.attention_mask.to(model.device).float()
        hidden = model(ids, output_hidden_states=True).hidden_states[-1].float()
        own = mask.clone()
        own[:, 0] = 0  # the start token
        ends = mask.sum(dim=1).long() - 1
        own[torch.arange(len(texts)), ends.clamp_min(0)] = 0  # the end token
        own = own.clamp_min(0)
        counts = own.sum(dim=1, keepdim=True)
        mean = (hidden * own[..., None]).sum(dim=1) / counts.clamp_min(1)
        # a text with no word of its own (empty) reads as its end token's state
        mean = torch.where(counts > 0, mean, hidden[torch.arange(len(texts)), ends])
        pooled = hidden[torch.arange(len(texts)), ends]  # CLIP's pooled state: the end token's
        parts += [mean, pooled]
    return torch.cat(parts, dim=1).cpu()
