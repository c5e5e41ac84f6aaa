"""`art-jax answer`: DPR-format retrieval results (as `search` writes them) -> the reader's answer
to each question over its top-K passages, one ``{"question", "answers", "prediction"}`` per line
in the results' order (what `art-jax evaluate --answers` scores)."""

from __future__ import annotations

import dataclasses
import json
import os

from art_jax.core import storage
from art_jax.core.distributed import is_lead
from art_jax.core.errors import UserError
from art_jax.core.fileio import read_json
from art_jax.core.sharding import make_mesh
from art_jax.data.reader_inputs import resolve_format
from art_jax.evaluation.predict import predict_answers, read_retrieved
from art_jax.models.reader_folder import READER_FILE


def answer_file(reader_spec: str, results_path: str, out: str, *, topk: int = 50, input_format: str | None = None,
                max_input_tokens: int | None = None, max_answer_tokens: int | None = None, beams: int = 1,
                batch_size: int = 8, step: int | None = None, best: bool = False, progress: bool = True) -> int:
    """Answer every question of ``results_path``; the reader's recorded settings unless a flag
    overrides them. Returns the number of questions answered."""
    for flag, value in (("--topk", topk), ("--beams", beams), ("--batch-size", batch_size),
                        ("--max-input-tokens", max_input_tokens), ("--max-answer-tokens", max_answer_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if input_format is not None:
        resolve_format(input_format, "--input-format")
    storage.check_file_target(out, "--out")
    results = read_json(results_path)
    mesh = make_mesh()
    from art_jax.workdir import load_reader  # Orbax: a run's reader

    reader = load_reader(reader_spec, mesh=mesh, step=step, best=best)
    given = {"input_format": input_format, "max_input_tokens": max_input_tokens,
             "max_answer_tokens": max_answer_tokens}
    settings = dataclasses.replace(reader.settings, **{k: v for k, v in given.items() if v is not None})
    recorded = f"{os.path.join(reader.source, READER_FILE)}: input_format"
    settings = dataclasses.replace(settings, input_format=resolve_format(
        settings.input_format, "--input-format" if input_format is not None else recorded))
    items = read_retrieved(results, results_path, scores=settings.joint)
    predictions = predict_answers(reader.model, reader.tokenizer, items, settings, topk=topk, mesh=mesh, beams=beams,
                                  batch_size=batch_size, progress=progress)
    if is_lead():
        storage.write_text(out, "".join(
            json.dumps({"question": item["question"], "answers": item["answers"], "prediction": prediction},
                       ensure_ascii=False) + "\n"
            for item, prediction in zip(results, predictions)))
    return len(predictions)
