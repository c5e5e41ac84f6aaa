"""The export folder (both towers as Hugging Face folders that transformers and
sentence-transformers load) and retriever arguments: a Hugging Face folder, an export, a run."""

import json
import os

import numpy as np
import pytest
import torch

from art_jax import cli
from art_jax.core.errors import UserError
from art_jax.data.corpus import TokenizerSpec, prepare_corpus
from art_jax.models.export import export_retriever
from art_jax.models.hf import load_bert, load_tokenizer
from art_jax.retrieval.encoder import load_retriever, load_tower, retriever_kind
from art_jax.retrieval.index import IndexVersion
from tests.hf_fixtures import CORPUS, make_bert_checkpoint

QUESTIONS = ["who visited the bridge near paris", "which fox crossed the harbour", "when was the castle painted",
             # longer than the question max length (16): cut
             "what did marie curie describe in lagos in 1977 and who painted the old castle near kyoto"]
TITLES = ["Paris notes", "", "Kyoto", "A very long title about bridges and castles"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """Two different random BERTs (question, passage) with one tokenizer; initialised wider than
    BERT's 0.02 so that [CLS] depends on the input enough to rank passages apart."""
    folder = tmp_path_factory.mktemp("towers")
    return tuple(make_bert_checkpoint(str(folder / side), seed=seed, initializer_range=0.3)
                 for seed, side in enumerate(("question", "passage")))


@pytest.fixture(scope="module")
def exported(towers, tmp_path_factory):
    """`art-jax export` of one Hugging Face folder."""
    out = str(tmp_path_factory.mktemp("export") / "out")
    cli.main(["export", "--retriever", towers[0], "--out", out, "--question-max-length", "16",
              "--passage-max-length", "48"])
    return out


def _read(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_export_folder_of_a_hugging_face_checkpoint(towers, exported):
    from transformers import AutoModel, BertModel

    assert _read(f"{exported}/art_jax_export.json") == {
        "retriever": towers[0], "format": 1, "shared_towers": True, "question_max_length": 16,
        "passage_max_length": 48, "question_truncation": "right"}
    assert not [name for name in os.listdir(os.path.dirname(exported)) if name != "out"], "staging left behind"
    original = BertModel.from_pretrained(towers[0]).state_dict()
    for side, length in (("question", 16), ("passage", 48)):
        folder = f"{exported}/{side}_encoder"
        assert _read(f"{folder}/art_jax_tower.json") == {"side": side, "max_length": length}
        assert _read(f"{folder}/sentence_bert_config.json") == {"max_seq_length": length, "do_lower_case": False}
        modules = _read(f"{folder}/modules.json")
        assert [(m["path"], m["type"].rsplit(".", 1)[1]) for m in modules] == [("", "Transformer"),
                                                                             ("1_Pooling", "Pooling")]
        pooling = _read(f"{folder}/1_Pooling/config.json")
        assert pooling.pop("word_embedding_dimension") == 32 and pooling.pop("pooling_mode_cls_token") is True
        assert not any(pooling.values()), pooling  # no other pooling mode

        model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=f"{side}: {key}")


def test_sentence_transformers_gives_the_dual_encoder_vectors(exported):
    from sentence_transformers import SentenceTransformer

    encoder = load_retriever(exported)
    assert (encoder.question_max_length, encoder.passage_max_length) == (16, 48)
    assert len(encoder.tokenizer(QUESTIONS[-1])["input_ids"]) > 16, "the long question is not cut"
    question_model = SentenceTransformer(f"{exported}/question_encoder", device="cpu")
    assert len(question_model) == 2 and question_model.max_seq_length == 16  # no Normalize module
    assert question_model.similarity_fn_name == "dot"
    want = np.asarray(encoder.embed_questions(QUESTIONS))
    got = question_model.encode(QUESTIONS, convert_to_numpy=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert np.abs(want - want.mean(0)).max() > 0.1, "every question gets the same vector: the test proves nothing"

    # passages as the README says: "title [SEP] text" (an empty title too), the text cut at the end
    texts = [CORPUS[0], CORPUS[1], " ".join(CORPUS[2:12]), CORPUS[3]]
    passage_model = SentenceTransformer(f"{exported}/passage_encoder", device="cpu")
    assert passage_model.max_seq_length == 48
    got = passage_model.encode([f"{title} [SEP] {text}" for title, text in zip(TITLES, texts)],
                               convert_to_numpy=True)
    np.testing.assert_allclose(got, np.asarray(encoder.embed_passages(TITLES, texts)), rtol=0, atol=1e-5)


def test_load_retriever_of_an_export_equals_its_hugging_face_folder(towers, exported):
    from_export, from_folder = load_retriever(exported), load_retriever(towers[0])
    from_folder.question_max_length, from_folder.passage_max_length = 16, 48
    for encoder in (from_export, from_folder):
        np.testing.assert_allclose(np.asarray(encoder.embed_questions(QUESTIONS)),
                                   np.asarray(from_folder.embed_questions(QUESTIONS)), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(encoder.embed_passages(TITLES, CORPUS[:4])),
                                   np.asarray(from_folder.embed_passages(TITLES, CORPUS[:4])), rtol=0, atol=1e-6)
    # one tower and its recorded length: the export's, an exported tower folder's, none for a plain folder
    assert load_tower(exported, "passage")[1] == 48 and load_tower(exported, "question")[1] == 16
    assert load_tower(f"{exported}/passage_encoder", "passage")[1] == 48
    assert load_tower(towers[0], "passage")[1] is None


def _cls(folder, tokenizer, first, second, max_length):
    """[CLS] embeddings from transformers, token type ids all 0 as DPR and ART feed them."""
    from transformers import BertModel

    batch = tokenizer(first, second, truncation="only_second" if second else True, max_length=max_length,
                      padding=True, return_tensors="pt")
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    with torch.no_grad():
        return BertModel.from_pretrained(folder).eval()(**batch).last_hidden_state[:, 0].numpy()


def test_search_uses_the_question_tower_against_the_passage_towers_index(towers, tmp_path):
    from transformers import AutoTokenizer

    question_dir, passage_dir = towers
    export = str(tmp_path / "export")
    export_retriever(load_bert(question_dir), load_bert(passage_dir), load_tokenizer(question_dir), export,
                     question_max_length=16, passage_max_length=48, provenance={"step": 7})
    assert _read(f"{export}/art_jax_export.json")["shared_towers"] is False
    assert _read(f"{export}/art_jax_export.json")["step"] == 7

    rows = [(2000 + i, TITLES[i % 4], " ".join([CORPUS[5 * i]] * (1 + i % 3))) for i in range(12)]
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("id\ttext\ttitle\n" + "".join(f"{i}\t{x}\t{t}\n" for i, t, x in rows), encoding="utf-8")
    store = prepare_corpus(str(corpus), str(tmp_path / "store"), load_tokenizer(question_dir),
                           TokenizerSpec(question_dir, 128), progress=False)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answers": ["x"]}) + "\n" for q in QUESTIONS))
    index, results = str(tmp_path / "index"), str(tmp_path / "results.json")
    cli.main(["embed", "--retriever", export, "--corpus", store.path, "--out", index, "--batch-size", "8"])
    version = IndexVersion.open(index)
    assert version.meta["max_length"] == 48 and version.meta["checkpoint"] == export  # the recorded length
    k = 4
    cli.main(["search", "--retriever", export, "--index", index, "--questions", str(questions), "--topk", str(k),
              "--out", results, "--rows-per-device", "2"])

    tokenizer = AutoTokenizer.from_pretrained(question_dir)
    q = _cls(question_dir, tokenizer, QUESTIONS, None, 16)
    p = _cls(passage_dir, tokenizer, [t for _, t, _ in rows], [x for _, _, x in rows], 48)
    np.testing.assert_allclose(version.read(0, version.count).astype(np.float32), p, atol=4e-3, rtol=2e-3)
    scores = q @ p.T
    ranked = np.argsort(-scores, axis=1)[:, :k]
    gaps = -np.diff(np.sort(scores, axis=1)[:, ::-1][:, :k + 1], axis=1)
    assert gaps.min() > 1e-2, "near ties: float16 rounding could reorder them"
    ids = np.array([i for i, _, _ in rows])
    got = [[int(c["id"]) for c in item["ctxs"]] for item in _read(results)]
    np.testing.assert_array_equal(got, ids[ranked])
    # informative: a different order per question, and not the order of the passage tower's questions
    assert len({tuple(r) for r in ranked}) > 1
    wrong = np.argsort(-(_cls(passage_dir, tokenizer, QUESTIONS, None, 16) @ p.T), axis=1)[:, :k]
    assert (wrong != ranked).any()


# ---------------------------------------------------------------------------------------
# training runs: delegated to art_jax.workdir


def _fake_run(root):
    os.makedirs(root / "checkpoints" / "100")
    os.makedirs(root / "best" / "60")
    (root / "config.json").write_text("{}")
    return root


def test_retriever_kinds(towers, exported, tmp_path):
    run = _fake_run(tmp_path / "run")
    assert retriever_kind(exported) == retriever_kind(exported + "/") == "export"
    assert retriever_kind(towers[0]) == retriever_kind(f"{exported}/question_encoder") == "hf"
    assert retriever_kind("bert-base-uncased") == "hf"
    for path in (run, run / "checkpoints" / "100", run / "best", run / "best" / "60"):
        assert retriever_kind(str(path)) == "run", path
    assert retriever_kind(str(run / "checkpoints")) == "hf"  # not a checkpoint: loading says what is missing


def test_export_usage_errors(towers, exported, tmp_path, capsys):
    run = str(_fake_run(tmp_path / "run"))
    out = str(tmp_path / "out")
    for argv, what in [
        (["--run", towers[0]], f"--run {towers[0]}: not a training run"),
        (["--retriever", towers[0], "--step", "5"], "training run's workdir; " + towers[0]),
        (["--retriever", exported, "--best"], "is an export folder"),
        (["--retriever", run, "--question-max-length", "8"], "--question-max-length"),
        (["--retriever", towers[0], "--passage-max-length", "129"], "passage max length 129"),
    ]:
        with pytest.raises(SystemExit) as exc:
            cli.main(["export", *argv, "--out", out])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("art-jax export: error: ") and what in err, err
        assert not os.path.exists(out)
    with pytest.raises(UserError, match="--step/--best"):
        load_tower(exported, "passage", step=3)
