"""ma_convert.training.data: sources, held-out split, packing and the bad-input errors. Offline and fast."""

import itertools
import json

import pytest
import torch

from ma_convert.training.data import (
    DataConfig,
    HubUnreachableError,
    PackedBlocks,
    build_datasets,
    iter_texts,
    pack,
    pydoc_topics,
    source_texts,
)

WORDS = [f"w{i:03d}" for i in range(200)]  # one width: documents of equal word count are equal in size


def _word_tokenizer(eos: bool = True):
    """One token per known word, built in memory: no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>" if eos else None)


@pytest.fixture(scope="module")
def tok():
    return _word_tokenizer()


def _ids(text):
    return [WORDS.index(word) + 2 for word in text.split()]


def _docs(n=30, words=5):
    # distinct, known words, so each document is `words` tokens
    return [" ".join(WORDS[(d * words + k) % len(WORDS)] for k in range(words)) for d in range(n)]


class _NoTokenizing:
    """A tokenizer that fails if anything is tokenized: proves a check ran before the heavy work."""

    eos_token_id = 1

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized before the input was checked")


# ------------------------------------------------------------------------------------------------ packing


def test_pack_blocks_and_eos_between_documents(tok):
    texts = ["w001 w002 w003", "w004 w005", "w006 w007 w008 w009"]
    stream = [*_ids(texts[0]), 1, *_ids(texts[1]), 1, *_ids(texts[2]), 1]  # 12 tokens, EOS after each doc
    blocks = list(pack(texts, tok, 4))
    assert all(b.dtype == torch.long and b.shape == (4,) for b in blocks)
    assert torch.cat(blocks).tolist() == stream
    assert blocks[0][3] == 1 and blocks[1][2] == 1 and blocks[2][3] == 1

    five = list(pack(texts, tok, 5))  # 12 tokens: two blocks, the last 2 tokens dropped
    assert len(five) == 2 and torch.cat(five).tolist() == stream[:10]
    (only,) = pack(["", "w001"], tok, 2)  # empty documents add no EOS
    assert only.tolist() == [*_ids("w001"), 1]


def test_pack_max_tokens_and_laziness(tok):
    texts = ["w001 w002 w003"] * 10  # 40 tokens
    assert len(list(pack(texts, tok, 4, max_tokens=9))) == 2  # whole blocks within the limit
    assert len(list(pack(texts, tok, 4, max_tokens=3))) == 0
    assert len(list(pack(texts, tok, 4))) == 10
    endless = itertools.repeat("w001 w002 w003")  # stops at max_tokens without reading everything
    assert len(list(pack(endless, tok, 8, max_tokens=80))) == 10


def test_pack_needs_eos():
    with pytest.raises(ValueError, match="eos"):
        list(pack(["w001 w002"], _word_tokenizer(eos=False), 2))
    with pytest.raises(ValueError, match="eos"):
        build_datasets(DataConfig(seq_len=8), _word_tokenizer(eos=False), 64)


# ------------------------------------------------------------------------------------------------ pydoc


def test_pydoc_split_disjoint_and_deterministic(tok):
    train, held = pydoc_topics("train"), pydoc_topics("eval")
    assert not set(train) & set(held)
    assert sorted(train + held) == pydoc_topics("all")
    assert held == pydoc_topics("eval") and train == pydoc_topics("train")
    assert pydoc_topics("eval", 0.3) != held

    from pydoc_data.topics import topics

    cfg = DataConfig(seq_len=64)
    assert list(iter_texts(cfg, "eval")) == [topics[k] for k in held]
    assert list(iter_texts(cfg, "train")) == [topics[k] for k in train]
    chars = sum(len(topics[k]) for k in held) / sum(len(t) for t in topics.values())
    assert 0.05 < chars <= 0.1  # the eval share is measured in text, not in topics

    tr1, ev1 = build_datasets(cfg, tok, 2048)
    tr2, ev2 = build_datasets(cfg, tok, 2048)
    assert len(tr1) > 5 * len(ev1) > 0
    assert all(torch.equal(a, b) for a, b in zip(tr1 + ev1, tr2 + ev2, strict=True))


def test_pydoc_as_both_sources_is_refused(tok):
    with pytest.raises(ValueError, match="overlap"):
        build_datasets(DataConfig(eval_source="pydoc"), tok, 2048)


def test_eval_source_replaces_the_held_out_part(tok, tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(_docs(10)))
    cfg = DataConfig(seq_len=16, eval_source=str(path))
    assert list(iter_texts(cfg, "eval")) == _docs(10)
    from pydoc_data.topics import topics

    assert len(list(iter_texts(cfg, "train"))) == len(topics)  # all of pydoc trains


# ------------------------------------------------------------------------------------------------ files


def _write(tmp_path, kind, docs, field="text"):
    if kind == "txt":
        path = tmp_path / "corpus.txt"
        # documents may span lines; runs of blank (or whitespace) lines separate them
        path.write_text("\n\n  \n".join(doc.replace(" ", "\n", 1) for doc in docs) + "\n")
    elif kind == "jsonl":
        path = tmp_path / "corpus.jsonl"
        path.write_text("".join(json.dumps({field: doc, "id": i}) + "\n\n" for i, doc in enumerate(docs)))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path)
    return path


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files(tok, tmp_path, kind):
    docs = _docs(40)
    cfg = DataConfig(source=str(_write(tmp_path, kind, docs)), seq_len=6, eval_fraction=0.25)
    train_docs, eval_docs = list(iter_texts(cfg, "train")), list(iter_texts(cfg, "eval"))
    assert len(eval_docs) == 10 and not set(train_docs) & set(eval_docs)  # equal-size docs: exactly 25%
    if kind != "txt":
        assert sorted(train_docs + eval_docs) == sorted(docs)
    train, held = build_datasets(cfg, tok, 2048)
    assert len(train) == 30 * 6 // 6 and len(held) == 10  # 6 tokens a document (5 words + EOS)
    assert torch.equal(torch.cat(held), torch.cat(list(pack(eval_docs, tok, 6))))
    if kind != "txt":
        assert torch.cat(train).tolist()[:6] == [*_ids(docs[0]), 1]


def test_streaming_matches_materialised(tok, tmp_path):
    path = _write(tmp_path, "jsonl", _docs(50, words=7))
    listed, held = build_datasets(DataConfig(source=str(path), seq_len=5, max_train_tokens=200), tok, 64)
    stream, held2 = build_datasets(
        DataConfig(source=str(path), seq_len=5, max_train_tokens=200, streaming=True), tok, 64
    )
    assert isinstance(listed, list) and isinstance(stream, PackedBlocks) and isinstance(held2, list)
    for _epoch in range(2):  # re-iterable
        streamed = list(stream)
        assert len(streamed) == len(listed) == 40
        assert all(torch.equal(a, b) for a, b in zip(streamed, listed, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(held, held2, strict=True))
    loader = torch.utils.data.DataLoader(stream, batch_size=8)
    assert torch.equal(torch.cat(list(loader)), torch.stack(listed))


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("seq_len", 1, ">= 2"),
        ("seq_len", 8.0, ">= 2"),
        ("eval_fraction", 0.0, "(0, 1)"),
        ("eval_fraction", 1.0, "(0, 1)"),
        ("max_train_tokens", 100, ">= seq_len"),
        ("max_eval_tokens", 0, ">= seq_len"),
        ("source", "", "non-empty"),
        ("eval_source", " ", "non-empty"),
        ("text_field", "", "non-empty"),
        ("streaming", "yes", "True or False"),
    ],
)
def test_config_validation(field, value, allowed):
    with pytest.raises(ValueError, match=rf"DataConfig\.{field}.*{allowed}".replace("(", r"\(").replace(")", r"\)")):
        DataConfig(**{field: value})


def test_missing_file(tmp_path):
    for spec in (str(tmp_path / "nope.jsonl"), "./nope.csv"):
        with pytest.raises(ValueError, match="file not found"):
            build_datasets(DataConfig(source=spec), _NoTokenizing(), 2048)
    with pytest.raises(ValueError, match="eval_source: file not found"):
        build_datasets(DataConfig(eval_source=str(tmp_path / "nope.txt")), _NoTokenizing(), 2048)
    (tmp_path / "data.xml").write_text("<text>hello</text>\n")
    with pytest.raises(ValueError, match="unsupported local source"):
        build_datasets(DataConfig(source=str(tmp_path / "data.xml")), _NoTokenizing(), 2048)
    with pytest.raises(ValueError, match="no file matches"):
        build_datasets(DataConfig(source=str(tmp_path / "nothing-*.jsonl")), _NoTokenizing(), 2048)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_file_with_no_text(tmp_path, kind):
    if kind == "parquet":
        path = _write(tmp_path, kind, [])
    else:
        path = tmp_path / f"empty.{kind}"
        path.write_text("\n  \n\n")
    with pytest.raises(ValueError, match="contains no text"):
        build_datasets(DataConfig(source=str(path)), _NoTokenizing(), 2048)


def test_too_little_text_for_one_block(tok, tmp_path):
    path = _write(tmp_path, "txt", _docs(20, words=3))  # 20 documents of 4 tokens with EOS
    with pytest.raises(ValueError, match=r"train set is empty: .* gave \d+ tokens .* seq_len=128"):
        build_datasets(DataConfig(source=str(path), seq_len=128, eval_fraction=0.5), tok, 2048)
    with pytest.raises(
        ValueError,
        match=r"eval set is empty: .*held-out eval_fraction=0.01 share.* gave 0 tokens from 0 documents.*seq_len=8",
    ):
        build_datasets(DataConfig(source=str(path), seq_len=8, eval_fraction=0.01), tok, 2048)
    stream = DataConfig(source=str(path), seq_len=48, eval_fraction=0.5, streaming=True)
    with pytest.raises(ValueError, match=r"train set is empty: .* gave 40 tokens from 10 documents.*seq_len=48"):
        build_datasets(stream, tok, 2048)


def test_seq_len_longer_than_the_model():
    with pytest.raises(ValueError, match=r"seq_len=512 is longer than the model allows \(max_positions=256\)"):
        build_datasets(DataConfig(), _NoTokenizing(), 256)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_missing_text_field(tmp_path, kind):
    path = _write(tmp_path, kind, _docs(3), field="content")
    with pytest.raises(ValueError, match=r"no text_field .*'text'.* columns present are .*'content'.*'id'"):
        build_datasets(DataConfig(source=str(path)), _NoTokenizing(), 2048)
    assert len(list(iter_texts(DataConfig(source=str(path), text_field="content", eval_fraction=0.5), "train"))) == 2


def test_unreachable_hub_is_a_clear_error(tok, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # datasets reads the variable at import
    with pytest.raises(HubUnreachableError, match=r"Hub is unreachable.*offline.*local .*file.*'pydoc'") as info:
        build_datasets(DataConfig(source="ma-convert-tests/no-such-dataset:cfg"), tok, 2048)
    assert isinstance(info.value, ValueError) and info.value.__suppress_context__  # no datasets traceback


def test_offline_is_read_from_the_error_types():
    """The Hub's typed errors anywhere in the chain mean offline; other errors do not."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    from ma_convert.training.data import _looks_offline

    def raised(error, cause):
        try:
            raise error from cause
        except Exception as caught:
            return caught

    assert _looks_offline(raised(ValueError("load failed"), OfflineModeIsEnabled("offline")))
    assert _looks_offline(LocalEntryNotFoundError("not cached")) and _looks_offline(ConnectionError("no route"))
    assert not _looks_offline(raised(ValueError("bad config"), KeyError("name")))
    assert not _looks_offline(FileNotFoundError("no such dataset"))



def _table_docs(n=6):
    return [f"document {i} " + "word " * (5 + i) for i in range(n)]


def test_local_tables_read_through_datasets(tmp_path):
    """.json, .csv, compressed .jsonl.gz, a glob of shards and a save_to_disk folder give the same
    documents, in order (datasets.load_dataset with data_files, load_from_disk)."""
    import gzip
    import json

    datasets = pytest.importorskip("datasets")
    docs = _table_docs()
    rows = [{"text": d, "id": i} for i, d in enumerate(docs)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text("id,text\n" + "".join(f"{r['id']},{r['text']}\n" for r in rows))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "shards").mkdir()
    for k in range(2):
        shard = "".join(json.dumps(r) + "\n" for r in rows[3 * k: 3 * k + 3])
        (tmp_path / "shards" / f"part-{k}.jsonl").write_text(shard)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for spec in ("a.json", "a.csv", "a.jsonl.gz", "shards/part-*.jsonl", "saved"):
        got = list(source_texts(str(tmp_path / spec)))
        assert got == docs, spec


def test_a_table_that_does_not_parse_names_the_file_and_reader(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": unquoted}\n')
    with pytest.raises(ValueError, match=r"broken.jsonl: cannot be read as json \("):
        list(source_texts(str(tmp_path / "broken.jsonl")))
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "mixed" / "b.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="different or unsupported kinds"):
        build_datasets(DataConfig(source=str(tmp_path / "mixed" / "*")), _NoTokenizing(), 2048)
