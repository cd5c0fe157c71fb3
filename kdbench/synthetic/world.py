"""A procedurally generated world and an instruction-following corpus about it.

The embedded benchmark needs a teacher that genuinely knows more than its student on a CPU in
minutes. Here knowledge is literal: a seeded world of people and cities with attributes. The
teacher reads the whole world (every person's biography plus every labelled training instance);
the student gets a small labelled subset plus unlabelled prompts (what KD and SeqKD can use).

Tasks mirror Dolly's categories, and the reference lengths cover the DPKD length buckets
((0,30], (30,70], (70,inf) words):

==========================  ===============================================  ==========
category                    task                                              bucket
==========================  ===============================================  ==========
closed_qa                   answer from a passage given in the input          (0,30]
open_qa                     a fact of the world, no input                      (0,30]
classification              which region a person lives in (two hops)          (0,30]
information_extraction      pull three fields out of a passage                 (0,30]
summarization               rewrite a shuffled passage as one sentence         (30,70]
brainstorming               name people of a city (several valid references)   (0,30]
general_qa                  describe a city and its residents                   (30,70]
creative_writing            a long templated biography                          (70,inf)
==========================  ===============================================  ==========

Text is written with punctuation as separate words ("bavo is a baker ."), so the word-level
tokenizer round-trips it exactly. Every instance has a key; splits are assigned per key, so no
instance appears in two splits (facts of the world may: that is what is learned).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

SYLLABLES = ["ba", "ko", "ri", "ta", "mel", "vo", "sa", "len", "di", "nu", "ra", "po", "ki", "zo", "fa", "lu",
             "te", "mi", "gor", "an", "el", "dun", "ves", "tor", "shi", "ka", "mo", "bel", "rin", "da"]
JOBS = ["baker", "pilot", "farmer", "doctor", "teacher", "painter", "sailor", "miner", "tailor", "singer",
        "builder", "writer", "fisher", "guard", "cook", "smith", "weaver", "potter", "hunter", "nurse"]
PETS = ["cat", "dog", "parrot", "horse", "rabbit", "goat", "turtle", "owl", "lizard", "ferret", "goose", "pig"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "gray", "brown"]
FOODS = ["bread", "soup", "rice", "cheese", "apples", "fish", "honey", "beans", "pears", "noodles", "plums",
         "carrots"]
HOBBIES = ["chess", "dancing", "hiking", "singing", "knitting", "rowing", "gardening", "reading", "fishing",
           "drawing", "archery", "cycling"]
REGIONS = ["north", "south", "east", "west"]
PRODUCTS = ["wine", "silk", "salt", "glass", "wool", "copper", "tea", "paper", "spices", "timber", "pottery",
            "lace", "iron", "marble", "amber", "cotton"]
NUMBER_WORDS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy"}

CATEGORIES = ("closed_qa", "open_qa", "classification", "information_extraction", "summarization",
              "brainstorming", "general_qa", "creative_writing")


@dataclass
class Person:
    name: str
    city: str
    job: str
    age: int
    pet: str
    color: str
    food: str
    hobby: str


@dataclass
class City:
    name: str
    region: str
    product: str
    residents: list[str] = field(default_factory=list)


@dataclass
class World:
    people: list[Person]
    cities: list[City]

    def city(self, name: str) -> City:
        return next(c for c in self.cities if c.name == name)


def _names(rng: random.Random, count: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    names = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(*syllables)))
        if name not in taken and len(name) > 3:
            taken.add(name)
            names.append(name)
    return names


def make_world(n_people: int, n_cities: int, seed: int, *, exclude_names: set[str] | None = None) -> World:
    """A seeded world: ``n_people`` people spread over ``n_cities`` cities. ``exclude_names``: names no
    person or city of this world may have (a second world with disjoint names)."""
    rng = random.Random(f"world-{seed}")
    taken: set[str] = set(exclude_names or ())
    city_names = _names(rng, n_cities, (2, 2), taken)
    products = rng.sample(PRODUCTS, k=min(n_cities, len(PRODUCTS)))
    cities = [City(name, REGIONS[i % len(REGIONS)], products[i % len(products)]) for i, name in enumerate(city_names)]
    people = []
    for i, name in enumerate(_names(rng, n_people, (2, 3), taken)):
        city = cities[i % n_cities]  # balanced residents per city
        people.append(Person(name=name, city=city.name, job=rng.choice(JOBS), age=rng.randint(18, 79),
                             pet=rng.choice(PETS), color=rng.choice(COLORS), food=rng.choice(FOODS),
                             hobby=rng.choice(HOBBIES)))
        city.residents.append(name)
    return World(people=people, cities=cities)


# ---------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------

def fact_sentences(p: Person) -> dict[str, str]:
    return {
        "city": f"{p.name} lives in {p.city} .",
        "job": f"{p.name} works as a {p.job} .",
        "age": f"{p.name} is {p.age} years old .",
        "pet": f"{p.name} has a {p.pet} .",
        "color": f"the favorite color of {p.name} is {p.color} .",
        "food": f"the favorite food of {p.name} is {p.food} .",
        "hobby": f"{p.name} enjoys {p.hobby} .",
    }


def biography(p: Person, world: World) -> str:
    """A long templated description (> 70 words): the creative_writing reference and the world text."""
    city = world.city(p.city)
    return (
        f"{p.name} is a {p.age} year old {p.job} who lives in {p.city} , a city in the {city.region} "
        f"that is famous for its {city.product} . every morning {p.name} wakes up early , feeds the {p.pet} "
        f"and walks through the streets of {p.city} before starting work as a {p.job} . "
        f"the favorite food of {p.name} is {p.food} , and the favorite color of {p.name} is {p.color} . "
        f"in the evening {p.name} enjoys {p.hobby} with friends from {p.city} . people in the {city.region} "
        f"say that {p.name} is the best {p.job} they know , and the {p.pet} of {p.name} is known in every street ."
    )


def city_description(c: City, world: World) -> str:
    """A medium description (30-70 words): the general_qa reference."""
    residents = c.residents[:4]
    listed = " , ".join(residents[:-1]) + f" and {residents[-1]}" if len(residents) > 1 else residents[0]
    return (
        f"{c.name} is a city in the {c.region} . it is famous for its {c.product} , which traders carry to "
        f"every corner of the land . among the people who live in {c.name} are {listed} . "
        f"visitors to {c.name} often buy {c.product} at the market near the river ."
    )


def age_band(age: int) -> str:
    return "young" if age < 40 else ("middle aged" if age < 60 else "old")


# ---------------------------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------------------------

ATTRIBUTE_QUESTIONS = {
    "job": ("what does {name} do for a living ?", "{name} works as a {job} ."),
    "city": ("where does {name} live ?", "{name} lives in {city} ."),
    "age": ("how old is {name} ?", "{name} is {age} years old ."),
    "pet": ("what animal does {name} have ?", "{name} has a {pet} ."),
    "color": ("what is the favorite color of {name} ?", "the favorite color of {name} is {color} ."),
    "food": ("what is the favorite food of {name} ?", "the favorite food of {name} is {food} ."),
    "hobby": ("what does {name} enjoy ?", "{name} enjoys {hobby} ."),
}


def _person_fields(p: Person) -> dict:
    return {"name": p.name, "city": p.city, "job": p.job, "age": p.age, "pet": p.pet, "color": p.color,
            "food": p.food, "hobby": p.hobby}


def _wrong_value(rng: random.Random, attribute: str, right: object, world: World) -> object:
    pools = {"job": JOBS, "pet": PETS, "color": COLORS, "food": FOODS, "hobby": HOBBIES,
             "city": [c.name for c in world.cities], "age": list(range(18, 80)), "region": REGIONS}
    return rng.choice([v for v in pools[attribute] if v != right])


def instances(world: World, seed: int) -> list[dict]:
    """Every instance the world supports, each with a unique ``key`` and a ``category``.

    Records: ``key``, ``category``, ``instruction``, ``input``, ``output`` (first reference),
    ``references`` (all valid answers), and ``rejected`` (a plausible wrong answer, for the
    preference methods).
    """
    rng = random.Random(f"instances-{seed}")
    out: list[dict] = []

    def add(key, category, instruction, input_text, references, rejected):
        out.append({"key": key, "category": category, "instruction": instruction, "input": input_text,
                    "output": references[0], "references": references, "rejected": rejected})

    for p in world.people:
        fields = _person_fields(p)
        facts = fact_sentences(p)
        for attribute, (question, answer) in ATTRIBUTE_QUESTIONS.items():
            wrong = {**fields, attribute: _wrong_value(rng, attribute, fields[attribute], world)}
            # open QA: the fact must be known
            add(f"open_qa/{p.name}/{attribute}", "open_qa", question.format(**fields), "",
                [answer.format(**fields)], answer.format(**wrong))
            # closed QA: the fact is in a passage of three shuffled sentences
            others = rng.sample([k for k in facts if k != attribute], 2) + [attribute]
            rng.shuffle(others)
            passage = " ".join(facts[k] for k in others)
            add(f"closed_qa/{p.name}/{attribute}", "closed_qa",
                "answer the question using the passage . " + question.format(**fields), passage,
                [answer.format(**fields)], answer.format(**wrong))
        city = world.city(p.city)
        wrong_region = _wrong_value(rng, "region", city.region, world)
        add(f"classification/{p.name}/region", "classification",
            f"in which part of the land does {p.name} live : north , south , east or west ?", "",
            [f"{p.name} lives in the {city.region} ."], f"{p.name} lives in the {wrong_region} .")
        add(f"classification/{p.name}/age", "classification",
            f"is {p.name} young , middle aged or old ?", "",
            [f"{p.name} is {age_band(p.age)} ."],
            f"{p.name} is {rng.choice([b for b in ('young', 'middle aged', 'old') if b != age_band(p.age)])} .")
        passage = " ".join(facts[k] for k in rng.sample(list(facts), len(facts)))
        picked = rng.sample(["city", "job", "age", "pet", "food"], 3)
        wrong = {**fields, picked[0]: _wrong_value(rng, picked[0], fields[picked[0]], world)}
        add(f"information_extraction/{p.name}/{'-'.join(picked)}", "information_extraction",
            f"extract the {picked[0]} , {picked[1]} and {picked[2]} of {p.name} from the text .", passage,
            [" ; ".join(f"{k} : {fields[k]}" for k in picked)], " ; ".join(f"{k} : {wrong[k]}" for k in picked))
        rewrite = (f"{p.name} is a {p.age} year old {p.job} from {p.city} who has a {p.pet} , enjoys {p.hobby} , "
                   f"likes the color {p.color} and likes to eat {p.food} more than anything else in the world every single day .")
        wrong = {**fields, "pet": _wrong_value(rng, "pet", p.pet, world)}
        add(f"summarization/{p.name}", "summarization",
            "rewrite the text as one sentence about the person .",
            " ".join(facts[k] for k in rng.sample(list(facts), len(facts))) + " the end .",
            [rewrite], rewrite.replace(f"has a {p.pet}", f"has a {wrong['pet']}"))
        wrong_job = _wrong_value(rng, "job", p.job, world)
        add(f"creative_writing/{p.name}", "creative_writing", f"write a short story about the life of {p.name} .",
            "", [biography(p, world)], biography(p, world).replace(f" {p.job} ", f" {wrong_job} "))
    for c in world.cities:
        # brainstorming: several valid answers (any three residents, in their listed order)
        valid = [sorted(rng.sample(c.residents, 3), key=c.residents.index) for _ in range(6)]
        references = list(dict.fromkeys(f"{a} , {b} and {d} ." for a, b, d in valid))
        outsiders = [p.name for p in world.people if p.city != c.name]
        add(f"brainstorming/{c.name}", "brainstorming", f"name three people who live in {c.name} .", "",
            references, f"{valid[0][0]} , {rng.choice(outsiders)} and {valid[0][2]} .")
        description = city_description(c, world)
        add(f"general_qa/{c.name}", "general_qa", f"tell me about the city of {c.name} .", "", [description],
            description.replace(f"the {c.region}", f"the {_wrong_value(rng, 'region', c.region, world)}"))
        for job in sorted({world.people[i].job for i in range(len(world.people))
                           if world.people[i].city == c.name})[:3]:
            workers = [p.name for p in world.people if p.city == c.name and p.job == job]
            add(f"brainstorming/{c.name}/{job}", "brainstorming", f"name a {job} who lives in {c.name} .", "",
                [f"{w} is a {job} in {c.name} ." for w in workers],
                f"{rng.choice(outsiders)} is a {job} in {c.name} .")
    return out


def split_of(key: str, seed: int, fractions: tuple[float, float, float]) -> str:
    """Deterministic split of an instance key: 'train', 'validation' or 'test'."""
    digest = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / float(16 ** 12)
    train, valid, _ = fractions
    return "train" if digest < train else ("validation" if digest < train + valid else "test")


def multiple_choice_questions(world: World, seed: int, open_qa_keys: list[str]) -> list[dict]:
    """Four-option questions about the world, one per held-out open-QA instance (``open_qa/<name>/<attr>``),
    so the multiple-choice task asks only what no training instance asked. Choices are full answer
    sentences (what the models were trained to produce); the other three use plausible wrong values."""
    rng = random.Random(f"mc-{seed}")
    people = {p.name: p for p in world.people}
    rows = []
    for key in open_qa_keys:
        _, name, attribute = key.split("/")
        if attribute == "age":  # too many near-identical options
            continue
        fields = _person_fields(people[name])
        values = {fields[attribute]}
        while len(values) < 4:
            values.add(_wrong_value(rng, attribute, fields[attribute], world))
        question, answer = ATTRIBUTE_QUESTIONS[attribute]
        ordered = sorted(values, key=str)
        choices = [answer.format(**{**fields, attribute: value}) for value in ordered]
        rows.append({"key": key, "question": question.format(**fields), "choices": choices,
                     "answer": ordered.index(fields[attribute])})
    return rows
