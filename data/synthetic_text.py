"""Deterministic, learnable synthetic English-like documents for smoke runs.

Document ``i`` of stream ``seed`` is a pure function of ``(seed, i)``: a loader's position in the
stream is one integer, and resume or data-parallel splitting needs no other state.

The text is built to be *learnable* by a tiny model within a few hundred steps:
  - a fixed small "world" per seed (people with a city, colour, job, pet, ...) whose facts are
    repeated consistently across documents, so they can be memorised;
  - simple arithmetic and counting, whose next tokens follow rules;
  - lists that are later repeated verbatim (copying / induction);
  - a handful of sentence templates, so the grammar itself is quickly learned.
Lengths vary from a few tens to a few hundred tokens.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

NAMES = (
    "Mira Tomas Anna Lukas Sofia Emil Nora Jonas Ida Felix Clara Oskar Lea Hugo Maja Noah "
    "Alma Leon Ella Viktor Iris Max Freya Otto Vera Axel Lina Karl Greta Milo Ada Sven "
    "Rosa Ivan Elin Paul Hanna Finn Olga Tage"
).split()
CITIES = (
    "Oslo Lima Paris Cairo Tokyo Rome Berlin Madrid Dublin Vienna Quito Accra Seoul Lisbon "
    "Prague Nairobi Delhi Hanoi Bogota Riga Tunis Perth Kyoto Sofia"
).split()
CITIES = tuple(c for c in CITIES if c not in NAMES)  # "Sofia" is a name here, not a city
COLOURS = "red blue green yellow black white orange purple pink brown grey silver".split()
OBJECTS = (
    "lamp cup book chair kite clock hat bicycle guitar umbrella map key ring bag spoon "
    "candle drum mirror basket coat pen camera boat ball"
).split()
ANIMALS = "cat dog horse rabbit parrot goat fish turtle mouse owl duck pig".split()
JOBS = (
    "baker teacher doctor farmer pilot painter singer sailor nurse builder writer driver "
    "cook tailor miner judge"
).split()
FOODS = "bread soup rice apples cheese fish noodles cake plums beans eggs honey pears corn".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = (
    "January February March April May June July August September October November December"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    colour: str
    job: str
    pet: str
    food: str
    thing: str
    age: int
    friend: str


def make_world(seed: int, num_people: int = 32) -> dict[str, Person]:
    """The fixed cast of stream ``seed``: the same facts are true in every document."""
    rng = random.Random(f"world:{seed}")  # str seeds hash with sha512: stable across processes
    names = rng.sample(NAMES, num_people)
    people = {}
    for i, name in enumerate(names):
        people[name] = Person(
            name=name,
            city=rng.choice(CITIES),
            colour=rng.choice(COLOURS),
            job=rng.choice(JOBS),
            pet=rng.choice(ANIMALS),
            food=rng.choice(FOODS),
            thing=rng.choice(OBJECTS),
            age=rng.randint(18, 80),
            friend=names[(i + 1 + rng.randrange(num_people - 1)) % num_people],
        )
    return people


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _profile(rng: random.Random, world: dict[str, Person]) -> str:
    p = world[rng.choice(list(world))]
    facts = [
        f"{p.name} lives in {p.city}.",
        f"{p.name}'s favourite colour is {p.colour}.",
        f"{p.name} works as {_a(p.job)}.",
        f"{p.name} has a pet {p.pet}.",
        f"{p.name} likes to eat {p.food}.",
        f"{p.name} owns {_a(p.colour)} {p.thing}.",
        f"{p.name} is {p.age} years old.",
        f"{p.name}'s best friend is {p.friend}.",
    ]
    rng.shuffle(facts)
    out = facts[: rng.randint(3, len(facts))]
    if rng.random() < 0.5:
        out.append(f"Where does {p.name} live? {p.name} lives in {p.city}.")
    if rng.random() < 0.5:
        f = world[p.friend]
        out.append(f"{f.name} is the friend of {p.name}. {f.name} lives in {f.city}.")
    return " ".join(out)


def _arithmetic(rng: random.Random, world: dict[str, Person]) -> str:
    out = []
    for _ in range(rng.randint(3, 14)):
        op = rng.choice(("plus", "minus", "times"))
        if op == "plus":
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            c = a + b
        elif op == "minus":
            a = rng.randint(0, 30)
            b = rng.randint(0, a)
            c = a - b
        else:
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            c = a * b
        out.append(f"{a} {op} {b} is {c}.")
    return " ".join(out)


def _counting(rng: random.Random, world: dict[str, Person]) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        step = rng.randint(1, 5)
        start = rng.randint(0, 30)
        n = rng.randint(5, 20)
        seq = [str(start + step * k) for k in range(n)]
        return f"Counting by {step} from {start}: " + ", ".join(seq) + "."
    if kind == 1:
        start = rng.randint(10, 60)
        n = rng.randint(5, min(20, start + 1))
        seq = [str(start - k) for k in range(n)]
        return f"Counting down from {start}: " + ", ".join(seq) + "."
    if kind == 2:
        i = rng.randrange(len(LETTERS) - 4)
        j = rng.randint(i + 4, len(LETTERS) - 1)
        return f"The letters from {LETTERS[i]} to {LETTERS[j]} are " + ", ".join(LETTERS[i : j + 1]) + "."
    names = DAYS if rng.random() < 0.5 else MONTHS
    i = rng.randrange(len(names))
    out = []
    for k in range(rng.randint(3, 8)):
        a, b = names[(i + k) % len(names)], names[(i + k + 1) % len(names)]
        out.append(f"After {a} comes {b}.")
    return " ".join(out)


def _recall(rng: random.Random, world: dict[str, Person]) -> str:
    """A list stated once and repeated later: the copy is predictable only from context."""
    if rng.random() < 0.5:
        group = rng.sample(list(world), rng.randint(2, 6))
        city = rng.choice(CITIES)
        food = rng.choice(FOODS)
        return (
            f"{_join(group)} went to {city}. They ate {food} and saw {_a(rng.choice(COLOURS))} "
            f"{rng.choice(OBJECTS)}. Later, {_join(group)} came home from {city}."
        )
    items = rng.sample(OBJECTS, rng.randint(3, 8))
    return f"The list is: {', '.join(items)}. Again, the list is: {', '.join(items)}."


def _story(rng: random.Random, world: dict[str, Person]) -> str:
    p = world[rng.choice(list(world))]
    f = world[p.friend]
    day = rng.choice(DAYS)
    lines = [
        f"On {day}, {p.name} took the {p.colour} {p.thing} to {f.city}.",
        f"In {f.city}, {p.name} met {f.name}, who works as {_a(f.job)}.",
        f"They ate {f.food} together.",
    ]
    if rng.random() < 0.5:
        lines.append(f"{f.name}'s {f.pet} liked the {p.thing}.")
    lines.append(f"Then {p.name} went back to {p.city}.")
    return " ".join(lines)


PARAGRAPHS = (_profile, _arithmetic, _counting, _recall, _story)


def synthetic_document(seed: int, index: int, world: dict[str, Person] | None = None) -> str:
    """Document ``index`` of stream ``seed``: 1-6 paragraphs of mixed kinds, joined by blank lines.

    Pass ``world=make_world(seed)`` when generating many documents to skip rebuilding it.
    """
    if index < 0:
        raise ValueError(f"document index={index} must be >= 0")
    world = make_world(seed) if world is None else world
    rng = random.Random(f"doc:{seed}:{index}")
    return "\n\n".join(rng.choice(PARAGRAPHS)(rng, world) for _ in range(rng.randint(1, 6)))


class SyntheticText:
    """Indexable source: ``source[i]`` is document ``i`` of stream ``seed`` (infinite)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.world = make_world(seed)

    def __getitem__(self, index: int) -> str:
        return synthetic_document(self.seed, index, self.world)


def main() -> None:
    ap = argparse.ArgumentParser(description="print synthetic documents")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--n", type=int, default=3)
    args = ap.parse_args()
    src = SyntheticText(args.seed)
    for i in range(args.start, args.start + args.n):
        print(f"=== doc {i} ===\n{src[i]}\n")


if __name__ == "__main__":
    main()
