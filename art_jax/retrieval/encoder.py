"""The dual encoder: question and passage towers (BERT or RoBERTa, optionally with a projection
head on [CLS]), [CLS] embeddings (token type ids all 0, as DPR and ART feed them); and what a
command's retriever argument names, resolved to towers.

``projection`` (in ``DualEncoder.from_pretrained``, ``load_retriever``, ``load_tower``): None takes
the towers as they are; True gives each tower without a projection head a freshly initialised
one (DPR-PAQ's Dense + LayerNorm on [CLS]; the same seed for both towers); False refuses towers
that have one (see ``art_jax.models.hf.load_bert``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax

from art_jax.core import storage
from art_jax.core.errors import UserError
from art_jax.core.remote import local_copy
from art_jax.data.tokenization import tokenize_passages, tokenize_questions
from art_jax.models.bert import Bert
from art_jax.models.export import is_export_folder, read_export, reads_as_export, tower_max_length, tower_path
from art_jax.models.hf import load_bert, load_tokenizer, resolve_checkpoint, with_projection


@dataclasses.dataclass
class DualEncoder:
    """Two towers (the same module when shared) and their tokenizer."""

    question: Bert
    passage: Bert
    tokenizer: object
    question_max_length: int = 256
    passage_max_length: int = 256
    question_truncation: str = "right"  # "left": a long question keeps its end (dialogue contexts)

    @classmethod
    def from_pretrained(cls, question: str, passage: str | None = None, *, shared: bool = False,
                        mesh=None, projection: bool | None = None, **overrides) -> DualEncoder:
        """Towers from Hugging Face checkpoints. With one checkpoint both towers start from
        it (separate weights unless ``shared``)."""
        q_tower = load_bert(question, mesh=mesh, projection=projection, **overrides)
        p_tower = q_tower if shared else load_bert(passage or question, mesh=mesh, projection=projection,
                                                   **overrides)
        return cls(q_tower, p_tower, load_tokenizer(question))

    def embed_questions(self, questions: Sequence[str]) -> jax.Array:
        tokens = tokenize_questions(self.tokenizer, questions, self.question_max_length,
                                    truncation_side=self.question_truncation)
        return _embed(self.question, tokens.ids, tokens.mask)

    def embed_passages(self, titles: Sequence[str], texts: Sequence[str]) -> jax.Array:
        tokens = tokenize_passages(self.tokenizer, titles, texts, self.passage_max_length)
        return _embed(self.passage, tokens.ids, tokens.mask)


# NNX modules are pytrees: the tower is an ordinary jit argument.
_embed = jax.jit(lambda tower, ids, mask: tower.embed_cls(ids, mask))


# ---------------------------------------------------------------------------------------
# Retriever arguments: a Hugging Face checkpoint, an export folder, or a training run


_DESCRIBED = {"hf": "a Hugging Face checkpoint", "export": "an export folder", "run": "a training run"}


def retriever_kind(spec: str) -> str:
    """What a retriever argument names: "export", a folder `art-jax export` wrote (it has
    art_jax_export.json) or one holding question_encoder/ and passage_encoder/ model folders;
    "run", a training run's workdir (config.json and checkpoints/) or one of its checkpoints
    (WORKDIR/checkpoints/N, WORKDIR/best, WORKDIR/best/N); else "hf", a Hugging Face folder,
    hub id or gs:// folder, one tower for both sides."""
    path = _normalised(spec)
    if not storage.isdir(path):  # a hub id, or nothing there (loading says which)
        return "hf"
    if reads_as_export(path):
        return "export"
    if is_export_folder(path):
        raise UserError(f"{spec}: an export of a reader alone (reader/); it holds no retriever towers")
    from art_jax.workdir import run_root

    return "run" if run_root(path) else "hf"


def load_retriever(spec: str, *, mesh=None, step: int | None = None, best: bool = False,
                   projection: bool | None = None) -> DualEncoder:
    """The dual encoder ``spec`` names (see ``retriever_kind``), questions always through the
    question tower and passages through the passage tower: a run's checkpoint (its newest,
    ``step``'s, or with ``best`` its best evaluation's); an export's two towers with their
    recorded max lengths; or one Hugging Face checkpoint as both towers (max lengths: what its
    art_jax_tower.json records, else the DualEncoder defaults). ``projection``: see the module's
    docstring."""
    kind = _kind(spec, step, best)
    if kind == "run":
        from art_jax.workdir import read_run  # Orbax: only when asked

        run = read_run(_normalised(spec), step=step, best=best, mesh=mesh)
        question, passage = (with_projection(tower, projection, mesh=mesh, source=f"{spec} ({side} tower)")
                             for side, tower in (("question", run.question), ("passage", run.passage)))
        return DualEncoder(question, passage, run.tokenizer, question_max_length=run.question_max_length,
                           passage_max_length=run.passage_max_length, question_truncation=run.question_truncation)
    if kind == "export":
        folder = _local(spec)
        info = read_export(folder)
        question, passage = tower_path(folder, "question"), tower_path(folder, "passage")
        return DualEncoder(load_bert(question, mesh=mesh, projection=projection),
                           load_bert(passage, mesh=mesh, projection=projection), load_tokenizer(question),
                           question_max_length=info["question_max_length"],
                           passage_max_length=info["passage_max_length"],
                           question_truncation=info.get("question_truncation", "right"))
    folder = resolve_checkpoint(spec)
    encoder = DualEncoder.from_pretrained(folder, shared=True, mesh=mesh, projection=projection)
    recorded = tower_max_length(folder)
    if recorded is not None:
        encoder.question_max_length = encoder.passage_max_length = recorded
    return encoder


def load_tower(spec: str, side: str, *, mesh=None, step: int | None = None, best: bool = False,
               projection: bool | None = None) -> tuple[Bert, int | None]:
    """The ``side`` ("question" or "passage") tower of ``spec`` and its recorded max length
    (None for a Hugging Face checkpoint that records none); of an export, only that tower's
    folder is read. ``projection``: see the module's docstring."""
    kind = _kind(spec, step, best)
    if kind == "run":
        from art_jax.workdir import read_run_tower  # Orbax: only when asked

        tower, length = read_run_tower(_normalised(spec), side, step=step, best=best, mesh=mesh)
        return with_projection(tower, projection, mesh=mesh, source=f"{spec} ({side} tower)"), length
    if kind == "export":
        folder = _local(spec)
        return (load_bert(tower_path(folder, side), mesh=mesh, projection=projection),
                read_export(folder)[f"{side}_max_length"])
    folder = resolve_checkpoint(spec)
    return load_bert(folder, mesh=mesh, projection=projection), tower_max_length(folder)


def _kind(spec: str, step: int | None, best: bool) -> str:
    kind = retriever_kind(spec)
    if kind != "run" and (step is not None or best):
        raise UserError(f"a step or the best checkpoint (--step/--best) can only be chosen from a training run's "
                        f"workdir; {spec} is {_DESCRIBED[kind]}")
    return kind


def _normalised(spec: str) -> str:
    return spec.rstrip("/") if storage.is_remote(spec) else os.path.normpath(os.path.expanduser(spec))


def _local(spec: str) -> str:
    """A local copy of the folder ``spec`` (itself when local)."""
    return local_copy(os.path.expanduser(spec))


def load_retriever_tokenizer(spec: str):
    """The tokenizer of the retriever ``spec`` names (an export's or a run's is its question
    tower's; both towers share it), without reading any weights."""
    kind = retriever_kind(spec)
    if kind == "export":
        return load_tokenizer(tower_path(_local(spec), "question"))
    if kind == "run":
        from art_jax.workdir import MODELS, run_root

        return load_tokenizer(local_copy(os.path.join(run_root(_normalised(spec)), MODELS, "question")))
    return load_tokenizer(spec)
