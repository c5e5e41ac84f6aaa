"""Evidence corpora: streaming DPR TSV / JSONL rows, and the pre-tokenized store.

The store is a folder of flat memory-mapped arrays, built once by ``art-jax
prepare-corpus``: passage ids, the raw title/text bytes (for results files), the
retriever's ``[CLS] title [SEP] text [SEP]`` ids and the scorer's ``title + text`` ids.
Ragged rows are one flat array plus int64 offsets, so the tokens of any retrieved
rows are one vectorised gather, not a Python loop.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from art_jax.core import storage
from art_jax.core.batching import round_up
from art_jax.core.distributed import barrier, is_lead
from art_jax.core.errors import UserError
from art_jax.core.fileio import local_file
from art_jax.core.progress import progress_bar
from art_jax.core.remote import keep_as_copy, local_copy, staging_parent
from art_jax.data.tokenization import Tokens, passage_rows

STORE_FORMAT = 1
TSV_COLUMNS = ("id", "text", "title")


@dataclasses.dataclass(frozen=True)
class Passage:
    line: int
    end: int  # byte offset just past this row, for progress
    id: int
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


def _parse_id(value) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, str) and _INTEGER.fullmatch(value)):
        raise _BadRow(f"id {value!r} is not an integer")
    value = int(value)
    if not _INT64[0] <= value <= _INT64[1]:
        raise _BadRow(f"id {value} does not fit in 64 bits")
    return value


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


def iter_passages(path: str, *, skip_bad_rows: bool = False, bad_rows: list | None = None) -> Iterator[Passage]:
    """Stream an evidence file: DPR TSV (header ``id text title``, csv quoting) or JSONL
    (``{"id","title","text"}``). A bad row (column count, non-integer or duplicate id,
    invalid UTF-8, empty text) is an error naming file and line, or with
    ``skip_bad_rows`` is skipped and appended to ``bad_rows`` as ``(line, reason)``."""
    path = local_file(path)
    jsonl = path.endswith((".jsonl", ".json"))
    seen = _IdSet()
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
                passage = _parse_json(line, number, end) if jsonl else _parse_tsv(line, number, end, header)
                if not passage.text.strip():
                    raise _BadRow("empty text")
                if not seen.add(passage.id):
                    raise _BadRow(f"duplicate id {passage.id}")
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


def _parse_tsv(line: str, number: int, end: int, header: _Header) -> Passage:
    fields = _csv_fields(line)
    if len(fields) != header.width:
        raise _BadRow(f"{len(fields)} columns, expected {header.width} as in the header")
    pid, text, title = (fields[i] for i in header.columns)
    return Passage(number, end, _parse_id(pid), title, text)


def _parse_json(line: str, number: int, end: int) -> Passage:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadRow(f"invalid JSON ({err.msg})") from None
    if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("text"), str):
        raise _BadRow('expected an object with "id" and "text"')
    title = "" if row.get("title") is None else row["title"]
    if not isinstance(title, str):
        raise _BadRow('"title" is not a string')
    return Passage(number, end, _parse_id(row["id"]), title, row["text"])


# ---------------------------------------------------------------- ragged arrays

class _RaggedWriter:
    def __init__(self, folder: str, name: str, dtype):
        self.folder, self.name, self.dtype = folder, name, np.dtype(dtype)
        self.file = open(os.path.join(folder, f"{name}.bin"), "wb")
        self.offsets = [np.zeros(1, np.int64)]
        self.end = 0

    def append(self, rows: Sequence[Sequence[int]] | Sequence[bytes]) -> None:
        lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
        if self.dtype == np.uint8:
            self.file.write(b"".join(rows))
        elif len(rows):
            self.file.write(np.concatenate([np.asarray(r, self.dtype) for r in rows]).tobytes())
        self._advance(lengths)

    def append_flat(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Rows given as their concatenation and lengths (copied from another ragged array)."""
        self.file.write(np.asarray(values, self.dtype).tobytes())
        self._advance(np.asarray(lengths, np.int64))

    def _advance(self, lengths: np.ndarray) -> None:
        self.offsets.append(self.end + np.cumsum(lengths))
        self.end += int(lengths.sum())

    def close(self) -> None:
        self.file.close()
        np.save(os.path.join(self.folder, f"{self.name}.offsets.npy"), np.concatenate(self.offsets))


class Ragged:
    """Read side: ``data[offsets[i]:offsets[i + 1]]`` is row i; both memory-mapped."""

    def __init__(self, folder: str, name: str, dtype):
        self.offsets = np.load(os.path.join(folder, f"{name}.offsets.npy"), mmap_mode="r")
        path = os.path.join(folder, f"{name}.bin")
        # an empty file cannot be mapped; one dummy element keeps gather's indexing valid
        self.data = np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(1, dtype)

    def lengths(self, rows=None) -> np.ndarray:
        rows = np.arange(len(self.offsets) - 1) if rows is None else np.asarray(rows, np.int64)
        return np.asarray(self.offsets[rows + 1] - self.offsets[rows])

    def row(self, i: int) -> np.ndarray:
        return np.asarray(self.data[self.offsets[i]:self.offsets[i + 1]])

    def gather(self, rows, length: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Rows cut/padded to ``length``: values [R, length] and true lengths [R]."""
        rows = np.asarray(rows, np.int64)
        starts = np.asarray(self.offsets[rows])
        lengths = np.minimum(np.asarray(self.offsets[rows + 1]) - starts, length)
        positions = np.arange(length)
        valid = positions[None, :] < lengths[:, None]
        values = np.where(valid, self.data[np.where(valid, starts[:, None] + positions, 0)], pad)
        return values, lengths


def _token_dtype(vocab_size: int):
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
    try:
        meta = json.loads(storage.read_text(os.path.join(path, "meta.json")))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") in (STORE_FORMAT, STORE_FORMAT - 1) and "retriever" in meta


class CorpusStore:
    """A prepared corpus: ``len(store)`` passages, row r has passage id ``store.ids[r]``."""

    def __init__(self, path: str):
        # an index records its store by this path: absolute, or a URL (for other machines)
        self.path = path if storage.is_remote(path) else os.path.abspath(path)
        local = local_copy(path)  # memory-mapped: a gs:// store is copied to local disk first
        meta_path = os.path.join(local, "meta.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{path}: not a corpus store (no meta.json); build one with art-jax prepare-corpus")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != STORE_FORMAT:
            raise UserError(f"{path}: corpus store format {self.meta.get('format')}, expected {STORE_FORMAT}")
        self.ids = np.load(os.path.join(local, "ids.npy"), mmap_mode="r")
        self.titles = Ragged(local, "title", np.uint8)
        self.texts = Ragged(local, "text", np.uint8)
        retriever = self.meta["retriever"]
        self.retriever = Ragged(local, "retriever", retriever["dtype"])
        scorer = self.meta.get("scorer")
        self.scorer = Ragged(local, "scorer", scorer["dtype"]) if scorer else None

    def __len__(self) -> int:
        return len(self.ids)

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
        full = self.retriever.lengths(rows)
        lengths = np.minimum(full, max_length)
        width = min(max_length, round_up(int(lengths.max(initial=1)), multiple)) if multiple else max_length
        ids, _ = self.retriever.gather(rows, width, meta["pad_id"])
        ids = ids.astype(np.int32)
        cut = np.flatnonzero(full > max_length)
        if cut.size:  # then width == max_length
            ids[cut, max_length - 1] = meta["sep_id"]
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
        return Tokens(ids, mask)

    def scorer_passages(self, rows) -> list[list[int]]:
        """``title + text`` scorer ids of ``rows`` (the prompt builder adds head and verbalizer)."""
        if self.scorer is None:
            raise UserError(f"{self.path}: built without --scorer, so it holds no scorer tokens")
        return [self.scorer.row(int(r)).tolist() for r in rows]


def prepare_corpus(corpus_path: str, out: str, retriever_tokenizer, retriever: TokenizerSpec,
                   scorer_tokenizer=None, scorer: TokenizerSpec | None = None, *, batch_size: int = 2048,
                   skip_bad_rows: bool = False, progress: bool = True) -> CorpusStore:
    """Stream ``corpus_path`` into a store at ``out`` (written beside it, then renamed into
    place; a URL's is built in the local cache, then uploaded with meta.json last).
    Tokenization of one batch overlaps parsing the next (fast tokenizers release the GIL and
    use their own threads)."""
    from art_jax.data.prompts import PromptBuilder

    out = out.rstrip("/")
    storage.check_replaceable(out, "a corpus store (no meta.json of a store)", is_corpus_store)
    source = corpus_path if storage.is_remote(corpus_path) else os.path.abspath(corpus_path)
    corpus_path = local_file(corpus_path)
    parent = staging_parent(out)
    processes, me = jax.process_count(), jax.process_index()
    # each process tokenizes every processes-th batch into its own part, process 0 merges the
    # parts in batch order: in one staging folder of the job's, or, when the store goes to a
    # URL (no folder shared), each in its own, the others' parts passed on through parts_url
    shared = processes > 1 and not storage.is_remote(out)
    parts_url = f"{os.path.dirname(out)}/.{os.path.basename(out)}.parts"
    if shared:
        staging = os.path.join(parent, f".{os.path.basename(out)}.building-job")
    else:
        if processes == 1:
            _remove_stale_staging(parent, os.path.basename(out))
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.building-{_HOST}-{os.getpid()}-", dir=parent)
    if processes > 1:
        if is_lead():  # a failed run's leftovers must not mix in
            if shared:
                shutil.rmtree(staging, ignore_errors=True)
                os.makedirs(staging)
            else:
                storage.rmtree(parts_url)
        barrier("art_jax.prepare_corpus.staging")
    folder = staging if processes == 1 else os.path.join(staging, f"part-{me}")
    os.makedirs(folder, exist_ok=True)
    builder = PromptBuilder(scorer_tokenizer) if scorer_tokenizer is not None else None
    columns = {"title": np.dtype(np.uint8), "text": np.dtype(np.uint8),
               "retriever": np.dtype(_token_dtype(len(retriever_tokenizer)))}
    if builder is not None:
        columns["scorer"] = np.dtype(_token_dtype(len(scorer_tokenizer)))
    writers = {name: _RaggedWriter(folder, name, dtype) for name, dtype in columns.items()}
    # every batch's ids: every process parses every row, so all meet the same bad rows and duplicates
    ids: list[np.ndarray] = []
    bad_rows: list[tuple[int, str]] = []

    def tokenize(batch: list[Passage]):
        titles, texts = [p.title for p in batch], [p.text for p in batch]
        out = {"retriever": passage_rows(retriever_tokenizer, titles, texts, retriever.max_length)}
        if builder is not None:
            out["scorer"] = [row[:scorer.max_length] for row in builder.passage_ids(titles, texts)]
        return batch, out

    def write(job) -> None:
        batch, tokens = job.result()
        writers["title"].append([p.title.encode("utf-8") for p in batch])
        writers["text"].append([p.text.encode("utf-8") for p in batch])
        for name, rows in tokens.items():
            writers[name].append(rows)

    try:
        passages = iter_passages(corpus_path, skip_bad_rows=skip_bad_rows, bad_rows=bad_rows)
        with (concurrent.futures.ThreadPoolExecutor(1) as pool,
              progress_bar(total=os.path.getsize(corpus_path), unit="B", unit_scale=True, desc="prepare-corpus",
                   disable=not progress) as bar):
            pending, parsed = None, 0
            for number, batch in enumerate(_batches(passages, batch_size)):
                ids.append(np.fromiter((p.id for p in batch), np.int64, len(batch)))
                parsed += len(batch)
                if number % processes == me:
                    job = pool.submit(tokenize, batch)
                    if pending is not None:
                        write(pending)
                    pending = job
                bar.update(batch[-1].end - bar.n)
                bar.set_postfix(passages=parsed, refresh=False)
            if pending is not None:
                write(pending)
        for writer in writers.values():
            writer.close()
        all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        if not len(all_ids):
            raise UserError(f"{corpus_path}: no passages")
        if processes > 1:
            if not shared and not is_lead():
                storage.upload_tree(folder, f"{parts_url}/part-{me}")
            barrier("art_jax.prepare_corpus.parts")
            if is_lead():
                if not shared:
                    for part in range(1, processes):
                        storage.download_tree(f"{parts_url}/part-{part}", os.path.join(staging, f"part-{part}"))
                    storage.rmtree(parts_url)
                _merge_parts(staging, columns, processes, [len(a) for a in ids])
    except BaseException:
        shutil.rmtree(staging if is_lead() or not shared else folder, ignore_errors=True)
        if processes > 1 and not shared and is_lead():
            storage.rmtree(parts_url)
        raise
    if not is_lead():
        if not shared:
            shutil.rmtree(staging, ignore_errors=True)
        barrier("art_jax.prepare_corpus.published")
        return CorpusStore(out)
    try:
        np.save(os.path.join(staging, "ids.npy"), all_ids)
        meta = {
            "format": STORE_FORMAT, "count": len(all_ids), "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "skipped_rows": len(bad_rows), "skipped_examples": [list(b) for b in bad_rows[:20]],
            "retriever": _token_meta(retriever_tokenizer, retriever, sep_id=retriever_tokenizer.sep_token_id),
            "scorer": _token_meta(scorer_tokenizer, scorer) if builder is not None else None,
        }
        storage.write_text(os.path.join(staging, "meta.json"), json.dumps(meta, indent=1))
        storage.publish_folder(staging, out, marker="meta.json")
        if storage.is_remote(out):
            keep_as_copy(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    barrier("art_jax.prepare_corpus.published")
    if bad_rows and progress:
        print(f"prepare-corpus: skipped {len(bad_rows)} bad row(s), e.g. line {bad_rows[0][0]}: {bad_rows[0][1]}")
    return CorpusStore(out)


# staging folders carry the host and pid of their builder: only a build of this machine whose
# process is gone is known to be dead (a shared disk may hold other machines' live builds)
_HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())


def _remove_stale_staging(parent: str, name: str) -> None:
    """Remove what killed builds of the store ``name`` on this machine left in ``parent``: the
    ``.{name}.building-HOST-PID-*`` folders of this host whose process is gone. (A multi-process
    job clears its own ``.building-job`` folder when it starts.)"""
    building = re.compile(rf"\.{re.escape(name)}\.building-{_HOST}-(\d+)-.*")
    for entry in os.listdir(parent):
        match = building.fullmatch(entry)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's
        return True
    return True


def _merge_parts(staging: str, columns: dict[str, np.dtype], processes: int, batch_sizes: list[int]) -> None:
    """The parts' columns into one store in batch order (batch b is part b % processes's);
    the parts are removed."""
    parts = [os.path.join(staging, f"part-{p}") for p in range(processes)]
    for name, dtype in columns.items():
        _merge_column(parts, name, dtype, staging, batch_sizes)
    # the parts' memory maps closed with _merge_column's frame: NFS would keep mapped files
    for part in parts:
        shutil.rmtree(part)


def _merge_column(parts: list[str], name: str, dtype, staging: str, batch_sizes: list[int]) -> None:
    sources = [Ragged(part, name, dtype) for part in parts]
    merged = _RaggedWriter(staging, name, dtype)
    next_row = [0] * len(parts)
    for number, size in enumerate(batch_sizes):
        part = number % len(parts)
        offsets = np.asarray(sources[part].offsets[next_row[part]:next_row[part] + size + 1])
        merged.append_flat(sources[part].data[offsets[0]:offsets[-1]], np.diff(offsets))
        next_row[part] += size
    merged.close()


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _token_meta(tokenizer, spec: TokenizerSpec, **extra) -> dict:
    return {"tokenizer": spec.name, "max_length": spec.max_length, "vocab_size": len(tokenizer),
            "dtype": np.dtype(_token_dtype(len(tokenizer))).name, "pad_id": tokenizer.pad_token_id, **extra}
