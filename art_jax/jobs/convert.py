"""`art-jax convert`: retrievers trained elsewhere -> an export folder (art_jax.models.export),
which every command takes as a retriever and training takes as its starting towers.

- ``--megatron DIR``: an ART / EMDR2 / Megatron-LM ICT checkpoint (art_jax.models.megatron);
  its towers stay pre-LayerNorm BERTs, written as transformers ``megatron-bert`` folders.
- ``--dpr-cp FILE``: a facebookresearch/DPR training checkpoint (art_jax.models.dpr_checkpoint).
- ``--question-tower Q --passage-tower P``: two Hugging Face folders or hub ids, e.g. DPR's
  ``DPRQuestionEncoder`` and ``DPRContextEncoder`` releases, as one retriever.

Training checkpoints carry no tokenizer: ``--tokenizer`` names the one the model was trained
with (bert-large-uncased for ART's, bert-base-uncased for DPR's).
"""

from __future__ import annotations

from art_jax.core.distributed import is_lead
from art_jax.core.errors import UserError
from art_jax.models.bert import Bert
from art_jax.models.export import DEFAULT_MAX_LENGTHS, check_export_target, check_max_lengths, export_retriever
from art_jax.models.hf import bert_from_weights, load_bert, load_tokenizer
from art_jax.models.torch_checkpoints import ConvertedRetriever


def convert(out: str, *, megatron: str | None = None, dpr_cp: str | None = None, question_tower: str | None = None,
            passage_tower: str | None = None, tokenizer: str | None = None, question_max_length: int | None = None,
            passage_max_length: int | None = None) -> str:
    """Write the export ``out`` from exactly one source (see the module's docstring). Max lengths
    default to DPR's and ART's 64 (questions) and 256 (passages), within the towers' positions."""
    check_export_target(out)
    if passage_tower and not question_tower:
        raise UserError("convert: --passage-tower goes with --question-tower (a training checkpoint gives both towers)")
    if megatron or dpr_cp:
        if not tokenizer:
            raise UserError(f"convert: {'--megatron' if megatron else '--dpr-cp'} needs --tokenizer (a training "
                            "checkpoint holds none): the Hugging Face tokenizer the model was trained with, e.g. "
                            f"{'bert-large-uncased' if megatron else 'bert-base-uncased'}")
        converted = _read_training_checkpoint(megatron, dpr_cp)
        source = megatron or dpr_cp
        question, passage = (bert_from_weights(tower.hf_config, tower.weights, source=f"{source} ({side} tower)")
                             for side, tower in (("question", converted.question), ("passage", converted.passage)))
        provenance = converted.provenance
    else:
        if not (question_tower and passage_tower):
            raise UserError("convert: name a source: --megatron DIR, --dpr-cp FILE, or both --question-tower and "
                            "--passage-tower")
        question, passage = load_bert(question_tower), load_bert(passage_tower)
        provenance = {"source": "towers", "question_tower": question_tower, "passage_tower": passage_tower}
        tokenizer = tokenizer or question_tower
    vocab = load_tokenizer(tokenizer)
    _check_vocabulary(vocab, tokenizer, question, passage)
    lengths = {side: min(DEFAULT_MAX_LENGTHS[side], tower.config.max_length) if given is None else given
               for side, tower, given in (("question", question, question_max_length),
                                          ("passage", passage, passage_max_length))}
    check_max_lengths(question, passage, lengths["question"], lengths["passage"])
    if not is_lead():  # one writer of the folder in a multi-process job
        return out
    return export_retriever(question, passage, vocab, out, question_max_length=lengths["question"],
                            passage_max_length=lengths["passage"],
                            provenance={"converted_from": {**provenance, "tokenizer": tokenizer}})


def _read_training_checkpoint(megatron: str | None, dpr_cp: str | None) -> ConvertedRetriever:
    if megatron:
        from art_jax.models.megatron import read_megatron_checkpoint

        return read_megatron_checkpoint(megatron)
    from art_jax.models.dpr_checkpoint import read_dpr_checkpoint

    return read_dpr_checkpoint(dpr_cp)


def _check_vocabulary(tokenizer, name: str, *towers: Bert) -> None:
    """Every id the tokenizer gives must have a row in the towers' embeddings (Megatron pads
    the vocabulary to a multiple of 128: more rows than tokens is normal)."""
    rows = min(tower.config.vocab_size for tower in towers)
    if len(tokenizer) > rows:
        raise UserError(f"convert: tokenizer {name} has {len(tokenizer)} tokens, more than the towers' {rows} "
                        "embedding rows: not the vocabulary this model was trained with")
