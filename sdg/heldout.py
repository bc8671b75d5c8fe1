"""The held-out split: seed question-answer pairs kept out of training so evaluation asks what training never showed.

A pair's place is decided by the SHA-256 of its normalized question and answer: the `fraction` of each leaf's
pairs with the smallest hashes is held out. The split happens before generation, so held-out pairs are neither
trained on nor shown to the teacher as examples, and generated pairs that repeat a held-out question are dropped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import string

HELDOUT_FRACTION = 0.5  # per leaf; 56 seed pairs in the sample knowledge leaf -> 28 held-out questions


def normalize(text: str) -> str:
    """Lowercase, no punctuation or articles, single spaces (SQuAD-style answer normalization)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d"))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def content_hash(*texts: str) -> str:
    return hashlib.sha256("\n".join(normalize(t) for t in texts).encode()).hexdigest()


def record_hash(record: dict) -> str:
    """A messages sample's content: its user and assistant turns (what a leak into training would repeat)."""
    return content_hash(*(m["content"] for m in record["messages"] if m["role"] in ("user", "assistant")))


def split_pairs(pairs: list[dict], fraction: float = HELDOUT_FRACTION) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs), each in the leaf's order; with 2+ pairs both parts get at least one."""
    if len(pairs) < 2 or fraction <= 0:
        return list(pairs), []
    count = min(max(1, round(fraction * len(pairs))), len(pairs) - 1)
    held = set(sorted(content_hash(p["question"], p["answer"]) for p in pairs)[:count])
    return ([p for p in pairs if content_hash(p["question"], p["answer"]) not in held],
            [p for p in pairs if content_hash(p["question"], p["answer"]) in held])


def split_leaf(leaf, fraction: float = HELDOUT_FRACTION):
    """(the leaf with only its training seeds, held-out pairs with the context they came with)."""
    data = leaf.data
    if leaf.kind == "knowledge":
        pairs = [{**qa, "context": seed["context"]} for seed in data["seed_examples"]
                 for qa in seed["questions_and_answers"]]
    else:
        pairs = [dict(seed) for seed in data["seed_examples"]]
    train, held = split_pairs(pairs, fraction)
    kept = {content_hash(p["question"], p["answer"]) for p in train}
    if leaf.kind == "knowledge":
        seeds = [{**seed, "questions_and_answers": qas} for seed in data["seed_examples"]
                 if (qas := [qa for qa in seed["questions_and_answers"]
                             if content_hash(qa["question"], qa["answer"]) in kept])]
    else:
        seeds = [s for s in data["seed_examples"] if content_hash(s["question"], s["answer"]) in kept]
    return dataclasses.replace(leaf, data={**data, "seed_examples": seeds}), held


def held_out_question(question: str, held: list[dict]) -> bool:
    """A generated question that repeats a held-out one (after normalization) would leak it into training."""
    wanted = normalize(question)
    return any(wanted == normalize(p["question"]) or wanted.endswith(" " + normalize(p["question"])) for p in held)
