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


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from art_jax.data.tokenizers import train_wordpiece

    folder = str(tmp_path_factory.mktemp("tokenizer"))
    tokenizer = train_wordpiece(CORPUS, 120)
    assert len(tokenizer) <= VOCAB
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def megatron_dir(tmp_path_factory):
    """An ART checkpoint (checkpoint_version 1.0, as ART saves) and its two source models."""
    query, context = hf_model(1), hf_model(2)
    biencoder = {"query_model": megatron_tower(query, 1.0), "context_model": megatron_tower(context, 1.0)}
    folder = tmp_path_factory.mktemp("megatron")
    save(folder, megatron_state({"retriever/biencoder_model": biencoder}, 1.0, iteration=2000))
    return str(folder), query, context


def _cls(model, tokenizer, texts, pairs=None):
    batch = tokenizer(texts, pairs, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=torch.zeros_like(batch["input_ids"])).last_hidden_state[:, 0].numpy()


def test_a_converted_megatron_retriever_searches_as_megatron_bert_does(megatron_dir, tokenizer_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, MegatronBertModel

    folder, query, context = megatron_dir
    out = tmp_path / "art_nq"
    cli.main(["convert", "--megatron", folder, "--tokenizer", tokenizer_dir, "--out", str(out)])
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
    store, index, results = tmp_path / "store", tmp_path / "index", tmp_path / "results.json"
    cli.main(["prepare-corpus", "--corpus", str(corpus), "--retriever", str(out), "--out", str(store)])
    cli.main(["embed", "--retriever", str(out), "--corpus", str(store), "--out", str(index), "--dtype", "float16"])
    cli.main(["search", "--retriever", str(out), "--index", str(index), "--questions", str(questions_file),
              "--topk", "5", "--out", str(results)])

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
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


def test_two_dpr_towers_become_one_retriever(tokenizer_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    from art_jax.retrieval.encoder import load_retriever

    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               max_position_embeddings=64)
    folders = {}
    for seed, (side, cls) in enumerate((("question", DPRQuestionEncoder), ("passage", DPRContextEncoder))):
        torch.manual_seed(seed)
        model = cls(DPRConfig(**cfg)).eval()
        folders[side] = str(tmp_path / side)
        model.save_pretrained(folders[side])
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folders[side])
    out = tmp_path / "dpr"
    cli.main(["convert", "--question-tower", folders["question"], "--passage-tower", folders["passage"],
              "--out", str(out), "--passage-max-length", "48"])
    capsys.readouterr()
    encoder = load_retriever(str(out))
    assert (encoder.question_max_length, encoder.passage_max_length) == (64, 48)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tokenizer(CORPUS[:6], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = DPRQuestionEncoder.from_pretrained(folders["question"])(**batch).pooler_output.numpy()
    np.testing.assert_allclose(np.asarray(encoder.embed_questions(CORPUS[:6])), want, rtol=0, atol=1e-5)


def test_bad_invocations_are_one_line(megatron_dir, tokenizer_dir, tmp_path, capsys):
    folder = megatron_dir[0]
    err = _fails(["convert", "--megatron", folder, "--out", str(tmp_path / "o")], capsys)
    assert "--tokenizer" in err and "bert-large-uncased" in err, err
    err = _fails(["convert", "--question-tower", folder, "--out", str(tmp_path / "o")], capsys)
    assert "--passage-tower" in err, err
    err = _fails(["convert", "--megatron", str(tmp_path / "nothing"), "--tokenizer", tokenizer_dir,
                  "--out", str(tmp_path / "o")], capsys)
    assert str(tmp_path / "nothing") in err, err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    err = _fails(["convert", "--megatron", folder, "--tokenizer", tokenizer_dir, "--out", str(mine)], capsys)
    assert str(mine) in err and (mine / "notes.txt").exists(), err
    from art_jax.data.tokenizers import train_wordpiece

    big = tmp_path / "big_tokenizer"
    train_wordpiece(CORPUS + [" ".join(f"word{i}" for i in range(200))], 400).save_pretrained(str(big))
    err = _fails(["convert", "--megatron", folder, "--tokenizer", str(big), "--out", str(tmp_path / "o")], capsys)
    assert "embedding rows" in err, err
    assert not (tmp_path / "o").exists()
