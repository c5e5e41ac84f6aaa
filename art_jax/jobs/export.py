"""`art-jax export`: any retriever argument (a Hugging Face checkpoint, an export folder, a
training run) -> an export folder (art_jax.models.export)."""

from __future__ import annotations

from art_jax.core.distributed import is_lead
from art_jax.core.errors import UserError
from art_jax.models.export import (
    DEFAULT_MAX_LENGTHS,
    check_export_target,
    check_max_lengths,
    export_retriever,
    provenance_of,
    read_export,
)
from art_jax.retrieval.encoder import load_retriever, retriever_kind


def export_spec(spec: str, out: str, *, step: int | None = None, best: bool = False,
                question_max_length: int | None = None, passage_max_length: int | None = None) -> str:
    """Export ``spec``. Max lengths default to the recorded ones of an export or a run, else to
    DPR's 64 (questions) and 256 (passages), within the tower's positions. A run's export, with
    its provenance, is the run's own (art_jax.workdir.export_run)."""
    check_export_target(out)
    kind = retriever_kind(spec)
    if kind == "run":
        if question_max_length is not None or passage_max_length is not None:
            raise UserError(f"export: {spec} is a training run, whose export records the lengths it was trained "
                            "with; --question-max-length/--passage-max-length are for other retrievers")
        from art_jax.workdir import export_run  # Orbax and the train state: only when asked

        return export_run(spec, out, step=step, best=best)
    encoder = load_retriever(spec, step=step, best=best)  # (refuses step and best)
    if kind == "export":
        provenance = provenance_of(read_export(spec))
        defaults = {"question": encoder.question_max_length, "passage": encoder.passage_max_length}
    else:
        provenance = {}
        positions = encoder.question.config.max_position_embeddings
        defaults = {side: min(n, positions) for side, n in DEFAULT_MAX_LENGTHS.items()}
    lengths = {side: defaults[side] if given is None else given
               for side, given in (("question", question_max_length), ("passage", passage_max_length))}
    check_max_lengths(encoder.question, encoder.passage, lengths["question"], lengths["passage"])
    if not is_lead():  # one writer of the folder in a multi-process job
        return out
    return export_retriever(encoder.question, encoder.passage, encoder.tokenizer, out,
                            question_max_length=lengths["question"], passage_max_length=lengths["passage"],
                            question_truncation=encoder.question_truncation,
                            provenance={**provenance, "retriever": spec})
