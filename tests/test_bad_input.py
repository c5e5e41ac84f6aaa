"""Bad input to the commands: one line naming the file or flag, exit 2, no traceback, and
nothing of the user's deleted (issue 13)."""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess

import jax
import pytest
import torch

from art_jax import cli
from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.sharding import make_mesh
from art_jax.data import corpus
from art_jax.data.corpus import STORE_FORMAT, TokenizerSpec, is_corpus_store, prepare_corpus
from art_jax.models.hf import load_bert, load_tokenizer
from art_jax.retrieval.embed import embed_corpus
from tests import hf_fixtures
from tests.test_cli import GOOD, _fails, _results, _write_jsonl


def _tree(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what must survive a refusal unchanged."""
    return {os.path.relpath(os.path.join(root, name), folder): pathlib.Path(root, name).read_bytes()
            for root, _, names in os.walk(folder) for name in names}


@pytest.fixture(scope="module")
def searchable(files, bert_dir, tmp_path_factory):
    """(index folder, questions JSONL) of the ``files`` corpus embedded by ``bert_dir``."""
    folder = tmp_path_factory.mktemp("searchable")
    store = prepare_corpus(files[0], str(folder / "store"), load_tokenizer(bert_dir), TokenizerSpec(bert_dir, 64),
                           progress=False)
    tower = load_bert(bert_dir, mesh=make_mesh(devices=jax.local_devices()))
    embed_corpus(tower, store, str(folder / "index"), checkpoint=bert_dir, max_length=64, progress=False)
    return str(folder / "index"), files[1]


def _search(retriever, searchable, tmp_path, *extra) -> list[str]:
    index, questions = searchable
    return ["search", "--retriever", retriever, "--index", index, "--questions", questions,
            "--out", str(tmp_path / "results.json"), "--topk", "5", *extra]


# ---------------------------------------------------------------------------------------
# an existing --out folder is replaced only when it is what the command writes


def _prepare(corpus_path, bert_dir, out) -> list[str]:
    return ["prepare-corpus", "--corpus", corpus_path, "--retriever", bert_dir, "--out", str(out)]


def test_prepare_corpus_replaces_only_a_corpus_store(files, bert_dir, tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(bert_dir, checkpoint)
    version = tmp_path / "v000000"  # an index version's meta.json has a format, but is no store's
    version.mkdir()
    (version / "meta.json").write_text(json.dumps({"format": 1, "count": 3, "dim": 32}))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    kept = {path: _tree(path) if path.is_dir() else path.read_bytes() for path in (checkpoint, version, a_file)}

    def tokenized(*args, **kwargs):
        raise AssertionError("tokenized before refusing the --out")

    with monkeypatch.context() as patch:
        patch.setattr(corpus, "passage_rows", tokenized)
        for out in kept:
            err = _fails(_prepare(files[0], bert_dir, out), capsys)
            assert f"{out}: exists and is not a corpus store (no meta.json of a store); refusing to replace it" in err
        err = _fails(_prepare(files[0], bert_dir, a_file / "store"), capsys)
        assert f"{a_file} is a file, not a folder" in err, err
    assert kept == {path: _tree(path) if path.is_dir() else path.read_bytes() for path in kept}

    empty = tmp_path / "empty"
    empty.mkdir()
    cli.main(_prepare(files[0], bert_dir, empty))  # an empty folder is filled
    assert is_corpus_store(str(empty))
    cli.main(_prepare(files[0], bert_dir, empty))  # and, a store now, replaced
    assert is_corpus_store(str(empty))


def test_corpus_stores_of_this_and_the_last_format_are_recognised(tmp_path):
    for fmt, recognised in ((STORE_FORMAT, True), (STORE_FORMAT - 1, True), (STORE_FORMAT + 1, False)):
        (tmp_path / "meta.json").write_text(json.dumps({"format": fmt, "count": 1, "retriever": {}}))
        assert is_corpus_store(str(tmp_path)) == recognised, fmt
    (tmp_path / "meta.json").write_bytes(b"\xff not json")
    assert not is_corpus_store(str(tmp_path))


def test_embed_writes_only_into_an_index_folder(files, bert_dir, searchable, tmp_path, capsys):
    index, _ = searchable
    store = os.path.join(os.path.dirname(index), "store")
    out = tmp_path / "papers"
    out.mkdir()
    (out / "draft.txt").write_text("keep me")
    err = _fails(["embed", "--retriever", bert_dir, "--corpus", store, "--out", str(out)], capsys)
    assert f"{out}: exists and is not an index folder (no vNNNNNN version in it); refusing to replace it" in err
    assert _tree(out) == {"draft.txt": b"keep me"}


def test_killed_prepare_corpus_staging_is_removed_by_the_next_run(files, bert_dir, tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    from art_jax.data.corpus import _HOST

    stale = [f".store.building-{_HOST}-{dead.pid}-x1y2"]
    kept = [f".store.building-{_HOST}-{os.getpid()}-live",  # a build still running
            f".store.building-elsewhere-{dead.pid}-x1y2",  # another machine's, on a shared disk
            ".store.building-job", f".other.building-{_HOST}-{dead.pid}-k3j4h5"]
    for name in [*stale, *kept]:
        os.makedirs(tmp_path / name / "part")
    cli.main(_prepare(files[0], bert_dir, tmp_path / "store"))
    assert sorted(n for n in os.listdir(tmp_path) if ".building-" in n) == sorted(kept)


# ---------------------------------------------------------------------------------------
# search, score and evaluate


@pytest.mark.parametrize("topk", ["0", "-3"])
def test_search_topk_must_be_positive(topk, bert_dir, searchable, tmp_path, capsys):
    argv = _search(bert_dir, searchable, tmp_path)[:-2] + ["--topk", topk]
    assert f"--topk must be positive, got {topk}" in _fails(argv, capsys)


def test_evaluate_topk_must_be_positive(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results()))
    assert "--topk must be positive, got 0" in _fails(["evaluate", "--results", str(results), "--topk", "1", "0"],
                                                       capsys)


@pytest.fixture(scope="module")
def bert48_dir(tmp_path_factory):
    return hf_fixtures.make_bert_checkpoint(str(tmp_path_factory.mktemp("bert48")), hidden_size=48)


def test_search_with_a_retriever_of_another_dimension(bert48_dir, searchable, tmp_path, capsys):
    err = _fails(_search(bert48_dir, searchable, tmp_path), capsys)
    assert f"--index {searchable[0]}" in err and "32-dimensional" in err and "gives 48" in err, err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("name, content", [("q.tsv", ""), ("q.jsonl", "\n  \n"), ("q.json", "[]")])
def test_search_empty_question_file(name, content, bert_dir, searchable, tmp_path, capsys):
    questions = tmp_path / name
    questions.write_text(content)
    argv = _search(bert_dir, (searchable[0], str(questions)), tmp_path)
    assert f"{questions}: no questions" in _fails(argv, capsys)


@pytest.mark.parametrize("name, lines", [
    ("q.tsv", [b'who visited the bridge\t["Paris"]', b'who \xff visited\t["x"]']),
    ("q.jsonl", [json.dumps({"question": "who?"}).encode(), b'{"question": "who \xc3 visited"}']),
    ("q.json", [b'[{"question": "who?"},', b' {"question": "\xff"}]']),
])
def test_question_file_of_invalid_utf8_names_the_line(name, lines, bert_dir, searchable, tmp_path, capsys):
    questions = tmp_path / name
    questions.write_bytes(b"\n".join(lines) + b"\n")
    argv = _search(bert_dir, (searchable[0], str(questions)), tmp_path)
    assert f"{questions}:2: invalid UTF-8" in _fails(argv, capsys)


def test_empty_pairs_and_results_to_score(t5_v10_dir, tmp_path, capsys):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", ["", "  "])
    err = _fails(["score", "--scorer", t5_v10_dir, "--pairs", pairs, "--out", str(tmp_path / "s.jsonl")], capsys)
    assert f"{pairs}: no pairs" in err, err
    for content in ([], [{"question": "q", "answers": [], "ctxs": []}]):
        results = tmp_path / "results.json"
        results.write_text(json.dumps(content))
        err = _fails(["score", "--scorer", t5_v10_dir, "--rerank", str(results), "--out", str(tmp_path / "r.json")],
                     capsys)
        assert f"{results}: no ctxs to re-rank" in err, err
    assert not (tmp_path / "s.jsonl").exists() and not (tmp_path / "r.json").exists()


def test_pairs_file_of_invalid_utf8_names_the_line(t5_v10_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(json.dumps(GOOD).encode() + b'\n{"title": "\xff", "text": "x", "question": "q"}\n')
    err = _fails(["score", "--scorer", t5_v10_dir, "--pairs", str(pairs), "--out", str(tmp_path / "s")], capsys)
    assert f"{pairs}:2: invalid UTF-8" in err, err


# ---------------------------------------------------------------------------------------
# files and folders in the wrong place


def _argvs(t5_dir, bert_dir, searchable, tmp_path, *, inputs: str, out: str) -> list[list[str]]:
    """Every command with one input file, or one output file, replaced."""
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    results = tmp_path / "results.json"
    results.write_text(json.dumps(_results()))
    index, questions = searchable
    return [
        ["score", "--scorer", t5_dir, "--pairs", inputs or pairs, "--out", out or str(tmp_path / "s.jsonl")],
        ["score", "--scorer", t5_dir, "--rerank", inputs or str(results), "--out", out or str(tmp_path / "r.json")],
        ["search", "--retriever", bert_dir, "--index", index, "--questions", inputs or questions, "--out",
         out or str(tmp_path / "found.json"), "--topk", "5"],
        ["evaluate", "--results", inputs or str(results), "--topk", "1",
         "--annotated-out", out or str(tmp_path / "a.json")],
    ]


def test_a_folder_given_as_an_input_file(t5_v10_dir, bert_dir, files, searchable, tmp_path, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    argvs = _argvs(t5_v10_dir, bert_dir, searchable, tmp_path, inputs=str(folder), out="")
    argvs.append(_prepare(str(folder), bert_dir, tmp_path / "store"))
    for argv in argvs:
        assert f"{folder}: is a folder, expected a file" in _fails(argv, capsys), argv


@pytest.mark.parametrize("where", ["folder", "under-a-file"])
def test_an_output_file_that_cannot_be_written(where, t5_v10_dir, bert_dir, searchable, tmp_path, capsys):
    blocker = tmp_path / "blocker"
    if where == "folder":
        blocker.mkdir()
        (blocker / "keep.txt").write_text("keep me")
        out, what = blocker, f"{blocker}: is a folder, expected a file"
    else:
        blocker.write_text("keep me")
        out, what = blocker / "x.json", f"{blocker} is a file, not a folder"
    for argv in _argvs(t5_v10_dir, bert_dir, searchable, tmp_path, inputs="", out=str(out)):
        flag = "--annotated-out" if argv[0] == "evaluate" else "--out"
        err = _fails(argv, capsys)
        assert err.startswith(f"art-jax {argv[0]}: error: {flag} {out}") and what in err, err
    assert (blocker / "keep.txt" if where == "folder" else blocker).read_text() == "keep me"
    with pytest.raises(UserError, match=re.escape(what)):  # the same from the library, which checks where it writes
        storage.write_text(str(out), "x")


# ---------------------------------------------------------------------------------------
# checkpoints


def test_truncated_safetensors(bert_dir, searchable, tmp_path, capsys):
    folder = tmp_path / "bert"
    shutil.copytree(bert_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    for size, what in ((5, "shorter than its header"), (header // 2, "shorter than its header"),
                       (len(data) - 100, f"its header declares {len(data)}")):
        weights.write_bytes(data[:size])
        err = _fails(_search(str(folder), searchable, tmp_path), capsys)
        assert f"{weights}: truncated safetensors file ({size} bytes, {what}" in err, err


class _Payload:
    """Code a pickle runs while it loads: harmless here, a shell command in an attack."""

    def __reduce__(self):
        return print, ("pwned",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pytorch_model_bin(writer, bert_dir, searchable, tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(os.path.join(bert_dir, "config.json"), folder)
    path = folder / "pytorch_model.bin"
    if writer == "torch.save":
        torch.save({"embeddings.word_embeddings.weight": _Payload()}, path)
        torch.load(path, weights_only=False)  # the file is what it claims: loaded unsafely, it runs the payload
    else:  # a raw pickle of a newer protocol, on which torch also warns
        path.write_bytes(pickle.dumps({"x": _Payload()}, protocol=4))
        pickle.loads(path.read_bytes())
    assert "pwned" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exc:
        cli.main(_search(str(folder), searchable, tmp_path))
    captured = capsys.readouterr()
    assert exc.value.code == 2 and "pwned" not in captured.out + captured.err
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"art-jax search: error: {path}: refused: not a plain tensor file ("), err
    assert "weights_only" not in err[0], err


def test_offline_hub_miss_is_one_line(t5_v10_dir, tmp_path, capsys, monkeypatch):
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    argv = ["score", "--scorer", "no-such-org/no-such-model", "--pairs", pairs, "--out", str(tmp_path / "s")]
    err = _fails(argv, capsys)  # HF_HUB_OFFLINE=1 in the tests
    assert "'no-such-org/no-such-model' is not a local folder" in err and "HF_HUB_OFFLINE is set" in err, err

    import huggingface_hub

    def multi_line(*args, **kwargs):
        raise OSError("We couldn't connect to the hub.\nCheck your connection.\n\tOr set HF_HUB_OFFLINE=1.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", multi_line)
    err = _fails(argv, capsys)
    assert err.endswith("OSError: We couldn't connect to the hub."), err
