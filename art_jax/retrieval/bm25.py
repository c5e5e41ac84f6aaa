"""BM25 over an evidence corpus, scored as Pyserini's Lucene index of DPR Wikipedia scores it,
in bm25s's index format (a CSC matrix of precomputed per-term scores, memory-mapped for search).

Settings (Pyserini's for DPR Wikipedia): Lucene's BM25, k1=0.9, b=0.4, over "title text".
Analysis, close to Lucene's EnglishAnalyzer (StandardTokenizer, EnglishPossessiveFilter,
LowerCaseFilter, StopFilter, PorterStemFilter): lower-cased runs of letters/digits (inner
apostrophes kept, a trailing 's dropped), Lucene's 33 English stopwords (bm25s's
``stopwords="en"`` list is exactly that set) and the Porter stemmer (PyStemmer's "porter",
the algorithm of Lucene's PorterStemFilter). Where it differs from Lucene: "U.S." or "3.14"
split at the dot (Lucene's UAX#29 tokenizer keeps them whole), document lengths are exact
(Lucene stores them in one lossy byte), and scores lack Lucene < 8's constant (k1 + 1) factor
(bm25s's "lucene" method, as Lucene >= 8): rankings are unaffected.

The index is built in chunks so that a Wikipedia-size corpus (21M passages) fits in a few
GiB: passages are tokenized chunk by chunk (each chunk's (term, passage, tf) triples kept on
disk, sorted by term), then the CSC arrays are written term block by term block, each block
gathered from every chunk. ``benchmarks/bm25_build.py`` measures the peak memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.progress import progress_bar

METHOD = "lucene"
K1 = 0.9
B = 0.4
STEMMER = "porter"
# a token: a run of letters/digits/underscores, inner apostrophes kept ("o'neil"), a trailing
# possessive 's left out ("john's" -> "john"); the regex's one group is the token
TOKEN_PATTERN = r"(\w+(?:['’](?!s\b)\w+)*)(?:['’]s\b)?"
INDEX_FORMAT = 1
META = "art_jax_bm25.json"  # written last: its presence says the folder holds a finished index
# bm25s's file names (bm25s.BM25.save / load)
DATA, INDICES, INDPTR = "data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy"
VOCAB, PARAMS = "vocab.index.json", "params.index.json"

DEFAULT_CHUNK_PASSAGES = 1_000_000
DEFAULT_BLOCK_ENTRIES = 32 << 20

_TOKEN = re.compile(TOKEN_PATTERN)


def _bm25s():
    # imported late: bm25s runs a jax top_k when imported, which must come after
    # jax.distributed.initialize in a multi-process job
    import bm25s

    return bm25s


def stopwords() -> tuple[str, ...]:
    """bm25s's English list (``stopwords="en"``): Lucene's EnglishAnalyzer stop set, 33 words."""
    return tuple(_bm25s().stopwords.STOPWORDS_EN)


def split_words(text: str) -> list[str]:
    """Tokens of lower-cased text, a trailing possessive 's dropped (EnglishPossessiveFilter)."""
    return _TOKEN.findall(text)


def settings() -> dict:
    """Everything that decides an index's contents besides the corpus."""
    return {"format": INDEX_FORMAT, "method": METHOD, "k1": K1, "b": B, "fields": "title text",
            "lowercase": True, "token_pattern": TOKEN_PATTERN,
            "stopwords": sorted(stopwords()), "stemmer": f"PyStemmer {STEMMER}"}


def make_tokenizer():
    """bm25s's tokenizer with this module's analysis; its vocabulary maps stems to term ids."""
    import Stemmer

    return _bm25s().tokenization.Tokenizer(lower=True, splitter=_TOKEN.findall, stopwords=list(stopwords()),
                                           stemmer=Stemmer.Stemmer(STEMMER))


def content_fingerprint(title_data: np.ndarray, title_offsets: np.ndarray, text_data: np.ndarray,
                        text_offsets: np.ndarray, *, piece: int = 64 << 20) -> str:
    """SHA-256 of a corpus's titles and texts (UTF-8 bytes, concatenated, with every row's
    length): the same for a corpus store and the evidence file it was prepared from."""
    parts = []
    for data, offsets in ((title_data, title_offsets), (text_data, text_offsets)):
        offsets = np.asarray(offsets)
        end = int(offsets[-1]) if len(offsets) else 0
        content, lengths = hashlib.sha256(), hashlib.sha256()
        for start in range(0, end, piece):
            content.update(np.asarray(data[start:min(end, start + piece)], np.uint8).tobytes())
        for start in range(0, max(len(offsets) - 1, 0), piece // 8):
            stop = min(len(offsets) - 1, start + piece // 8)
            lengths.update(np.diff(np.asarray(offsets[start:stop + 1], np.int64)).astype("<i8").tobytes())
        parts += [content.hexdigest(), lengths.hexdigest()]
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()


# ---------------------------------------------------------------- building

@dataclasses.dataclass
class _Chunk:
    """One chunk's (term, passage, tf) triples on disk, sorted by term then passage: the
    passages of run_terms[i] are entries run_starts[i]:run_starts[i + 1]."""

    docs_path: str
    tf_path: str
    tf_dtype: np.dtype
    run_terms: np.ndarray  # int32, ascending
    run_starts: np.ndarray  # int64, len(run_terms) + 1


def _read(path: str, dtype, start: int, stop: int) -> np.ndarray:
    dtype = np.dtype(dtype)
    with open(path, "rb") as f:
        f.seek(start * dtype.itemsize)
        return np.fromfile(f, dtype, stop - start)


def _tokenized(ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """A batch's term ids, flat (int32), and its passages' lengths (int64)."""
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum())), lengths


def _write_chunk(batches: list[tuple[np.ndarray, np.ndarray]], first_row: int, folder: str,
                 number: int) -> tuple[_Chunk, np.ndarray]:
    """Sort a chunk's tokens ((term ids, lengths) per batch) into term-major (term, passage) pairs
    with their counts, on disk; ``batches`` is emptied as it is used."""
    lengths = np.concatenate([b[1] for b in batches]) if batches else np.zeros(0, np.int64)
    keys = np.empty(int(lengths.sum()), np.int64)  # term << 32 | passage within the chunk
    at, row = 0, 0
    for flat, lens in batches:
        part = keys[at:at + len(flat)]
        part[:] = flat
        part <<= 32
        part |= np.repeat(np.arange(row, row + len(lens), dtype=np.int64), lens)
        at, row = at + len(flat), row + len(lens)
    batches.clear()
    keys.sort()  # in place: term, then passage
    # (the steps below keep at most about three copies' worth of 8-byte arrays alive at once)
    first = np.ones(len(keys), bool)
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    starts = np.flatnonzero(first)  # where each (term, passage) pair's run begins
    del first
    tf = np.diff(starts, append=len(keys))
    tf_dtype = np.dtype(np.uint16 if tf.max(initial=0) <= np.iinfo(np.uint16).max else np.uint32)
    tf = tf.astype(tf_dtype)
    keys = keys[starts]
    del starts
    docs = (keys & 0xFFFFFFFF).astype(np.int32)
    docs += np.int32(first_row)
    keys >>= 32
    terms = keys.astype(np.int32)
    del keys
    starts = np.flatnonzero(terms[1:] != terms[:-1]) + 1
    run_terms = terms[np.concatenate([[0], starts]).astype(np.int64)] if len(terms) else np.zeros(0, np.int32)
    run_starts = np.concatenate([[0], starts, [len(terms)]] if len(terms) else [[0]]).astype(np.int64)
    del terms, starts
    chunk = _Chunk(os.path.join(folder, f"{number:05d}.docs"), os.path.join(folder, f"{number:05d}.tf"), tf_dtype,
                   run_terms, run_starts)
    docs.tofile(chunk.docs_path)
    tf.tofile(chunk.tf_path)
    return chunk, lengths.astype(np.int32)


def _term_blocks(indptr: np.ndarray, block_entries: int) -> Iterator[tuple[int, int]]:
    """Term ranges [t0, t1) of at most ``block_entries`` entries (or one term, if it has more)."""
    vocab = len(indptr) - 1
    t0 = 0
    while t0 < vocab:
        t1 = int(np.searchsorted(indptr, indptr[t0] + block_entries, side="right")) - 1
        t1 = min(max(t1, t0 + 1), vocab)
        yield t0, t1
        t0 = t1


def _npy_writer(path: str, dtype, count: int):
    f = open(path, "wb")  # noqa: SIM115 - closed by the caller
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (count,)})
    return f


def _assemble(chunks: list[_Chunk], df: np.ndarray, lengths: np.ndarray, folder: str, *,
              block_entries: int, progress: bool) -> None:
    """The CSC arrays of Lucene BM25 scores, written term block by term block: data (float32
    score of term t in passage d), indices (int32 passage rows), indptr (int64, per term)."""
    count = len(lengths)
    avgdl = float(lengths.sum(dtype=np.int64)) / count
    idf = np.log(1 + (count - df + 0.5) / (df + 0.5)).astype(np.float32)  # Lucene's, never negative
    indptr = np.zeros(len(df) + 1, np.int64)
    np.cumsum(df, out=indptr[1:])
    np.save(os.path.join(folder, INDPTR), indptr)
    nnz = int(indptr[-1])
    data_file, indices_file = _npy_writer(os.path.join(folder, DATA), np.float32, nnz), \
        _npy_writer(os.path.join(folder, INDICES), np.int32, nnz)
    with data_file, indices_file, progress_bar(total=nnz, unit="entry", unit_scale=True, desc="bm25 index: write",
                                               disable=not progress) as bar:
        for t0, t1 in _term_blocks(indptr, block_entries):
            docs, tfs, terms = [], [], []
            for chunk in chunks:  # each chunk's part of the block, in passage order
                lo, hi = np.searchsorted(chunk.run_terms, [t0, t1])
                start, stop = int(chunk.run_starts[lo]), int(chunk.run_starts[hi])
                if start == stop:
                    continue
                docs.append(_read(chunk.docs_path, np.int32, start, stop))
                tfs.append(_read(chunk.tf_path, chunk.tf_dtype, start, stop))
                terms.append(np.repeat(chunk.run_terms[lo:hi], np.diff(chunk.run_starts[lo:hi + 1])))
            if not docs:  # (every term of the vocabulary occurs somewhere, so never)
                continue
            order = np.argsort(np.concatenate(terms), kind="stable")  # term-major, passages ascending
            terms = np.concatenate(terms)[order]
            docs = np.concatenate(docs)[order]
            tfs = np.concatenate(tfs)[order]
            del order
            step = 1 << 22
            for s in range(0, len(docs), step):  # float64 temporaries in slices
                d, tf = docs[s:s + step], tfs[s:s + step].astype(np.float64)
                # bm25s's "lucene" arithmetic, in its order: idf * tf / (k1 (1 - b + b dl / avgdl) + tf)
                norm = K1 * ((1 - B) + B * lengths[d] / avgdl)
                data_file.write((idf[terms[s:s + step]] * (tf / (norm + tf))).astype(np.float32).tobytes())
            indices_file.write(docs.tobytes())
            bar.update(len(docs))


def build_index(docs: Iterable[tuple[str, str]], folder: str, *, count: int, fingerprint: str,
                corpus: str = "", chunk_passages: int = DEFAULT_CHUNK_PASSAGES,
                block_entries: int = DEFAULT_BLOCK_ENTRIES, progress: bool = True) -> BM25Index:
    """Index ``docs`` ((title, text) in row order, ``count`` of them) into the new folder
    ``folder``: built beside it, then renamed into place, so it holds a whole index or none."""
    if count >= 1 << 31:  # passage rows are int32, as bm25s keeps them
        raise UserError(f"{corpus}: {count} passages; a BM25 index holds at most 2^31 - 1")
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.building-", dir=parent)
    try:
        scratch = os.path.join(staging, "chunks")
        os.makedirs(scratch)
        tokenizer = make_tokenizer()
        chunks, lengths, pending, df = [], [], [], np.zeros(0, np.int64)
        rows = waiting = 0

        def flush() -> None:
            nonlocal df, waiting
            chunk, chunk_lengths = _write_chunk(pending, rows - waiting, scratch, len(chunks))
            waiting = 0
            chunks.append(chunk)
            lengths.append(chunk_lengths)
            vocab = len(tokenizer.get_vocab_dict())
            if len(df) < vocab:
                df = np.concatenate([df, np.zeros(vocab - len(df), np.int64)])
            df[chunk.run_terms] += np.diff(chunk.run_starts)

        with progress_bar(total=count, unit="passage", desc="bm25 index: tokenize", disable=not progress) as bar:
            for batch in _batches(docs, 4096):
                pending.append(_tokenized(list(tokenizer.streaming_tokenize(
                    [f"{title} {text}" for title, text in batch], update_vocab=True, allow_empty=False))))
                rows, waiting = rows + len(batch), waiting + len(batch)
                bar.update(len(batch))
                if waiting >= chunk_passages:
                    flush()
            if waiting or not chunks:
                flush()
        if rows != count:
            raise RuntimeError(f"bm25 index: {rows} passages read, {count} expected")
        vocab = tokenizer.get_vocab_dict()
        df = np.concatenate([df, np.zeros(max(0, len(vocab) - len(df)), np.int64)])
        _assemble(chunks, df, np.concatenate(lengths), staging, block_entries=block_entries, progress=progress)
        shutil.rmtree(scratch)
        with open(os.path.join(staging, VOCAB), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        params = {"k1": K1, "b": B, "delta": 0.5, "method": METHOD, "idf_method": METHOD, "dtype": "float32",
                  "int_dtype": "int32", "num_docs": rows, "version": _bm25s().__version__, "backend": "numpy"}
        with open(os.path.join(staging, PARAMS), "w") as f:
            json.dump(params, f, indent=1)
        meta = {"passages": rows, "fingerprint": fingerprint, "corpus": corpus, "vocabulary": len(vocab),
                "entries": int(df.sum()), "settings": settings(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(os.path.join(staging, META), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1, ensure_ascii=False)
        os.chmod(staging, storage.FOLDER_MODE)  # mkdtemp made it private
        if os.path.isdir(folder):  # an empty folder (checked by the caller)
            os.rmdir(folder)
        os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BM25Index(folder)


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def open_or_build(folder: str, docs: Callable[[], Iterable[tuple[str, str]]], *, count: int,
                  fingerprint: Callable[[], str], corpus: str, progress: bool = True, **build_options) -> BM25Index:
    """The index in ``folder`` if it was built from this corpus (same passage count and
    content fingerprint, same settings), else a refusal; a new one when ``folder`` is
    missing or empty."""
    if storage.is_remote(folder):
        raise UserError(f"--bm25-index {folder}: must be a local folder (bm25s memory-maps it)")
    if os.path.isfile(os.path.join(folder, META)):
        meta = _read_meta(folder)
        if meta.get("settings") != settings():
            raise UserError(f"--bm25-index {folder}: built with other BM25 settings than these "
                            f"({_settings_difference(meta.get('settings'))}); remove it or give another folder")
        if meta.get("passages") != count:
            raise UserError(f"--bm25-index {folder}: built for another corpus ({meta.get('passages')} passages, "
                            f"from {meta.get('corpus') or 'unknown'}), not {corpus} ({count} passages); "
                            "remove it or give another folder")
        if meta.get("fingerprint") != fingerprint():
            raise UserError(f"--bm25-index {folder}: built for another corpus (from {meta.get('corpus') or 'unknown'}: "
                            f"the same number of passages, {count}, but other titles or texts than {corpus}); "
                            "remove it or give another folder")
        return BM25Index(folder)
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise UserError(f"--bm25-index {folder}: exists and is not a BM25 index of art-jax mine (no {META}); "
                        "refusing to replace it")
    return build_index(docs(), folder, count=count, fingerprint=fingerprint(), corpus=corpus, progress=progress,
                       **build_options)


def _read_meta(folder: str) -> dict:
    try:
        with open(os.path.join(folder, META), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"--bm25-index {folder}: unreadable {META} ({err})") from None
    if not isinstance(meta, dict):
        raise UserError(f"--bm25-index {folder}: {META} is not a JSON object")
    return meta


def _settings_difference(recorded) -> str:
    if not isinstance(recorded, dict):
        return "none recorded"
    ours = settings()
    keys = sorted(k for k in set(ours) | set(recorded) if ours.get(k) != recorded.get(k))
    return ", ".join(f"{k}: {recorded.get(k)!r} there, {ours.get(k)!r} here" for k in keys[:3])


# ---------------------------------------------------------------- searching

class BM25Index:
    """A finished index, memory-mapped (bm25s ``load(mmap=True)``): row r is the corpus's r-th passage."""

    def __init__(self, folder: str):
        self.folder = folder
        self.meta = _read_meta(folder)
        self.model = _bm25s().BM25.load(folder, mmap=True, load_vocab=True, show_progress=False)
        self.count = int(self.model.scores["num_docs"])

    def query_ids(self, queries: Sequence[str]) -> list[list[int]]:
        """Each query's term ids, analysed as the passages were (unknown terms dropped; a
        repeated term counts each time, as in Lucene's bag-of-words query)."""
        tokenizer = make_tokenizer()
        tokenizer.stem_to_sid = self.model.vocab_dict  # read only: update_vocab=False adds no stems
        return list(tokenizer.streaming_tokenize(list(queries), update_vocab=False, allow_empty=False))

    def scores(self, ids: Sequence[int]) -> np.ndarray:
        """BM25 score of every passage for one query's term ids (float32, [count])."""
        if not len(ids):
            return np.zeros(self.count, np.float32)
        return self.model.get_scores_from_ids(list(ids))

    def top(self, ids: Sequence[int], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (int64) and scores (float32) of the ``k`` best passages that match at least one
        query term (so possibly fewer than ``k``, as Lucene returns), best first; equal scores
        in row order."""
        scores = self.scores(ids)
        rows = np.flatnonzero(scores > 0)
        if len(rows) > k:
            part = rows[np.argpartition(-scores[rows], k - 1)[:k]]
            kth = scores[part].min()
            above = rows[scores[rows] > kth]
            rows = np.concatenate([above, rows[scores[rows] == kth][:k - len(above)]])
        rows = rows[np.lexsort((rows, -scores[rows]))]
        return rows.astype(np.int64), scores[rows]

    def search(self, queries: Sequence[str], k: int, *, threads: int | None = None,
               progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
        """``top`` of every query, in query order, on ``threads`` threads (default: one per CPU)."""
        ids = self.query_ids(queries)
        threads = threads or os.cpu_count() or 1
        with (progress_bar(total=len(ids), unit="question", desc="bm25 search", disable=not progress) as bar,
              ThreadPoolExecutor(threads) as pool):
            results = []
            for result in pool.map(lambda q: self.top(q, k), ids):
                results.append(result)
                bar.update(1)
        return results
