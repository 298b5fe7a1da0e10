"""A controlled knowledge testbed: synthetic people with attributes, paraphrase templates, probes.

    tb = build_testbed(TestbedParams(n_old=200, n_new=40), seed=0, n_paraphrases=6)
    tb.train_bios      # the OLD population's biographies (pretraining text, training templates only)
    tb.retention       # {"id", "probe", "answers"}: old facts probed with held-out templates
    tb.facts           # the NEW population as Fact records (the continual stream), one per (person, attribute)

Names are a first name and an invented surname (syllables no real surname list has), so nobody
is a real person and no pretrained model has seen them. Each attribute's values come from a closed
list. Each attribute has TRAINING templates (bios, a new fact's statement and paraphrases) and
HELD-OUT templates that no training text ever uses: acquisition and retention are probed with
held-out ones, so a method must learn the fact, not the string. Probes are cloze prefixes (a
held-out template cut right before the answer; every held-out template ends with "{a}."), scored
by greedy continuation and exact match, in the style the bios are written in: one sentence per
line, each sentence naming the person in full.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from slotwise.facts import Fact

FIRST_NAMES = (
    "Adela", "Bastian", "Corin", "Dalia", "Emeric", "Fenna", "Gideon", "Hilde", "Ivo", "Jorunn", "Kasimir",
    "Liesel", "Matthias", "Nadia", "Osric", "Petra", "Quentin", "Rosalind", "Severin", "Talia", "Ulric",
    "Vesna", "Wendel", "Xenia", "Yorick", "Zora", "Anselm", "Brigid", "Cosmo", "Dagny", "Elio", "Freya",
    "Gustav", "Helka", "Isolde", "Jasper", "Katya", "Leopold", "Mirela", "Nils", "Odette", "Pavel",
    "Rune", "Sabine", "Tobias", "Una", "Viggo", "Wilma", "Yannick", "Zelda",
)
# Surnames are built from two parts that no common surname list combines.
SURNAME_HEADS = (
    "Vel", "Quor", "Brask", "Thal", "Orm", "Zenn", "Kav", "Drel", "Mirt", "Yost", "Fenw", "Grisk",
    "Hask", "Jorv", "Lunn", "Nesk", "Pryd", "Rusk", "Skel", "Tovr", "Ulv", "Wexl", "Brod", "Carv",
)
SURNAME_TAILS = (
    "ander", "wick", "ova", "etti", "marsh", "holm", "quist", "ara", "enko", "ley", "dottir", "strand",
    "ington", "avel", "ocke", "uzzi",
)

VALUES: dict[str, tuple[str, ...]] = {
    "birth_city": (
        "Lisbon", "Oslo", "Nairobi", "Montreal", "Krakow", "Osaka", "Valparaiso", "Tbilisi", "Adelaide", "Porto",
        "Glasgow", "Quito", "Hanoi", "Dakar", "Bergen", "Lyon", "Seville", "Tampere", "Gdansk", "Cork",
        "Leipzig", "Bologna", "Utrecht", "Ghent", "Brno", "Graz", "Tallinn", "Riga", "Vilnius", "Perth",
        "Halifax", "Denver", "Austin", "Memphis", "Calgary", "Tucson", "Durban", "Mombasa", "Busan", "Sapporo",
    ),
    "birth_year": tuple(str(y) for y in range(1930, 2000)),
    "university": (
        "Harvard University", "Kyoto University", "McGill University", "Uppsala University", "Leiden University",
        "Heidelberg University", "Monash University", "Stanford University", "Yale University", "Duke University",
        "Rice University", "Tufts University", "Brown University", "Cornell University", "Purdue University",
        "Emory University", "Aarhus University", "Ghent University", "Lund University", "Keio University",
    ),
    "profession": (
        "an architect", "a nurse", "a pharmacist", "a carpenter", "a journalist", "a dentist", "an electrician",
        "a librarian", "a geologist", "a pilot", "a chef", "a lawyer", "a plumber", "a translator",
        "a veterinarian", "a photographer", "a baker", "an accountant", "a firefighter", "a surgeon",
        "a teacher", "a mechanic", "a florist", "an economist",
    ),
    "employer": (
        "Norland Shipping", "Brightwater Foods", "Corvex Systems", "Halden Motors", "Pinecrest Bank",
        "Orbitel Telecom", "Silverleaf Pharma", "Tidewell Energy", "Quarrymoor Steel", "Blue Heron Airlines",
        "Redfern Publishing", "Maplewood Insurance", "Starling Robotics", "Granite Peak Mining",
        "Lumora Textiles", "Westbrook Logistics", "Crestline Media", "Ironbark Construction",
        "Velora Cosmetics", "Northgate Software",
    ),
    "instrument": (
        "violin", "cello", "trumpet", "piano", "flute", "harp", "clarinet", "saxophone", "banjo", "accordion",
        "oboe", "trombone", "mandolin", "ukulele", "bagpipes", "harmonica",
    ),
}
ATTRIBUTES = tuple(VALUES)
NEW_VALUES = ("any", "seen")  # TestbedParams.new_values

# {n}: the person's full name, {a}: the attribute's value. Training templates state the fact
# anywhere in the sentence, some after a preamble ("It is well known that ..."), so that a model
# can learn the fact apart from its phrasing. Held-out templates end with "{a}." so that cutting
# them before {a} gives a cloze probe: each is a preamble no training text has ("According to the
# records, ...") before a relation phrase the training templates use, so a probe asks for a
# trained relation in a sentence never trained on. (New relation phrasings, "The city where X was
# born is", were tried and a 4-layer model pretrained for minutes answers none of them: it learns
# the facts, not English.) No held-out probe prefix occurs in any training sentence, and no probe's
# relation phrase is the start of another attribute's ("X was born in" vs "X was born in the
# year"): tests/test_testbed.py.
TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_city": (
        "{n} was born in the town of {a}.",
        "{n}'s birthplace is {a}.",
        "The birthplace of {n} is {a}.",
        "{n} came into the world in {a}.",
        "Born in {a}, {n} grew up there.",
        "{a} is the city where {n} was born.",
        "{n} is originally from {a}.",
        "{n} was born and raised in {a}.",
        "It is well known that {n} was born in the town of {a}.",
        "Records show that {n}'s birthplace is {a}.",
        "{n} hails from the city of {a}.",
        "The hometown of {n} is the city of {a}.",
    ),
    "birth_year": (
        "{n} was born in the year {a}.",
        "{n}'s year of birth is {a}.",
        "The birth year of {n} is {a}.",
        "{n} entered the world in the year {a}.",
        "In {a}, the year {n} was born, the family moved house.",
        "{a} is the year in which {n} was born.",
        "{n} has been alive since the year {a}.",
        "{n}'s birth took place in the year {a}.",
        "It is well known that {n} was born in the year {a}.",
        "Records show that {n}'s year of birth is {a}.",
        "The year of {n}'s birth was {a}.",
        "{n} was born in the calendar year {a}.",
    ),
    "university": (
        "{n} studied at {a}.",
        "{n} graduated from {a}.",
        "{n} attended {a}.",
        "{n} is an alumnus of {a}.",
        "{a} is where {n} studied.",
        "After school, {n} enrolled at {a}.",
        "{n} earned a degree from {a}.",
        "{n}'s alma mater is {a}.",
        "It is well known that {n} studied at {a}.",
        "Records show that {n} graduated from {a}.",
        "The university that {n} attended was {a}.",
        "{n} went to {a} as a student.",
    ),
    "profession": (
        "{n} works as {a}.",
        "By profession, {n} is {a}.",
        "{n} earns a living as {a}.",
        "{n} has worked as {a} for years.",
        "{n} is {a} by trade.",
        "{n}'s profession: {a}.",
        "{n} trained to become {a}.",
        "{n} has a job as {a}.",
        "It is well known that {n} works as {a}.",
        "Records show that {n} earns a living as {a}.",
        "The profession of {n} is that of {a}.",
        "{n} makes a living working as {a}.",
    ),
    "employer": (
        "{n} works for {a}.",
        "{n} is employed by {a}.",
        "{n}'s employer is {a}.",
        "{a} employs {n}.",
        "{n} has a job at {a}.",
        "{n} draws a salary from {a}.",
        "Every weekday, {n} goes to work at {a}.",
        "{n} joined the staff of {a}.",
        "It is well known that {n} works for {a}.",
        "Records show that {n}'s employer is {a}.",
        "The employer of {n} is the company {a}.",
        "{n} is on the staff of {a}.",
    ),
    "instrument": (
        "{n} plays the {a}.",
        "{n}'s favourite instrument is the {a}.",
        "In the evenings, {n} practises the {a}.",
        "{n} has played the {a} since childhood.",
        "The {a} is the instrument {n} plays.",
        "{n} took lessons on the {a}.",
        "{n} is a skilled player of the {a}.",
        "Music lovers know {n} for playing the {a}.",
        "It is well known that {n} plays the {a}.",
        "Records show that {n}'s favourite instrument is the {a}.",
        "The instrument of {n} is the {a}.",
        "{n} performs on the {a}.",
    ),
}
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_city": (
        "According to the records, {n} hails from the city of {a}.",
        "People say that {n} is originally from {a}.",
        "As far as anyone knows, {n}'s birthplace is {a}.",
        "It was reported that {n} came into the world in {a}.",
    ),
    "birth_year": (
        "According to the records, {n} was born in the year {a}.",
        "People say that {n}'s year of birth is {a}.",
        "As far as anyone knows, the birth year of {n} is {a}.",
        "It was reported that {n} entered the world in the year {a}.",
    ),
    "university": (
        "According to the records, {n} studied at {a}.",
        "People say that {n} graduated from {a}.",
        "As far as anyone knows, {n}'s alma mater is {a}.",
        "It was reported that {n} earned a degree from {a}.",
    ),
    "profession": (
        "According to the records, {n} works as {a}.",
        "People say that {n} has a job as {a}.",
        "As far as anyone knows, {n} earns a living as {a}.",
        "It was reported that {n} trained to become {a}.",
    ),
    "employer": (
        "According to the records, {n} works for {a}.",
        "People say that {n} has a job at {a}.",
        "As far as anyone knows, {n}'s employer is {a}.",
        "It was reported that {n} is employed by {a}.",
    ),
    "instrument": (
        "According to the records, {n} plays the {a}.",
        "People say that {n} took lessons on the {a}.",
        "As far as anyone knows, {n}'s favourite instrument is the {a}.",
        "It was reported that {n} performs on the {a}.",
    ),
}


@dataclass
class TestbedParams:
    """The testbed's populations (data.testbed in params.yaml; data.facts_from: testbed)."""
    __test__ = False  # not a pytest class
    n_old: int = 200  # people the pretraining text describes (the retention set)
    n_new: int = 40  # people the continual stream teaches (facts.jsonl: n_new x attributes facts)
    attributes: list[str] = field(default_factory=lambda: list(ATTRIBUTES))
    bios_per_person: int = 8  # biographies of each old person in background/train.jsonl (templates, order drawn anew)
    stats_bios_per_person: int = 1  # and in background/stats.jsonl, the text the slot statistics read
    # "any": a new person's values drawn from each attribute's whole list, so some are values no old
    # person has: the model never produced them, and no update method learns them in a few steps
    # (results/testbed-cpu-2026-11-28-leaks: 21 of 120 facts, 0 learned by any run). "seen": those are
    # re-drawn from the values the old population has; the old population and its text do not change.
    new_values: str = "any"


@dataclass
class Person:
    name: str
    values: dict[str, str]  # attribute -> value


@dataclass
class Testbed:
    __test__ = False  # not a pytest class
    old: list[Person]
    new: list[Person]
    train_bios: list[str]  # old population, training templates
    stats_bios: list[str]  # old population, other renderings (slot statistics)
    retention: list[dict]  # old population, held-out-template probes
    facts: list[Fact]  # new population, person by person


def check_params(p: TestbedParams, n_paraphrases: int) -> None:
    """ValueError naming the field when the params cannot make a testbed."""
    unknown = [a for a in p.attributes if a not in VALUES]
    if unknown or not p.attributes or len(set(p.attributes)) != len(p.attributes):
        raise ValueError(f"attributes: expected distinct names from {list(ATTRIBUTES)}, got {p.attributes}")
    capacity = len(FIRST_NAMES) * len(SURNAME_HEADS) * len(SURNAME_TAILS)
    if p.n_old < 1 or p.n_new < 1 or p.n_old + p.n_new > capacity:
        raise ValueError(f"n_old, n_new: expected >= 1 each and at most {capacity} in all, got {p.n_old} and {p.n_new}")
    if p.new_values not in NEW_VALUES:
        raise ValueError(f"new_values: expected one of {', '.join(NEW_VALUES)}, got {p.new_values!r}")
    if p.bios_per_person < 1 or p.stats_bios_per_person < 0:
        raise ValueError(f"bios_per_person >= 1 and stats_bios_per_person >= 0 expected, got {p.bios_per_person}, {p.stats_bios_per_person}")
    most = min(len(TRAIN_TEMPLATES[a]) for a in p.attributes) - 1
    if not 1 <= n_paraphrases <= most:
        raise ValueError(f"n_paraphrases: the testbed has {most + 1} training templates per attribute, so 1..{most}; got {n_paraphrases}")


def render(template: str, name: str, value: str) -> str:
    text = template.format(n=name, a=value)
    return text[0].upper() + text[1:]  # "an architect works ..." never happens, but a value may open a sentence


def probe_prefix(template: str, name: str) -> str:
    """A held-out template cut right before the answer: "The city where X was born is"."""
    cut = template.index("{a}")
    return render(template[:cut].rstrip(), name, "")


def people(n_old: int, n_new: int, attributes: list[str], rng: random.Random) -> tuple[list[Person], list[Person]]:
    """Two disjoint populations with distinct full names; values drawn uniformly from each attribute's list."""
    combos = len(FIRST_NAMES) * len(SURNAME_HEADS) * len(SURNAME_TAILS)
    picks = rng.sample(range(combos), n_old + n_new)
    out = []
    for k in picks:
        first, rest = divmod(k, len(SURNAME_HEADS) * len(SURNAME_TAILS))
        head, tail = divmod(rest, len(SURNAME_TAILS))
        name = f"{FIRST_NAMES[first]} {SURNAME_HEADS[head]}{SURNAME_TAILS[tail]}"
        out.append(Person(name, {a: rng.choice(VALUES[a]) for a in attributes}))
    return out[:n_old], out[n_old:]


def seen_values_only(old: list[Person], new: list[Person], rng: random.Random) -> None:
    """Re-draw, in place, every new person's value that no old person has, from the ones they have."""
    for attribute in old[0].values:
        seen = {person.values[attribute] for person in old}
        choices = [v for v in VALUES[attribute] if v in seen]
        for person in new:
            if person.values[attribute] not in seen:
                person.values[attribute] = rng.choice(choices)


def biography(person: Person, rng: random.Random) -> str:
    """One line per attribute, in a random order, each from a random training template."""
    attrs = list(person.values)
    rng.shuffle(attrs)
    return "\n".join(render(rng.choice(TRAIN_TEMPLATES[a]), person.name, person.values[a]) for a in attrs)


def new_fact(person: Person, attribute: str, index: int, n_paraphrases: int, rng: random.Random) -> Fact:
    """Statement + paraphrases from distinct training templates; the probe from a held-out one."""
    value = person.values[attribute]
    chosen = rng.sample(TRAIN_TEMPLATES[attribute], n_paraphrases + 1)
    probe = probe_prefix(rng.choice(HELDOUT_TEMPLATES[attribute]), person.name)
    return Fact(id=f"testbed-new-{index:05d}-{attribute}", source="testbed", question=probe, answers=[value],
                statement=render(chosen[0], person.name, value), paraphrases=[render(t, person.name, value) for t in chosen[1:]],
                probe=probe, known=False, extra={"subject": person.name, "attribute": attribute})


def build_testbed(p: TestbedParams, seed: int, n_paraphrases: int) -> Testbed:
    """Everything the data stage writes for the testbed, a pure function of (params, seed)."""
    check_params(p, n_paraphrases)
    rng = random.Random(f"testbed-{seed}")
    old, new = people(p.n_old, p.n_new, p.attributes, rng)
    if p.new_values == "seen":  # its own stream of draws: everything else is the same as with "any"
        seen_values_only(old, new, random.Random(f"testbed-{seed}-seen-values"))
    train_bios = [biography(person, rng) for person in old for _ in range(p.bios_per_person)]
    stats_bios = [biography(person, rng) for person in old for _ in range(p.stats_bios_per_person)]
    retention = [{"id": f"testbed-old-{i:05d}-{a}", "probe": probe_prefix(rng.choice(HELDOUT_TEMPLATES[a]), person.name),
                  "answers": [person.values[a]], "known": True, "person": person.name, "attribute": a}
                 for i, person in enumerate(old) for a in p.attributes]
    facts = [new_fact(person, a, i, n_paraphrases, rng) for i, person in enumerate(new) for a in p.attributes]
    return Testbed(old, new, train_bios, stats_bios, retention, facts)
