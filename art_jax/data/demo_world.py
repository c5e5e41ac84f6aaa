"""A generated world for the offline demo: made-up people, templated facts, questions.

Each entity has a unique two-word name built from syllables (rare tokens) and facts
drawn from small pools, written as passages that share their template words. A question
names its entity, so only the rare name tokens tell the gold passage apart - the
lexical signal a query-likelihood teacher gives and ART must learn to use.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from art_jax.data.questions import Question

_SYLLABLES = ("ka", "lor", "ven", "mi", "dra", "sol", "tu", "bel", "qua", "rin", "zo", "phe", "mar", "ost",
              "ly", "gan", "ther", "wi", "nox", "pel", "cu", "dim", "rae", "vok")
CITIES = ("Orvale", "Brunmoor", "Castel Ny", "Dunmere", "Eskarth", "Fallow Reach", "Grindle", "Hathor Bay",
          "Ilvermark", "Jorun", "Kestrel Point", "Lumsby", "Marrowgate", "Norhaven", "Ostrava Minor", "Pellim",
          "Quarrel Hill", "Rivenport", "Saltmarsh", "Tiller", "Umber Falls", "Vantor", "Wexley", "Yarrow")
PROFESSIONS = ("glassblower", "cartographer", "beekeeper", "clockmaker", "shipwright", "astronomer", "weaver",
               "apothecary", "stonemason", "bookbinder", "falconer", "lighthouse keeper", "tanner", "cooper",
               "surveyor", "printer", "luthier", "chandler", "miller", "herbalist")
INSTRUMENTS = ("oboe", "lute", "harp", "cello", "bagpipes", "zither", "flute", "viola", "dulcimer", "trumpet",
               "bassoon", "accordion", "sitar", "mandolin", "clarinet")
RIVERS = ("Alder", "Brisk", "Coldwater", "Dorne", "Elm", "Fenwick", "Glass", "Hollow", "Ivy", "Juniper",
          "Kettle", "Larch", "Mossy", "Nettle", "Otter", "Pike")


@dataclasses.dataclass(frozen=True)
class World:
    passages: list[tuple[int, str, str]]  # (id, title, text), ids from 1
    train: list[Question]
    dev: list[Question]


def _names(rng: np.random.Generator, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        words = ["".join(rng.choice(_SYLLABLES, rng.integers(2, 4))).capitalize() for _ in range(2)]
        names.add(" ".join(words))
    return sorted(names)


def make_world(seed: int = 0, entities: int = 200, dev_fraction: float = 0.2) -> World:
    rng = np.random.default_rng(seed)
    passages, questions = [], []
    for name in _names(rng, entities):
        city, year = rng.choice(CITIES), int(rng.integers(1700, 2000))
        job, instrument, river = rng.choice(PROFESSIONS), rng.choice(INSTRUMENTS), rng.choice(RIVERS)
        passages.append((name, f"{name} was born in {city} in {year} and later worked as a {job}."))
        passages.append((name, f"{name} played the {instrument} and lived beside the river {river} for many years."))
        questions += [Question(f"where was {name} born?", (city,)),
                      Question(f"in which year was {name} born?", (str(year),)),
                      Question(f"what was the profession of {name}?", (job,)),
                      Question(f"what instrument did {name} play?", (instrument,)),
                      Question(f"beside which river did {name} live?", (river,))]
    order = rng.permutation(len(questions))
    dev_count = int(round(dev_fraction * len(questions)))
    shuffled = [questions[i] for i in order]
    return World([(i + 1, title, text) for i, (title, text) in enumerate(passages)],
                 shuffled[dev_count:], shuffled[:dev_count])


def write_world(world: World, folder: str) -> dict[str, str]:
    """corpus.tsv (DPR evidence format), train.jsonl and dev.jsonl in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    paths = {name: os.path.join(folder, file) for name, file in
             (("corpus", "corpus.tsv"), ("train", "train.jsonl"), ("dev", "dev.jsonl"))}
    with open(paths["corpus"], "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        f.writelines(f"{pid}\t{text}\t{title}\n" for pid, title, text in world.passages)
    for split in ("train", "dev"):
        with open(paths[split], "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"question": q.question, "answers": list(q.answers)}) + "\n"
                         for q in getattr(world, split))
    return paths
