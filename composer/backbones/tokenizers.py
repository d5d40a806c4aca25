"""Tokenizers built offline: CLIP BPE from open-clip-torch's shipped vocabulary, a T5-style unigram tokenizer.

No hub access is needed: the CLIP merges come from the gzip file that open-clip-torch ships, and the T5-side
vocabulary is derived from the same word list, so tiny and toy backbones tokenize real text the real way.
"""

from __future__ import annotations

import gzip
import math
from functools import lru_cache
from importlib import resources

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_FULL_MERGES = 49152 - 256 - 2  # the merges open_clip and OpenAI CLIP use (vocab size 49408)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


@lru_cache(maxsize=1)
def _open_clip_merges() -> tuple[str, ...]:
    path = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    with resources.as_file(path) as p, gzip.open(p, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    return tuple(lines[1 : CLIP_FULL_MERGES + 1])  # line 0 is a version header


def clip_vocab_and_merges(num_merges: int = CLIP_FULL_MERGES) -> tuple[dict[str, int], list[str]]:
    """The CLIP BPE vocabulary exactly as OpenAI CLIP builds it, keeping the first `num_merges` merges.

    With the default, token ids equal those of openai/clip-vit-large-patch14.
    """
    if not 0 < num_merges <= CLIP_FULL_MERGES:
        raise ValueError(f"num_merges must be in 1..{CLIP_FULL_MERGES}, got {num_merges}")
    merges = list(_open_clip_merges()[:num_merges])
    chars = list(_bytes_to_unicode().values())
    tokens = (
        chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges] + [CLIP_BOS, CLIP_EOS]
    )
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(num_merges: int = CLIP_FULL_MERGES, max_length: int = 77, pad_token: str = CLIP_EOS):
    """A transformers CLIPTokenizer built from open-clip-torch's BPE file. OpenAI's CLIP pads with its end token;
    SDXL's second tokenizer (OpenCLIP bigG) pads with "!"."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(num_merges)
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token)
    tok.model_max_length = max_length
    return tok


def t5_tokenizer(num_pieces: int = 4000, max_length: int = 256):
    """A T5-style SentencePiece-unigram tokenizer (T5TokenizerFast) made offline with `tokenizers`.

    Pieces are the most frequent whole words of the CLIP BPE list (merge order is frequency order) written
    with SentencePiece's word-start marker, plus every printable ASCII character, so any text encodes.
    """
    from transformers import T5TokenizerFast

    words: list[str] = []
    seen: set[str] = set()
    for merge in _open_clip_merges():
        token = "".join(merge.split(" "))
        if token.endswith("</w>") and token[:-4].isascii() and token[:-4].isalpha():
            piece = "\u2581" + token[:-4]
            if piece not in seen:
                seen.add(piece)
                words.append(piece)
        if len(words) >= num_pieces:
            break
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = [chr(c) for c in range(33, 127)] + ["\u2581"] + ["\u2581" + chr(c) for c in range(97, 123)]
    pieces = [(c, -20.0) for c in chars] + [(w, -math.log(i + 2)) for i, w in enumerate(words)]
    tok = T5TokenizerFast(vocab=specials + pieces, extra_ids=0)
    tok.model_max_length = max_length
    return tok
