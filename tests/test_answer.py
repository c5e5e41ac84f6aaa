"""`art-jax answer` (art_jax/jobs/answer.py) against transformers on PyTorch CPU.

The oracle builds each question's Fusion-in-Decoder memory by hand: every (question, passage)
input formatted by the documented template, tokenized by transformers' own tokenizer, cut to
--max-input-tokens with its closing special token kept, encoded alone by transformers' T5
encoder; the K encodings laid end to end (a missing passage: zeros, masked out). transformers'
``generate`` then decodes over that memory. A Joint top-K reader's bias goes in as a 4-D float
encoder mask (0 or the float32 minimum, plus lambda * softmax(score / tau) at each passage's
positions), which transformers' eager attention adds to the cross-attention logits as it is.

The reader demo (configs/reader_demo.py, shortened, which must learn) and its other methods' smoke
runs train in their own processes, started by the first test of this file so that they train while
the others run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from art_jax import cli
from tests.hf_fixtures import CORPUS
from tests.multiprocess import art_jax_job, child_env
from tests.test_cli import _fails

transformers = pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FID = "question: {question} title: {title} context: {text}"
EMDR2 = "[CLS] {question} [SEP] {title} [SEP] {text} [SEP]"
TOPK = 3
MAX_INPUT = 48  # cuts the longer fid inputs, pads the shorter
SHORT_INPUT = 30  # the same for the shorter emdr2 and custom inputs
MAX_ANSWER = 12
# ctxs per question: some below TOPK, some above; 10 questions make two batches of 8 (the mesh's
# data axis), the second padded with its last question
COUNTS = [4, 1, 3, 2, 5, 3, 2, 4, 1, 3]
QUESTIONS = ["Who visited the bridge near Paris?", "When was the old castle painted?",
             "Where did the committee cross the harbour?", "What did Marie Curie describe in 1977?",
             "who painted the laboratory near Kyoto?", "When did a small brown fox cross the bridge?",
             "What did Ada Lovelace paint?", "Where is the harbour the river Thames crossed?",
             "Who described the old castle near Lagos?", "In which year was the laboratory visited?"]


def _results() -> list[dict]:
    """DPR-format results: varied passages and retriever scores; some ctxs with an empty title,
    some with none at all."""
    results = []
    for qi, (question, count) in enumerate(zip(QUESTIONS, COUNTS)):
        ctxs = []
        for rank in range(count):
            ci = (7 * qi + 13 * rank) % len(CORPUS)
            ctx = {"id": str(ci), "title": f"T{ci % 9}", "text": CORPUS[ci], "score": round(9.0 - 1.7 * rank
                                                                                             + 0.3 * qi, 3)}
            if (qi + rank) % 4 == 1:
                ctx["title"] = ""
            elif (qi + rank) % 4 == 3:
                del ctx["title"]
            ctxs.append(ctx)
        results.append({"question": question, "answers": [f"answer {qi}"], "ctxs": ctxs})
    return results


RESULTS = _results()


@pytest.fixture(scope="module")
def results_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("answer_results") / "results.json"
    path.write_text(json.dumps(RESULTS), encoding="utf-8")
    return str(path)


def _answer(reader, results, out, *flags) -> list[dict]:
    cli.main(["answer", "--reader", str(reader), "--results", str(results), "--out", str(out), *flags])
    with open(out, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _predictions(rows) -> list[str]:
    return [row["prediction"] for row in rows]


# ---------------------------------------------------------------------------------------
# the oracle


class Oracle:
    """transformers' T5 and tokenizer of one folder (eager attention: the 4-D float mask is
    added to the logits as it is)."""

    def __init__(self, folder: str):
        self.tok = transformers.AutoTokenizer.from_pretrained(folder)
        self.hf = transformers.T5ForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()

    def memory(self, results, template: str, topk: int, max_input: int):
        """([Q, K * N, D] memory, [Q, K * N] 0/1 mask) of the first ``topk`` ctxs of each result."""
        # a template that spells out special tokens (EMDR2's [CLS]/[SEP]) gets no </s> added
        spelled_out = any(token in template for token in self.tok.all_special_tokens)
        memory = torch.zeros(len(results), topk, max_input, self.hf.config.d_model)
        mask = torch.zeros(len(results), topk, max_input, dtype=torch.long)
        self.cut = []  # per input: whether it was cut (the tests want both kinds)
        with torch.no_grad():
            for qi, item in enumerate(results):
                for k, ctx in enumerate(item["ctxs"][:topk]):
                    text = template.format(question=item["question"], title=ctx.get("title") or "", text=ctx["text"])
                    ids = self.tok(text, add_special_tokens=not spelled_out)["input_ids"]
                    self.cut.append(len(ids) > max_input)
                    if len(ids) > max_input:  # cut, the closing special token kept last
                        assert ids[-1] in self.tok.all_special_ids
                        ids = ids[:max_input - 1] + ids[-1:]
                    memory[qi, k, :len(ids)] = self.hf.encoder(input_ids=torch.tensor([ids])).last_hidden_state[0]
                    mask[qi, k, :len(ids)] = 1
        return memory.reshape(len(results), topk * max_input, -1), mask.reshape(len(results), -1)

    def generate_tokens(self, results, *, template=FID, topk=TOPK, max_input=MAX_INPUT, max_answer=MAX_ANSWER,
                        beams=1) -> torch.Tensor:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        from transformers.modeling_outputs import BaseModelOutput

        memory, mask = self.memory(results, template, topk, max_input)
        with torch.no_grad():
            # the cache built lazily: the one generate makes counts the encoder's layers, and the
            # fixtures' decoders have one more (tests/test_generation.py)
            return self.hf.generate(encoder_outputs=BaseModelOutput(last_hidden_state=memory), attention_mask=mask,
                                    max_new_tokens=max_answer, num_beams=beams, do_sample=False,
                                    past_key_values=EncoderDecoderCache(DynamicCache(), DynamicCache()))

    def joint_greedy_tokens(self, results, lam: float, tau: float, *, topk=TOPK, max_input=MAX_INPUT,
                            max_answer=MAX_ANSWER) -> torch.Tensor:
        """Greedy decoding by hand (``generate`` takes only a 2-D mask), the whole prefix re-run
        each step, over a memory whose mask carries the Joint top-K bias."""
        memory, mask = self.memory(results, FID, topk, max_input)
        bias = torch.zeros(len(results), topk)
        for qi, item in enumerate(results):  # softmax over the passages the question has
            scores = torch.tensor([ctx["score"] for ctx in item["ctxs"][:topk]], dtype=torch.float32)
            bias[qi, :len(scores)] = lam * torch.softmax(scores / tau, dim=0)
        padding = torch.where(mask > 0, 0.0, torch.finfo(torch.float32).min)
        encoder_mask = (padding + torch.repeat_interleave(bias, max_input, dim=-1))[:, None, None, :]
        cfg = self.hf.config
        tokens = torch.full((len(results), 1), cfg.decoder_start_token_id)
        ended = torch.zeros(len(results), dtype=torch.bool)
        with torch.no_grad():
            for _ in range(max_answer):
                logits = self.hf(encoder_outputs=(memory,), attention_mask=encoder_mask, decoder_input_ids=tokens,
                                 use_cache=False).logits[:, -1]
                chosen = torch.where(ended, cfg.pad_token_id, logits.argmax(-1))
                tokens = torch.cat([tokens, chosen[:, None]], dim=1)
                ended |= chosen == cfg.eos_token_id
                if ended.all():
                    break
        return tokens

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return [text.strip() for text in self.tok.batch_decode(tokens, skip_special_tokens=True)]

    def answers(self, results, **kwargs) -> list[str]:
        return self.decode(self.generate_tokens(results, **kwargs))


@pytest.fixture(scope="module")
def sharp(t5_sharp_dir) -> Oracle:
    return Oracle(t5_sharp_dir)


@pytest.fixture(scope="module")
def fid_answers(t5_sharp_dir, results_path, tmp_path_factory) -> list[dict]:
    """The sharp T5's greedy answers: a plain Hugging Face folder, read in FiD's default format."""
    out = tmp_path_factory.mktemp("answers") / "greedy.jsonl"
    return _answer(t5_sharp_dir, results_path, out, "--topk", str(TOPK), "--max-input-tokens", str(MAX_INPUT),
                   "--max-answer-tokens", str(MAX_ANSWER))


def _check_nontrivial(predictions: list[str]) -> None:
    """Answers that mostly say something (the random model ends some at once: </s> first), and not
    all the same."""
    assert sum(map(bool, predictions)) >= 0.6 * len(predictions), predictions
    assert len(set(predictions)) >= len(predictions) // 2, predictions


# ---------------------------------------------------------------------------------------
# 1. a Hugging Face T5 folder as the reader: greedy and beam search


def test_greedy_answers_match_transformers(fid_answers, sharp):
    assert [(row["question"], row["answers"]) for row in fid_answers] == [
        (item["question"], item["answers"]) for item in RESULTS]  # every question, in input order
    assert all(set(row) == {"question", "answers", "prediction"} for row in fid_answers)
    predictions = _predictions(fid_answers)
    assert predictions == sharp.answers(RESULTS)
    assert any(sharp.cut) and not all(sharp.cut)
    _check_nontrivial(predictions)


def test_beam_search_answers_match_transformers(t5_sharp_dir, results_path, fid_answers, sharp, tmp_path):
    rows = _answer(t5_sharp_dir, results_path, tmp_path / "beams.jsonl", "--topk", str(TOPK), "--max-input-tokens",
                   str(MAX_INPUT), "--max-answer-tokens", str(MAX_ANSWER), "--beams", "3")
    predictions = _predictions(rows)
    assert predictions == sharp.answers(RESULTS, beams=3)
    _check_nontrivial(predictions)
    assert predictions != _predictions(fid_answers), "beam search found nothing greedy decoding did not"


# ---------------------------------------------------------------------------------------
# 2. input formats and the answer length


@pytest.fixture(scope="module")
def t5_specials_dir(t5_sharp_dir, tmp_path_factory) -> str:
    """t5_sharp_dir whose tokenizer also has EMDR2's [CLS] and [SEP] as special tokens (ids within
    the vocabulary's padding), so that the emdr2 preset spells them out."""
    folder = str(tmp_path_factory.mktemp("t5_specials"))
    shutil.copytree(t5_sharp_dir, folder, dirs_exist_ok=True)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
    with open(os.path.join(folder, "config.json")) as f:
        assert len(tok) <= json.load(f)["vocab_size"]
    tok.save_pretrained(folder)
    return folder


def test_emdr2_format(t5_specials_dir, results_path, tmp_path):
    oracle = Oracle(t5_specials_dir)
    # spelled out: [CLS] q [SEP] t [SEP] text [SEP], no </s>; a cut input keeps its last [SEP]
    ids = oracle.tok(EMDR2.format(question="q", title="t", text="x"), add_special_tokens=False)["input_ids"]
    assert ids[0] == oracle.tok.cls_token_id and ids[-1] == oracle.tok.sep_token_id
    assert oracle.tok.eos_token_id not in ids
    rows = _answer(t5_specials_dir, results_path, tmp_path / "emdr2.jsonl", "--input-format", "emdr2", "--topk",
                   str(TOPK), "--max-input-tokens", str(SHORT_INPUT), "--max-answer-tokens", str(MAX_ANSWER))
    predictions = _predictions(rows)
    assert predictions == oracle.answers(RESULTS, template=EMDR2, max_input=SHORT_INPUT)
    assert any(oracle.cut) and not all(oracle.cut)
    _check_nontrivial(predictions)
    assert predictions != oracle.answers(RESULTS, max_input=SHORT_INPUT), "the format changed nothing"


def test_custom_template(t5_sharp_dir, results_path, sharp, tmp_path):
    template = "{title}: {text} || {question}"  # no preset's prefixes, the question last
    rows = _answer(t5_sharp_dir, results_path, tmp_path / "custom.jsonl", "--input-format", template, "--topk",
                   str(TOPK), "--max-input-tokens", str(SHORT_INPUT), "--max-answer-tokens", str(MAX_ANSWER))
    predictions = _predictions(rows)
    assert predictions == sharp.answers(RESULTS, template=template, max_input=SHORT_INPUT)
    assert any(sharp.cut) and not all(sharp.cut)
    _check_nontrivial(predictions)
    assert predictions != sharp.answers(RESULTS, max_input=SHORT_INPUT), "the template changed nothing"


def test_max_answer_tokens_caps_the_answer(t5_sharp_dir, results_path, sharp, tmp_path):
    rows = _answer(t5_sharp_dir, results_path, tmp_path / "short.jsonl", "--topk", str(TOPK), "--max-input-tokens",
                   str(MAX_INPUT), "--max-answer-tokens", "3")
    predictions = _predictions(rows)
    assert predictions == sharp.answers(RESULTS, max_answer=3)
    # greedy: each capped answer is the uncapped one's first 3 tokens, and the cap bit somewhere
    long = sharp.generate_tokens(RESULTS)[:, 1:]
    assert predictions == sharp.decode(long[:, :3])
    assert any(len([t for t in row.tolist() if t not in (0, 1)]) > 3 for row in long)


# ---------------------------------------------------------------------------------------
# 3. a Joint top-K reader: lambda * softmax(score / tau) on the cross-attention logits

JOINT_LAMBDA, JOINT_TAU = 4.0, 0.5


@pytest.fixture(scope="module")
def joint_dir(t5_sharp_dir, tmp_path_factory) -> str:
    """t5_sharp_dir with an art_jax_reader.json of a Joint top-K reader (its lengths recorded
    too: the command below gives no flags but --topk)."""
    folder = str(tmp_path_factory.mktemp("t5_joint"))
    shutil.copytree(t5_sharp_dir, folder, dirs_exist_ok=True)
    with open(os.path.join(folder, "art_jax_reader.json"), "w") as f:
        json.dump({"input_format": "fid", "max_input_tokens": MAX_INPUT, "max_answer_tokens": MAX_ANSWER,
                   "joint_lambda": JOINT_LAMBDA, "joint_tau": JOINT_TAU}, f)
    return folder


def test_joint_topk_reader_matches_biased_torch(joint_dir, results_path, fid_answers, sharp, tmp_path):
    rows = _answer(joint_dir, results_path, tmp_path / "joint.jsonl", "--topk", str(TOPK))
    predictions = _predictions(rows)
    assert predictions == sharp.decode(sharp.joint_greedy_tokens(RESULTS, JOINT_LAMBDA, JOINT_TAU))
    _check_nontrivial(predictions)
    assert predictions != _predictions(fid_answers), "the bias changed nothing"


@pytest.mark.parametrize("score", [None, "7.5"], ids=["missing", "string"])
def test_joint_topk_needs_numeric_scores(score, joint_dir, tmp_path, capsys):
    results = json.loads(json.dumps(RESULTS))
    if score is None:
        del results[2]["ctxs"][1]["score"]
    else:
        results[2]["ctxs"][1]["score"] = score
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    out = tmp_path / "joint.jsonl"
    err = _fails(["answer", "--reader", joint_dir, "--results", str(path), "--out", str(out)], capsys)
    assert f"{path}: result 2, ctx 1: no numeric 'score'" in err, err
    assert not out.exists()


@pytest.mark.parametrize("record,says", [
    ({"joint_tau": None}, "numeric joint_lambda and joint_tau"),
    ({"max_input_tokens": "250"}, "positive integers"),
    ({"input_format": "{question:d}"}, "art_jax_reader.json: input_format: the template"),
], ids=["lambda-without-tau", "length-a-string", "recorded-template"])
def test_bad_reader_record(record, says, joint_dir, results_path, tmp_path, capsys):
    """A reader folder's art_jax_reader.json that cannot be used is named in one line."""
    folder = tmp_path / "reader"
    shutil.copytree(joint_dir, folder)
    path = folder / "art_jax_reader.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **record}))
    out = tmp_path / "answers.jsonl"
    err = _fails(["answer", "--reader", str(folder), "--results", results_path, "--out", str(out)], capsys)
    assert str(path) in err and says in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# 4. a training run's reader and its export's


class ReaderRuns:
    """`art-jax train --config=configs/reader_demo.py` for every method of the reader demo, each its own
    process on one CPU device (as on a fresh machine), all at once: the demo as the README gives it
    (Joint top-K) shortened to 400 of its 900 steps, which must learn to answer, and the other
    methods' smoke runs (4 steps); two checkpoints each, so that --step has two to choose from."""

    METHODS = ("emdr2", "individual_topk", "joint_topk", "fid")
    DEMO = "joint_topk"  # configs/reader_demo.py's default
    DEMO_STEPS = 400

    def __init__(self, root):
        self.root = root
        self.procs = {}
        for method in self.METHODS:
            log = open(root / f"{method}.log", "w")
            if method == self.DEMO:  # it learns: optimised code, as on a fresh machine
                env, settings = child_env(compile_fast=False), [
                    "--config=configs/reader_demo.py", f"--config.train.steps={self.DEMO_STEPS}",
                    *(f"--config.train.{key}={self.DEMO_STEPS // 2}" for key in ("eval_every", "checkpoint_every"))]
            else:
                env, settings = child_env(), [f"--config=configs/reader_demo.py:{method},smoke",
                                              "--config.train.checkpoint_every=2"]
            argv = [sys.executable, "-m", "art_jax", "train", *settings, f"--workdir={root / method}"]
            self.procs[method] = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
            log.close()

    def workdir(self, method: str) -> str:
        """The run's workdir once it has trained."""
        code = self.procs[method].wait(timeout=900)
        assert code == 0, (self.root / f"{method}.log").read_text()
        return str(self.root / method)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="session")
def reader_runs(tmp_path_factory):
    runs = ReaderRuns(tmp_path_factory.mktemp("reader_runs"))
    yield runs
    runs.close()


@pytest.fixture(scope="module", autouse=True)
def _start_reader_runs(reader_runs):
    """The trainings start with this file's first test and run while the others do."""


@pytest.fixture(scope="module")
def exports(reader_runs, tmp_path_factory) -> dict[str, dict[str, str]]:
    """method -> {"workdir", "export" (its newest checkpoint), "export_first" (its first: step 2, the
    demo's 200), and the steps "first", "newest" and "best"}."""
    folders = {}
    for method in ReaderRuns.METHODS:
        workdir = reader_runs.workdir(method)
        first, newest = sorted(int(step) for step in os.listdir(os.path.join(workdir, "checkpoints")))
        [best] = os.listdir(os.path.join(workdir, "best"))
        out = tmp_path_factory.mktemp(f"{method}_exports")
        cli.main(["export", "--run", workdir, "--out", str(out / "newest")])
        cli.main(["export", "--run", workdir, "--step", str(first), "--out", str(out / "first")])
        folders[method] = {"workdir": workdir, "export": str(out / "newest"), "export_first": str(out / "first"),
                           "first": str(first), "newest": str(newest), "best": best}
    return folders


def test_the_reader_demo_learns_to_answer(reader_runs):
    """The README's reader demo (Joint top-K on the generated world, its retriever pre-trained by 150
    steps of the ART demo), shortened to 400 of its 900 steps, raises dev EM by at least 20 points, the
    answers judged by SQuAD's normalisation, and keeps the retriever's top-5 (measured: EM 0.0% -> 31.7%,
    top-5 99.2% -> 98.8%; the whole demo 73.8%)."""
    reader_runs.workdir(ReaderRuns.DEMO)
    out = (reader_runs.root / f"{ReaderRuns.DEMO}.log").read_text()
    assert "the retriever's pre-training: 150 steps of the ART demo" in out
    [line] = [line for line in out.splitlines() if line.startswith("dev EM")]
    figures = {name: (float(a), float(b)) for name, a, b in re.findall(r"(EM|top-5) ([\d.]+)% -> ([\d.]+)%", line)}
    assert set(figures) == {"EM", "top-5"}, line
    assert figures["EM"][1] - figures["EM"][0] >= 20.0, line
    assert figures["top-5"][1] >= figures["top-5"][0] - 2.0, line  # the retriever kept what pre-training gave


def _weights(reader_spec: str, **choice) -> dict[str, np.ndarray]:
    from art_jax.models.hf import state_dict
    from art_jax.workdir import load_reader

    return state_dict(load_reader(reader_spec, **choice).model)


@pytest.mark.parametrize("method", ReaderRuns.METHODS)
def test_run_and_export_answer_alike(method, exports, results_path, tmp_path):
    from safetensors.numpy import load_file

    from art_jax.models.reader_folder import read_settings

    folders = exports[method]
    workdir, export = folders["workdir"], folders["export"]
    # the run's recorded settings travel with the export
    settings = read_settings(os.path.join(export, "reader"))
    assert (settings.input_format, settings.max_input_tokens, settings.max_answer_tokens) == (FID, 40, 8)

    def answer(reader, *choice) -> str:
        out = tmp_path / f"{len(os.listdir(tmp_path))}.jsonl"
        rows = _answer(reader, results_path, out, "--topk", str(TOPK), *choice)
        assert [row["question"] for row in rows] == QUESTIONS
        return out.read_text(encoding="utf-8")

    first, best = folders["first"], folders["best"]
    newest = answer(workdir)
    assert answer(workdir, "--step", folders["newest"]) == newest
    assert answer(export) == newest
    assert answer(workdir, "--best") == answer(workdir, "--step", best)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:  # best: the step of the highest dev EM
        em = {row["step"]: row["em"] for row in map(json.loads, f) if "em" in row and row["step"] > 0}
    assert em[int(best)] == max(em.values()), em
    at_first = answer(workdir, "--step", first)
    assert answer(os.path.join(workdir, "checkpoints", first)) == at_first
    assert answer(folders["export_first"]) == at_first

    # 4 smoke steps teach the random demo reader no answer (its predictions may all be empty), and the
    # demo's answers to these questions about another world say little, so that the same answers above
    # say little alone: the readers are the very same weights, and --step chose another one
    weights = _weights(workdir)
    exported = load_file(os.path.join(export, "reader", "model.safetensors"))
    assert weights.keys() == exported.keys()
    assert all(np.array_equal(weights[name], exported[name]) for name in weights)
    best_weights, at_best = _weights(workdir, best=True), _weights(workdir, step=int(best))
    assert best_weights.keys() == weights.keys()
    assert all(np.array_equal(best_weights[name], w) for name, w in at_best.items())
    first_weights = _weights(workdir, step=int(first))
    assert all(np.array_equal(first_weights[name], w) for name, w in _weights(folders["export_first"]).items())
    assert any(not np.array_equal(first_weights[name], weights[name]) for name in weights)


@pytest.mark.parametrize("method", ReaderRuns.METHODS)
def test_exported_reader_loads_in_transformers(method, exports):
    import jax

    from art_jax.models.hf import load_t5, load_tokenizer
    from art_jax.workdir import load_reader

    folder = os.path.join(exports[method]["export"], "reader")
    tok = load_tokenizer(folder)
    ids = tok([FID.format(question=q, title="T1", text=CORPUS[i]) for i, q in enumerate(QUESTIONS[:3])],
              padding=True, return_tensors="np")
    labels = tok(["Ada Lovelace", "1920", "the harbour near Paris"], padding=True, return_tensors="np")["input_ids"]
    decoder_ids = np.concatenate([np.zeros((len(labels), 1), labels.dtype), labels[:, :-1]], axis=1)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = hf(input_ids=torch.from_numpy(ids["input_ids"]).long(),
                      attention_mask=torch.from_numpy(ids["attention_mask"]).long(),
                      decoder_input_ids=torch.from_numpy(decoder_ids).long()).logits.numpy()

    @jax.jit
    def logits(model, ids, mask, decoder_ids):
        return model.logits(model.encode(ids, mask), mask, decoder_ids)

    args = (ids["input_ids"], ids["attention_mask"], decoder_ids)
    ours = np.asarray(logits(load_t5(folder), *args))
    assert np.max(np.abs(ours - expected)) <= 1e-4
    assert np.std(expected) > 0.1
    run = np.asarray(logits(load_reader(exports[method]["workdir"]).model, *args))  # the run's own reader
    np.testing.assert_array_equal(run, ours)


def test_answer_as_two_processes_writes_what_one_process_writes(exports, results_path, tmp_path):
    """`art-jax answer` as a job of 2 processes x 2 devices (launch/local.sh): each batch of 8 split
    over the 4 devices of both processes, the second padded, the answers gathered and written by the
    first process: the file one process writes, from the demo's trained Joint top-K reader (its
    answers differ between questions, and read the results' scores as its bias)."""
    export, one, two = exports[ReaderRuns.DEMO]["export"], tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    rows = _answer(export, results_path, one, "--topk", str(TOPK))
    assert len(set(_predictions(rows))) > 3, _predictions(rows)
    art_jax_job("answer", "--reader", export, "--results", results_path, "--out", str(two), "--topk", str(TOPK),
                devices=2, processes=2)
    assert two.read_text(encoding="utf-8") == one.read_text(encoding="utf-8")


def test_a_joint_topk_export_records_the_lambda_it_trained(exports):
    """The sidecar of a Joint top-K export holds the lambda of its checkpoint (trained away from
    its start, K) and the run's tau, which `answer` biases with (the answers through the run and
    through the export are the same: test_run_and_export_answer_alike)."""
    from art_jax.models.reader_folder import read_settings
    from art_jax.workdir import load_reader

    folders = exports["joint_topk"]
    newest, first = (read_settings(os.path.join(folders[name], "reader")) for name in ("export", "export_first"))
    run = load_reader(folders["workdir"]).settings
    run_first = load_reader(folders["workdir"], step=int(folders["first"])).settings
    assert (newest.joint_lambda, newest.joint_tau) == (run.joint_lambda, run.joint_tau)
    assert (first.joint_lambda, first.joint_tau) == (run_first.joint_lambda, run_first.joint_tau)
    start = 4.0  # reader.joint_lambda 0: K, the demo's top-4
    assert len({start, first.joint_lambda, newest.joint_lambda}) == 3
    assert newest.joint_tau == first.joint_tau > 0
    assert read_settings(os.path.join(exports["emdr2"]["export"], "reader")).joint_lambda is None


def test_reader_only_export(exports, capsys, tmp_path):
    """fid trains no towers: its export is reader/ alone, which search will not take as a
    retriever; emdr2's holds both towers and the reader."""
    fid, emdr2 = exports["fid"]["export"], exports["emdr2"]["export"]
    assert sorted(os.listdir(fid)) == ["art_jax_export.json", "reader"]
    with open(os.path.join(fid, "art_jax_export.json")) as f:
        assert json.load(f)["reader_only"] is True
    assert {"question_encoder", "passage_encoder", "reader"} <= set(os.listdir(emdr2))
    err = _fails(_search_argv(fid, exports, tmp_path), capsys)
    assert fid in err, err
    assert not (tmp_path / "results.json").exists()


def test_end_to_end_demo_starts_from_its_pretrained_retriever(exports):
    """The reader demo's emdr2 run starts its towers from WORKDIR/demo/retriever, the export of the
    ART demo's run it made first (smoke: 4 steps, in WORKDIR/demo/art-4), whose towers moved away from the
    random BERT."""
    from safetensors.numpy import load_file

    workdir = exports["emdr2"]["workdir"]
    demo = os.path.join(workdir, "demo")
    pretrained = os.path.join(demo, "retriever")
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["retriever"]["checkpoint"] == pretrained
    with open(os.path.join(pretrained, "art_jax_export.json")) as f:
        record = json.load(f)
    assert (record["run"], record["step"], record["source"]) == (os.path.join(demo, "art-4"), 4,
                                                                 os.path.join(demo, "bert"))
    trained = load_file(os.path.join(pretrained, "question_encoder", "model.safetensors"))
    random = load_file(os.path.join(demo, "bert", "model.safetensors"))
    assert trained.keys() == random.keys()
    assert any(not np.array_equal(trained[name], random[name]) for name in trained)


def _search_argv(retriever: str, exports, tmp_path) -> list[str]:
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answers": ["x"]}) + "\n" for q in QUESTIONS[:2]))
    # an index the emdr2 run built, so that the retriever is what search refuses
    index = os.path.join(exports["emdr2"]["workdir"], "index")
    return ["search", "--retriever", retriever, "--index", index, "--questions", str(questions), "--out",
            str(tmp_path / "results.json"), "--topk", "2"]


def test_reader_only_export_refusal_says_why(exports, capsys, tmp_path):
    err = _fails(_search_argv(exports["fid"]["export"], exports, tmp_path), capsys)
    assert "reader" in err, err


def test_search_refuses_a_reader_only_run(exports, capsys, tmp_path):
    err = _fails(_search_argv(exports["fid"]["workdir"], exports, tmp_path), capsys)
    assert exports["fid"]["workdir"] in err, err


# ---------------------------------------------------------------------------------------
# 5. bad input: one line, exit 2, no answers written


def _bad_results(tmp_path, results) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    return str(path)


def _without_text(tmp_path) -> tuple[str, str]:
    results = json.loads(json.dumps(RESULTS))
    del results[1]["ctxs"][0]["text"]
    path = _bad_results(tmp_path, results)
    return path, f"{path}: result 1, ctx 0: expected an object with a string 'text'"


# each case: (flags changed, what the line must say); {tmp} is the test's folder
BAD = {
    "missing-results": ({"--results": "{tmp}/nothing.json"}, "{tmp}/nothing.json"),
    "results-not-a-list": ({"--results": "not-a-list"}, "expected a non-empty JSON list of results"),
    "ctx-without-text": ({"--results": "without-text"}, None),
    "topk-0": ({"--topk": "0"}, "--topk must be"),  # the CLI checks every --topk itself
    "beams-0": ({"--beams": "0"}, "--beams must be at least 1, got 0"),
    "template-unknown-field": ({"--input-format": "{question} {passage}"}, "unknown field(s) {passage}"),
    "template-unmatched-brace": ({"--input-format": "{question} {text"}, "cannot read the template"),
    "template-without-question": ({"--input-format": "fidd"}, "neither a preset (fid, emdr2) nor a template"),
    "template-conversion": ({"--input-format": "{question!x} {text}"}, "cannot be filled with text"),
    "template-format-spec": ({"--input-format": "{question:d} {text}"}, "cannot be filled with text"),
    "empty-question": ({"--results": "empty-question"}, None),
    "reader-bert": ({"--reader": "bert"}, "model_type='bert'"),
    "reader-a-retriever-export": ({"--reader": "towers"}, "{tmp}/towers: an export of a retriever alone (no reader/"),
    "reader-missing": ({"--reader": "{tmp}/no-such-reader"}, "checkpoint folder not found: {tmp}/no-such-reader"),
    "out-folder": ({"--out": "{tmp}"}, "--out {tmp}: is a folder, expected a file"),
    "step-not-a-run": ({"--step": "2"}, "can only be chosen from a training run"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, t5_sharp_dir, bert_dir, results_path, tmp_path, capsys):
    changes, expected = BAD[case]
    args = {"--reader": t5_sharp_dir, "--results": results_path, "--out": str(tmp_path / "answers.jsonl")}
    for flag, value in changes.items():
        if value == "not-a-list":
            value = _bad_results(tmp_path, RESULTS[0])
        elif value == "without-text":
            value, expected = _without_text(tmp_path)
        elif value == "empty-question":
            results = json.loads(json.dumps(RESULTS))
            results[1]["question"] = " "
            value = _bad_results(tmp_path, results)
            expected = f"{value}: result 1: the question is empty"
        elif value == "bert":
            value = bert_dir
        elif value == "towers":  # an export of the towers alone
            for side in ("question", "passage"):
                shutil.copytree(bert_dir, tmp_path / "towers" / f"{side}_encoder")
            value = str(tmp_path / "towers")
        args[flag] = value.replace("{tmp}", str(tmp_path))
    argv = ["answer", *[part for flag_value in args.items() for part in flag_value]]
    err = _fails(argv, capsys)
    assert expected.replace("{tmp}", str(tmp_path)) in err, err
    assert not (tmp_path / "answers.jsonl").exists()
