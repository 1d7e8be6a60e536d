"""Tokenizers of the training text: ``byte`` (each byte a token, vocab 256) or ``bpe[:VOCAB]``, a byte-level BPE
(Hugging Face ``tokenizers``, GPT-2 style: bytes mapped to printable characters, no unknown token) trained on the
training split only, ``VOCAB`` tokens (default 32000, the vocabulary of the GaLore and SMET papers' LLaMA runs).

The text is decoded as UTF-8 (an invalid byte becomes U+FFFD, 3 bytes: a warning says that bpb then overcounts the
bytes) and cut into chunks of about 1 MiB at line ends,
in order, for training and encoding; training is deterministic (same text and vocab -> same merges). The trained
tokenizer (``tokenizer.json``) and the token streams are cached next to the byte cache they come from.

``token_bytes[id]`` is the number of text bytes token ``id`` stands for (1 for ``byte``), so that a loss in nats
per token converts to bits per byte: ``bpb = loss · tokens / (ln 2 · bytes)``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_BPE_VOCAB = 32000
MIN_BPE_VOCAB = 257  # the 256 byte symbols and at least one merge
CHUNK_BYTES = 1 << 20


class TokenizerError(ValueError):
    """A bad ``--tokenizer`` value (raised with a one-line message)."""


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str  # "byte" or "bpe"
    vocab_size: int

    @property
    def name(self) -> str:
        return "byte" if self.kind == "byte" else f"bpe{self.vocab_size}"


def parse_tokenizer(spec: str, name: str = "tokenizer") -> TokenizerSpec:
    """``"byte"`` -> byte tokens; ``"bpe"`` or ``"bpe:VOCAB"`` -> byte-level BPE of ``VOCAB`` (>= 257) tokens; errors
    name the setting ``name``."""
    if not isinstance(spec, str):
        raise TokenizerError(f"{name} must be 'byte' or 'bpe[:VOCAB]', got {spec!r}")
    if spec == "byte":
        return TokenizerSpec("byte", 256)
    kind, _, vocab = spec.partition(":")
    if kind != "bpe":
        raise TokenizerError(f"{name} must be 'byte' or 'bpe[:VOCAB]', got {spec!r}")
    if not vocab:
        return TokenizerSpec("bpe", DEFAULT_BPE_VOCAB)
    try:
        size = int(vocab)
    except ValueError:
        raise TokenizerError(f"{name} vocab must be an integer, got {spec!r}") from None
    if not MIN_BPE_VOCAB <= size <= 1 << 20:
        raise TokenizerError(f"{name} vocab must be in [{MIN_BPE_VOCAB}, {1 << 20}], got {size}")
    return TokenizerSpec("bpe", size)


def text_chunks(data: np.ndarray) -> list[str]:
    """The bytes ``data`` as UTF-8 text in chunks of about :data:`CHUNK_BYTES`, cut after a newline."""
    raw = bytes(np.asarray(data, dtype=np.uint8))
    chunks, start = [], 0
    while start < len(raw):
        end = raw.find(b"\n", start + CHUNK_BYTES)
        end = len(raw) if end < 0 else end + 1
        chunks.append(raw[start:end].decode("utf-8", errors="replace"))
        start = end
    return chunks


def _is_utf8(data: np.ndarray) -> bool:
    try:
        bytes(np.asarray(data, dtype=np.uint8)).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def train_bpe(train_bytes: np.ndarray, vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` tokens trained on ``train_bytes``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(text_chunks(train_bytes), trainer=trainer)
    return tokenizer


def token_dtype(vocab_size: int) -> type:
    """The dtype of token ids: uint16 when the vocabulary fits (ids below 65536), else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def encode(tokenizer, data: np.ndarray) -> np.ndarray:
    """Token ids of the bytes ``data`` (:func:`token_dtype`)."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    ids = [np.asarray(e.ids, dtype=dtype) for e in tokenizer.encode_batch(text_chunks(data), add_special_tokens=False)]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=dtype)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """Bytes per token id: a byte-level token's string has one character per byte."""
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, index in tokenizer.get_vocab().items():
        lengths[index] = len(token)
    return lengths


def bpe_streams(train: np.ndarray, val: np.ndarray, cache_stem: Path, vocab_size: int):
    """``(train_tokens, val_tokens, token_bytes)`` of the byte streams ``train``/``val`` under a BPE trained on
    ``train``; the tokenizer and both token streams are cached as ``{cache_stem}.bpe{vocab}-{version}.*``."""
    import tokenizers
    from tokenizers import Tokenizer

    from .data import written_in_place_of

    stem = cache_stem.with_name(f"{cache_stem.name}.bpe{vocab_size}-{tokenizers.__version__}")
    paths = {name: stem.with_name(f"{stem.name}.{name}") for name in ("tokenizer.json", "train.bin", "val.bin")}
    if not all(p.exists() for p in paths.values()):
        tokenizer = train_bpe(train, vocab_size)
        streams = {"train.bin": encode(tokenizer, train), "val.bin": encode(tokenizer, val)}
        with written_in_place_of(paths) as tmp:  # a failed write (a full disk) leaves no temporary file
            for name in ("train.bin", "val.bin"):
                streams[name].tofile(tmp[name])
            tokenizer.save(str(tmp["tokenizer.json"]))
    tokenizer = Tokenizer.from_file(str(paths["tokenizer.json"]))
    dtype = token_dtype(tokenizer.get_vocab_size())
    if not _is_utf8(val):
        warnings.warn("the validation text is not valid UTF-8: under a BPE tokenizer each invalid byte reads as "
                      "U+FFFD (3 bytes), so val_bpb divides by more bytes than the text holds (the byte tokenizer "
                      "counts them exactly)", RuntimeWarning, stacklevel=2)  # fmt: skip

    def load(name):
        path = paths[name]
        return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)

    return load("train.bin"), load("val.bin"), token_byte_lengths(tokenizer)
