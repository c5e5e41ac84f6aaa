"""A generated world for the offline demo: made-up people, templated facts, questions.

Every entity has a two-word name whose words are built from syllables and used by no
other entity, so the name tokens are rare and point at that entity's passages alone.
Facts come from small pools and are written with templates shared across the corpus:
the template words carry no signal about the entity, and a question's only strong
lexical link to its gold passage is the name (plus a cue word telling which fact). That
is the signal a query-likelihood teacher gives and the retriever has to learn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re

from art_jax.core.storage import write_text
from art_jax.data.questions import Question

# Names are a start, an optional middle and an end syllable: pronounceable, like "Talor Vemmick".
_STARTS = ("ta", "ve", "ko", "mi", "dra", "sel", "bri", "or", "hal", "ny", "qui", "ros", "tam", "el", "gor",
           "lu", "fen", "ar", "mor", "zel", "pa", "ith", "cal", "jo")
_MIDDLES = ("la", "ri", "no", "ve", "ma", "de", "lo", "si", "ta", "bu")
_ENDS = ("lor", "mick", "dan", "wen", "ris", "ton", "vik", "sel", "nor", "bek", "lin", "mar", "thas", "dor",
         "ven", "ric", "gan", "wyn", "tis", "mund")
CITIES = ("Orvale", "Brunmoor", "Dunmere", "Eskarth", "Grindle", "Hathor Bay", "Ilvermark", "Jorun", "Kestrel Point",
          "Lumsby", "Marrowgate", "Norhaven", "Pellim", "Quarrel Hill", "Rivenport", "Saltmarsh", "Umber Falls",
          "Vantor", "Wexley", "Yarrow")
# All start with a consonant, so the template's "a" is always right.
PROFESSIONS = ("glassblower", "cartographer", "beekeeper", "clockmaker", "shipwright", "weaver", "stonemason",
               "bookbinder", "falconer", "lighthouse keeper", "tanner", "cooper", "surveyor", "printer", "luthier",
               "chandler", "miller", "herbalist", "potter", "blacksmith")
INSTRUMENTS = ("oboe", "lute", "harp", "cello", "bagpipes", "zither", "flute", "viola", "dulcimer", "trumpet",
               "bassoon", "accordion", "sitar", "mandolin", "clarinet")
RIVERS = ("Alder", "Brisk", "Coldwater", "Dorne", "Fenwick", "Hollow", "Juniper", "Kettle", "Larch", "Mossy",
          "Nettle", "Otter", "Pike", "Sorrel")
PETS = ("ferret", "tortoise", "raven", "hedgehog", "goat", "parrot", "owl", "hare", "lizard", "toad", "magpie",
        "donkey")
TOPICS = ("comets", "tides", "lichens", "old maps", "bees", "bridges", "salt", "moths", "weather", "ferns",
          "sundials", "shipwrecks", "mushrooms", "windmills", "eclipses", "glaciers")

# Kinds of fact: a passage template and its questions as (template, slot of the answer). Each
# question shares a cue word with its passage ("born", "instrument", "year"...) that tells an
# entity's passages apart; the cue is common to a whole kind, so it never singles out an entity.
_FACTS = (
    ("{name} was born in {birthplace} in {born} and grew up by the river {river}.",
     (("where was {name} born?", "birthplace"), ("when was {name} born?", "born"),
      ("by which river did {name} grow up?", "river"))),
    ("{name} was a {profession} by profession, played the {instrument} as a favourite instrument "
     "and kept a {pet} as a pet.",
     (("what was the profession of {name}?", "profession"), ("which instrument did {name} play?", "instrument"),
      ("what pet did {name} keep?", "pet"))),
    ("{name} died in the city of {deathplace} in the year {died}, after writing a book about {topic}.",
     (("in which city did {name} die?", "deathplace"), ("in which year did {name} die?", "died"),
      ("what was the book by {name} about?", "topic"))),
)
# restate=True: each passage ends with the entity's facts of its other passages, said briefly (every
# fact then stands in two passages, as facts do in an encyclopedia: masked-salient-span pre-training
# learns from that redundancy)
_RESTATED = ("{name} was born in {birthplace} in {born}.", "{name} played the {instrument}.",
             "{name} died in {deathplace} in {died}.")
_MAX_ENTITIES = 2000  # of 5280 possible name words, so drawing unused ones stays quick


@dataclasses.dataclass(frozen=True)
class World:
    passages: list[tuple[int, str, str]]  # (id, title, text), ids from 1, title = entity name
    train: list[Question]
    dev: list[Question]


def _names(rng: random.Random, count: int) -> list[str]:
    # A name word must differ from every template and pool word, or it would match them.
    texts = [text for text, _ in _FACTS] + [ask for _, asks in _FACTS for ask, _ in asks]
    pools = CITIES + PROFESSIONS + INSTRUMENTS + RIVERS + PETS + TOPICS
    taken = set(re.findall(r"[a-z]+", " ".join(texts + list(pools)).lower()))
    words = []
    while len(words) < 2 * count:
        middle = rng.choice(_MIDDLES) if rng.random() < 0.5 else ""
        word = rng.choice(_STARTS) + middle + rng.choice(_ENDS)
        if word not in taken:
            taken.add(word)
            words.append(word.capitalize())
    return [f"{first} {last}" for first, last in zip(words[::2], words[1::2])]


def _facts(rng: random.Random) -> dict[str, str]:
    born = rng.randint(1700, 1924)
    return dict(birthplace=rng.choice(CITIES), born=str(born), river=rng.choice(RIVERS),
                profession=rng.choice(PROFESSIONS), instrument=rng.choice(INSTRUMENTS), pet=rng.choice(PETS),
                deathplace=rng.choice(CITIES), died=str(born + rng.randint(25, 75)), topic=rng.choice(TOPICS))


def make_world(seed: int = 0, entities: int = 200, facts_per_entity: int = 2, dev_fraction: float = 0.2,
               restate: bool = False) -> World:
    """``entities`` made-up people with ``facts_per_entity`` passages each (kinds drawn per
    entity) and three questions per passage, split at random into train and dev. ``restate``:
    each passage also restates the facts of the entity's other passages (the same draws: the same
    people, facts and questions)."""
    if not 1 <= entities <= _MAX_ENTITIES:
        raise ValueError(f"entities must be in 1..{_MAX_ENTITIES}, got {entities}")
    if not 1 <= facts_per_entity <= len(_FACTS):
        raise ValueError(f"facts_per_entity must be in 1..{len(_FACTS)}, got {facts_per_entity}")
    if not 0 <= dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    rng = random.Random(seed)  # stdlib: its stream is stable across versions
    passages, questions = [], []
    for name in _names(rng, entities):
        facts = _facts(rng)
        kinds = sorted(rng.sample(range(len(_FACTS)), facts_per_entity))
        for kind in kinds:
            text, asks = _FACTS[kind]
            others = [_RESTATED[other] for other in kinds if other != kind] if restate else []
            passages.append((len(passages) + 1, name, " ".join([text, *others]).format(name=name, **facts)))
            questions += [Question(ask.format(name=name), (facts[slot],)) for ask, slot in asks]
    # A random split, not by entity: dev asks new facts about people that train questions also
    # name, as questions over one evidence corpus do; unseen names would need a bigger model.
    rng.shuffle(questions)
    dev = round(dev_fraction * len(questions))
    return World(passages, questions[dev:], questions[:dev])


def write_world(world: World, folder: str) -> dict[str, str]:
    """corpus.tsv (DPR evidence TSV), train.jsonl and dev.jsonl in ``folder``; their paths."""
    paths = {name: os.path.join(folder, file) for name, file in
             (("corpus", "corpus.tsv"), ("train", "train.jsonl"), ("dev", "dev.jsonl"))}
    # Generated text has no tab, newline or quote, so rows need no csv quoting.
    write_text(paths["corpus"], "id\ttext\ttitle\n" + "".join(
        f"{pid}\t{text}\t{title}\n" for pid, title, text in world.passages))
    for split in ("train", "dev"):
        write_text(paths[split], "".join(json.dumps({"question": q.question, "answers": list(q.answers)}) + "\n"
                                           for q in getattr(world, split)))
    return paths
