"""``--tokenizer byte|bpe[:VOCAB]``: a deterministic byte-level BPE trained on the training split, cached with the
tokens, and validation in bits per byte so that byte and BPE runs compare."""

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch

from smet_kernels.train import cli, tokenizer as tokenizer_module
from smet_kernels.train.data import DataError, load_corpus
from smet_kernels.train.tokenizer import (
    DEFAULT_BPE_VOCAB,
    TokenizerError,
    encode,
    parse_tokenizer,
    token_byte_lengths,
    train_bpe,
)
from smet_kernels.train.trainer import ConfigError, TrainConfig, train
from test_train_trainer import cache_dir  # noqa: F401 -- autouse: the shared token cache


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A small text corpus: the standard library's json package (about 100 kB, split by path)."""
    folder = tmp_path_factory.mktemp("corpus")
    for path in sorted((Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py")):
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_tokenizer_specs_parse_with_one_line_errors():
    assert parse_tokenizer("byte").vocab_size == 256
    assert parse_tokenizer("bpe").vocab_size == DEFAULT_BPE_VOCAB == 32000
    assert parse_tokenizer("bpe:512").vocab_size == 512 and parse_tokenizer("bpe:512").name == "bpe512"
    assert parse_tokenizer("bpe:257").vocab_size == 257 and parse_tokenizer(f"bpe:{1 << 20}").vocab_size == 1 << 20
    for bad, message in (("wordpiece", "must be 'byte' or 'bpe"), ("byte:300", "must be 'byte' or 'bpe"),
                         (None, "must be 'byte' or 'bpe"),
                         ("bpe:x", "must be an integer"), ("bpe:256", "must be in [257"),
                         (f"bpe:{(1 << 20) + 1}", "must be in [257")):
        with pytest.raises(TokenizerError, match=message.replace("[", r"\[")):
            parse_tokenizer(bad)
    with pytest.raises(ConfigError, match="must be 'byte' or 'bpe"):
        TrainConfig(tokenizer="sentencepiece").validate()


def test_bpe_is_deterministic_and_accounts_for_every_byte():
    text = "".join(f"def function_{i}(value):\n    return value * {i} + 'caf\u00e9'\n" for i in range(300)).encode()
    data = np.frombuffer(text, dtype=np.uint8)
    first, second = train_bpe(data, 300), train_bpe(data, 300)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 300
    ids = encode(first, data)
    assert ids.dtype == np.uint16 and len(ids) < len(text) / 2
    assert first.decode(ids.tolist()) == text.decode()
    assert int(token_byte_lengths(first)[ids.astype(np.int64)].sum()) == len(text)


def test_bpe_corpus_is_trained_on_the_training_split_and_cached(corpus_dir, monkeypatch):
    byte_corpus = load_corpus(str(corpus_dir))
    corpus = load_corpus(str(corpus_dir), tokenizer="bpe:320")
    assert corpus.vocab_size == 320 and corpus.train.dtype == np.uint16
    assert int(corpus.train.max()) < 320 and len(corpus.train) < 0.7 * len(byte_corpus.train)
    assert corpus.bytes_of(corpus.train) == len(byte_corpus.train)
    assert corpus.bytes_of(corpus.val) == len(byte_corpus.val)
    # the tokenizer saw only the training split: training it on those bytes gives the same merges
    trained = train_bpe(byte_corpus.train, 320)
    assert np.array_equal(encode(trained, byte_corpus.val), np.asarray(corpus.val))

    def no_training(*args):
        raise AssertionError("the cached tokenizer and tokens should be reused")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    again = load_corpus(str(corpus_dir), tokenizer="bpe:320")
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)


def test_a_token_file_refuses_bpe(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    assert load_corpus(str(path)).token_bytes is None
    with pytest.raises(DataError, match="is a token file"):
        load_corpus(str(path), tokenizer="bpe:300")


def test_a_token_file_named_in_capitals_is_read_as_uint16_tokens_not_as_text(tmp_path):
    path = tmp_path / "TOKENS.BIN"
    np.arange(300, 1300, dtype=np.uint16).tofile(path)  # was read as text: refused for its NUL bytes, or trained on
    corpus = load_corpus(str(path))
    assert corpus.vocab_size == 1300 and corpus.train.dtype == np.uint16 and len(corpus.train) + len(corpus.val) == 1000


@pytest.mark.parametrize("tokenizer, message", [
    ("bpe:x", "tokenizer vocab must be an integer, got 'bpe:x'"),
    ("bpe:256", f"tokenizer vocab must be in [257, {1 << 20}], got 256"),
    ("wordpiece", "tokenizer must be 'byte' or 'bpe[:VOCAB]', got 'wordpiece'"),
])
def test_a_bad_tokenizer_given_to_load_corpus_is_a_one_line_data_error_before_the_data_is_read(tokenizer, message,
                                                                                               tmp_path):
    with pytest.raises(DataError) as raised:
        load_corpus(str(tmp_path / "missing.txt"), tokenizer=tokenizer)  # the missing file is not reached
    assert str(raised.value) == message and raised.value.__suppress_context__  # no TokenizerError chained


def test_byte_and_bpe_runs_report_bits_per_byte(corpus_dir, tmp_path):
    summaries, records = {}, {}
    for spec in ("byte", "bpe:320"):
        out = tmp_path / spec.replace(":", "-")
        summaries[spec] = train(TrainConfig(model="tiny", optimizer="adamw", data=str(corpus_dir), tokenizer=spec,
                                            batch_size=4, seq_len=32, max_steps=4, eval_every=2, eval_batches=2,
                                            backend="reference", progress=False, out_dir=str(out)))
        records[spec] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    byte, bpe = summaries["byte"], summaries["bpe:320"]
    assert byte["vocab_size"] == 256 and bpe["vocab_size"] == 320
    assert byte["final_val_bpb"] == pytest.approx(byte["final_val_loss"] / math.log(2))
    # bpb = loss · tokens / (ln 2 · bytes), tokens and bytes of the evaluated targets
    corpus = load_corpus(str(corpus_dir), tokenizer="bpe:320")
    from smet_kernels.train.data import eval_windows, window_batch

    targets = window_batch(corpus.val, eval_windows(corpus.val, 32, 8), 32)[1].numpy()
    expected = bpe["final_val_loss"] * targets.size / (math.log(2) * corpus.bytes_of(targets))
    assert bpe["final_val_bpb"] == pytest.approx(expected, rel=1e-9)
    assert all("val_bpb" in r for r in records["bpe:320"] if "val_loss" in r)
    assert torch.isfinite(torch.tensor(bpe["final_val_bpb"]))


def test_the_tokenizer_option_is_explained_and_fixed_on_resume(corpus_dir, tmp_path, capsys):
    help_text = " ".join(cli.build_parser().format_help().split())
    assert "--tokenizer TOKENIZER byte" in help_text and "(default: byte)" in help_text
    assert "VOCAB default 32000" in help_text
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--tokenizer", "bpe:12", "--no-progress", "--out-dir", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("smet-train: error: --tokenizer vocab")
    out = tmp_path / "run"
    cli.main(["--config", "tiny", "--optimizer", "adamw", "--data", str(corpus_dir), "--batch-size", "2",
              "--seq-len", "16", "--max-steps", "2", "--eval-every", "0", "--checkpoint-every", "2",
              "--backend", "reference", "--no-progress", "--out-dir", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--resume", str(out), "--tokenizer", "bpe:300", "--max-steps", "4", "--no-progress"])
    assert exit_info.value.code == 2
    assert "cannot change --tokenizer" in capsys.readouterr().err


def test_a_bpe_cache_write_that_fails_on_a_full_disk_is_a_data_error_and_leaves_no_temporary_file(
        corpus_dir, tmp_path, monkeypatch):
    """The BPE token streams are cached like the byte streams, but their write was outside load_corpus' OSError
    handling and cleanup: a full disk stopped the run with an OSError traceback (not the one-line DataError of a
    byte stream) and left the partial temporary file in the cache, one more on every attempt."""
    import errno

    monkeypatch.setenv("SMET_CACHE_DIR", str(tmp_path / "cache"))
    load_corpus(str(corpus_dir))  # the byte streams, cached
    cached = sorted(path.name for path in (tmp_path / "cache").iterdir())
    real_encode = tokenizer_module.encode

    class FillsTheDisk(np.ndarray):
        def tofile(self, path):
            np.asarray(self)[: len(self) // 2].tofile(path)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokenizer_module, "encode", lambda *args: real_encode(*args).view(FillsTheDisk))
    with pytest.raises(DataError, match="No space left on device"):
        load_corpus(str(corpus_dir), tokenizer="bpe:300")
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == cached


def test_text_is_cut_into_chunks_after_the_first_newline_past_the_chunk_size_and_decoded_with_replacement(
        monkeypatch):
    monkeypatch.setattr(tokenizer_module, "CHUNK_BYTES", 4)
    data = np.frombuffer(b"ab\ncdefg\nh\xffi\nj", dtype=np.uint8)
    assert tokenizer_module.text_chunks(data) == ["ab\ncdefg\n", "h\ufffdi\nj"]


def test_token_ids_are_uint16_up_to_a_vocabulary_of_65536():
    assert [tokenizer_module.token_dtype(size) for size in (1 << 16, (1 << 16) + 1)] == [np.uint16, np.uint32]


def test_each_bpe_vocabulary_and_tokenizers_release_has_its_own_cache_entry_and_a_partial_entry_is_rebuilt(
        corpus_dir, monkeypatch):
    """The BPE cache key holds the vocabulary and the tokenizers release; an entry missing one of its files (a crash
    between the renames) is trained again, not read."""
    assert [load_corpus(str(corpus_dir), tokenizer=f"bpe:{vocab}").vocab_size for vocab in (300, 310)] == [300, 310]
    trainings = []
    real_train_bpe = tokenizer_module.train_bpe
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *args: trainings.append(args) or real_train_bpe(*args))
    monkeypatch.setattr(tokenizers, "__version__", "0.0.0-other")
    first = load_corpus(str(corpus_dir), tokenizer="bpe:300")
    assert len(trainings) == 1
    (val_tokens,) = Path(first.train.filename).parent.glob("*.bpe300-0.0.0-other.val.bin")
    val_tokens.unlink()
    assert np.array_equal(load_corpus(str(corpus_dir), tokenizer="bpe:300").val, first.val) and len(trainings) == 2


def test_a_resume_may_name_the_saved_tokenizer_another_way_as_bpe_and_bpe_32000_are_one(tmp_path):
    """``bpe`` and ``bpe:32000`` share one cache entry and give the same tokens: a resume was refused."""
    from smet_kernels.train.checkpoint import fixed_values, refuse_fixed_changes

    (tmp_path / "config.json").write_text(json.dumps(TrainConfig(tokenizer="bpe").to_dict()))
    refuse_fixed_changes(tmp_path, fixed_values(TrainConfig(tokenizer=f"bpe:{DEFAULT_BPE_VOCAB}")))
    with pytest.raises(ConfigError, match=r"^cannot change tokenizer when resuming .*\(saved: tokenizer 'bpe'\)"):
        refuse_fixed_changes(tmp_path, fixed_values(TrainConfig(tokenizer="bpe:300")))


def test_an_empty_cache_dir_variable_is_the_default_cache_and_a_tilde_in_it_is_the_home_folder(monkeypatch,
                                                                                                tmp_path):
    """``SMET_CACHE_DIR=`` wrote the token cache into the working folder, ``SMET_CACHE_DIR='~/c'`` into ``./~/c``."""
    from smet_kernels.train import data

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SMET_CACHE_DIR", "")
    assert data.cache_dir() == tmp_path / ".cache" / "smet_kernels"
    monkeypatch.setenv("SMET_CACHE_DIR", "~/tokens")
    assert data.cache_dir() == tmp_path / "tokens"


def test_bpe_on_validation_text_that_is_not_utf8_warns_that_bits_per_byte_overcount_its_bytes(tmp_path):
    """Each invalid byte reads as U+FFFD, 3 bytes in the token byte counts: val_bpb came out about a quarter low on
    Latin-1 text, without a word."""
    path = tmp_path / "latin1.txt"
    path.write_bytes("".join(f"caf\u00e9 cr\u00e8me num\u00e9ro {i}\n" for i in range(2000)).encode("latin-1"))
    with pytest.warns(RuntimeWarning, match="not valid UTF-8: under a BPE tokenizer each invalid byte"):
        corpus = load_corpus(str(path), tokenizer="bpe:300")
    assert corpus.bytes_of(corpus.val) > len(load_corpus(str(path)).val)  # what the warning is about
