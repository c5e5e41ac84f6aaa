"""Evidence files and the pre-tokenized corpus store, checked against independent references:
Python's csv module for DPR TSV, the tokenizer / prompt builder run on the strings for tokens."""

from __future__ import annotations

import csv
import io
import json
import os
import re

import numpy as np
import pytest

from art_jax import cli
from art_jax.core.errors import UserError
from art_jax.data import corpus
from art_jax.data.corpus import CorpusStore, TokenizerSpec, iter_passages, prepare_corpus
from art_jax.data.prompts import PromptBuilder, PromptConfig
from art_jax.data.tokenization import tokenize_passages
from art_jax.models.hf import load_tokenizer
from tests.hf_fixtures import CORPUS

M, S = 48, 40  # stored retriever / scorer max lengths
TITLES = ["Ada Lovelace", "", "Marie Curie described the laboratory near Lagos", "Café Ünïcödé 東京",
          'The "Thames"\tbridge']
DPR_LINE = '1\t"Aaron Aaron ( or ; ""Ahärôn"") is"\tAaron'  # csv quoting as in psgs_w100.tsv


def _passages(n: int = 23) -> list[tuple[int, str, str]]:
    """(id, title, text): 1..5 sentences, unicode, quotes and tabs; sparse, dense-far and huge ids."""
    rows = []
    for i in range(n):
        text = " ".join(CORPUS[(7 * i + j) % len(CORPUS)] for j in range(1 + i % 5))
        if i % 3 == 0:
            text = f"naïve “café” — 東京 {text}"
        if i % 4 == 1:
            text += '\t"quoted" end'
        rows.append(({1: 3_000_000, 2: 10**12}.get(i, 3 + 10 * i), TITLES[i % len(TITLES)], text))
    return rows


PASSAGES = _passages()


def _line(p, fmt: str, header=("id", "text", "title")) -> str:
    if fmt == "jsonl":
        return json.dumps(dict(zip(("id", "title", "text"), p)), ensure_ascii=False)
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t", lineterminator="").writerow([dict(zip(("id", "title", "text"), p))[c] for c in header])
    return buf.getvalue()


def _write(path, lines) -> str:
    with open(path, "wb") as f:
        f.write(b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines))
    return str(path)


def _corpus(tmp_path, fmt="tsv", passages=PASSAGES, name="corpus") -> str:
    head = ["id\ttext\ttitle"] if fmt == "tsv" else []
    return _write(tmp_path / f"{name}.{fmt}", head + [_line(p, fmt) for p in passages])


def _csv_reference(path) -> list[tuple[int, str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r]
    col = {name: rows[0].index(name) for name in ("id", "title", "text")}
    return [(int(r[col["id"]]), r[col["title"]], r[col["text"]]) for r in rows[1:]]


def _parsed(path, **kw) -> list[tuple[int, str, str]]:
    return [(p.id, p.title, p.text) for p in iter_passages(path, **kw)]


@pytest.fixture(scope="module")
def toks(bert_dir, t5_v11_dir):
    return load_tokenizer(bert_dir), load_tokenizer(t5_v11_dir)


def _build(toks, corpus, out, *, batch_size=7, retriever_max=M, scorer_max=S, **kw) -> CorpusStore:
    bert, t5 = toks
    return prepare_corpus(corpus, str(out), bert, TokenizerSpec("bert", retriever_max), t5,
                          TokenizerSpec("t5", scorer_max), batch_size=batch_size, progress=False, **kw)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize("header", [("id", "text", "title"), ("id", "title", "text"), ("title", "id", "text")])
def test_tsv_matches_csv_module(tmp_path, header):
    lines = ["\t".join(header)] + [_line(p, "tsv", header) for p in PASSAGES]
    if header == ("id", "text", "title"):
        lines.insert(1, DPR_LINE)
        lines[-1] += "\r"  # a CRLF line end
    path = _write(tmp_path / "c.tsv", lines)
    got = _parsed(path)
    assert got == _csv_reference(path)
    assert got[-len(PASSAGES):] == PASSAGES
    if header == ("id", "text", "title"):
        assert got[0] == (1, "Aaron", 'Aaron Aaron ( or ; "Ahärôn") is')


def test_jsonl_ids_and_missing_title(tmp_path):
    path = _write(tmp_path / "c.jsonl", ['{"id": 5, "title": "T", "text": "a"}', '{"id": "17", "text": "b"}',
                                         "", '{"id": 9, "title": null, "text": "ü"}'])
    assert _parsed(path) == [(5, "T", "a"), (17, "", "b"), (9, "", "ü")]


BAD_TSV = {
    "two columns": "7\tonly two", "four columns": "7\ta\tb\tc", "id abc": "abc\ttext\tT", "id 1.5": "1.5\ttext\tT",
    "empty id": "\ttext\tT", "duplicate": f"{PASSAGES[0][0]}\tagain\tT", "duplicate dense": "3000000\tagain\tT",
    "duplicate huge": f"{10**12}\tagain\tT", "invalid utf-8": b"8\tbad \xff\xfe bytes\tT", "empty text": "9\t\tT",
    "blank text": "9\t  \tT",
}
BAD_JSONL = {
    "bad json": '{"id": 5, "text": ', "id abc": '{"id": "abc", "text": "x"}', "id 1.5": '{"id": 1.5, "text": "x"}',
    "missing text": '{"id": 5}', "blank text": '{"id": 5, "text": " "}', "not an object": "[1, 2]",
    "duplicate": f'{{"id": {PASSAGES[0][0]}, "text": "x"}}', "duplicate huge": f'{{"id": {10**12}, "text": "x"}}',
    "invalid utf-8": b'{"id": 5, "text": "\xff"}', "title not a string": '{"id": 5, "text": "x", "title": 3}',
}


def _with_bad(tmp_path, fmt, bad_lines) -> tuple[str, list[int]]:
    """Good rows with the bad ones interleaved (after the rows whose ids they repeat), a blank line
    near the start; returns the file and the 1-based line number of each bad row."""
    lines, numbers = (["id\ttext\ttitle"] if fmt == "tsv" else []), []
    for i, p in enumerate(PASSAGES):
        lines.append(_line(p, fmt))
        if i == 0:
            lines.append("")
        if 3 <= i < 3 + len(bad_lines):
            lines.append(bad_lines[i - 3])
            numbers.append(len(lines))
    return _write(tmp_path / f"c.{fmt}", lines), numbers


@pytest.mark.parametrize("fmt,case", [("tsv", c) for c in BAD_TSV] + [("jsonl", c) for c in BAD_JSONL])
def test_bad_row_names_file_and_line(tmp_path, fmt, case):
    path, (line,) = _with_bad(tmp_path, fmt, [{"tsv": BAD_TSV, "jsonl": BAD_JSONL}[fmt][case]])
    with pytest.raises(UserError, match=f"^{re.escape(path)}:{line}: "):
        _parsed(path)
    kept = _parsed(path, skip_bad_rows=True, bad_rows=(bad := []))
    assert kept == PASSAGES and [b[0] for b in bad] == [line]


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_skip_bad_rows_store(tmp_path, toks, fmt):
    bad_lines = list({"tsv": BAD_TSV, "jsonl": BAD_JSONL}[fmt].values())
    path, numbers = _with_bad(tmp_path, fmt, bad_lines)
    with pytest.raises(UserError, match=f"^{re.escape(path)}:{numbers[0]}: "):
        _build(toks, path, tmp_path / "store")
    store = _build(toks, path, tmp_path / "store", skip_bad_rows=True)
    assert list(store.ids) == [p[0] for p in PASSAGES]
    assert [(store.title(r), store.text(r)) for r in range(len(store))] == [p[1:] for p in PASSAGES]
    assert store.meta["skipped_rows"] == len(bad_lines)
    assert [e[0] for e in store.meta["skipped_examples"]] == numbers


def test_header_errors(tmp_path):
    for header in ("id\ttext", "id\ttitle\tbody"):
        path = _write(tmp_path / "h.tsv", [header, "1\tx\tT"])
        with pytest.raises(UserError, match=f"^{re.escape(path)}:1: header"):
            _parsed(path)
    with pytest.raises(UserError, match="file not found"):
        _parsed(str(tmp_path / "missing.tsv"))


@pytest.mark.parametrize("lines,line,max_length", [
    (["id\ttext\ttitle", "1\tfoo\rbar\tT"], 2, M),  # stray CR in an unquoted field: _csv.Error escapes
    (["id\ttext\ttitle", f"{2**64}\tfoo\tT"], 2, M),  # id beyond int64: OverflowError in np.fromiter
    (["src\tid\ttext\ttitle", "1\tfoo\tT"], 2, M),  # extra header column: IndexError in _parse_tsv
    (["", "id\ttext", "1\tfoo"], 2, M),  # blank line before a bad header: reported as line 1
    (["id\ttext\ttitle", f"1\tfoo bar\t{TITLES[2]}"], 2, 10),  # title longer than max length: tokenizers Exception
], ids=["cr", "huge-id", "extra-column", "blank-before-header", "long-title"])
def test_parses_or_names_line(tmp_path, toks, lines, line, max_length):
    path = _write(tmp_path / "c.tsv", lines)
    try:
        _build(toks, path, tmp_path / "store", retriever_max=max_length)
    except UserError as err:
        assert f"{path}:{line}: " in str(err)


# ---------------------------------------------------------------- the store


def _reference_tokens(bert, rows, length):
    return tokenize_passages(bert, [PASSAGES[r][1] for r in rows], [PASSAGES[r][2] for r in rows], length, pad_to=length)


@pytest.mark.parametrize("fmt,batch_size", [("tsv", 7), ("jsonl", 1), ("tsv", 2048), ("jsonl", 23)])
def test_store_rows_and_retriever_tokens(tmp_path, toks, fmt, batch_size):
    bert = toks[0]
    store = _build(toks, _corpus(tmp_path, fmt), tmp_path / "store", batch_size=batch_size)
    assert len(store) == len(PASSAGES) and store.meta["skipped_rows"] == 0
    assert [(int(store.ids[r]), store.title(r), store.text(r)) for r in range(len(store))] == PASSAGES
    rng = np.random.default_rng(batch_size)
    for rows in (rng.permutation(len(PASSAGES)), rng.integers(0, len(PASSAGES), 40), [4, 4, 0]):
        for length in (M, 24, 16):
            ref = _reference_tokens(bert, rows, length)
            got = store.retriever_tokens(rows, length)
            np.testing.assert_array_equal(got.ids, ref.ids)
            np.testing.assert_array_equal(got.mask, ref.mask)
            width = min(length, -(-int(ref.mask.sum(1).max()) // 8) * 8)
            got = store.retriever_tokens(list(rows), length, multiple=8)
            assert got.ids.shape == (len(rows), width)
            np.testing.assert_array_equal(got.ids, ref.ids[:, :width])
            np.testing.assert_array_equal(got.mask, ref.mask[:, :width])
    full = _reference_tokens(bert, range(len(PASSAGES)), M + 64).mask.sum(1)
    assert (full > M).sum() >= 5 and (full <= 24).any(), "rows both cut and kept whole at every length"
    short = [r for r in range(len(PASSAGES)) if full[r] <= 20]
    assert store.retriever_tokens(short, M, multiple=8).ids.shape[1] < M
    with pytest.raises(UserError, match="max length"):
        store.retriever_tokens([0], M + 1)


def test_store_scorer_passages(tmp_path, toks):
    t5 = toks[1]
    store = _build(toks, _corpus(tmp_path), tmp_path / "store")
    rows = np.random.default_rng(0).integers(0, len(PASSAGES), 50)
    titles, texts = [PASSAGES[r][1] for r in rows], [PASSAGES[r][2] for r in rows]
    fixed = len(t5(PromptConfig().head, add_special_tokens=False).input_ids) + 1 + \
        len(t5(PromptConfig().verbalizer, add_special_tokens=False).input_ids)
    # the store keeps S passage tokens: equivalent to the builder's cut while the budget after the
    # head is at most S (boundary included), whatever the passage length
    for max_encoder_tokens in (fixed + S, fixed + S - 1, fixed + 12):
        builder = PromptBuilder(t5, PromptConfig(max_encoder_tokens=max_encoder_tokens))
        got = builder.encoder_ids_from_passages(store.scorer_passages(rows))
        assert got == builder.encoder_ids(titles, texts)
    lengths = [len(t5(t, add_special_tokens=False).input_ids) + len(t5(x, add_special_tokens=False).input_ids)
               for t, x in zip(titles, texts)]
    assert max(lengths) > S + 10 and min(lengths) < S, "need passages on both sides of the scorer cut"


# ---------------------------------------------------------------- atomic publish


def _leftovers(folder) -> list[str]:
    return [n for n in os.listdir(folder) if ".building-" in n or ".old-" in n]


def test_rebuild_replaces_and_failure_keeps_old_store(tmp_path, toks):
    out = tmp_path / "store"
    _build(toks, _corpus(tmp_path, "tsv", PASSAGES[:10], "a"), out)
    bert, _ = toks
    new = prepare_corpus(_corpus(tmp_path, "jsonl", PASSAGES[10:], "b"), str(out), bert,
                         TokenizerSpec("bert", 32), progress=False)
    assert list(CorpusStore(str(out)).ids) == list(new.ids) == [p[0] for p in PASSAGES[10:]]
    assert new.scorer is None and "scorer.bin" not in os.listdir(out), "the old store's files must go"
    assert not _leftovers(tmp_path)
    bad, _ = _with_bad(tmp_path, "tsv", [BAD_TSV["id abc"]])
    with pytest.raises(UserError):
        _build(toks, bad, out)
    kept = CorpusStore(str(out))
    assert list(kept.ids) == [p[0] for p in PASSAGES[10:]] and kept.text(0) == PASSAGES[10][2]
    assert not _leftovers(tmp_path)
    os.makedirs(tmp_path / "empty")
    for folder in ("empty", "nowhere"):
        with pytest.raises(UserError, match="not a corpus store"):
            CorpusStore(str(tmp_path / folder))


# ---------------------------------------------------------------- CLI


def _cli_fails(argv, capsys) -> list[str]:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return _as_on_a_terminal(capsys.readouterr().err)


def _as_on_a_terminal(stream: str) -> list[str]:
    """The non-blank lines a terminal would keep: a carriage return rewrites its line
    (that is how a progress bar updates and clears itself)."""
    lines = (line.split("\r")[-1] for line in stream.split("\n"))
    return [line for line in lines if line.strip()]


def _cli_argv(tmp_path, corpus, bert_dir, t5_dir, *extra) -> list[str]:
    return ["prepare-corpus", "--corpus", corpus, "--retriever", bert_dir, "--scorer", t5_dir,
            "--out", str(tmp_path / "store"), "--retriever-max-length", "32", "--batch-size", "5", *extra]


def test_cli_prepare_corpus(tmp_path, capsys, bert_dir, t5_v11_dir):
    cli.main(_cli_argv(tmp_path, _corpus(tmp_path), bert_dir, t5_v11_dir))
    assert f"wrote {tmp_path / 'store'}: {len(PASSAGES)} passages, 0 bad row(s)" in capsys.readouterr().out
    store = CorpusStore(str(tmp_path / "store"))
    assert [int(i) for i in store.ids] == [p[0] for p in PASSAGES] and store.scorer is not None
    assert store.meta["retriever"]["max_length"] == 32 and store.meta["scorer"]["tokenizer"] == t5_v11_dir
    bad, (line,) = _with_bad(tmp_path, "tsv", [BAD_TSV["two columns"]])
    err = _cli_fails(_cli_argv(tmp_path, bad, bert_dir, t5_v11_dir), capsys)
    assert err[-1].startswith("art-jax prepare-corpus: error: ") and f"{bad}:{line}: " in err[-1], err
    cli.main(_cli_argv(tmp_path, bad, bert_dir, t5_v11_dir, "--skip-bad-rows"))
    assert f"{len(PASSAGES)} passages, 1 bad row(s) skipped" in capsys.readouterr().out
    missing = str(tmp_path / "missing.tsv")
    assert _cli_fails(_cli_argv(tmp_path, missing, bert_dir, t5_v11_dir), capsys) == [
        f"art-jax prepare-corpus: error: file not found: {missing}"]


def test_cli_bad_row_is_one_stderr_line(tmp_path, capsys, bert_dir, t5_v11_dir):
    bad, (line,) = _with_bad(tmp_path, "tsv", [BAD_TSV["id abc"]])
    err = _cli_fails(_cli_argv(tmp_path, bad, bert_dir, t5_v11_dir), capsys)
    assert len(err) == 1 and f"{bad}:{line}: " in err[0], err


# ---------------------------------------------------------------- string ids


# BEIR / TREC style: the first id is not an integer; some look like integers, "007" is not "7"
STRING_IDS = ["MED-10", "007", "7", "FBIS3-10082", "doc b", "Ünïcödé:東京", "x" * 300, "-3", "MED-9"]


def _string_corpus(tmp_path, fmt, ids=STRING_IDS, key="_id", name="s") -> str:
    rows = [(i, TITLES[n % len(TITLES)], CORPUS[n]) for n, i in enumerate(ids)]
    if fmt == "jsonl":
        lines = [json.dumps({key: i, "title": t, "text": x}, ensure_ascii=False) for i, t, x in rows]
    else:
        lines = ["id\ttext\ttitle"] + [_line(r, "tsv") for r in rows]
    return _write(tmp_path / f"{name}.{fmt}", lines)


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_string_ids_store_and_row_of(tmp_path, toks, fmt):
    store = _build(toks, _string_corpus(tmp_path, fmt), tmp_path / "store", batch_size=4)
    assert store.id_kind == "str" and store.meta["ids"] == "str" and len(store) == len(STRING_IDS)
    assert store.passage_ids(range(len(store))) == STRING_IDS
    assert [(store.title(r), store.text(r)) for r in range(len(store))] == [
        (TITLES[n % len(TITLES)], CORPUS[n]) for n in range(len(STRING_IDS))]
    assert [store.row_of(i) for i in STRING_IDS] == list(range(len(STRING_IDS)))
    rows = np.random.default_rng(0).integers(0, len(STRING_IDS), 30)
    np.testing.assert_array_equal(store.rows_of([STRING_IDS[r] for r in rows]), rows)
    np.testing.assert_array_equal(store.ids, [corpus.fingerprint(i) for i in STRING_IDS])
    assert store.row_of(7) == STRING_IDS.index("7") and store.row_of(-3) == STRING_IDS.index("-3")
    for unknown in ("MED-11", "07", "doc", 8):
        with pytest.raises(UserError, match=re.escape(f"no passage with id {unknown!r}")):
            store.row_of(unknown)
    reopened = CorpusStore(str(tmp_path / "store"))
    assert reopened.row_of("Ünïcödé:東京") == 5 and reopened.passage_id(4) == "doc b"


def test_id_kind_choice(tmp_path, toks):
    numeric = _string_corpus(tmp_path, "tsv", ["7", "007", "10"], name="numeric")
    # auto: the first id is an integer, so every id is one: "007" is 7 again
    with pytest.raises(UserError, match=f"^{re.escape(numeric)}:3: duplicate id 7"):
        _parsed(numeric)
    store = _build(toks, numeric, tmp_path / "store", ids="str")
    assert store.passage_ids(range(3)) == ["7", "007", "10"] and store.row_of("007") == 1
    with pytest.raises(UserError, match="no passage with id '07'"):
        store.row_of("07")
    mixed = _string_corpus(tmp_path, "jsonl", [5, "abc"], key="id", name="mixed")
    with pytest.raises(UserError, match=f"^{re.escape(mixed)}:2: id 'abc' is not an integer .*--ids str"):
        _parsed(mixed)
    assert [p.id for p in iter_passages(mixed, ids="str")] == ["5", "abc"]
    with pytest.raises(UserError, match=f"^{re.escape(mixed)}:2: id 'abc' is not an integer"):
        _parsed(mixed, ids="int")
    with pytest.raises(UserError, match="unknown id kind 'text'"):
        _parsed(mixed, ids="text")


BAD_STRING_JSONL = {
    "duplicate": '{"_id": "MED-10", "text": "x"}', "empty id": '{"_id": " ", "text": "x"}',
    "float id": '{"_id": 1.5, "text": "x"}', "null id": '{"_id": null, "text": "x"}', "no id": '{"text": "x"}',
}


@pytest.mark.parametrize("case", BAD_STRING_JSONL)
def test_bad_string_id_rows(tmp_path, toks, case):
    good = _string_corpus(tmp_path, "jsonl")
    with open(good, encoding="utf-8") as f:
        lines = f.read().splitlines()
    path = _write(tmp_path / "bad.jsonl", lines[:3] + [BAD_STRING_JSONL[case]] + lines[3:])
    with pytest.raises(UserError, match=f"^{re.escape(path)}:4: "):
        _parsed(path)
    store = _build(toks, path, tmp_path / "store", skip_bad_rows=True)
    assert store.passage_ids(range(len(store))) == STRING_IDS and store.meta["skipped_examples"][0][0] == 4


def test_shared_fingerprints_resolved_by_the_string(tmp_path, toks, monkeypatch):
    monkeypatch.setattr(corpus, "fingerprint", lambda s: len(s) % 3)  # collisions everywhere
    store = _build(toks, _string_corpus(tmp_path, "jsonl"), tmp_path / "store")
    assert [store.row_of(i) for i in STRING_IDS] == list(range(len(STRING_IDS)))
    with pytest.raises(UserError, match="no passage with id 'MED-11'"):
        store.row_of("MED-11")  # its key is shared by MED-10 and MED-9


def test_integer_ids_row_of(tmp_path, toks):
    store = _build(toks, _corpus(tmp_path), tmp_path / "store")  # ids not in row order
    assert store.id_kind == "int" and store.meta["ids"] == "int"
    ids = [p[0] for p in PASSAGES]
    assert store.passage_ids(range(len(store))) == ids
    assert [store.row_of(i) for i in ids] == list(range(len(ids)))
    assert [store.row_of(str(i)) for i in ids] == list(range(len(ids)))  # as qrels and runs write them
    assert store.row_of(np.int64(ids[5])) == 5
    np.testing.assert_array_equal(store.rows_of(ids[::-1]), np.arange(len(ids))[::-1])
    for unknown in (4, "abc", "1.5", 2**70):
        with pytest.raises(UserError, match="no passage with id"):
            store.row_of(unknown)
    ordered = sorted(PASSAGES)
    store = _build(toks, _corpus(tmp_path, "jsonl", ordered, "sorted"), tmp_path / "sorted")
    assert [store.row_of(p[0]) for p in ordered] == list(range(len(ordered)))
    assert store._id_lookup()[1] is None, "ascending ids are searched in place"
    # a store written before string ids (no "ids" in meta.json) reads as integer ids
    meta_path = tmp_path / "sorted" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["ids"]
    meta_path.write_text(json.dumps(meta))
    old = CorpusStore(str(tmp_path / "sorted"))
    assert old.id_kind == "int" and old.row_of(ordered[3][0]) == 3 and old.passage_id(3) == ordered[3][0]
