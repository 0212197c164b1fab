"""Training data for router finetuning: read documents, tokenize, pack into fixed-length blocks.

Sources (``DataConfig.source``):

* ``"pydoc"``: CPython's own reference text (``pydoc_data.topics.topics``). Every Python ships it, so
  the recipe runs with no download (~465k characters of English, ~110k tokens for a LLaMA tokenizer).
* a local ``.txt`` file (documents separated by blank lines);
* local tables, read by ``datasets.load_dataset`` with ``data_files``, text in column ``text_field``:
  ``.jsonl`` / ``.json``, ``.csv`` and ``.parquet`` files, each optionally compressed (``.gz``, ``.bz2``,
  ``.xz``, ``.zst``), a glob of them (``data/*.jsonl.gz``), or a folder written by ``save_to_disk``.
* anything else: a Hub dataset for ``datasets.load_dataset``, written ``name``, ``name:config``, either
  optionally followed by ``@split`` (otherwise ``DataConfig.split``).

Without an ``eval_source`` the eval set is held out of ``source``: walking the documents in order (pydoc:
sorted topic keys), a document goes to eval whenever that keeps eval's share of the characters seen so
far at or under ``eval_fraction``, else to train. Deterministic, disjoint, close to ``eval_fraction`` of
the text even when document sizes vary a lot (pydoc's do), and it needs no totals, so it works on streams.

Packing tokenizes each document without special tokens, appends EOS after it, concatenates and cuts
fixed ``seq_len`` blocks; the last partial block is dropped.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
from torch.utils.data import IterableDataset

from ..core.config import is_int, is_num

__all__ = [
    "DataConfig",
    "HubUnreachableError",
    "PackedBlocks",
    "build_datasets",
    "iter_texts",
    "pack",
    "pydoc_topics",
    "source_texts",
]

_FILE_KINDS = {".txt": "txt", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_TOKENIZE_BATCH = 64  # documents per tokenizer call: fast tokenizers batch in Rust, and the stream stays lazy


class HubUnreachableError(ValueError, ConnectionError):
    """A Hub dataset was asked for and the Hub cannot be reached (offline mode or no network)."""


@dataclass
class DataConfig:
    source: str = "pydoc"
    seq_len: int = 512
    eval_source: str | None = None  # None: hold out eval_fraction of source
    eval_fraction: float = 0.1
    text_field: str = "text"
    split: str = "train"
    streaming: bool = False
    max_train_tokens: int | None = None
    max_eval_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("source", "text_field", "split", "eval_source"):
            value = getattr(self, name)
            if (value is not None or name != "eval_source") and not (isinstance(value, str) and value.strip()):
                none = "None or " if name == "eval_source" else ""
                raise ValueError(f"DataConfig.{name} must be {none}a non-empty string, got {value!r}")
        if not is_int(self.seq_len) or self.seq_len < 2:
            # a block of one token has no next-token target
            raise ValueError(f"DataConfig.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not (is_num(self.eval_fraction) and 0 < self.eval_fraction < 1):
            raise ValueError(f"DataConfig.eval_fraction must be in (0, 1) (exclusive), got {self.eval_fraction!r}")
        if not isinstance(self.streaming, bool):
            raise ValueError(f"DataConfig.streaming must be True or False, got {self.streaming!r}")
        for name in ("max_train_tokens", "max_eval_tokens"):
            value = getattr(self, name)
            # fewer tokens than one block would always give an empty set
            if value is not None and (not is_int(value) or value < self.seq_len):
                raise ValueError(
                    f"DataConfig.{name} must be None or an integer >= seq_len ({self.seq_len}), got {value!r}"
                )


# ----------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    kind: str  # "pydoc", "txt", "table" (datasets' json / csv / parquet builders), "disk" or "hub"
    spec: str
    files: tuple = ()  # txt, table, disk: the local files (disk: the save_to_disk folder)
    name: str | None = None  # hub: the dataset; table: the builder
    config: str | None = None
    split: str | None = None

    def identity(self) -> tuple:
        """What makes two sources the same data (for the overlap check)."""
        return (self.kind, self.name, self.config, self.split, tuple(str(f.resolve()) for f in self.files))


def _file_kind(path: Path) -> Optional[str]:
    """txt, json, csv or parquet from the name (a compression suffix is looked through)."""
    suffixes = [x.lower() for x in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes = suffixes[:-1]
    kind = _FILE_KINDS.get(suffixes[-1]) if suffixes else None
    return None if kind == "txt" and path.suffix.lower() in _COMPRESSIONS else kind


def _resolve(spec: str, cfg: DataConfig, field: str) -> _Source:
    if spec == "pydoc":
        return _Source("pydoc", spec)
    if any(c in spec for c in "*?["):
        return _resolve_glob(spec, field)
    path = Path(spec).expanduser()
    kind = _file_kind(path)
    if kind is not None:
        if not path.is_file():
            raise ValueError(f"DataConfig.{field}: file not found: {spec}")
        return _Source("txt", spec, (path,)) if kind == "txt" else _Source("table", spec, (path,), name=kind)
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return _Source("disk", spec, (path,))  # datasets' save_to_disk
    if path.exists():
        raise ValueError(
            f"DataConfig.{field}: unsupported local source {spec!r}; use a .txt, .jsonl, .json, .csv or .parquet "
            f"file (optionally .gz/.bz2/.xz/.zst), a glob of them, a save_to_disk folder, 'pydoc', or a Hub dataset"
        )
    if path.is_absolute() or spec.startswith((".", "~")):
        # clearly meant as a path: don't send it to the Hub
        raise ValueError(f"DataConfig.{field}: file not found: {spec}")
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    return _Source("hub", spec, name=name, config=config or None, split=split or cfg.split)


def _resolve_glob(spec: str, field: str) -> _Source:
    import glob

    files = tuple(sorted(Path(f) for f in glob.glob(str(Path(spec).expanduser()), recursive=True) if Path(f).is_file()))
    if not files:
        raise ValueError(f"DataConfig.{field}: no file matches {spec}")
    kinds = {_file_kind(f) for f in files}
    if len(kinds) != 1 or None in kinds or "txt" in kinds:
        raise ValueError(f"DataConfig.{field}: {spec} matches files of different or unsupported kinds "
                         f"({', '.join(sorted({f.name for f in files})[:5])}); a glob takes .jsonl, .json, .csv or "
                         f".parquet files of one kind")
    return _Source("table", spec, files, name=kinds.pop())


def pydoc_topics(part: Literal["train", "eval", "all"] = "all", eval_fraction: float = 0.1) -> list[str]:
    """The pydoc topic keys of one part, in sorted order (see the module docstring for the rule)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if part == "all":
        return keys
    if part not in ("train", "eval"):
        raise ValueError(f"part must be 'train', 'eval' or 'all', got {part!r}")
    want_eval = part == "eval"
    return [key for key, is_eval in _split(keys, eval_fraction, lambda key: len(topics[key])) if is_eval == want_eval]


def _split(items: Iterable, fraction: float, size=len) -> Iterator[tuple[object, bool]]:
    """Pair each item with "is it eval?" by the character-share rule of the module docstring."""
    seen = held = 0
    for item in items:
        n = size(item)
        seen += n
        is_eval = held + n <= fraction * seen
        if is_eval:
            held += n
        yield item, is_eval


def source_texts(spec: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Every non-empty document of one source, lazily, as the recipe reads it: a .txt (documents
    separated by blank lines), a local table (`text_field`, see the module docstring), 'pydoc', or a Hub dataset
    ``name[:config][@split]``."""
    cfg = DataConfig(source=spec, text_field=text_field, split=split)
    return _iter_source(_resolve(spec, cfg, "source"), cfg)


def _iter_source(src: _Source, cfg: DataConfig) -> Iterator[str]:
    """Every non-empty document of a source, lazily, in a fixed order."""
    if src.kind == "pydoc":
        from pydoc_data.topics import topics

        for key in pydoc_topics("all"):
            yield topics[key]
    elif src.kind == "txt":
        yield from _iter_txt(src.files[0])
    else:
        yield from _iter_rows(src, cfg)


def _iter_txt(path: Path) -> Iterator[str]:
    """The runs of lines with text, each one document (blank or whitespace-only lines separate them)."""
    with path.open(encoding="utf-8") as f:
        for has_text, lines in itertools.groupby(f, key=lambda line: bool(line.strip())):
            if has_text:
                yield "".join(lines).removesuffix("\n")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "reading tables and Hub datasets needs the `datasets` package (pip install 'ma-convert[train]'); "
            "or use a local .txt file or source='pydoc'"
        ) from None
    return datasets


def _load(src: _Source, cfg: DataConfig):
    """The source as a `datasets` dataset (streamed if `cfg.streaming`), checked for `text_field`."""
    datasets = _datasets()
    if src.kind == "disk":
        ds = datasets.load_from_disk(str(src.files[0]))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"{src.spec}: no split {cfg.split!r}; the splits are {sorted(ds)}")
            ds = ds[cfg.split]
    elif src.kind == "table":
        ds = _load_table(src, cfg, datasets)
    else:
        ds = _load_hub(src, cfg, datasets)
    if isinstance(ds, list):  # an empty table
        return ds
    columns = ds.column_names  # None for some streamed datasets: then the row check catches it
    if columns is not None and cfg.text_field not in columns:
        raise ValueError(f"{src.spec}: no text_field column {cfg.text_field!r}; the columns present are {columns}")
    return ds if columns is None else ds.select_columns([cfg.text_field])  # decode only the text


def _no_rows(files, builder: str) -> bool:
    """Files with no data at all (datasets' builders fail on them instead of reading nothing)."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        return all(pq.ParquetFile(f).metadata.num_rows == 0 for f in files)
    return all(f.suffix.lower() not in _COMPRESSIONS and not _has_text(f) for f in files)


def _has_text(path: Path) -> bool:
    """Whether a file holds anything but whitespace (read until the first character that is not)."""
    with path.open("rb") as f:
        return any(chunk.strip() for chunk in iter(lambda: f.read(1 << 16), b""))


def _load_table(src: _Source, cfg: DataConfig, datasets):
    if _no_rows(src.files, src.name):
        return []
    files = [str(f) for f in src.files]
    try:
        return datasets.load_dataset(src.name, data_files=files, split="train", streaming=cfg.streaming)
    except Exception as error:  # a parse error deep in an Arrow builder: name the file and the reader
        cause = error.__cause__ or error.__context__ or error
        raise ValueError(f"{src.spec}: cannot be read as {src.name} "
                         f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''})") from None


def _load_hub(src: _Source, cfg: DataConfig, datasets):
    try:
        return datasets.load_dataset(src.name, src.config, split=src.split, streaming=cfg.streaming)
    except Exception as error:  # datasets surfaces network trouble in many types; classify, then re-raise
        if _looks_offline(error):
            raise HubUnreachableError(
                f"cannot load Hub dataset {src.spec!r}: the Hugging Face Hub is unreachable (offline mode, "
                f"HF_HUB_OFFLINE=1, or no network) and the dataset is not in the local cache. "
                f"Use a local file (.txt, .jsonl, .csv, .parquet, ...), or source='pydoc' (built in). "
                f"[{type(error).__name__}: {error}]"
            ) from None
        if isinstance(error, FileNotFoundError):
            raise ValueError(f"{src.spec!r} is neither a local file nor a dataset found on the Hub [{error}]") from None
        raise


def _looks_offline(error: BaseException) -> bool:
    """Whether the error, or one it came from, is the Hub being unreachable: datasets raises
    ConnectionError, huggingface_hub its typed offline and cache-miss errors."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = (ConnectionError, TimeoutError, OfflineModeIsEnabled, LocalEntryNotFoundError)
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, offline):
            return True
        error = error.__cause__ or error.__context__
    return False


def _iter_rows(src: _Source, cfg: DataConfig) -> Iterator[str]:
    for number, row in enumerate(_load(src, cfg)):
        if cfg.text_field not in row:
            raise ValueError(
                f"{src.spec} row {number}: no text_field {cfg.text_field!r}; the columns present are {sorted(row)}"
            )
        text = row[cfg.text_field]
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{src.spec} row {number}: the text field holds {type(text).__name__}, expected a string")
        if text and text.strip():
            yield text


def _parts(cfg: DataConfig) -> tuple[_Source, _Source | None]:
    """The train source and the eval source (None: eval is held out of the train source)."""
    train = _resolve(cfg.source, cfg, "source")
    if cfg.eval_source is None:
        return train, None
    held = _resolve(cfg.eval_source, cfg, "eval_source")
    if held.identity() == train.identity():
        raise ValueError(
            f"DataConfig.eval_source {cfg.eval_source!r} is the same data as source {cfg.source!r}, so eval would "
            f"overlap train; leave eval_source=None to hold out eval_fraction of source"
        )
    return train, held


def iter_texts(cfg: DataConfig, part: Literal["train", "eval"]) -> Iterator[str]:
    """The non-empty documents of the train or eval part, lazily."""
    if part not in ("train", "eval"):
        raise ValueError(f"part must be 'train' or 'eval', got {part!r}")
    train, held = _parts(cfg)
    if held is not None:
        yield from _iter_source(train if part == "train" else held, cfg)
        return
    want_eval = part == "eval"
    for text, is_eval in _split(_iter_source(train, cfg), cfg.eval_fraction):
        if is_eval == want_eval:
            yield text


# ----------------------------------------------------------------------------------------------- packing


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos_token_id; packing separates documents with EOS, so set tokenizer.eos_token"
        )
    return int(eos)


def pack(texts: Iterable[str], tokenizer, seq_len: int, max_tokens: int | None = None,
         counts: Counter | None = None) -> Iterator[torch.LongTensor]:
    """Tokenize documents, EOS after each, concatenate, cut into ``seq_len`` blocks (last partial dropped).

    Lazy: consumes ``texts`` only as far as the blocks asked for, and stops after ``max_tokens // seq_len``
    blocks when ``max_tokens`` is set. ``counts``, if given, adds up the "documents" and "tokens" read.
    """
    if not is_int(seq_len) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 0):
        raise ValueError(f"max_tokens must be None or an integer >= 0, got {max_tokens!r}")
    eos = _eos_id(tokenizer)
    counts = Counter() if counts is None else counts
    blocks_left = math.inf if max_tokens is None else max_tokens // seq_len
    buffer: list[int] = []
    texts = (text for text in texts if text)
    while blocks_left and (batch := list(itertools.islice(texts, _TOKENIZE_BATCH))):
        # no BOS etc.: documents are joined by EOS only; verbose=False silences the "longer than
        # model_max_length" warning, which does not apply to text we cut into blocks
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(eos)
            counts["documents"] += 1
            counts["tokens"] += len(ids) + 1
        full = min(len(buffer) // seq_len, blocks_left)
        for k in range(full):
            yield torch.tensor(buffer[k * seq_len : (k + 1) * seq_len], dtype=torch.long)
        blocks_left -= full
        del buffer[: full * seq_len]  # once per batch, so long documents stay linear


class PackedBlocks(IterableDataset):
    """The train blocks as a re-iterable stream (each epoch reads and packs the source again)."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer

    def __iter__(self) -> Iterator[torch.LongTensor]:
        blocks = pack(iter_texts(self.cfg, "train"), self.tokenizer, self.cfg.seq_len, self.cfg.max_train_tokens)
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            return blocks
        # DataLoader workers each run this: give each a disjoint share of the blocks instead of copies
        return itertools.islice(blocks, worker.id, None, worker.num_workers)


# ----------------------------------------------------------------------------------------------- datasets


def _blocks(cfg: DataConfig, tokenizer, part: str, limit: int | None = None) -> list[torch.Tensor]:
    """The part's blocks (only the first `limit` when set); an empty part is an error that says why."""
    counts = Counter()
    max_tokens = cfg.max_train_tokens if part == "train" else cfg.max_eval_tokens
    blocks = list(itertools.islice(pack(iter_texts(cfg, part), tokenizer, cfg.seq_len, max_tokens, counts), limit))
    if blocks:
        return blocks
    where = cfg.source if part == "train" or cfg.eval_source is None else cfg.eval_source
    held = (
        f" (its held-out eval_fraction={cfg.eval_fraction:g} share; raise eval_fraction or set eval_source)"
        if part == "eval" and cfg.eval_source is None
        else ""
    )
    raise ValueError(
        f"the {part} set is empty: {where!r}{held} gave {counts['tokens']} tokens from {counts['documents']} "
        f"documents, fewer than one block of seq_len={cfg.seq_len}; use more text or a smaller seq_len"
    )


def describe_eval_text(cfg: DataConfig, tokens: Optional[int] = None) -> str:
    """What evaluation perplexity is measured on, for cards and reports: the text, the part, the block length."""
    spec = cfg.eval_source or cfg.source
    if spec == "pydoc":
        name = "CPython's documentation text (`pydoc_data.topics`)"
    else:
        name = f"`{Path(spec).name if Path(spec).exists() else spec}`"
    part = "" if cfg.eval_source else f", the held-out {cfg.eval_fraction:.0%}"
    amount = f", {tokens:,} tokens" if tokens else ""
    return f"{name}{part}, in {cfg.seq_len}-token blocks{amount}"


def build_datasets(
    cfg: DataConfig, tokenizer, max_positions: int | None
) -> tuple[list[torch.Tensor] | PackedBlocks, list[torch.Tensor]]:
    """Train blocks (a list, or a ``PackedBlocks`` stream when ``cfg.streaming``) and eval blocks (a list).

    ``max_positions`` is the longest sequence the model accepts (None: no limit). Every check that needs
    no tokenizing runs first.
    """
    _eos_id(tokenizer)
    if max_positions is not None and cfg.seq_len > max_positions:
        raise ValueError(
            f"DataConfig.seq_len={cfg.seq_len} is longer than the model allows (max_positions={max_positions}); "
            f"use seq_len <= {max_positions}"
        )
    for src in _parts(cfg):
        # cheap before tokenizing: reading lazily, the first document also checks the columns and the Hub
        if src is not None and src.kind != "pydoc" and next(_iter_source(src, cfg), None) is None:
            raise ValueError(f"{src.spec}: contains no text")
    if cfg.streaming:  # pull one block now, so an empty stream fails here rather than inside the training loop
        _blocks(cfg, tokenizer, "train", limit=1)
        return PackedBlocks(cfg, tokenizer), _blocks(cfg, tokenizer, "eval")
    return _blocks(cfg, tokenizer, "train"), _blocks(cfg, tokenizer, "eval")
