"""A user's whole path after `art-jax train`: export the run, load both towers with transformers
and sentence-transformers, re-embed the dev questions and the corpus outside art_jax, search by
numpy brute force, and get back the dev top-k the trainer printed; `search` given the export and
given the workdir agree."""

import csv
import json
import os
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from art_jax import cli
from art_jax.data.questions import read_questions
from art_jax.evaluation.answers import has_answer
from art_jax.retrieval.index import IndexVersion


def _corpus(workdir):
    with open(os.path.join(workdir, "demo", "corpus.tsv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [int(r["id"]) for r in rows], [r["title"] for r in rows], [r["text"] for r in rows]


def _cls(folder, texts, pairs=None, max_length=None):
    """[CLS] of the last layer from transformers' BertModel on PyTorch (token types all 0)."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, pairs, truncation="only_second" if pairs else True, max_length=max_length,
                      padding=True, return_tensors="pt")
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    with torch.no_grad():
        return model(**batch).last_hidden_state[:, 0].numpy()


def test_export_as_its_own_process_says_what_it_wrote_and_nothing_else(demo_run, tmp_path):
    """What a user sees of `art-jax export`: the folder it wrote, and no library's warnings (Orbax warns
    on every read of a run's checkpoints that a read-only view is read-only: those are dropped)."""
    from tests.multiprocess import art_jax_job

    out = str(tmp_path / "export")
    done = art_jax_job("export", "--run", demo_run[0], "--out", out, devices=1)
    assert done.stdout.splitlines() == [f"wrote {out}"], done.stdout
    assert "WARNING" not in done.stderr, done.stderr


def test_a_trained_run_is_exported_searched_and_reproduced_outside_art_jax(demo_run, tmp_path, capsys):
    workdir, stdout = demo_run
    [line] = [line for line in stdout.splitlines() if line.startswith("dev accuracy:")]
    printed = {int(k): float(b) for k, _, b in re.findall(r"top-(\d+) ([\d.]+)% -> ([\d.]+)%", line)}

    export = str(tmp_path / "export")
    cli.main(["export", "--run", workdir, "--out", export])
    info = json.load(open(os.path.join(export, "art_jax_export.json")))
    config = json.load(open(os.path.join(workdir, "config.json")))
    assert info["step"] == 100 and info["config"] == config and info["shared_towers"]  # the demo shares its towers
    assert (info["question_max_length"], info["passage_max_length"]) == (16, 64)

    # transformers on PyTorch: the towers as any Hugging Face user loads them
    questions = read_questions(os.path.join(workdir, "demo", "dev.jsonl"))
    ids, titles, texts = _corpus(workdir)
    q = _cls(os.path.join(export, "question_encoder"), [x.question for x in questions], max_length=16)
    p = _cls(os.path.join(export, "passage_encoder"), titles, texts, max_length=64)
    # sentence-transformers gives the same question vectors
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(os.path.join(export, "question_encoder"), device="cpu")
    np.testing.assert_allclose(st.encode([x.question for x in questions], batch_size=64), q, atol=1e-4)

    # numpy brute force over the float16 index the trainer evaluated with
    half = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
    top = np.argsort(-(half(q) @ half(p).T), axis=1, kind="stable")[:, :max(printed)]
    hits = np.array([[has_answer(x.answers, texts[r]) for r in row] for x, row in zip(questions, top)])
    for k, accuracy in printed.items():
        ours = 100 * np.mean(hits[:, :k].any(axis=1))
        # float rounding may swap passages whose scores tie to ~1e-3: at most one question either way
        assert abs(ours - accuracy) <= 100 / len(questions) + 0.05, (k, ours, accuracy)

    # art-jax search takes the export and the workdir alike, and gives what numpy gives
    outputs = {}
    for name, retriever in (("export", export), ("workdir", workdir)):
        out = str(tmp_path / f"{name}.json")
        cli.main(["search", "--retriever", retriever, "--index", os.path.join(workdir, "index"),
                  "--questions", os.path.join(workdir, "demo", "dev.jsonl"), "--topk", "20", "--out", out])
        outputs[name] = json.load(open(out))
    assert outputs["export"] == outputs["workdir"]
    version = IndexVersion.open(os.path.join(workdir, "index"))
    assert version.meta["step"] == 100  # the final index, from the exported passage tower
    found = np.array([[int(c["id"]) for c in item["ctxs"][:5]] for item in outputs["export"]])
    agree = np.mean(found == np.asarray(ids)[top[:, :5]])
    assert agree > 0.97, agree  # the same ranking but for near-ties
    capsys.readouterr()


def test_a_run_is_read_at_any_of_its_checkpoints(demo_run, tmp_path, capsys):
    """--run takes the workdir (newest checkpoint), --step, --best, or a checkpoint folder."""
    from art_jax.workdir import read_run

    workdir, _ = demo_run
    newest = read_run(workdir)
    for spec, kwargs in ((f"{workdir}/checkpoints/100", {}), (workdir, {"step": 100}), (f"{workdir}/best", {}),
                         (workdir, {"best": True})):
        run = read_run(spec, **kwargs)
        assert run.provenance["step"] == 100
        for a, b in zip(jax.tree.leaves(nnx.state(run.passage)), jax.tree.leaves(nnx.state(newest.passage))):
            np.testing.assert_array_equal(a, b)
    best = read_run(workdir, best=True).provenance
    assert best["metric"] == "top20" and best["value"] == pytest.approx(json.loads(
        open(os.path.join(workdir, "metrics.jsonl")).readlines()[-1])["top20"])
    out = str(tmp_path / "e")
    for argv, what in ((["--run", f"{workdir}/checkpoints/100", "--step", "100"], "is one checkpoint"),
                       (["--run", workdir, "--step", "7"], "no checkpoint of step 7"),
                       (["--run", workdir, "--step", "100", "--best"], "give one of them")):
        with pytest.raises(SystemExit):
            cli.main(["export", *argv, "--out", out])
        assert what in capsys.readouterr().err
        assert not os.path.exists(out)
