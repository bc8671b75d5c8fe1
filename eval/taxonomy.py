"""Taxonomy knowledge as MMLU-style questions; the leaves come from the one taxonomy reader, sdg/taxonomy.py."""
from __future__ import annotations

import random

from config import ConfigError
from sdg.taxonomy import Leaf, mmlu_subject, qa_pairs


def knowledge_mmlu_rows(leaves: list[Leaf], seed: int = 42) -> list[dict]:
    """Knowledge Q/As as 4-choice MMLU rows; wrong choices are other answers of the same leaf (or taxonomy)."""
    knowledge = [(mmlu_subject(leaf.name), [{k: qa[k].strip() for k in ("question", "answer")} for qa in qa_pairs(leaf)])
                 for leaf in leaves if leaf.kind == "knowledge"]
    if not knowledge:
        raise ConfigError("the taxonomy has no knowledge leaves (folders under knowledge/, or leaves with a document) "
                          "to build MMLU questions from")
    all_answers = sorted({qa["answer"] for _, pairs in knowledge for qa in pairs})
    if len(all_answers) < 4:
        raise ConfigError("the taxonomy's knowledge leaves need at least 4 distinct answers to build 4-choice questions")
    rows = []
    for subject, pairs in knowledge:
        leaf_answers = sorted({qa["answer"] for qa in pairs})
        for i, qa in enumerate(pairs):
            # String seeds are hashed deterministically by `random`, so the same taxonomy gives the same questions.
            rng = random.Random(f"{seed}:{subject}:{i}")
            pool = [a for a in (leaf_answers if len(leaf_answers) >= 4 else all_answers) if a != qa["answer"]]
            choices = rng.sample(pool, 3) + [qa["answer"]]
            rng.shuffle(choices)
            rows.append({"question": qa["question"], "subject": subject, "choices": choices,
                         "answer": choices.index(qa["answer"])})
    return rows
