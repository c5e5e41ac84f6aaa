"""Evidence corpora: streaming DPR TSV / JSONL rows, and the pre-tokenized store.

The store is a folder of flat memory-mapped arrays, built once by ``art-jax
prepare-corpus``: passage ids, the raw title/text bytes (for results files), the
retriever's ``[CLS] title [SEP] text [SEP]`` ids and the scorer's ``title + text`` ids.
Ragged rows are one flat array plus int64 offsets, so the tokens of any retrieved
rows are one vectorised gather, not a Python loop.

Passage ids are integers (DPR) or strings (BEIR, MS MARCO, TREC docids). ``ids.npy`` holds
one int64 per row either way: the id itself, or for string ids a 64-bit fingerprint of it
(what an index records and checks its store by); a string-id store also keeps the strings
(``id.bin``) and its fingerprints sorted (``id_sorted.npy``, ``id_order.npy``) for id -> row.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator

import numpy as np

from art_jax.core import storage
from art_jax.core.batching import round_up
from art_jax.core.distributed import is_lead
from art_jax.core.errors import UserError
from art_jax.core.fileio import local_file
from art_jax.core.progress import progress_bar
from art_jax.core.remote import local_copy
from art_jax.data.build import HOST as _HOST  # noqa: F401 - the staging folders' host (tests name them)
from art_jax.data.build import Build, Ragged, RaggedWriter, read_meta
from art_jax.data.tokenization import Tokens, passage_rows

STORE_FORMAT = 1
TSV_COLUMNS = ("id", "text", "title")
# how a corpus's ids are read: "auto" lets the first row decide (an integer: every id must be
# one, as DPR's; anything else: every id is kept as its string), "int" and "str" force a kind
ID_KINDS = ("auto", "int", "str")
_FINGERPRINT_BLOCK = 1 << 23  # values per block when digesting a column


@dataclasses.dataclass(frozen=True)
class Passage:
    line: int
    end: int  # byte offset just past this row, for progress
    id: int | str  # int in an integer-id corpus, str in a string-id one
    title: str
    text: str


class _BadRow(Exception):
    pass


class _IdSet:
    """Seen passage ids: a bitmap for the dense small ids evidence files use (DPR: 1..21M),
    a set for the rest, so 21M ids cost megabytes, not a gigabyte of Python ints."""

    DENSE_LIMIT = 1 << 28

    def __init__(self):
        self.dense = np.zeros(1 << 20, bool)
        self.sparse: set[int] = set()

    def add(self, pid: int) -> bool:
        """False when ``pid`` was seen before."""
        if not 0 <= pid < self.DENSE_LIMIT:
            if pid in self.sparse:
                return False
            self.sparse.add(pid)
            return True
        if pid >= len(self.dense):
            self.dense = np.concatenate([self.dense, np.zeros(max(len(self.dense), pid + 1), bool)])
        if self.dense[pid]:
            return False
        self.dense[pid] = True
        return True


_INTEGER = re.compile(r"-?[0-9]+")
_INT64 = (-(1 << 63), (1 << 63) - 1)


def _is_integer(value) -> bool:
    return not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, str)
                                             and _INTEGER.fullmatch(value) is not None)


def _parse_id(value, hint: str = "") -> int:
    if not _is_integer(value):
        raise _BadRow(f"id {value!r} is not an integer{hint}")
    value = int(value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise _BadRow(f"id {value} does not fit in 64 bits")
    return value


def _parse_str_id(value) -> str:
    """A string id as written; a JSON integer counts as its decimal string."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _BadRow(f"id {value!r} is neither a string nor an integer")
    value = str(value)
    if not value.strip():
        raise _BadRow("empty id")
    return value


def fingerprint(passage_id: str) -> int:
    """The int64 a string id is recorded by in ``ids.npy`` (and an index's ids): the first 8
    bytes of its UTF-8 BLAKE2b digest, the same on every machine and in every process."""
    digest = hashlib.blake2b(passage_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclasses.dataclass(frozen=True)
class _Header:
    width: int
    columns: tuple[int, int, int]  # positions of id, text, title


def _tsv_header(path: str, number: int, line: str) -> _Header:
    names = _csv_fields(line.removeprefix("\ufeff"))
    missing = [c for c in TSV_COLUMNS if c not in names]
    if missing:
        raise UserError(f"{path}:{number}: header {names} lacks column(s) {missing}; "
                        "expected id<TAB>text<TAB>title")
    return _Header(len(names), tuple(names.index(c) for c in TSV_COLUMNS))


def _csv_fields(line: str) -> list[str]:
    try:
        return next(csv.reader([line], delimiter="\t"))
    except csv.Error as err:
        raise _BadRow(f"unreadable TSV row ({err})") from None


def iter_passages(path: str, *, skip_bad_rows: bool = False, bad_rows: list | None = None,
                  ids: str = "auto") -> Iterator[Passage]:
    """Stream an evidence file: DPR TSV (header ``id text title``, csv quoting) or JSONL
    (``{"id","title","text"}``; BEIR's ``{"_id","title","text"}`` too). ``ids`` (``ID_KINDS``):
    with "auto" the first row's id decides: an integer makes every id an int (a later
    non-integer id is a bad row), anything else makes every id a str, kept as written. A bad
    row (column count, non-integer, empty or duplicate id, invalid UTF-8, empty text) is an
    error naming file and line, or with ``skip_bad_rows`` is skipped and appended to
    ``bad_rows`` as ``(line, reason)``."""
    if ids not in ID_KINDS:
        raise UserError(f"unknown id kind {ids!r}; expected one of {', '.join(ID_KINDS)}")
    path = local_file(path)
    jsonl = path.endswith((".jsonl", ".json"))
    kind, hint = (None if ids == "auto" else ids), ""
    seen: _IdSet | set[str] = _IdSet() if ids == "int" else set()
    with open(path, "rb") as f:
        header, end = None, 0
        for number, raw in enumerate(f, 1):
            end += len(raw)
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.strip(" "):
                    continue
                if not jsonl and header is None:
                    header = _tsv_header(path, number, line)
                    continue
                raw_id, title, text = _parse_json(line) if jsonl else _parse_tsv(line, header)
                if kind is None and _is_integer(raw_id):
                    kind, seen = "int", _IdSet()
                    hint = (f" (the first id, {raw_id!r}, made this an integer-id corpus; "
                            "prepare-corpus --ids str keeps every id as a string)")
                elif kind is None and isinstance(raw_id, str) and raw_id.strip():
                    kind = "str"
                passage = Passage(number, end, _parse_id(raw_id, hint) if kind == "int" else _parse_str_id(raw_id),
                                  title, text)
                if not passage.text.strip():
                    raise _BadRow("empty text")
                if kind == "int" and not seen.add(passage.id):
                    raise _BadRow(f"duplicate id {passage.id}")
                if kind == "str":
                    if passage.id in seen:
                        raise _BadRow(f"duplicate id {passage.id!r}")
                    seen.add(passage.id)
            except (_BadRow, UnicodeDecodeError) as err:
                reason = "invalid UTF-8" if isinstance(err, UnicodeDecodeError) else str(err)
                if not skip_bad_rows:
                    raise UserError(f"{path}:{number}: {reason} (use --skip-bad-rows to skip such rows)") from None
                if bad_rows is not None:
                    bad_rows.append((number, reason))
                continue
            yield passage
    if not jsonl and header is None:
        raise UserError(f"{path}: empty file (expected a header id<TAB>text<TAB>title)")


def _parse_tsv(line: str, header: _Header) -> tuple[str, str, str]:
    """(raw id, title, text)."""
    fields = _csv_fields(line)
    if len(fields) != header.width:
        raise _BadRow(f"{len(fields)} columns, expected {header.width} as in the header")
    pid, text, title = (fields[i] for i in header.columns)
    return pid, title, text


def _parse_json(line: str) -> tuple[object, str, str]:
    """(raw id, title, text); the id is "id", else BEIR's "_id"."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadRow(f"invalid JSON ({err.msg})") from None
    if not isinstance(row, dict) or not ("id" in row or "_id" in row) or not isinstance(row.get("text"), str):
        raise _BadRow('expected an object with "id" (or "_id") and "text"')
    title = "" if row.get("title") is None else row["title"]
    if not isinstance(title, str):
        raise _BadRow('"title" is not a string')
    return row["id"] if "id" in row else row["_id"], title, row["text"]


_RaggedWriter = RaggedWriter  # the columns' writer and reader live in data/build.py


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


# ---------------------------------------------------------------- the store

@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """Which tokenizer produced a token column, for the store's metadata."""

    name: str
    max_length: int


def is_corpus_store(path: str) -> bool:
    """Whether the folder ``path`` holds a corpus store, of this format or the one before (by
    its meta.json: an index version's meta.json has a format too, but no retriever)."""
    meta = read_meta(path) or {}
    return meta.get("format") in (STORE_FORMAT, STORE_FORMAT - 1) and "retriever" in meta


class CorpusStore:
    """A prepared corpus: ``len(store)`` passages; row r has passage id ``store.passage_id(r)``,
    and ``store.row_of(id)`` is its row. ``store.ids[r]`` is row r's int64 key: the passage id
    itself in an integer-id store (``id_kind == "int"``), its ``fingerprint`` in a string-id one."""

    def __init__(self, path: str):
        # an index records its store by this path: absolute, or a URL (for other machines)
        self.path = path if storage.is_remote(path) else os.path.abspath(path)
        local = local_copy(path)  # memory-mapped: a gs:// store is copied to local disk first
        meta_path = os.path.join(local, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{path}: not a corpus store (no meta.json); build one with art-jax prepare-corpus")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if "retriever" not in self.meta:  # another store's meta.json (a pair or span store's)
            raise UserError(f"{path}: not a corpus store (its meta.json is not one); build one with art-jax "
                            "prepare-corpus")
        if self.meta.get("format") != STORE_FORMAT:
            raise UserError(f"{path}: corpus store format {self.meta.get('format')}, expected {STORE_FORMAT}")
        self.id_kind = self.meta.get("ids", "int")  # stores from before string ids have integer ids
        if self.id_kind not in ("int", "str"):
            raise UserError(f"{path}: unknown id kind {self.id_kind!r} in meta.json; expected int or str")
        self.ids = np.load(os.path.join(local, "ids.npy"), mmap_mode="r")
        self._id_strings = Ragged(local, "id", np.uint8) if self.id_kind == "str" else None
        # id -> row: keys sorted, and the rows in that order (None: row order); memory-mapped for
        # a string-id store, worked out on first use for an integer-id one
        self._lookup = ((np.load(os.path.join(local, "id_sorted.npy"), mmap_mode="r"),
                         np.load(os.path.join(local, "id_order.npy"), mmap_mode="r"))
                        if self.id_kind == "str" else None)
        self.titles = Ragged(local, "title", np.uint8)
        self.texts = Ragged(local, "text", np.uint8)
        retriever = self.meta["retriever"]
        self.retriever = Ragged(local, "retriever", retriever["dtype"])
        scorer = self.meta.get("scorer")
        self.scorer = Ragged(local, "scorer", scorer["dtype"]) if scorer else None

    def __len__(self) -> int:
        return len(self.ids)

    def passage_id(self, row: int) -> int | str:
        """Row ``row``'s passage id: an int, or the string as the corpus file wrote it."""
        if self._id_strings is None:
            return int(self.ids[row])
        return self._id_strings.row(row).tobytes().decode("utf-8")

    def passage_ids(self, rows) -> list[int | str]:
        return [self.passage_id(int(r)) for r in rows]

    def row_of(self, passage_id: int | str) -> int:
        """The row of the passage ``passage_id``; an id the store lacks is a UserError. An
        integer-id store takes ints or their decimal strings (as qrels and runs write them)."""
        return int(self.rows_of([passage_id])[0])

    def rows_of(self, passage_ids) -> np.ndarray:
        """Rows [n] of the passages ``passage_ids``, by binary search over the sorted keys."""
        given = list(passage_ids)
        passage_ids = [self._as_str(p) for p in given] if self.id_kind == "str" else given
        keys = np.fromiter((self._key(p) for p in passage_ids), np.int64, len(passage_ids))
        sorted_keys, order = self._id_lookup()
        n = len(sorted_keys)
        at = np.searchsorted(sorted_keys, keys)
        found = at < n
        found[found] = np.asarray(sorted_keys[at[found]]) == keys[found]
        rows = np.full(len(keys), -1, np.int64)
        rows[found] = at[found] if order is None else np.asarray(order[at[found]])
        if self._id_strings is not None:  # a fingerprint may be shared: the string decides
            for i in np.flatnonzero(found):
                rows[i] = self._matching_row(passage_ids[i], int(at[i]), int(keys[i]))
        missing = np.flatnonzero(rows < 0)
        if missing.size:
            raise UserError(f"{self.path}: no passage with id {given[missing[0]]!r}")
        return rows

    def _as_str(self, passage_id) -> str:
        if isinstance(passage_id, (int, np.integer)) and not isinstance(passage_id, bool):
            return str(int(passage_id))  # as a corpus file's JSON integer id is kept
        if not isinstance(passage_id, str):
            raise UserError(f"{self.path}: passage id {passage_id!r} is not a string")
        return passage_id

    def _key(self, passage_id) -> int:
        if self.id_kind == "str":
            return fingerprint(passage_id)
        try:
            return _parse_id(passage_id.item() if isinstance(passage_id, np.integer) else passage_id)
        except _BadRow:
            raise UserError(f"{self.path}: no passage with id {passage_id!r} (its ids are integers)") from None

    def _matching_row(self, passage_id: str, at: int, key: int) -> int:
        sorted_keys, order = self._lookup
        while at < len(sorted_keys) and int(sorted_keys[at]) == key:
            if self.passage_id(int(order[at])) == passage_id:
                return int(order[at])
            at += 1
        return -1

    def _id_lookup(self) -> tuple[np.ndarray, np.ndarray | None]:
        if self._lookup is None:
            ids = self.ids
            # DPR's ids ascend with the rows: search them as they are, no copy
            if len(ids) < 2 or bool(np.all(ids[1:] > ids[:-1])):
                self._lookup = (ids, None)
            else:
                order = np.argsort(ids, kind="stable")
                self._lookup = (np.asarray(ids)[order], order)
        return self._lookup

    def title(self, row: int) -> str:
        return self.titles.row(row).tobytes().decode("utf-8")

    def text(self, row: int) -> str:
        return self.texts.row(row).tobytes().decode("utf-8")

    def retriever_tokens(self, rows, max_length: int, multiple: int | None = None) -> Tokens:
        """Passage-tower input for ``rows``, re-cut to ``max_length`` exactly as the tokenizer's
        only-second truncation would (the text loses its end, the final [SEP] stays).
        Padded to ``max_length``, or with ``multiple`` to the longest row rounded up to it."""
        meta = self.meta["retriever"]
        if max_length > meta["max_length"]:
            raise UserError(f"{self.path}: tokens were stored at max length {meta['max_length']}, "
                            f"{max_length} requested; rebuild with a larger --retriever-max-length")
        width = max_length
        if multiple:
            width = min(max_length, round_up(int(np.minimum(self.retriever.lengths(rows), max_length).max(initial=1)),
                                             multiple))
        ids, lengths = self.retriever.cut(rows, max_length, pad=meta["pad_id"], last=meta["sep_id"], width=width)
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
        return Tokens(ids, mask)

    def scorer_passages(self, rows) -> list[list[int]]:
        """``title + text`` scorer ids of ``rows`` (the prompt builder adds head and verbalizer)."""
        if self.scorer is None:
            raise UserError(f"{self.path}: built without --scorer, so it holds no scorer tokens")
        return [self.scorer.row(int(r)).tolist() for r in rows]


def corpus_fingerprint(store: CorpusStore) -> str:
    """What a pair or span store records of the corpus its rows point into: a digest of the
    store's row keys (``ids.npy``) and text lengths, the same for the same corpus rebuilt."""
    digest = hashlib.blake2b(digest_size=16)
    for column in (store.ids, store.texts.offsets):
        for start in range(0, len(column), _FINGERPRINT_BLOCK):
            digest.update(np.ascontiguousarray(column[start:start + _FINGERPRINT_BLOCK]))
    return digest.hexdigest()


def prepare_corpus(corpus_path: str, out: str, retriever_tokenizer, retriever: TokenizerSpec,
                   scorer_tokenizer=None, scorer: TokenizerSpec | None = None, *, batch_size: int = 2048,
                   skip_bad_rows: bool = False, progress: bool = True, ids: str = "auto") -> CorpusStore:
    """Stream ``corpus_path`` into a store at ``out`` (written beside it, then renamed into
    place; a URL's is built in the local cache, then uploaded with meta.json last). ``ids``:
    integer or string passage ids, as ``iter_passages`` reads them.
    A staged build (``data/build.py``): each process tokenizes its share of the batches
    (tokenization of one batch overlapping parsing the next: fast tokenizers release the GIL
    and use their own threads), and a killed build is taken up by the rerun."""
    from art_jax.data.prompts import PromptBuilder

    out = out.rstrip("/")
    if ids not in ID_KINDS:
        raise UserError(f"unknown id kind {ids!r}; expected one of {', '.join(ID_KINDS)}")
    storage.check_replaceable(out, "a corpus store (no meta.json of a store)", is_corpus_store)
    source = corpus_path if storage.is_remote(corpus_path) else os.path.abspath(corpus_path)
    corpus_path = local_file(corpus_path)
    builder = PromptBuilder(scorer_tokenizer) if scorer_tokenizer is not None else None
    key = {"store": "corpus", "format": STORE_FORMAT, "input": input_key(corpus_path), "source": source,
           "retriever": [retriever.name, retriever.max_length, len(retriever_tokenizer)],
           "scorer": [scorer.name, scorer.max_length, len(scorer_tokenizer)] if builder is not None else None,
           "batch_size": batch_size, "skip_bad_rows": skip_bad_rows, "ids": ids}
    with Build(out, "prepare_corpus", kind="a corpus store (no meta.json of a store)", is_kind=is_corpus_store,
               key=key) as build:
        for name, dtype in (("title", np.uint8), ("text", np.uint8),
                            ("retriever", token_dtype(len(retriever_tokenizer)))):
            build.writer(name, dtype)
        if builder is not None:
            build.writer("scorer", token_dtype(len(scorer_tokenizer)))
        # every batch's ids (int64 keys): every process parses every row, so all meet the same bad
        # rows and duplicates; string ids are also written as they are, by process 0 alone
        keys: list[np.ndarray] = []
        kind, id_writer = None, None
        bad_rows: list[tuple[int, str]] = []

        def tokenize(batch: list[Passage]):
            titles, texts = [p.title for p in batch], [p.text for p in batch]
            out = {"retriever": passage_rows(retriever_tokenizer, titles, texts, retriever.max_length)}
            if builder is not None:
                out["scorer"] = [row[:scorer.max_length] for row in builder.passage_ids(titles, texts)]
            return batch, out

        def write(job) -> None:
            batch, tokens = job
            build.writers["title"].append([p.title.encode("utf-8") for p in batch])
            build.writers["text"].append([p.text.encode("utf-8") for p in batch])
            for name, rows in tokens.items():
                build.writers[name].append(rows)

        def every(batch: list[Passage], done: bool) -> None:
            nonlocal kind, id_writer
            if kind is None:  # every passage's id has the kind of the first
                kind = "str" if isinstance(batch[0].id, str) else "int"
                if kind == "str" and build.lead:
                    id_writer = build.writer("id", np.uint8, merged=False)
            if kind == "str":
                if id_writer is not None and not done:
                    id_writer.append([p.id.encode("utf-8") for p in batch])
                keys.append(np.fromiter((fingerprint(p.id) for p in batch), np.int64, len(batch)))
            else:
                keys.append(np.fromiter((p.id for p in batch), np.int64, len(batch)))

        passages = iter_passages(corpus_path, skip_bad_rows=skip_bad_rows, bad_rows=bad_rows, ids=ids)
        with progress_bar(total=os.path.getsize(corpus_path), unit="B", unit_scale=True, desc="prepare-corpus",
                          disable=not progress) as bar:

            def batches():
                parsed = 0
                for batch in batches_of(passages, batch_size):
                    yield batch
                    parsed += len(batch)
                    bar.update(batch[-1].end - bar.n)
                    bar.set_postfix(passages=parsed, refresh=False)

            build.run(batches(), tokenize, write, every)
        all_ids = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        if not len(all_ids):
            raise UserError(f"{corpus_path}: no passages")
        if build.finish():
            staging = build.staging
            np.save(os.path.join(staging, "ids.npy"), all_ids)
            if kind == "str":  # id -> row: binary search over the sorted fingerprints
                order = np.argsort(all_ids, kind="stable")
                np.save(os.path.join(staging, "id_order.npy"), order)
                np.save(os.path.join(staging, "id_sorted.npy"), all_ids[order])
            meta = {
                "format": STORE_FORMAT, "count": len(all_ids), "ids": kind, "source": source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "skipped_rows": len(bad_rows), "skipped_examples": [list(b) for b in bad_rows[:20]],
                "retriever": token_meta(retriever_tokenizer, retriever, sep_id=retriever_tokenizer.sep_token_id),
                "scorer": token_meta(scorer_tokenizer, scorer) if builder is not None else None,
            }
            storage.write_text(os.path.join(staging, "meta.json"), json.dumps(meta, indent=1))
            build.publish("meta.json")
    if bad_rows and progress and is_lead():
        print(f"prepare-corpus: skipped {len(bad_rows)} bad row(s), e.g. line {bad_rows[0][0]}: {bad_rows[0][1]}")
    return CorpusStore(out)


def input_key(path: str) -> list:
    """What a build's key records of an input file: its path, size and modification time."""
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def batches_of(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def token_meta(tokenizer, spec: TokenizerSpec, **extra) -> dict:
    return {"tokenizer": spec.name, "max_length": spec.max_length, "vocab_size": len(tokenizer),
            "dtype": np.dtype(token_dtype(len(tokenizer))).name, "pad_id": tokenizer.pad_token_id, **extra}
