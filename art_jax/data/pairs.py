"""Question-passage pairs for contrastive pre-training at PAQ's scale (DPR-PAQ, Oguz et al.
2022): tens of millions of pairs, tokenized once by ``art-jax prepare-pairs`` into a **pair
store** that training reads memory-mapped, holding no Python object per pair.

Input: JSONL rows ``{"question": str, "positive": P, "hard_negatives": [P, ...]}``
(``hard_negatives`` optional; other fields ignored). A passage P is ``{"title", "text"}``
(title optional), tokenized into the store, or a passage id (int or str) of the corpus store
``--corpus``: PAQ's passages are Wikipedia's, and an id costs 8 bytes instead of a copy of
the passage per pair.

The store is a folder of ragged columns (``data/build.py``), like the corpus store's:

- ``question``: the retriever's ``[CLS] q [SEP]`` ids, cut to the question max length from
  the side ``question_truncation`` says (training re-cuts them shorter, from either side
  when no stored question reached the max length);
- ``passage``: the inline passages' ``[CLS] title [SEP] text [SEP]`` ids (only the text cut,
  as the corpus store's), in input order;
- ``positive`` (one per pair) and ``negatives`` (a row per pair): passage references, int64:
  ``r >= 0`` is row r of the corpus store, ``r < 0`` inline passage ``-1 - r``;
- ``meta.json``: the tokenizer (name, vocabulary size, special ids), the max lengths, the
  corpus store (path, passage count and fingerprint: training refuses a pair store made
  against another corpus), counts, and the first question and inline passage as text, which
  training tokenizes again to refuse another tokenizer's store.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.fileio import local_file
from art_jax.core.progress import progress_bar
from art_jax.core.remote import local_copy
from art_jax.data.build import Build, Ragged, read_meta
from art_jax.data.corpus import CorpusStore, corpus_fingerprint, input_key, token_dtype
from art_jax.data.tokenization import Tokens, passage_rows, question_rows

PAIR_FORMAT = 1
TRUNCATION_SIDES = ("right", "left")
_BLOCK = 1 << 23  # values per block when scanning a column


def is_pair_store(path: str) -> bool:
    """Whether the folder ``path`` holds a pair store (by its meta.json)."""
    meta = read_meta(path) or {}
    return meta.get("kind") == "pairs" and meta.get("format") == PAIR_FORMAT


def corpus_tokens_match(store: CorpusStore, tokenizer) -> bool:
    """Whether ``store`` holds ``tokenizer``'s retriever tokens (its first passage tokenized again)."""
    fresh = passage_rows(tokenizer, [store.title(0)], [store.text(0)], store.meta["retriever"]["max_length"])[0]
    return store.retriever.row(0).tolist() == fresh


# ---------------------------------------------------------------- reading the input

class _BadLine(Exception):
    pass


@dataclasses.dataclass
class _Pair:
    path: str
    line: int
    question: str
    passages: list  # positive first: (title, text) of an inline passage, or a passage id


@dataclasses.dataclass
class _Batch:
    pairs: list[_Pair]
    end: int  # input bytes read through this batch, for progress
    first_inline: int = 0  # the store's index of the batch's first inline passage
    refs: np.ndarray | None = None  # every pair's references, positive first, concatenated


def _passage(value, what: str, has_corpus: bool):
    if isinstance(value, dict):
        text, title = value.get("text"), value.get("title")
        if not isinstance(text, str) or not text.strip():
            raise _BadLine(f'{what} needs a non-empty string "text"')
        if title is not None and not isinstance(title, str):
            raise _BadLine(f'{what}: "title" is not a string')
        return (title or "", text)
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise _BadLine(f'{what} is neither {{"title", "text"}} nor a passage id (int or str): {value!r}')
    if not has_corpus:
        raise _BadLine(f"{what} is the passage id {value!r}; passage ids need --corpus, the corpus store they "
                       "point into")
    return value


def _parse(line: str, has_corpus: bool) -> tuple[str, list]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadLine(f"invalid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise _BadLine('expected an object {"question", "positive", "hard_negatives"}')
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise _BadLine('missing or empty "question"')
    if "positive" not in row:
        raise _BadLine('missing "positive"')
    negatives = row.get("hard_negatives")
    if negatives is None:
        negatives = []
    if not isinstance(negatives, list):
        raise _BadLine('"hard_negatives" is not a list')
    passages = [_passage(row["positive"], '"positive"', has_corpus)]
    passages += [_passage(p, f'"hard_negatives"[{i}]', has_corpus) for i, p in enumerate(negatives)]
    return question, passages


def iter_pairs(paths: Sequence[str], *, has_corpus: bool) -> Iterator[tuple[_Pair, int]]:
    """(pair, bytes read so far) of every non-blank line of the local files ``paths``; a bad
    line is a UserError naming file and line."""
    done = 0
    for path in paths:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                done += len(raw)
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    question, passages = _parse(line, has_corpus)
                except (_BadLine, UnicodeDecodeError) as err:
                    reason = "invalid UTF-8" if isinstance(err, UnicodeDecodeError) else str(err)
                    raise UserError(f"{path}:{number}: {reason}") from None
                yield _Pair(path, number, question, passages), done


def _batches(pairs: Iterator[tuple[_Pair, int]], size: int) -> Iterator[_Batch]:
    batch, end = [], 0
    for pair, end in pairs:
        batch.append(pair)
        if len(batch) == size:
            yield _Batch(batch, end)
            batch = []
    if batch:
        yield _Batch(batch, end)


def _resolve(store: CorpusStore, batch: _Batch) -> None:
    """``batch.refs``: inline passages numbered from ``batch.first_inline``, ids as corpus rows."""
    refs, ids, at = [], [], []
    inline = batch.first_inline
    for pair in batch.pairs:
        for passage in pair.passages:
            if isinstance(passage, tuple):
                refs.append(-1 - inline)
                inline += 1
            else:
                at.append(len(refs))
                ids.append(passage)
                refs.append(0)
    refs = np.asarray(refs, np.int64)
    if ids:
        try:
            refs[at] = store.rows_of(ids)
        except UserError:  # name the first line with an unknown id
            for pair in batch.pairs:
                for passage in pair.passages:
                    if not isinstance(passage, tuple):
                        try:
                            store.row_of(passage)
                        except UserError as err:
                            raise UserError(f"{pair.path}:{pair.line}: {err}") from None
            raise
    batch.refs = refs


def _inline_count(batch: _Batch) -> int:
    return sum(isinstance(p, tuple) for pair in batch.pairs for p in pair.passages)


# ---------------------------------------------------------------- the build

def prepare_pairs(pair_paths: Sequence[str], out: str, tokenizer, tokenizer_name: str, *,
                  corpus: str | None = None, question_max_length: int = 256, passage_max_length: int = 256,
                  question_truncation: str = "right", batch_size: int = 4096, progress: bool = True) -> PairStore:
    """Tokenize the JSONL files ``pair_paths`` into a pair store at ``out`` with the retriever
    tokenizer ``tokenizer`` (named ``tokenizer_name`` in meta.json); passage ids are rows of the
    corpus store ``corpus``. A staged build (``data/build.py``): every process reads every line
    and tokenizes its share of the batches; a killed build is taken up by the rerun; the store is
    renamed into place when whole."""
    out = out.rstrip("/")
    if question_truncation not in TRUNCATION_SIDES:
        raise UserError(f"question truncation {question_truncation!r} is not 'right' or 'left'")
    for flag, value, least in (("--question-max-length", question_max_length, 3),
                               ("--passage-max-length", passage_max_length, 4), ("--batch-size", batch_size, 1)):
        if value < least:
            raise UserError(f"{flag}={value} must be at least {least}")
    if not pair_paths:
        raise UserError("no pair files given")
    storage.check_replaceable(out, "a pair store (no meta.json of one)", is_pair_store)
    sources = [p if storage.is_remote(p) else os.path.abspath(p) for p in pair_paths]
    locals_ = [local_file(p) for p in pair_paths]
    store = CorpusStore(corpus) if corpus else None
    corpus_meta = None
    if store is not None:
        if not corpus_tokens_match(store, tokenizer):
            raise UserError(f"--corpus {corpus}: its passages were tokenized with "
                            f"{store.meta['retriever']['tokenizer']!r}, whose tokens differ from --retriever "
                            f"{tokenizer_name}'s; pairs and corpus must share the retriever's tokenizer")
        corpus_meta = {"path": store.path, "count": len(store), "ids": store.id_kind,
                       "fingerprint": corpus_fingerprint(store)}
    dtype = np.dtype(token_dtype(len(tokenizer)))
    key = {"store": "pairs", "format": PAIR_FORMAT, "inputs": [input_key(p) for p in locals_],
           "tokenizer": [tokenizer_name, len(tokenizer)], "lengths": [question_max_length, passage_max_length],
           "truncation": question_truncation, "corpus": corpus_meta, "batch_size": batch_size}
    with Build(out, "prepare_pairs", kind="a pair store (no meta.json of one)", is_kind=is_pair_store,
               key=key) as build:
        writers = {name: build.writer(name, dtype) for name in ("question", "passage")}
        writers.update({name: build.writer(name, np.int64) for name in ("positive", "negatives")})
        probe: dict = {"question": None, "passage": None}
        inline = 0  # inline passages before the next batch

        def every(batch: _Batch, done: bool) -> None:
            nonlocal inline
            batch.first_inline = inline
            inline += _inline_count(batch)
            if probe["question"] is None:
                probe["question"] = batch.pairs[0].question
            if probe["passage"] is None:
                probe["passage"] = next((list(p) for pair in batch.pairs for p in pair.passages
                                         if isinstance(p, tuple)), None)
            if not done:
                _resolve(store, batch)

        def tokenize(batch: _Batch):
            questions = question_rows(tokenizer, [p.question for p in batch.pairs], question_max_length,
                                      question_truncation)
            inline_passages = [p for pair in batch.pairs for p in pair.passages if isinstance(p, tuple)]
            passages = passage_rows(tokenizer, [t for t, _ in inline_passages], [x for _, x in inline_passages],
                                    passage_max_length) if inline_passages else []
            return batch, questions, passages

        def write(job) -> None:
            batch, questions, passages = job
            counts = np.fromiter((len(p.passages) for p in batch.pairs), np.int64, len(batch.pairs))
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            writers["question"].append(questions)
            writers["passage"].append(passages)
            writers["positive"].append_flat(batch.refs[starts], np.ones(len(counts), np.int64))
            negatives = np.ones(len(batch.refs), bool)
            negatives[starts] = False
            writers["negatives"].append_flat(batch.refs[negatives], counts - 1)

        total = sum(os.path.getsize(p) for p in locals_)
        with progress_bar(total=total, unit="B", unit_scale=True, desc="prepare-pairs", disable=not progress) as bar:

            def batches():
                read = 0
                for batch in _batches(iter_pairs(locals_, has_corpus=store is not None), batch_size):
                    yield batch
                    read += len(batch.pairs)
                    bar.update(batch.end - bar.n)
                    bar.set_postfix(pairs=read, refresh=False)

            build.run(batches(), tokenize, write, every)
        if probe["question"] is None:
            raise UserError(f"{', '.join(pair_paths)}: no pairs")
        if build.finish():
            write_meta(build.staging, tokenizer, tokenizer_name, sources=sources, corpus=corpus_meta, probe=probe,
                       question_max_length=question_max_length, question_truncation=question_truncation,
                       passage_max_length=passage_max_length)
            build.publish("meta.json")
    return PairStore(out)


def write_meta(folder: str, tokenizer, tokenizer_name: str, *, sources: list[str], corpus: dict | None,
               probe: dict, question_max_length: int, question_truncation: str, passage_max_length: int) -> dict:
    """meta.json of the pair store whose columns are in ``folder``, written last: its counts
    from the columns, and what training checks a pair store by (``PairStore.check_*``).
    ``probe``: the first question and first inline passage ([title, text] or None) as text."""
    dtype = np.dtype(token_dtype(len(tokenizer)))
    questions, passages, positives, negatives = (Ragged(folder, name, dt) for name, dt in (
        ("question", dtype), ("passage", dtype), ("positive", np.int64), ("negatives", np.int64)))
    meta = {
        "format": PAIR_FORMAT, "kind": "pairs", "count": len(questions), "sources": sources,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inline_passages": len(passages), "hard_negatives": int(negatives.offsets[-1]),
        "corpus_references": _count_at_least(positives, 0) + _count_at_least(negatives, 0),
        "retriever": {"tokenizer": tokenizer_name, "vocab_size": len(tokenizer), "dtype": dtype.name,
                      "pad_id": tokenizer.pad_token_id, "cls_id": tokenizer.cls_token_id,
                      "sep_id": tokenizer.sep_token_id},
        "question": {"max_length": question_max_length, "truncation": question_truncation,
                     "at_max_length": _count_at_least(questions, question_max_length, lengths=True)},
        "passage": {"max_length": passage_max_length},
        "corpus": corpus, "probe": probe,
    }
    del questions, passages, positives, negatives  # (memory maps closed before the folder moves)
    storage.write_text(os.path.join(folder, "meta.json"), json.dumps(meta, indent=1))
    return meta


def _count_at_least(column: Ragged, least: int, *, lengths: bool = False) -> int:
    """How many values (``lengths``: rows' lengths) of ``column`` are at least ``least``."""
    values = column.offsets if lengths else column.data[:int(column.offsets[-1])]
    count = 0
    for start in range(0, len(values), _BLOCK):
        block = np.asarray(values[start:start + _BLOCK + (1 if lengths else 0)])
        count += int(np.count_nonzero((np.diff(block) if lengths else block) >= least))
    return count


# ---------------------------------------------------------------- the store

class PairStore:
    """A prepared pair store: ``len(store)`` pairs, every column memory-mapped."""

    def __init__(self, path: str):
        self.path = path if storage.is_remote(path) else os.path.abspath(path)
        local = local_copy(path)
        if not is_pair_store(local):
            raise UserError(f"{path}: not a pair store (no meta.json of one); build one with art-jax prepare-pairs")
        with open(os.path.join(local, "meta.json")) as f:
            self.meta = json.load(f)
        dtype = self.meta["retriever"]["dtype"]
        self.questions = Ragged(local, "question", dtype)
        self.passages = Ragged(local, "passage", dtype)
        self.positives = Ragged(local, "positive", np.int64)  # one reference per pair
        self.negatives = Ragged(local, "negatives", np.int64)

    def __len__(self) -> int:
        return len(self.questions)

    def positive(self, rows) -> np.ndarray:
        """The positive references of the pairs ``rows``."""
        return np.asarray(self.positives.data[np.asarray(rows, np.int64)])

    def hard_negatives(self, row: int) -> np.ndarray:
        return self.negatives.row(row)

    def question_tokens(self, rows, max_length: int, truncation: str = "right") -> Tokens:
        """Questions of ``rows`` re-cut to ``max_length`` keeping ``[CLS] .. [SEP]``: their start
        (``right``) or their end (``left``), padded to ``max_length``."""
        meta = self.meta["retriever"]
        ids, lengths = self.questions.cut(rows, max_length, pad=meta["pad_id"], first=meta["cls_id"],
                                          last=meta["sep_id"], keep="end" if truncation == "left" else "start")
        return Tokens(ids, (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32))

    def passage_tokens(self, indices, max_length: int) -> Tokens:
        """Inline passages ``indices`` re-cut to ``max_length`` as ``CorpusStore.retriever_tokens`` does."""
        meta = self.meta["retriever"]
        ids, lengths = self.passages.cut(indices, max_length, pad=meta["pad_id"], last=meta["sep_id"])
        return Tokens(ids, (np.arange(max_length)[None, :] < lengths[:, None]).astype(np.int32))

    def check_tokenizer(self, tokenizer, key: str) -> None:
        """Refuse a store tokenized by another tokenizer than ``tokenizer``: its first question
        and first inline passage are tokenized again and compared with what it holds."""
        meta, probe = self.meta, self.meta["probe"]
        same = len(tokenizer) == meta["retriever"]["vocab_size"] and self.questions.row(0).tolist() == question_rows(
            tokenizer, [probe["question"]], meta["question"]["max_length"], meta["question"]["truncation"])[0]
        if same and probe["passage"] is not None:
            title, text = probe["passage"]
            same = self.passages.row(0).tolist() == passage_rows(tokenizer, [title], [text],
                                                                 meta["passage"]["max_length"])[0]
        if not same:
            raise UserError(f"{key}: {self.path} was tokenized with {meta['retriever']['tokenizer']!r}, whose tokens "
                            "differ from retriever.checkpoint's; prepare the pairs with the run's retriever "
                            "(art-jax prepare-pairs --retriever ...)")

    def check_corpus(self, store: CorpusStore | None, key: str) -> None:
        """The corpus store the pairs' references point into is ``store`` (when they point into one)."""
        recorded = self.meta["corpus"]
        if not self.meta["corpus_references"]:
            return
        if store is None:
            raise UserError(f"{key}: {self.path} points at rows of the corpus store {recorded['path']}; set "
                            "data.corpus_store to it")
        if len(store) != recorded["count"] or corpus_fingerprint(store) != recorded["fingerprint"]:
            raise UserError(f"{key}: {self.path} was prepared against the corpus store {recorded['path']} "
                            f"({recorded['count']} passages), not the run's {store.path} ({len(store)} passages); "
                            "its passage references would point at other passages")
