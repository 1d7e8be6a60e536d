"""The ``hf:NAME[:CONFIG][@REVISION]`` data source of the trainer: a Hugging Face dataset's text, byte-tokenised, read here
from local folders (``datasets.load_dataset`` of a folder of ``.txt`` or ``.jsonl`` files, offline)."""

import json

import numpy as np
import pytest

from smet_kernels.train.data import DataError, load_corpus

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def offline_caches(tmp_path, monkeypatch):
    """Both caches in this test's folder; the hub never asked."""
    monkeypatch.setenv("SMET_CACHE_DIR", str(tmp_path / "smet_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def folder(tmp_path, files: dict[str, str]) -> str:
    root = tmp_path / "dataset"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    return f"hf:{root}"


def text_of(tokens: np.ndarray) -> str:
    return np.asarray(tokens).tobytes().decode("utf-8")


def test_the_train_and_validation_splits_are_the_rows_of_their_text_column_joined_by_newlines(tmp_path):
    corpus = load_corpus(folder(tmp_path, {"train.txt": "first row\nsecond row — ü\n\nlast\n",
                                           "validation.txt": "held out\nrows\n"}))
    assert text_of(corpus.train) == "first row\nsecond row — ü\n\nlast"
    assert text_of(corpus.val) == "held out\nrows"
    assert corpus.vocab_size == 256 and corpus.bytes_of(corpus.val) == len("held out\nrows")


def test_a_dataset_without_a_validation_split_gives_the_tail_of_its_training_text(tmp_path):
    rows = [f"row {index}" for index in range(300)]
    corpus = load_corpus(folder(tmp_path, {"train.txt": "\n".join(rows) + "\n"}), val_percent=10.0)
    text = "\n".join(rows).encode()
    cut = len(text) - int(len(text) * 0.1)
    assert corpus.train.tobytes() == text[:cut] and corpus.val.tobytes() == text[cut:]


def test_more_rows_than_one_write_batch_are_all_kept_in_order(tmp_path):
    """The rows are streamed to the cache in batches: none lost or doubled at a batch boundary."""
    rows = [f"r{index}" for index in range(10_000)]
    corpus = load_corpus(folder(tmp_path, {"train.txt": "\n".join(rows), "test.txt": "v"}))
    assert text_of(corpus.train).split("\n") == rows and text_of(corpus.val) == "v"


def test_a_datasets_release_without_dataset_iter_reads_every_row(tmp_path, monkeypatch):
    """pyproject admits ``datasets>=2``; ``Dataset.iter`` came in 2.8: before, the rows were an AttributeError."""
    monkeypatch.delattr(datasets.Dataset, "iter")
    rows = [f"r{index}" for index in range(5000)]
    corpus = load_corpus(folder(tmp_path, {"train.txt": "\n".join(rows), "test.txt": "v"}))
    assert text_of(corpus.train).split("\n") == rows and text_of(corpus.val) == "v"


def test_the_text_column_is_text_else_the_first_string_column_and_a_missing_value_is_empty_text(tmp_path):
    rows = [{"label": 1, "body": "alpha", "text": None}, {"label": 2, "body": "beta", "text": "gamma"}]
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    corpus = load_corpus(folder(tmp_path, {"train.jsonl": lines, "validation.jsonl": lines}))
    assert text_of(corpus.train) == "\ngamma"
    body_only = tmp_path / "body"
    body_only.mkdir()
    (body_only / "train.jsonl").write_text('{"label": 1, "body": "alpha"}\n{"label": 2, "body": "beta"}\n')
    assert text_of(load_corpus(f"hf:{body_only}").train) == "alpha\nbet"  # its last byte: validation


def from_the_hub(monkeypatch, splits: dict[str, dict[str, list]]) -> list:
    """``datasets.load_dataset`` answering with ``splits`` (their columns); returns the list of its calls."""
    loads = []

    def load_dataset(name, subset):
        loads.append((name, subset))
        return datasets.DatasetDict({split: datasets.Dataset.from_dict(columns) for split, columns in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return loads


def test_a_valid_split_is_the_validation_text_and_a_second_load_reads_the_cache(monkeypatch):
    """A hub dataset whose held-out split is named ``valid`` (not ``validation``) is validated on it, before its
    ``test`` split; the second load is the cached stream: the dataset is not loaded again."""
    loads = from_the_hub(monkeypatch, {"train": {"text": ["first", "second"]}, "valid": {"text": ["held out"]},
                                       "test": {"text": ["never read"]}})
    for _ in range(2):
        corpus = load_corpus("hf:someone/corpus:en")
        assert text_of(corpus.train) == "first\nsecond" and text_of(corpus.val) == "held out"
    assert loads == [("someone/corpus", "en")]


@pytest.mark.parametrize("arrow_type", ["large_string", "string_view"])
def test_a_text_column_of_any_arrow_string_type_is_read(tmp_path, arrow_type):
    """A Parquet file's ``string_view`` column (``Value('string_view')``) was refused as no text column."""
    pa = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    try:
        datasets.Value(arrow_type)
    except ValueError:
        pytest.skip(f"this datasets release has no Value({arrow_type!r})")
    root = tmp_path / "dataset"
    root.mkdir()
    for split, rows in (("train", ["alpha", "beta"]), ("validation", ["gamma"])):
        table = pa.table({"id": [1] * len(rows), "text": pa.array(rows, type=getattr(pa, arrow_type)())})
        parquet.write_table(table, root / f"{split}.parquet")
    corpus = load_corpus(f"hf:{root}")
    assert text_of(corpus.train) == "alpha\nbeta" and text_of(corpus.val) == "gamma"


@pytest.mark.parametrize("files, message", [
    ({"train.jsonl": '{"label": 1}\n{"label": 2}\n'}, r"has no text column \(its columns: \['label'\]\)"),
    ({"test.txt": "only a test split\n"}, r"has no 'train' split \(its splits: \['test'\]\)"),
    ({"train.txt": "x", "validation.txt": "\n"}, "holds 1 byte.s. of training and 0 of validation text"),
])
def test_a_dataset_without_usable_text_is_refused_in_one_line(tmp_path, files, message):
    with pytest.raises(DataError, match=message) as raised:
        load_corpus(folder(tmp_path, files))
    assert "\n" not in str(raised.value)


def test_a_dataset_refused_halfway_leaves_no_temporary_file_in_the_cache(tmp_path, monkeypatch):
    """A validation split without a text column is refused after the training text was streamed to a temporary file:
    that file (the whole training text) stayed in the cache, one more on every attempt."""
    from_the_hub(monkeypatch, {"train": {"text": ["row"] * 100}, "validation": {"label": [1]}})
    with pytest.raises(DataError, match="has no text column"):
        load_corpus("hf:someone/corpus")
    assert list((tmp_path / "smet_cache").iterdir()) == []


def test_a_dataset_that_cannot_be_loaded_is_refused_in_one_line(tmp_path):
    with pytest.raises(DataError, match="cannot load Hugging Face dataset") as raised:
        load_corpus(f"hf:{tmp_path / 'missing'}")
    assert "\n" not in str(raised.value)


def test_an_edited_local_dataset_folder_is_read_again_not_taken_from_the_cache(tmp_path):
    """The cache key held the dataset's name only: a local folder edited after a first load gave its old text."""
    spec = folder(tmp_path, {"train.txt": "first text\n", "validation.txt": "held out\n"})
    assert text_of(load_corpus(spec).train) == "first text"
    (tmp_path / "dataset" / "train.txt").write_text("edited text, longer\n")
    assert text_of(load_corpus(spec).train) == "edited text, longer"


def test_each_config_and_validation_share_of_a_dataset_has_its_own_cache_entry(monkeypatch):
    """The cache key holds the config and the val_percent: without them a dataset's second config would read the
    first's cached text, and another val_percent of a dataset without a validation split the first's cut."""
    def load_dataset(name, subset):
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": [f"{subset} " * 50]})})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert text_of(load_corpus("hf:someone/corpus:en").train).startswith("en ")
    assert text_of(load_corpus("hf:someone/corpus:de").train).startswith("de ")
    assert [len(load_corpus("hf:someone/corpus:de", val_percent=share).val) for share in (2.0, 10.0)] == [3, 15]


def test_a_cache_entry_missing_one_of_its_streams_is_loaded_again(tmp_path, monkeypatch):
    loads = from_the_hub(monkeypatch, {"train": {"text": ["first", "second"]}, "validation": {"text": ["held out"]}})
    assert text_of(load_corpus("hf:someone/corpus").val) == "held out"
    (val_stream,) = (tmp_path / "smet_cache").glob("hf-*.val.bin")
    val_stream.unlink()
    assert text_of(load_corpus("hf:someone/corpus").val) == "held out"
    assert loads == [("someone/corpus", None)] * 2  # no config: None, not ""


def test_a_pinned_revision_is_asked_of_the_hub_and_each_revision_has_its_own_cache_entry(monkeypatch):
    """``@REVISION`` reaches ``load_dataset``; the cache key holds it: without it a newly pinned revision would read
    the text cached from another (or from the unpinned first download)."""
    loads = []

    def load_dataset(name, subset, **pin):
        loads.append((name, subset, pin))
        text = pin.get("revision", "unpinned")
        return datasets.DatasetDict({split: datasets.Dataset.from_dict({"text": [f"{text} {split}"]})
                                     for split in ("train", "validation")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for spec, text in [("hf:someone/corpus", "unpinned"), ("hf:someone/corpus:en@v1", "v1"),
                       ("hf:someone/corpus:en@refs/convert/parquet", "refs/convert/parquet"),
                       ("hf:someone/corpus:en@v1", "v1")]:
        assert text_of(load_corpus(spec).train) == f"{text} train"
    assert loads == [("someone/corpus", None, {}), ("someone/corpus", "en", {"revision": "v1"}),
                     ("someone/corpus", "en", {"revision": "refs/convert/parquet"})]  # the second v1: cached


@pytest.mark.parametrize("spec", ["hf:someone/corpus@", "hf:@main"])
def test_a_revision_without_a_name_or_a_name_without_its_revision_is_refused_in_one_line(spec):
    with pytest.raises(DataError, match="needs a name and a revision on each side of '@'") as raised:
        load_corpus(spec)
    assert "\n" not in str(raised.value)


def test_a_local_dataset_folder_takes_no_revision_and_may_hold_an_at_sign_in_its_name(tmp_path):
    spec = folder(tmp_path, {"train.txt": "first text\n", "validation.txt": "held out\n"})
    with pytest.raises(DataError, match="a local dataset folder has no revision"):
        load_corpus(f"{spec}@main")
    renamed = tmp_path / "corpus@2026"
    (tmp_path / "dataset").rename(renamed)
    assert text_of(load_corpus(f"hf:{renamed}").train) == "first text"


def test_a_local_dataset_folder_with_a_config_takes_no_revision_either(tmp_path):
    """'@' after the folder's config was taken as part of the config name: datasets said 'BuilderConfig
    'default@main' not found', not that a folder has no revision."""
    spec = folder(tmp_path, {"train.txt": "first text\n", "validation.txt": "held out\n"})
    with pytest.raises(DataError, match="a local dataset folder has no revision"):
        load_corpus(f"{spec}:default@main")
    assert text_of(load_corpus(f"{spec}:default").train) == "first text"


def test_a_hub_error_of_several_lines_is_refused_in_one_line_naming_the_revision(monkeypatch):
    """huggingface_hub's HTTP errors span lines ('404 Client Error.\\n\\nRevision Not Found for url: ...')."""
    def load_dataset(name, subset, **pin):
        raise OSError("500 Server Error.\n\nInternal Error for url: https://huggingface.co/api/datasets/x")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError) as raised:
        load_corpus("hf:someone/corpus@v1")
    assert str(raised.value) == ("cannot load Hugging Face dataset 'someone/corpus' at revision 'v1': 500 Server "
                                 "Error. Internal Error for url: https://huggingface.co/api/datasets/x")


@pytest.mark.parametrize("spec", ["hf:", "hf::en", "hf::en@main"])
def test_a_spec_without_a_dataset_name_is_refused_in_one_line_not_read_as_the_working_folder(spec, tmp_path,
                                                                                              monkeypatch):
    """``Path("")`` is the working folder: 'hf:' listed it and handed it to load_dataset as a local dataset."""
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "train.txt").write_text("the working folder's text\n")
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(DataError, match="needs a dataset name") as raised:
        load_corpus(spec)
    assert "\n" not in str(raised.value)
