"""A generated English-like corpus for the examples: no download, the same text on every machine.

Sentences come from a small grammar (subjects, verbs, objects, places, times) driven by a seeded
random generator, so a character-level model has real structure to learn: spelling, word order,
agreement, punctuation.
"""

import random

SUBJECTS = [
    "the old sailor",
    "a young fox",
    "the baker",
    "my sister",
    "the tired horse",
    "a quiet student",
    "the river pilot",
    "our neighbour",
    "the night guard",
    "a small crow",
]
VERBS = ["carries", "watches", "paints", "finds", "follows", "repairs", "counts", "hides", "sells", "remembers"]
OBJECTS = [
    "a wooden boat",
    "the silver key",
    "three red apples",
    "an empty basket",
    "the broken clock",
    "a letter from home",
    "the northern map",
    "two heavy stones",
    "a bright lantern",
    "the last coin",
]
PLACES = [
    "near the harbour",
    "behind the mill",
    "under the bridge",
    "in the market",
    "by the frozen lake",
    "at the edge of town",
    "inside the tower",
    "along the canal",
]
TIMES = ["every morning", "before the storm", "after supper", "at midnight", "in early spring", "on market day"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
    if rng.random() < 0.6:
        words.append(rng.choice(PLACES))
    if rng.random() < 0.4:
        words.append(rng.choice(TIMES))
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", ".", "!", "?"])


def generate(n_chars: int = 400_000, seed: int = 0) -> str:
    """About `n_chars` characters of text, paragraphs of 3-6 sentences."""
    rng = random.Random(seed)
    parts, size = [], 0
    while size < n_chars:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(3, 6))) + "\n"
        parts.append(paragraph)
        size += len(paragraph)
    return "".join(parts)
