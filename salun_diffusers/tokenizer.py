"""A small CLIP-style BPE tokenizer built from a word list (no download; the same class SD uses).

The vocabulary holds every byte-level character (alone and word-final), the two CLIP special tokens, and a chain of
merges for each listed word, so listed words become single tokens and any other text still tokenizes (character
by character). Saved with ``save_pretrained`` it loads with ``CLIPTokenizer.from_pretrained`` like SD's ``tokenizer/``.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, List

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode():
    """GPT-2/CLIP byte -> printable unicode map (byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_word_tokenizer(words: Iterable[str], save_directory: str, model_max_length: int = 77) -> CLIPTokenizer:
    """Write a CLIP tokenizer (vocab.json, merges.txt, configs) making each of ``words`` one token; load it back."""
    alphabet = list(_bytes_to_unicode().values())
    vocab = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges: List[str] = []
    seen = set()
    for word in sorted({w.lower() for w in words if w}):
        chars = [_bytes_to_unicode()[b] for b in word.encode("utf-8")]
        chars[-1] += "</w>"
        left = chars[0]
        for right in chars[1:]:
            pair = f"{left} {right}"
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    os.makedirs(save_directory, exist_ok=True)
    with open(os.path.join(save_directory, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(save_directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"model_max_length": model_max_length, "bos_token": BOS, "eos_token": EOS, "unk_token": EOS,
              "pad_token": EOS, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    with open(os.path.join(save_directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(save_directory, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, f, indent=2)
    return CLIPTokenizer.from_pretrained(save_directory)
