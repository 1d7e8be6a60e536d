"""LLaMA model and data pipeline of the reference trainer (its loss-spike diagnostics: test_train_spikes.py)."""

import math
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

from smet_kernels.train import data as data_module
from smet_kernels.train.data import DataError, PackedBatches, eval_windows, load_corpus, window_batch
from smet_kernels.train.model import (
    DecoderLayer,
    LlamaModel,
    RMSNorm,
    SwiGLU,
    apply_rope,
    lm_loss,
    model_config,
    rope_tables,
)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.getbasetemp() / "smet_cache"
    monkeypatch.setenv("SMET_CACHE_DIR", str(path))
    return path


# ------------------------------------------------------------------------------------------------ model
def test_model_configs_round_intermediate_to_128():
    assert model_config("1b", block_size=128).intermediate_size == 5504
    assert model_config("350m", block_size=32).intermediate_size == 2816
    assert model_config("20m", block_size=16).intermediate_size == 688
    assert model_config("20m", block_size=32).intermediate_size == 768
    assert model_config("7b").intermediate_size == 11008
    with pytest.raises(ValueError, match="config"):
        model_config("3b")
    with pytest.raises(ValueError, match="block_size"):
        model_config("tiny", block_size=128)


def test_model_is_causal_and_learns_shapes():
    torch.manual_seed(0)
    model = LlamaModel(model_config("tiny", max_seq_len=16))
    tokens = torch.randint(0, 256, (2, 16))
    logits = model(tokens)
    assert logits.shape == (2, 16, 256)
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])
    loss = lm_loss(logits, tokens)
    assert abs(loss.item() - np.log(256)) < 0.2  # small init: near-uniform predictions
    names = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_rmsnorm_divides_by_the_root_mean_square_plus_eps_under_the_root_and_scales_by_its_weight():
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8, generator=gen))
    x = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    x[2] *= 1e-4  # mean(x²) ~ 1e-8, below eps: where eps goes matters
    expected = torch.stack([
        row / math.sqrt(sum(v * v for v in row.tolist()) / 8 + 1e-6) for row in x
    ]) * norm.weight.detach().double()
    torch.testing.assert_close(norm(x.float()).double(), expected, rtol=1e-5, atol=1e-7)


def test_rope_rotates_each_pair_of_halves_by_position_times_its_frequency():
    """LLaMA's rotate-half RoPE: dims (i, i + d/2) turn by angle t · θ^(-2i/d), counter-clockwise."""
    head_dim, seq, theta = 8, 5, 10000.0
    x = torch.randn(1, 1, seq, head_dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cos, sin = rope_tables(head_dim, seq, theta)
    out = apply_rope(x, cos.double(), sin.double())
    half = head_dim // 2
    for t in range(seq):
        for i in range(half):
            angle = t * theta ** (-2 * i / head_dim)
            a, b = x[0, 0, t, i].item(), x[0, 0, t, i + half].item()
            assert out[0, 0, t, i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-6)
            assert out[0, 0, t, i + half].item() == pytest.approx(b * math.cos(angle) + a * math.sin(angle), abs=1e-6)


def test_swiglu_is_down_of_silu_gate_times_up():
    config = model_config("tiny")
    mlp = SwiGLU(config)
    x = torch.randn(2, config.hidden_size, generator=torch.Generator().manual_seed(2))
    gate, up = x @ mlp.gate_proj.weight.t(), x @ mlp.up_proj.weight.t()
    expected = (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.t()
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_decoder_layer_is_pre_norm_residual_attention_then_mlp():
    """h = x + attn(norm1(x)); out = h + mlp(norm2(h)): each sublayer sees its normalised input."""
    config = model_config("tiny", max_seq_len=8)
    layer = DecoderLayer(config)
    x = 3.0 * torch.randn(2, 8, config.hidden_size, generator=torch.Generator().manual_seed(3))
    cos, sin = rope_tables(config.head_dim, 8, config.rope_theta)

    def rms(t, weight):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + config.norm_eps) * weight

    with torch.no_grad():
        h = x + layer.attn(rms(x, layer.attn_norm.weight), cos, sin)
        expected = h + layer.mlp(rms(h, layer.mlp_norm.weight))
        torch.testing.assert_close(layer(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ data
def test_stdlib_corpus_split_is_by_path_and_cached():
    first = load_corpus("stdlib")
    assert first.vocab_size == 256 and first.train.dtype == np.uint8
    assert len(first.train) > 5_000_000 and 0 < len(first.val) < len(first.train) // 10
    again = load_corpus("stdlib")  # from the memory-mapped cache
    assert np.array_equal(first.val[:1000], again.val[:1000])
    assert bytes(first.val[:4000]).decode("utf-8", errors="replace").count("def ") > 0
    assert data_module._is_val("a/b.py", 2.0) == data_module._is_val("a/b.py", 2.0)


def test_text_file_folder_and_bin(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(b"hello world " * 500)
    corpus = load_corpus(str(text))
    assert len(corpus.train) + len(corpus.val) == 6000 and len(corpus.val) == 120
    assert bytes(corpus.train[:11]) == b"hello world"
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i in range(60):
        (folder / "sub" / f"f{i:02d}.txt").write_text(f"file {i}\n" * 20)
    corpus = load_corpus(str(folder))
    assert len(corpus.val) > 0 and len(corpus.train) > len(corpus.val)
    tokens = np.arange(3000, dtype=np.uint16) % 1000
    tokens.tofile(tmp_path / "tokens.bin")
    corpus = load_corpus(str(tmp_path / "tokens.bin"))
    assert corpus.vocab_size == 1000 and corpus.train.dtype == np.uint16
    assert len(corpus.train) + len(corpus.val) == 3000


def test_unreadable_data_raises_one_line_error(tmp_path):
    with pytest.raises(DataError, match=r"data must be 'stdlib', a path or 'hf:NAME\[:CONFIG\]\[@REVISION\]', got 123"):
        load_corpus(123)
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="uint16"):
        load_corpus(str(tmp_path / "odd.bin"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        load_corpus(str(tmp_path / "empty"))


def test_without_the_datasets_package_an_hf_source_names_the_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"needs the 'datasets' package \(pip install datasets\)"):
        load_corpus("hf:wikitext")


def test_a_one_byte_text_file_or_a_token_file_of_only_token_0_is_refused_in_one_line(tmp_path):
    (tmp_path / "one.txt").write_bytes(b"a")
    with pytest.raises(DataError, match="1 byte of text: too little for a training and a validation split"):
        load_corpus(str(tmp_path / "one.txt"))
    np.zeros(1000, dtype=np.uint16).tofile(tmp_path / "zeros.bin")
    with pytest.raises(DataError, match="holds only the token 0"):
        load_corpus(str(tmp_path / "zeros.bin"))


def test_a_folder_whose_validation_files_are_empty_is_split_by_position(tmp_path, monkeypatch):
    """An empty ``__init__.py`` may be the only file the split by path sends to validation."""
    monkeypatch.setenv("SMET_CACHE_DIR", str(tmp_path / "cache"))
    names = [f"g{i}.txt" for i in range(34)]
    assert [name for name in names if data_module._is_val(name, 2.0)] == ["g33.txt"]
    (tmp_path / "corpus").mkdir()
    for name in names[:-1]:
        (tmp_path / "corpus" / name).write_text(f"text of {name}\n" * 20)
    (tmp_path / "corpus" / "g33.txt").write_bytes(b"")
    corpus = load_corpus(str(tmp_path / "corpus"))
    assert len(corpus.val) == int((len(corpus.train) + len(corpus.val)) * 0.02)
    for cached in (tmp_path / "cache").glob("dir-*.val.bin"):  # an empty split an older release cached: written again
        cached.unlink()  # a new file: corpus.val maps the old one
        cached.write_bytes(b"")
    assert np.array_equal(load_corpus(str(tmp_path / "corpus")).val, corpus.val)


def test_a_token_cache_write_that_fails_on_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A write of the cached streams that fails (a full disk) left its partial temporary file in the cache, holding
    space on the full disk: one more on every attempt (their names hold the process id)."""
    import errno
    import pathlib

    monkeypatch.setenv("SMET_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "corpus.txt").write_bytes(b"hello world " * 500)
    real_write_bytes = pathlib.Path.write_bytes

    def fills_the_disk(self, data):
        real_write_bytes(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", fills_the_disk)
    with pytest.raises(DataError, match="No space left on device"):
        load_corpus(str(tmp_path / "corpus.txt"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_packed_batches_deterministic_resumable_and_sharded():
    tokens = np.arange(10 * 8 + 1, dtype=np.uint16)
    batches = PackedBatches(tokens, seq_len=8, batch_size=4, seed=3)
    assert batches.num_windows == 10
    seen = [batches.next_global() for _ in range(2)]
    state = batches.state_dict()
    rest = [batches.next_global() for _ in range(3)]  # crosses into epoch 1 (the tail of 2 windows is skipped)
    resumed = PackedBatches(tokens, seq_len=8, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_global()) for a in rest)
    assert len(set(torch.cat(seen).tolist())) == 8  # no window twice within an epoch
    x, y = batches.batch(seen[0])
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[:, 0], seen[0] * 8)
    shards = [PackedBatches.shard(seen[0], m, 2, r, 2) for m in range(2) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == sorted(seen[0].tolist())
    other_seed = PackedBatches(tokens, seq_len=8, batch_size=4, seed=4)
    assert not torch.equal(other_seed.next_global(), seen[0])
    with pytest.raises(DataError, match="fewer than batch_size"):
        PackedBatches(tokens, seq_len=8, batch_size=11, seed=0)
    assert eval_windows(tokens, 8, 3).tolist() == [0, 4, 9]


def test_the_validation_split_of_a_path_is_the_same_in_every_process():
    """The split depends on the path only: not on Python's per-process string hash seed."""
    code = "from smet_kernels.train import data; print([data._is_val(f'pkg/mod{i}.py', 50.0) for i in range(64)])"
    splits = {
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                       env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    (split,) = splits  # one split for both hash seeds
    assert "True" in split and "False" in split


def test_an_epoch_that_is_a_whole_number_of_batches_visits_every_window():
    tokens = np.arange(8 * 8 + 1, dtype=np.uint16)  # exactly 8 windows: two batches of 4
    batches = PackedBatches(tokens, seq_len=8, batch_size=4, seed=0)
    epoch = torch.cat([batches.next_global() for _ in range(2)])
    assert sorted(epoch.tolist()) == list(range(8)) and batches.epoch == 0


def test_each_epoch_visits_the_windows_in_a_new_order():
    batches = PackedBatches(np.arange(8 * 8 + 1, dtype=np.uint16), seq_len=8, batch_size=8, seed=0)
    orders = [tuple(batches.next_global().tolist()) for _ in range(3)]
    assert all(sorted(order) == list(range(8)) for order in orders) and len(set(orders)) == 3
    assert batches.state_dict()["epoch"] == 2


def test_a_path_whose_crc32_share_is_exactly_the_val_percent_goes_to_training():
    """The documented rule is ``crc32(path) % 10000 < 100 · val_percent``: with ``<=`` a file at the boundary would
    move to validation, and splits by path would differ from those of earlier releases."""
    assert [zlib.crc32(name.encode()) % 10000 for name in ("f4858.py", "f5790.py")] == [200, 199]
    assert not data_module._is_val("f4858.py", 2.0) and data_module._is_val("f5790.py", 2.0)


def test_a_folder_corpus_reads_its_text_files_only_and_skips_hidden_files_and_tool_folders(tmp_path):
    """Hidden files (``.DS_Store``: no suffix, read as text otherwise), hidden folders, ``site-packages`` and
    ``__pycache__`` stay out; a text suffix counts in any case (``NOTES.TXT``)."""
    root = tmp_path / "corpus"
    files = {"a.txt": "kept-a", "NOTES.TXT": "kept-upper", "README": "kept-bare", "img.png": "out-png",
             ".DS_Store": "out-dotfile", ".cache/x.txt": "out-hidden-dir", "site-packages/y.txt": "out-site",
             "__pycache__/z.txt": "out-pycache", "sub/b.md": "kept-sub"}
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"{text}\n" * 50)
    with pytest.warns(UserWarning, match=r"1 file\(s\) of suffix \.png left out"):
        corpus = load_corpus(str(root))
    text = bytes(corpus.train).decode() + bytes(corpus.val).decode()
    assert {word for word in files.values() if word in text} == {"kept-a", "kept-upper", "kept-bare", "kept-sub"}


def test_a_folder_says_which_files_it_leaves_out_and_reads_jsonl_and_tsv_as_text(tmp_path):
    """Files of another suffix were dropped without a word (a folder of ``.parquet`` shards and a README trained on
    the README alone); ``.jsonl`` / ``.tsv`` shards are text and are read."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_text('{"text": "kept-jsonl"}\n' * 50)
    (root / "b.tsv").write_text("kept\ttsv\n" * 50)
    (root / "c.parquet").write_text("out-parquet\n" * 50)
    (root / "d.arrow").write_text("out-arrow\n" * 50)
    with pytest.warns(UserWarning, match=r"2 file\(s\) of suffix \.arrow, \.parquet left out \(text suffixes: "):
        corpus = load_corpus(str(root))
    text = bytes(corpus.train).decode() + bytes(corpus.val).decode()
    assert "kept-jsonl" in text and "kept\ttsv" in text and "out-" not in text
    only = tmp_path / "shards"
    only.mkdir()
    (only / "x.parquet").write_text("out\n")
    with pytest.raises(DataError, match=r"holds no text files \(only \.parquet: give such a file itself as data\)"):
        load_corpus(str(only))


def test_a_folder_or_file_whose_name_is_not_utf8_is_read_and_split_by_the_bytes_of_its_name(tmp_path):
    """Linux names are bytes (a Latin-1 archive's ``café.txt``); Python reads them as lone surrogates, which
    ``str.encode()`` refused with a UnicodeEncodeError traceback from the cache key and the split by path."""
    root = tmp_path / "corpus"
    root.mkdir()
    try:
        (root / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin-1 name\n" * 50)
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    (root / "b.txt").write_bytes(b"utf-8 name\n" * 50)
    corpus = load_corpus(str(root))
    assert len(corpus.train) + len(corpus.val) == 13 * 50 + 1 + 11 * 50
    assert data_module._is_val(os.fsdecode(b"caf\xe9.txt"), 2.0) == (zlib.crc32(b"caf\xe9.txt") % 10000 < 200)
    assert len(load_corpus(str(root / os.fsdecode(b"caf\xe9.txt"))).train) > 0


def test_a_compressed_file_or_a_binary_file_in_a_text_folder_is_refused_naming_it(tmp_path):
    """A ``corpus.txt.gz`` or an executable in a folder of text was byte-tokenised and trained on without a word."""
    import gzip

    packed = tmp_path / "corpus.txt.gz"
    packed.write_bytes(gzip.compress(b"hello world\n" * 500, mtime=0))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"hello world\n" * 500)
    (folder / "tool").write_bytes(b"\x7fELF\x02\x01\x01\x00" + b"code" * 100)
    for data, binary in ((packed, packed), (folder, folder / "tool")):
        with pytest.raises(DataError, match=f"^data file {str(binary)!r} is not text \\(a NUL byte in its first 8000 "):
            load_corpus(str(data))


def test_the_token_cache_is_rebuilt_when_a_file_is_edited_or_the_validation_share_changes(tmp_path):
    """The cache key holds each file's size and mtime, and the val_percent: without them an edit in place (same size)
    or another val_percent would give the stale cached streams."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"hello world " * 500)
    assert bytes(load_corpus(str(path)).train[:11]) == b"hello world"
    stat = path.stat()
    path.write_bytes(b"hello there " * 500)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert bytes(load_corpus(str(path)).train[:11]) == b"hello there"
    assert len(load_corpus(str(path), val_percent=10.0).val) == 600 and len(load_corpus(str(path)).val) == 120


def test_a_token_file_is_cut_into_its_first_and_last_val_percent_tokens(tmp_path):
    """Validation is the tail of a ``.bin``, disjoint from training; a val_percent outside (0, 100) is refused."""
    tokens = np.arange(5000, dtype=np.uint16)
    tokens.tofile(tmp_path / "tokens.bin")
    corpus = load_corpus(str(tmp_path / "tokens.bin"), val_percent=2.0)
    assert np.array_equal(corpus.train, tokens[:4900]) and np.array_equal(corpus.val, tokens[4900:])
    for val_percent in (0.0, 100.0):
        with pytest.raises(DataError, match=r"val_percent must be in \(0, 100\)"):
            load_corpus(str(tmp_path / "tokens.bin"), val_percent=val_percent)


@pytest.mark.parametrize("length", [63, 64, 65, 66])
def test_every_counted_window_holds_seq_len_plus_one_tokens(length):
    """A stream of a multiple of seq_len tokens has no room for its last ``seq_len + 1`` window: counted, it would make
    ``batch`` fail (rows of unequal length) whenever the shuffle drew it, mid-run."""
    tokens = np.arange(length, dtype=np.uint16)
    batches = PackedBatches(tokens, seq_len=8, batch_size=1, seed=0)
    assert batches.num_windows == (length - 1) // 8
    x, y = batches.batch(torch.arange(batches.num_windows))
    rows = torch.stack([torch.from_numpy(tokens[i * 8 : i * 8 + 9].astype(np.int64)) for i in range(len(x))])
    assert torch.equal(x, rows[:, :-1]) and torch.equal(y, rows[:, 1:])


def test_no_two_seeds_visit_the_windows_in_the_same_order_in_their_first_epochs():
    """Seeds of a sweep must not share batch orders: with ``seed + epoch`` as the generator's seed, seed 1's first
    epoch would be seed 0's second."""
    tokens = np.arange(16 * 8 + 1, dtype=np.uint16)
    orders = set()
    for seed in range(4):
        batches = PackedBatches(tokens, seq_len=8, batch_size=16, seed=seed)
        orders |= {tuple(batches.next_global().tolist()) for _ in range(4)}
    assert len(orders) == 16


def test_loading_a_state_into_batches_already_drawn_from_continues_from_the_loaded_position():
    """``load_state_dict`` forgets the window order of the epoch it was in: kept, a loaded state of another seed or
    epoch would continue in the old order."""
    tokens = np.arange(10 * 8 + 1, dtype=np.uint16)
    source = PackedBatches(tokens, seq_len=8, batch_size=4, seed=1)
    source.next_global()
    used = PackedBatches(tokens, seq_len=8, batch_size=4, seed=2)
    used.next_global()
    used.load_state_dict(source.state_dict())
    assert all(torch.equal(used.next_global(), source.next_global()) for _ in range(4))


def test_a_global_batch_is_cut_into_consecutive_micro_steps_each_split_across_the_ranks():
    """The documented view ``[grad_accum, world_size, micro_batch]`` (evaluation shards the same way)."""
    indices = torch.arange(12)
    shards = [[PackedBatches.shard(indices, m, 2, r, 3).tolist() for r in range(3)] for m in range(2)]
    assert shards == [[[0, 1], [2, 3], [4, 5]], [[6, 7], [8, 9], [10, 11]]]


def test_the_corpus_digest_tells_apart_the_same_tokens_split_at_another_place():
    """A resume refuses data whose digest changed; the lengths in it tell a moved train/validation cut apart."""
    tokens = np.arange(100, dtype=np.uint8)
    digests = {data_module.Corpus(tokens[:cut], tokens[cut:], 256, "x").sha256 for cut in (90, 91)}
    assert len(digests) == 2


def test_a_folder_corpus_is_its_files_in_the_order_of_their_paths_each_joined_by_a_newline(tmp_path):
    """Files are read sorted by their path under the folder (``a/x.txt`` before ``b.txt``, though a walk of the folder
    meets ``b.txt`` first) and a split's files are joined by a newline (``g33.txt`` is the validation file at 2 %)."""
    root = tmp_path / "corpus"
    (root / "a").mkdir(parents=True)
    (root / "b.txt").write_text("beta")
    (root / "a" / "x.txt").write_text("alpha")
    (root / "g33.txt").write_text("held out")
    corpus = load_corpus(str(root))
    assert bytes(corpus.train) == b"alpha\nbeta" and bytes(corpus.val) == b"held out"


def test_the_token_cache_tells_apart_folders_and_files_that_keep_their_size_or_time(tmp_path):
    """The cache key holds the folder, each file's path under it, size and mtime: without one of them a corpus would
    read another's cached text (two folders alike in names, sizes and times; a renamed file, which keeps its mtime; an
    edit within one tick of a coarse file system clock)."""
    def write(path, text, mtime_ns=10**18):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.utime(path, ns=(mtime_ns, mtime_ns))

    def text_of(folder):
        corpus = load_corpus(str(folder))
        return bytes(corpus.train).decode() + "|" + bytes(corpus.val).decode()

    write(tmp_path / "one" / "a.txt", "first")
    write(tmp_path / "two" / "a.txt", "other")
    assert text_of(tmp_path / "one") != text_of(tmp_path / "two")
    for name, text in (("a.txt", "alpha"), ("b.txt", "bravo")):
        write(tmp_path / "renamed" / name, text)
    before = text_of(tmp_path / "renamed")
    (tmp_path / "renamed" / "a.txt").rename(tmp_path / "renamed" / "c.txt")  # keeps its mtime
    assert text_of(tmp_path / "renamed") != before
    write(tmp_path / "edited" / "a.txt", "short")
    assert text_of(tmp_path / "edited").replace("|", "") == "short"
    write(tmp_path / "edited" / "a.txt", "longer text")
    assert text_of(tmp_path / "edited").replace("|", "") == "longer text"


def test_the_corpus_digest_covers_the_validation_tokens():
    tokens = np.arange(100, dtype=np.uint8)
    kept, reversed_val = (data_module.Corpus(tokens[:90], val, 256, "x").sha256
                          for val in (tokens[90:], tokens[:89:-1]))
    assert kept != reversed_val


def test_evaluation_windows_are_spread_evenly_rounded_to_the_nearest_and_short_validation_data_is_refused():
    tokens = np.arange(11 * 8 + 1, dtype=np.uint16)  # 11 windows
    assert eval_windows(tokens, 8, 4).tolist() == [0, 3, 7, 10]  # 0, 3.3, 6.7, 10
    assert eval_windows(tokens, 8, 2).tolist() == [0, 10] and eval_windows(tokens, 8, 1).tolist() == [0]
    with pytest.raises(DataError, match=r"validation data is shorter than seq_len 8 \+ 1 tokens"):
        eval_windows(np.arange(8, dtype=np.uint16), 8, 2)


def test_evaluation_windows_of_a_validation_stream_of_more_than_2_to_the_24_windows_stay_inside_it():
    """float32 spacing past 2**24 rounded the last index up past the stream: a ragged batch and a numpy traceback."""
    tokens = np.zeros(2**24 + 5, dtype=np.uint8)  # 2**24 + 4 windows of seq_len 1
    assert eval_windows(tokens, 1, 2).tolist() == [0, 2**24 + 3]
    assert window_batch(tokens, eval_windows(tokens, 1, 3), 1)[1].shape == (3, 1)


def test_evaluation_windows_of_a_stream_of_at_most_2_to_the_24_windows_are_those_of_earlier_releases():
    """A resumed run evaluates on the windows it started with: float32 spacing, as earlier releases wrote them."""
    tokens = np.zeros(99999 * 8 + 1, dtype=np.uint8)  # 99999 windows of seq_len 8: float64 moves two of 160
    expected = torch.linspace(0, 99998, 160, dtype=torch.float32).round().long()
    assert torch.equal(eval_windows(tokens, 8, 160), expected)


def test_a_folder_given_by_a_relative_or_symlinked_path(tmp_path, monkeypatch):
    folder = tmp_path / "corpus" / "sub"
    folder.mkdir(parents=True)
    for i in range(6):
        (folder / f"f{i}.txt").write_text(f"text number {i} " * 200)
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    sizes = {len(load_corpus(spec).train) for spec in ("corpus/sub", "./corpus/sub", "link", str(folder))}
    assert len(sizes) == 1 and sizes.pop() > 0


def test_a_relative_file_path_has_the_cache_entry_of_the_file_it_resolves_to(tmp_path, monkeypatch):
    """Two folders' ``corpus.txt`` alike in size and mtime (a tarball extracted twice): keyed by the relative path as
    given, the second would read the first's cached text."""
    for name, word in (("one", "first"), ("two", "other")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "corpus.txt").write_text(f"{word} text\n" * 100)
        os.utime(tmp_path / name / "corpus.txt", ns=(10**18, 10**18))
    texts = []
    for name in ("one", "two"):
        monkeypatch.chdir(tmp_path / name)
        texts.append(bytes(load_corpus("corpus.txt").train[:5]))
    assert texts == [b"first", b"other"]


def test_the_stdlib_corpus_reads_the_python_files_of_the_standard_library_only(tmp_path, monkeypatch):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "decoder.py").write_text("python source\n" * 50)
    (tmp_path / "json" / "README.txt").write_text("not python\n" * 50)
    monkeypatch.setattr(data_module.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    corpus = load_corpus("stdlib")
    assert b"not python" not in bytes(corpus.train) + bytes(corpus.val)


def test_a_batch_of_no_windows_has_the_shape_of_a_batch():
    x, y = window_batch(np.arange(100, dtype=np.uint16), torch.zeros(0, dtype=torch.long), 8)
    assert x.shape == y.shape == (0, 8)


def test_a_subfolder_that_cannot_be_listed_is_a_one_line_error_not_left_out_of_the_corpus(tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (tmp_path / "a.txt").write_text("text " * 100)
    scandir = os.scandir

    def locked(path):  # os.walk lists each folder with scandir; this user may not read this one
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)
    with pytest.raises(DataError, match="^cannot read data .*: Permission denied$"):
        load_corpus(str(tmp_path))
