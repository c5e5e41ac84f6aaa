"""`art-jax train --dry-run`: the step compiled on the mesh with abstract shapes, its figures
against the parameters counted from the real tiny checkpoints; the paper configs fit 16 devices."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from art_jax.cli import main
from art_jax.config import apply_override, load_config, paper_config
from art_jax.core.errors import UserError
from art_jax.models.hf import load_bert, load_t5, read_config
from art_jax.training.dry_run import WIKIPEDIA_PASSAGES, dry_run, reader_config
from tests.multiprocess import child_env

TINY = {"train.batch_size": 8, "train.topk": 4, "retriever.question_max_length": 16,
        "retriever.passage_max_length": 32, "retriever.train_passage_max_length": 32, "scorer.batch_size": 16,
        "scorer.dtype": "float32", "retriever.dtype": "float32", "retriever.remat": False,
        "mesh.device_memory_gb": 1.0}


def _tiny(bert_dir, t5_dir, **overrides):
    cfg = paper_config("nq")
    for key, value in {"retriever.checkpoint": bert_dir, "scorer.checkpoint": t5_dir, **TINY, **overrides}.items():
        apply_override(cfg, f"config.{key}={value}")
    return cfg


def _bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_the_figures_are_the_real_models_sizes(bert_dir, t5_v11_dir):
    tower = jax.tree.leaves(nnx.state(load_bert(bert_dir), nnx.Param))
    bert = _bytes(tower)
    # FSDP over 8 devices: an array of 2048 elements or more with a dimension 8 divides is split 8 ways
    bert_split = sum(x.nbytes // 8 if x.size >= 2048 and any(d % 8 == 0 for d in x.shape) else x.nbytes for x in tower)
    t5 = _bytes(nnx.state(load_t5(t5_v11_dir), nnx.Param))
    replicated = dry_run(_tiny(bert_dir, t5_v11_dir, **{"mesh.model": 1, "mesh.fsdp": "off"}))
    split = dry_run(_tiny(bert_dir, t5_v11_dir, **{"mesh.model": 2, "mesh.fsdp": "on"}))
    (state_1, teacher_1, index_1), (state_8, teacher_2, index_8) = (
        [next(size for name, size in report.resident.items() if name.startswith(what))
         for what in ("train state", "teacher", "index")] for report in (replicated, split))
    # two towers' parameters and AdamW's two moments, float32, plus a few scalars (step, key, counts)
    assert 2 * 3 * bert <= state_1 <= 2 * 3 * bert + 64
    assert 2 * 3 * bert_split <= state_8 <= 2 * 3 * bert_split + 64 and bert_split < 0.8 * bert
    assert teacher_1 == t5 and t5 / 2 <= teacher_2 < 0.8 * t5  # heads, FFN and vocabulary split over model=2
    # no store to count: DPR's Wikipedia, 32 float16 numbers a passage, spread over all 8 devices
    assert index_1 == index_8 and WIKIPEDIA_PASSAGES * 32 * 2 / 8 <= index_1 < 1.01 * WIKIPEDIA_PASSAGES * 32 * 2 / 8
    assert dict(split.layout.mesh.shape) == {"data": 4, "model": 2} and split.fsdp and not replicated.fsdp
    update = replicated.functions[0]
    assert update.name.startswith("update") and update.temporaries > 0 and update.flops > 0
    assert replicated.fits and replicated.peak == sum(replicated.resident.values()) + max(
        f.temporaries for f in replicated.functions)


def test_the_dry_run_says_whether_it_fits_and_writes_nothing(bert_dir, t5_v11_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--config=" + os.path.join(os.path.dirname(__file__), "..", "configs", "art_nq_base.py"),
            "--dry-run", f"--config.retriever.checkpoint={bert_dir}", f"--config.scorer.checkpoint={t5_v11_dir}",
            *(f"--config.{key}={value}" for key, value in TINY.items())]
    main(args)
    out = capsys.readouterr().out
    assert "fits" in out and "DOES NOT FIT" not in out and "model FLOPs per training step" in out
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--config.mesh.device_memory_gb=0.01"])
    assert exit_.value.code == 3 and "DOES NOT FIT" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []
    for bad, message in (("--config.mesh.device_memory_gb=0.0", "mesh.device_memory_gb: the dry run needs"),
                         ("--config.method=mystery", "method: 'mystery' is not one of art, dpr, emdr2, fid, ict"),
                         ("--config.train.batch_size=7", "train.batch_size")):
        with pytest.raises(SystemExit) as exit_:
            main([*args, bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def _preset(name, **overrides):
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", name))
    for key, value in {"mesh.device_memory_gb": 1.0, **overrides}.items():
        apply_override(cfg, f"config.{key}={value}")
    return cfg


TINY_TOWERS = {"retriever.question_max_length": 16,
               "retriever.train_passage_max_length": 32, "retriever.passage_max_length": 32, "train.batch_size": 16}


def test_contrastive_runs_are_sized(bert_dir):
    """DPR: the two towers' state and the index its evaluations search (DPR's Wikipedia at the tiny
    tower's width)."""
    bert = _bytes(nnx.state(load_bert(bert_dir), nnx.Param))
    tiny_towers = {**TINY_TOWERS, "retriever.checkpoint": bert_dir}
    dpr = dry_run(_preset("dpr_nq.py", **tiny_towers))
    state = next(size for name, size in dpr.resident.items() if name.startswith("train state"))
    index = next(size for name, size in dpr.resident.items() if name.startswith("index shard, for evaluations"))
    assert 2 * 3 * bert <= state <= 2 * 3 * bert + 64 and not dpr.fsdp
    assert WIKIPEDIA_PASSAGES * 32 * 2 / 8 <= index < 1.01 * WIKIPEDIA_PASSAGES * 32 * 2 / 8
    assert [f.name.split(" (")[0] for f in dpr.functions] == ["update", "passage embedding at evaluation",
                                                             "search at evaluation, one block"]
    with pytest.raises(UserError, match="method=ict takes in-batch negatives only"):
        dry_run(_preset("ict.py", **tiny_towers, **{"train.hard_negatives": 1}))
    with pytest.raises(UserError, match="retriever.remat_policy: 'everything' is not one of nothing_saveable"):
        dry_run(_preset("dpr_nq.py", **tiny_towers, **{"retriever.remat_policy": "everything"}))


def test_reader_runs_are_sized(bert_dir, t5_v10_dir, tmp_path):
    """FiD: the reader's state alone, and with 2 micro-batches the same FLOPs (every micro-batch
    counted: XLA counts a loop's body once) in less memory a device. EMDR2 and Joint top-K: both
    towers and the reader in one state (joint_topk's frozen passage tower without AdamW moments,
    its lambda beside), an update beyond FiD's on the same reader inputs (the towers re-embed,
    EMDR2 decodes each passage again), the step's search and the index's passage embedding, and
    with dev questions their answers' generation (Joint top-K's with its bias)."""
    bert = _bytes(nnx.state(load_bert(bert_dir), nnx.Param))
    t5 = _bytes(nnx.state(load_t5(t5_v10_dir), nnx.Param))
    tiny = {**TINY_TOWERS, "retriever.checkpoint": bert_dir, "reader.checkpoint": t5_v10_dir,
            "reader.max_input_tokens": 32, "reader.max_answer_tokens": 8, "train.topk": 4,
            "reader.remat": False, "retriever.remat": False, "train.accumulation": 1}  # (the presets' paper scale)
    fid, halves = (dry_run(_preset("fid.py", **{**tiny, "train.accumulation": a, "data.dev_results": dev}))
                   for a, dev in ((1, "dev.json"), (2, "")))
    ((name, state),) = fid.resident.items()
    assert name.startswith("train state") and 3 * t5 <= state <= 3 * t5 + 64
    with pytest.raises(UserError, match="reader.remat_policy: 'everything' is not one of nothing_saveable"):
        dry_run(_preset("fid.py", **tiny, **{"reader.remat_policy": "everything"}))
    assert fid.fits and fid.functions[0].temporaries > 0
    # dev answers: generated by a float32 replica of the reader beside the state, counted with it
    assert [f.name.split(" (")[0] for f in fid.functions] == ["update", "answer generation at evaluation"]
    assert fid.functions[1].temporaries > t5 and fid.functions[1].calls == 0
    # 2 micro-batches: the same FLOPs, and each micro-batch on every device, so less memory a device
    np.testing.assert_allclose(halves.flops_per_step, fid.flops_per_step, rtol=0.02)
    assert halves.functions[0].temporaries < 0.7 * fid.functions[0].temporaries
    # a reader given as an export (its reader/) is sized by that folder's config, as the trainer reads it
    shutil.copytree(t5_v10_dir, tmp_path / "export" / "reader")
    assert reader_config(str(tmp_path / "export")) == reader_config(t5_v10_dir) == read_config(t5_v10_dir)

    emdr2, joint = (dry_run(_preset("emdr2.py", **tiny, method=method,
                                    **{"data.dev_questions": dev, "train.refresh_mode": "sync"}))
                    for method, dev in (("emdr2", ""), ("joint_topk", "dev.csv")))
    with pytest.raises(UserError, match="joint_topk never refreshes its index"):  # the method's own rules hold
        dry_run(_preset("emdr2.py", **tiny, method="joint_topk", **{"train.refresh_mode": "async"}))
    states = [next(size for name, size in report.resident.items() if name.startswith("train state"))
              for report in (emdr2, joint)]
    assert 3 * (2 * bert + t5) <= states[0] <= 3 * (2 * bert + t5) + 64
    assert 3 * bert + bert + 3 * (t5 + 4) <= states[1] <= 3 * bert + bert + 3 * (t5 + 4) + 64
    for report, last in ((emdr2, ["passage embedding at refresh"]),
                         (joint, ["the passages' vectors from the index", "passage embedding at start",
                                  "search at evaluation, one block",
                                  "answer generation at evaluation"])):
        assert [f.name.split(" (")[0] for f in report.functions] == [
            "update", "question embedding", "search, one block", *last]
        assert report.fits and report.functions[0].flops > fid.functions[0].flops
    assert emdr2.functions[0].flops > joint.functions[0].flops
    # joint top-K's frozen passage tower: the step reads the passages' vectors from the index, embeds none
    update = joint.functions[0].name
    assert "the passages' vectors from the index" in update and "re-embedded" not in update


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["t0-3b", "t5-xxl-lm-adapt"])
def test_the_paper_configs_fit_sixteen_a100s(teacher):
    """The paper's NQ runs (BERT-base towers, 64 questions x 32 passages, the 3B and 11B teachers)
    compiled for 16 devices of 40 GB with the shipped model shapes: no weights, no download."""
    run = _dry_run_fits(f"art_nq_base.py:nq,{teacher}")
    # the 11B teacher (22 GB) passes half a device: split over the fewest devices that bring it under
    assert f"model={ {'t0-3b': 1, 't5-xxl-lm-adapt': 2}[teacher]}," in run.stdout
    figures = [float(line.split()[-1]) for line in run.stdout.splitlines() if line.startswith("  teacher parameters")]
    total = {"t0-3b": 5.70, "t5-xxl-lm-adapt": 22.27}[teacher]
    assert np.isclose(figures[0] * int(run.stdout.split("model=")[1].split(",")[0]), total, rtol=0.02)


def _dry_run_fits(preset: str, *overrides: str, devices: int = 16, memory_gb: int = 40) -> subprocess.CompletedProcess:
    """`art-jax train --dry-run` of a shipped config for 16 devices of 40 GB (or ``devices`` of
    ``memory_gb``), asserted to fit."""
    run = subprocess.run([sys.executable, "-m", "art_jax", "train", f"--config=configs/{preset}", "--dry-run",
                          f"--config.mesh.device_memory_gb={memory_gb}", *overrides], env=child_env(devices),
                         capture_output=True, text=True, timeout=1200,
                         cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert run.returncode == 0, run.stdout + run.stderr
    assert ": fits" in run.stdout
    return run


@pytest.mark.slow
@pytest.mark.parametrize("preset,overrides", [
    ("dpr_nq.py", ()),  # DPR's 8 V100s of 32 GB, its batch of 128 (float32, no remat)
    # DPR-PAQ's largest BERT at its per-GPU batch of 12: 8 of its 64 V100s of 32 GB, each as in the whole run
    ("paq.py:bert-large", ("--config.train.batch_size=96",))])
def test_the_contrastive_paper_configs_fit_thirty_two_gigabyte_gpus(preset, overrides):
    run = _dry_run_fits(preset, *overrides, devices=8, memory_gb=32)
    assert "train state (replicated" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["emdr2.py:nq", "individual_topk.py:nq", "individual_topk.py:nq,joint", "fid.py"])
def test_the_reader_paper_configs_fit_sixteen_a100s(preset):
    """The reader methods' presets as shipped (T5-base; BERT-base towers for the end-to-end ones,
    whose shapes stand in for the retriever a run starts from; 64 questions x K passages) compiled
    for 16 devices of 40 GB: each fits, with its dev answers' generation sized."""
    run = _dry_run_fits(preset, "--config.retriever.checkpoint=bert-base-uncased")
    assert "answer generation at evaluation" in run.stdout


def test_the_layout_choices():
    from art_jax.models.shapes import KNOWN_CONFIGS, abstract_t5
    from art_jax.training.layout import choose_model_axis, fsdp_spec, known_memory_gb

    kinds = {"NVIDIA A100-SXM4-40GB": 40, "NVIDIA A100-SXM4-80GB": 80, "NVIDIA A100 80GB PCIe": 80,
             "NVIDIA H100 80GB HBM3": 80, "NVIDIA H100 NVL": 94, "NVIDIA H200": 141, "NVIDIA GH200 480GB": 96,
             "TPU v4": 32, "TPU v4 lite": 8, "TPU v5 lite": 16, "TPU v5p": 95, "TPU v6 lite": 32, "Tesla T4": None}
    assert {kind: known_memory_gb(kind) for kind in kinds} == kinds
    xxl = abstract_t5(KNOWN_CONFIGS["google/t5-xxl-lm-adapt"], dtype="bfloat16", param_dtype="bfloat16")  # 22.3 GB
    assert [choose_model_axis(8, xxl, gb * 1e9) for gb in (80, 40, 16, 8, 1)] == [1, 2, 4, 8, 8]
    assert choose_model_axis(8, xxl, None) == 1 and choose_model_axis(8, None, 40e9) == 1
    assert fsdp_spec((30522, 768), 8) == P(None, ("data", "model"))  # the dimension 8 divides
    assert fsdp_spec((3072, 768), 8) == P(("data", "model"), None)  # the largest of those
    assert fsdp_spec((768,), 8) == P() and fsdp_spec((7, 1001), 8) == P() and fsdp_spec((4096, 64), 1) == P()


def test_the_shipped_shapes_count_the_hub_models_parameters():
    """``models/shapes.py``'s configs against the parameter counts transformers reports for the hub
    checkpoints (``num_parameters()``; BERT and RoBERTa with their pooler, T5 with its head)."""
    from art_jax.models.shapes import KNOWN_CONFIGS, abstract_bert, abstract_t5

    counts = {"bert-base-uncased": 109_482_240, "bert-large-uncased": 335_141_888,
              "roberta-base": 124_645_632, "roberta-large": 355_359_744,
              "t5-base": 222_903_552, "t5-large": 737_668_096,
              "bigscience/T0_3B": 2_849_757_184, "google/t5-xl-lm-adapt": 2_849_757_184,
              "google/t5-xxl-lm-adapt": 11_135_332_352}
    assert set(counts) == set(KNOWN_CONFIGS)

    def parameters(hf, layers):  # the model built with ``layers`` layers (encoder and decoder alike)
        key = "num_layers" if hf["model_type"] == "t5" else "num_hidden_layers"
        module = (abstract_t5 if hf["model_type"] == "t5" else abstract_bert)({**hf, key: layers})
        return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param))), hf[key]

    for name, count in counts.items():
        # built with 1 and 2 layers (tracing 24 is slow): the first layer, then each further one's parameters
        (one, layers), (two, _) = parameters(KNOWN_CONFIGS[name], 1), parameters(KNOWN_CONFIGS[name], 2)
        assert one + (layers - 1) * (two - one) == count, name


def test_sizing_a_hub_model_downloads_its_config_alone(bert_dir, monkeypatch):
    """A hub id the package does not ship shapes for: its config.json is fetched, not its weights."""
    import huggingface_hub

    from art_jax.models.shapes import hf_config

    asked = []

    def snapshot_download(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return bert_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert hf_config("someone/a-bert")["model_type"] == "bert"
    assert asked == [("someone/a-bert", ["config.json"])]


def test_an_offline_run_after_a_dry_run_names_the_missing_weights(tmp_path, monkeypatch):
    """The hub cache after a dry run fetched a config alone: offline, huggingface_hub answers with
    that snapshot; loading says what is missing instead of 'no weights in <snapshot folder>'."""
    from huggingface_hub import constants

    from art_jax.models.hf import resolve_checkpoint

    repo, revision = tmp_path / "models--someone--a-bert", "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "snapshots" / revision / "config.json").write_text('{"model_type": "bert"}')
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_checkpoint("someone/a-bert", config_only=True) == str(repo / "snapshots" / revision)
    with pytest.raises(UserError, match="'someone/a-bert': the local Hugging Face cache holds no weights of it"):
        resolve_checkpoint("someone/a-bert")
