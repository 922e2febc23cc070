"""Token batches from a text file (or random ids), for calibrating routing rewrites and measuring routing statistics
from the command line.

Place in the pipeline: input preparation for the CLI (`moecompile convert --calibration`, `moecompile stats --text`)
and for checkpoint conversion. With a tokenizer saved beside the model (tokenizer.json / tokenizer_config.json) the
text is tokenized with it; without one, each byte of the file is a token id (modulo the vocabulary), which is what a
byte-level model expects and still gives a router realistic, non-uniform inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import MoECompileError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def check_text_file(text: str | Path, flag: str = "--calibration") -> Path:
    path = Path(text)
    if path.is_dir():
        raise MoECompileError(f"{text}: a folder, not a text file; pass {flag} FILE, one text file (concatenate "
                              "several with cat)")
    if not path.is_file():
        raise MoECompileError(f"{text}: no such text file; pass {flag} FILE with some text in the model's language")
    return path


def text_token_ids(text: str | Path, vocab_size: int, tokenizer_dir: str | Path | None = None
                   ) -> tuple[torch.Tensor, str]:
    """The file's token ids [N] and how they were made (for the log)."""
    path = check_text_file(text)
    if tokenizer_dir is not None and any((Path(tokenizer_dir) / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except Exception as exc:  # noqa: BLE001 - any tokenizer failure is the checkpoint's, say which
            raise MoECompileError(f"{tokenizer_dir}: its tokenizer files could not be loaded ({type(exc).__name__}: "
                                  f"{exc}); fix or remove them (without a tokenizer the text's bytes are the ids)"
                                  ) from None
        ids = torch.tensor(tokenizer(path.read_text(errors="replace"))["input_ids"], dtype=torch.long)
        if ids.numel() and int(ids.max()) >= vocab_size:
            raise MoECompileError(f"{tokenizer_dir}: the tokenizer gives id {int(ids.max())} but the model's "
                                  f"vocabulary has {vocab_size} entries; the tokenizer does not belong to the model")
        return ids, f"{path.name} tokenized with the checkpoint's tokenizer"
    return torch.tensor(list(path.read_bytes()), dtype=torch.long) % vocab_size, f"bytes of {path.name}"


def text_batches(text: str | Path, vocab_size: int, seq_len: int, count: int,
                 tokenizer_dir: str | Path | None = None) -> tuple[list[dict], str]:
    """Up to `count` batches {"input_ids": [1, seq_len]} of consecutive tokens from the file (at least one)."""
    if seq_len < 1 or count < 1:
        raise MoECompileError(f"sequence length and batch count must be >= 1, got {seq_len} and {count}")
    ids, source = text_token_ids(text, vocab_size, tokenizer_dir)
    available = ids.numel() // seq_len
    if available == 0:
        raise MoECompileError(f"{text}: {ids.numel()} tokens, fewer than one sequence of {seq_len}; pass a longer "
                              "file or a shorter sequence length")
    return [{"input_ids": ids[i * seq_len:(i + 1) * seq_len][None]} for i in range(min(count, available))], source


def random_batches(vocab_size: int, seq_len: int, count: int, seed: int = 0) -> tuple[list[dict], str]:
    gen = torch.Generator().manual_seed(seed)
    return ([{"input_ids": torch.randint(0, vocab_size, (1, seq_len), generator=gen)} for _ in range(count)],
            f"random token ids (seed {seed})")


def vocab_size_of(config: Any) -> int:
    """config.vocab_size, or that of its text sub-config (multimodal models)."""
    for cfg in (config, getattr(config, "text_config", None)):
        vocab = getattr(cfg, "vocab_size", None)
        if isinstance(vocab, int):
            return vocab
    raise MoECompileError(f"{type(config).__name__} has no vocab_size; calibration from text needs a language model "
                          "(an HF causal LM)")
