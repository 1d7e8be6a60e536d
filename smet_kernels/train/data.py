"""Training data: token corpora and deterministic, resumable packed batches.

Sources (:func:`load_corpus`):

* ``"stdlib"`` (default): the ``*.py`` files of the Python standard library (``sysconfig`` ``stdlib`` path,
  ``site-packages`` excluded), sorted, byte-level tokens (vocab 256). A file goes to validation when
  ``crc32(relative path) % 10000 < 100 · val_percent`` (hundredths of a percent) — the split depends only on the path.
* a text file: byte-level tokens, the last ``val_percent`` % of the bytes is validation;
* a folder: its text files (recursively, sorted; the suffixes of ``TEXT_SUFFIXES``, the other files left out with a
  warning that names their suffixes), split by path like ``stdlib``; a file with a NUL byte in its
  first 8000 bytes (binary, compressed, UTF-16), given or in a folder, is refused;
* a ``.bin`` file of uint16 tokens: the last ``val_percent`` % is validation; vocab = max token + 1;
* ``hf:NAME[:CONFIG][@REVISION]``: a Hugging Face dataset (needs ``datasets``), text column byte-tokenised. A hub
  dataset is downloaded once and its cached text reused until ``@REVISION`` (a branch, tag or commit) names another:
  pin a commit for the same text on every machine.

Tokenised text corpora are cached as ``.bin`` files (uint8) under ``$SMET_CACHE_DIR`` or
``~/.cache/smet_kernels``, keyed by the files' paths, sizes and mtimes, and memory-mapped. With
``tokenizer="bpe[:VOCAB]"`` a text corpus is re-tokenised by a byte-level BPE trained on its training split
(:mod:`smet_kernels.train.tokenizer`), cached next to the byte streams.

:class:`PackedBatches` cuts a token stream into windows of ``seq_len + 1`` tokens (window ``i`` starts at
``i * seq_len``), visits them in a per-epoch random order drawn from the seed, and splits each global batch
across gradient-accumulation micro-steps and data-parallel ranks. Its position is a small state dict.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sysconfig
import warnings
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from .config import setting

SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}
BINARY_SNIFF_BYTES = 8000  # a NUL byte among a text file's first bytes marks it binary (as git tells them apart)
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".hpp", ".js", ".java", ".go", ".rs", ".sh",
                 ".json", ".jsonl", ".html", ".xml", ".tex", ".csv", ".tsv", ".yaml", ".yml", ".toml", ""}


class DataError(ValueError):
    """The data source cannot be read or is unusable (raised with a one-line message)."""


class DataWarning(UserWarning):
    """The run's data is usable but not all as given: files of a folder left out, evaluation windows repeated
    (``smet-train`` prints it in one line, as its errors)."""


@dataclass
class Corpus:
    """Train and validation token streams (1-D integer arrays, usually memory-mapped)."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    name: str
    token_bytes: np.ndarray | None = None  # text bytes per token id (None: unknown, a token file)

    def bytes_of(self, tokens: np.ndarray) -> int | None:
        """Text bytes the token ids ``tokens`` stand for, or None when unknown."""
        return None if self.token_bytes is None else int(self.token_bytes[np.asarray(tokens, dtype=np.int64)].sum())

    @cached_property
    def sha256(self) -> str:
        """Digest of both token streams (dtype, lengths, tokens): a resume checks that its data is the saved one."""
        digest = hashlib.sha256(f"{self.train.dtype.str}|{len(self.train)}|{len(self.val)}".encode())
        for tokens in (self.train, self.val):
            digest.update(memoryview(np.ascontiguousarray(tokens)))
        return digest.hexdigest()


def cache_dir() -> Path:
    """``$SMET_CACHE_DIR`` (``~`` expanded; set but empty counts as unset, not as the working folder) or
    ``~/.cache/smet_kernels``."""
    return Path(os.environ.get("SMET_CACHE_DIR") or Path.home() / ".cache" / "smet_kernels").expanduser()


def _is_val(relative_path: str, val_percent: float) -> bool:
    return zlib.crc32(os.fsencode(relative_path)) % 10000 < val_percent * 100


def _raise(error: OSError):
    raise error


def _suffix_list() -> str:
    return ", ".join(sorted(suffix or "(none)" for suffix in TEXT_SUFFIXES))


def _list_files(root: Path, suffixes: set[str] | None, lenient: bool = False) -> list[Path]:
    """The files under ``root`` (``suffixes``: of these suffixes only), sorted by path; a folder that cannot be listed
    raises :class:`OSError` unless ``lenient`` (the standard library's), where os.walk left it out unsaid."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=None if lenient else _raise):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if filename.startswith("."):
                continue
            if suffixes is None or path.suffix.lower() in suffixes:
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _cached_split(files: list[Path], root: Path, val_percent: float, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte tokens of ``files`` split by path, written once to the cache and memory-mapped."""
    source = str(root if len(files) > 1 else files[0])
    if all(path.stat().st_size == 0 for path in files):
        raise DataError(f"data {source!r} holds no text: its file(s) are empty")
    key = hashlib.sha256(os.fsencode(f"{tag}|{root}|{val_percent}"))
    _key_files(key, files, root)
    stem = cache_dir() / f"{tag}-{key.hexdigest()[:16]}"
    paths = {split: stem.with_name(f"{stem.name}.{split}.bin") for split in ("train", "val")}
    if not all(p.exists() and p.stat().st_size for p in paths.values()):  # an empty split: written by an older release
        paths["train"].parent.mkdir(parents=True, exist_ok=True)
        chunks: dict[str, list[bytes]] = {"train": [], "val": []}
        for path in files:
            split = "val" if _is_val(path.relative_to(root).as_posix(), val_percent) else "train"
            content = path.read_bytes()
            if tag != "stdlib" and b"\0" in content[:BINARY_SNIFF_BYTES]:  # git's test for a binary file
                raise DataError(f"data file {str(path)!r} is not text (a NUL byte in its first {BINARY_SNIFF_BYTES} "
                                "bytes: binary, compressed or UTF-16): give text files or a uint16 .bin token file")
            chunks[split].append(content)
        if not any(chunks["train"]) or not any(chunks["val"]):
            # no text on one side of a split by path: split the concatenation by position instead
            data = b"\n".join(chunks["train"] + chunks["val"])
            if len(data) < 2:
                raise DataError(f"data {source!r} holds {len(data)} byte of text: too little for a training and a "
                                "validation split")
            cut = _val_cut(len(data), val_percent)
            chunks = {"train": [data[:cut]], "val": [data[cut:]]}
        with written_in_place_of(paths) as tmp:
            for split, written in tmp.items():
                written.write_bytes(b"\n".join(chunks[split]))
    return tuple(np.memmap(paths[s], dtype=np.uint8, mode="r") for s in ("train", "val"))


def _key_files(key, files: list[Path], root: Path) -> None:
    """Add each of ``files`` (path under ``root``, size, mtime) to the cache ``key``: a changed file, another key."""
    for path in files:
        stat = path.stat()
        key.update(os.fsencode(f"{path.relative_to(root).as_posix()}|{stat.st_size}|{stat.st_mtime_ns}\n"))


@contextlib.contextmanager
def written_in_place_of(targets: dict[str, Path]):
    """Temporary files (same keys) to write ``targets`` through: moved onto them when the block ends, removed when it
    raises (a full disk, a dataset refused halfway), where they would stay in the cache, one set per attempt."""
    tmp = {key: target.with_name(f"{target.name}.tmp{os.getpid()}") for key, target in targets.items()}
    try:
        yield tmp
        for key, target in targets.items():
            os.replace(tmp[key], target)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def _val_cut(length: int, val_percent: float) -> int:
    """Where a stream of ``length`` tokens is cut: the last ``val_percent`` % (at least one token) is validation."""
    return max(0, length - max(1, int(length * val_percent / 100)))


def _split_by_position(tokens: np.ndarray, val_percent: float) -> tuple[np.ndarray, np.ndarray]:
    cut = _val_cut(len(tokens), val_percent)
    return tokens[:cut], tokens[cut:]


def _text_column(split, name: str) -> str:
    """``text`` when it holds strings, else the first column that does (any of Arrow's string types)."""
    strings = [column for column, feature in split.features.items()
               if getattr(feature, "dtype", None) in ("string", "large_string", "string_view")]
    if not strings:
        raise DataError(f"Hugging Face dataset {name!r} has no text column (its columns: {split.column_names})")
    return "text" if "text" in strings else strings[0]


def _write_rows(split, column: str, target: Path) -> None:
    """The rows of ``column`` joined by newlines (a missing value as empty text), UTF-8, streamed to ``target``."""
    with target.open("wb") as file:
        for start in range(0, split.num_rows, 4096):  # slices: Dataset.iter is new in datasets 2.8 (pyproject: >= 2)
            text = "\n".join(row or "" for row in split[start:start + 4096][column])
            file.write((text if start == 0 else "\n" + text).encode("utf-8"))


def _load_hf(spec: str, val_percent: float) -> tuple[np.ndarray, np.ndarray]:
    """Byte tokens of a Hugging Face dataset's text column: ``train`` and its ``validation``/``valid``/``test``
    split, or the last ``val_percent`` % of ``train`` when it has none; written once to the cache (streamed, never
    the whole text in memory) and memory-mapped."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"data {spec!r} needs the 'datasets' package (pip install datasets)") from None
    body = spec[len("hf:") :]
    pinned = "@" in body and not Path(body.partition(":")[0]).expanduser().is_dir()  # a folder's '@' is its name's
    body, _, revision = body.rpartition("@") if pinned else (body, "", "")
    if pinned and not (body and revision):
        raise DataError(f"data {spec!r}: 'hf:NAME[:CONFIG]@REVISION' needs a name and a revision on each side of '@'")
    name, _, subset = body.partition(":")
    if not name:  # Path("") is the working folder
        raise DataError(f"data {spec!r}: 'hf:NAME[:CONFIG][@REVISION]' needs a dataset name (a hub name or a folder)")
    local = Path(name).expanduser()
    folder = local.is_dir()
    if folder and (revision or "@" in subset):  # hf:FOLDER:CONFIG@REVISION too
        raise DataError(f"data {spec!r}: a local dataset folder has no revision (its files key the cache)")
    key = hashlib.sha256(os.fsencode(f"hf|{name}|{subset}|{val_percent}"))
    if revision:  # another revision, another entry; the unpinned key is the one releases before pinning wrote
        key.update(f"|{revision}".encode())
    if folder:  # a local dataset folder: edited files make another cache entry, as for a text folder
        _key_files(key, _list_files(local, None), local)
    stem = cache_dir() / f"hf-{key.hexdigest()[:16]}"
    paths = {split: stem.with_name(f"{stem.name}.{split}.bin") for split in ("train", "val")}
    if not all(p.exists() for p in paths.values()):
        try:
            dataset = datasets.load_dataset(name, subset or None, **({"revision": revision} if revision else {}))
        except Exception as error:  # the hub raises many exception types
            at = f" at revision {revision!r}" if revision else ""
            detail = " ".join(str(error).split())  # the hub's HTTP errors span several lines
            raise DataError(f"cannot load Hugging Face dataset {name!r}{at}: {detail}") from None
        if "train" not in dataset:
            raise DataError(f"Hugging Face dataset {name!r} has no 'train' split (its splits: {sorted(dataset)})")
        val_split = next((s for s in ("validation", "valid", "test") if s in dataset), None)
        paths["train"].parent.mkdir(parents=True, exist_ok=True)
        with written_in_place_of(paths) as tmp:
            _write_rows(dataset["train"], _text_column(dataset["train"], name), tmp["train"])
            if val_split is not None:
                _write_rows(dataset[val_split], _text_column(dataset[val_split], name), tmp["val"])
            else:  # the tail of the training text
                with tmp["train"].open("r+b") as train:
                    cut = _val_cut(tmp["train"].stat().st_size, val_percent)
                    train.seek(cut)
                    tmp["val"].write_bytes(train.read())
                    train.truncate(cut)
    train, val = (np.memmap(paths[s], dtype=np.uint8, mode="r") if paths[s].stat().st_size else
                  np.zeros(0, dtype=np.uint8) for s in ("train", "val"))
    if not (len(train) and len(val)):
        raise DataError(f"Hugging Face dataset {name!r} holds {len(train)} byte(s) of training and {len(val)} of "
                        "validation text: both splits need text")
    return train, val


def load_corpus(data: str = "stdlib", val_percent: float = 2.0, tokenizer: str = "byte") -> Corpus:
    """Token streams for ``data`` under ``tokenizer`` (``byte`` or ``bpe[:VOCAB]``, see the module docstring);
    raises :class:`DataError` when unreadable."""
    from .tokenizer import TokenizerError, bpe_streams, parse_tokenizer

    try:
        spec = parse_tokenizer(tokenizer)
    except TokenizerError as error:
        raise DataError(str(error)) from None
    if not isinstance(data, str) or not data:
        raise DataError(f"data must be 'stdlib', a path or 'hf:NAME[:CONFIG][@REVISION]', got {data!r}")
    if not (0.0 < val_percent < 100.0):
        raise DataError(f"val_percent must be in (0, 100), got {val_percent}")
    try:
        if data == "stdlib":
            root = Path(sysconfig.get_paths()["stdlib"])
            files = _list_files(root, {".py"}, lenient=True)
            if not files:
                raise DataError(f"no .py files found in the standard library at {root}")
            train, val = _cached_split(files, root, val_percent, "stdlib")
            vocab = 256
        elif data.startswith("hf:"):
            train, val = _load_hf(data, val_percent)
            vocab = 256
        else:
            path = Path(data).expanduser().resolve()  # relative and symlinked folders: file paths under the root
            if not path.exists():
                raise DataError(f"data path {data!r} does not exist (use 'stdlib', a file, a folder or 'hf:NAME')")
            if path.is_dir():
                listed = _list_files(path, None)
                files = [file for file in listed if file.suffix.lower() in TEXT_SUFFIXES]
                left_out = sorted({file.suffix.lower() for file in listed} - TEXT_SUFFIXES)
                if not files:
                    raise DataError(f"data folder {data!r} holds no text files" + (
                        f" (only {', '.join(left_out)}: give such a file itself as data)" if left_out else ""))
                if left_out:
                    warnings.warn(f"data folder {data!r}: {len(listed) - len(files)} file(s) of suffix "
                                  f"{', '.join(left_out)} left out (text suffixes: {_suffix_list()})", DataWarning,
                                  stacklevel=2)
                train, val = _cached_split(files, path, val_percent, "dir")
                vocab = 256
            elif path.suffix.lower() == ".bin":  # TOKENS.BIN too: read as bytes, its uint16 tokens were text
                if path.stat().st_size == 0 or path.stat().st_size % 2 != 0:
                    raise DataError(f"data file {data!r} is not a uint16 token file (empty or odd byte count)")
                tokens = np.memmap(path, dtype=np.uint16, mode="r")
                train, val = _split_by_position(tokens, val_percent)
                vocab = int(tokens.max()) + 1
                if vocab < 2:
                    raise DataError(f"data file {data!r} holds only the token 0: a model needs at least 2 token ids")
            else:
                train, val = _cached_split([path], path.parent, val_percent, "file")
                vocab = 256
    except OSError as error:
        raise DataError(f"cannot read data {data!r} or write its cache in {str(cache_dir())!r}: "
                        f"{error.strerror or error}") from None
    if train.dtype != np.uint8:  # a token file: its tokens are given
        if spec.kind != "byte":
            raise DataError(f"data {data!r} is a token file: tokenizer {tokenizer!r} needs text (use 'byte')")
        return Corpus(train=train, val=val, vocab_size=vocab, name=data)
    if spec.kind == "bpe":
        stem = Path(str(train.filename)[: -len(".train.bin")])
        try:
            train, val, token_bytes = bpe_streams(train, val, stem, spec.vocab_size)
        except OSError as error:  # its cache write (a full disk)
            raise DataError(f"cannot cache the {spec.name} tokens of {data!r}: {error.strerror or error}") from None
        return Corpus(train=train, val=val, vocab_size=len(token_bytes), name=data, token_bytes=token_bytes)
    return Corpus(train=train, val=val, vocab_size=vocab, name=data, token_bytes=np.ones(256, dtype=np.int64))


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
    """How many ``seq_len + 1`` windows starting at multiples of ``seq_len`` fit in ``tokens``."""
    return max(0, (len(tokens) - 1) // seq_len)


def window_batch(tokens: np.ndarray, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``[len(starts), seq_len]`` (int64) of the windows at window indices ``starts``."""
    rows = [np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64) for i in starts.tolist()]
    batch = torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, seq_len + 1, dtype=torch.int64)
    return batch[:, :-1], batch[:, 1:]


class PackedBatches:
    """Global batches of ``batch_size`` windows in a seeded per-epoch order; resumable via ``state_dict``.

    :meth:`next_global` returns the window indices of the next global batch; :meth:`shard` picks the ones
    for micro-step ``micro`` of rank ``rank`` (global batch viewed as ``[grad_accum, world_size, micro_batch]``).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.num_windows = num_windows(tokens, seq_len)
        if self.num_windows < batch_size:
            raise DataError(
                f"training data holds {self.num_windows} windows of {setting('seq_len')} {seq_len} + 1 tokens, "
                f"fewer than {setting('batch_size')} {batch_size}"
            )
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(self.num_windows, generator=generator)
        return self._order

    def next_global(self) -> torch.Tensor:
        """Window indices ``[batch_size]`` of the next global batch (an epoch's tail is skipped)."""
        if self.position + self.batch_size > self.num_windows:
            self.epoch += 1
            self.position = 0
            self._order = None
        indices = self._epoch_order()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    @staticmethod
    def shard(indices: torch.Tensor, micro: int, grad_accum: int, rank: int, world_size: int) -> torch.Tensor:
        return indices.view(grad_accum, world_size, -1)[micro, rank]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return window_batch(self.tokens, indices, self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.seed = int(state["seed"])
        self._order = None


def eval_windows(tokens: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """``count`` window indices spread evenly over a validation stream (the same every evaluation)."""
    available = num_windows(tokens, seq_len)
    if available == 0:
        raise DataError(f"validation data is shorter than {setting('seq_len')} {seq_len} + 1 tokens")
    # float32 as earlier releases (the same windows on resume), float64 past 2**24, where float32 left the stream
    dtype = torch.float64 if available - 1 > 2**24 else torch.float32
    return (torch.linspace(0, available - 1, count, dtype=dtype).round().long() if count > 1
            else torch.zeros(1, dtype=torch.long))
