"""Caption tokenizers: GPT-2's for hub decoders, or a small byte-level BPE trained once on captions.

A trained tokenizer is saved with `save_pretrained`, so `AutoTokenizer.from_pretrained(dir)` loads it
exactly as the exported captioner's users will. One special token, `<|endoftext|>`, serves as BOS
(the decoder start token), EOS and padding, as in GPT-2: labels mask padding with -100, so sharing
the id does not stop the model from learning to emit EOS.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from advcap.errors import AdvcapError

log = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(captions: Iterable[str], out_dir: str | Path, vocab_size: int = 1000):
    """Train a byte-level BPE tokenizer on `captions` and save it to `out_dir`.

    Returns the loaded `PreTrainedTokenizerFast` (with bos = eos = pad = `<|endoftext|>`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(captions, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )
    from advcap import atomic

    out_dir = atomic.replace_dir(out_dir, lambda folder: tokenizer.save_pretrained(str(folder)))
    log.info("trained a %d-token BPE tokenizer into %s", len(tokenizer), out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(name_or_path: str | Path):
    """Load a tokenizer by hub name or local directory and make sure it can pad and stop.

    GPT-2 ships without a pad token; it gets EOS as pad (labels mask padding anyway).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as err:
        raise AdvcapError(f"cannot load tokenizer {str(name_or_path)!r}: {err}") from None
    if tokenizer.eos_token_id is None:
        raise AdvcapError(f"tokenizer {str(name_or_path)!r} has no EOS token; captions could never end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token_id is None:
        tokenizer.bos_token = tokenizer.eos_token
    return tokenizer


def train_captions(manifest) -> list[str]:
    """Every usable caption of the train split of a shard set (images are not decoded)."""
    from advcap.data.loader import split_metadata

    return [caption for meta in split_metadata(manifest, "train") for caption in meta.captions]
