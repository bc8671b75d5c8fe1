"""Read an InstructLab-style taxonomy (folders of qna.yaml) into plain question/answer lists.

Kept separate from sdg/ on purpose: evaluation only needs the seed questions and answers.
"""
from __future__ import annotations

import random
from pathlib import Path

import yaml

from config import ConfigError


def read_leaves(taxonomy_dir: str) -> list[dict]:
    """Every qna.yaml under the folder -> {"name", "kind": "knowledge"|"skill", "qa": [{"question", "answer", "context"}]}."""
    root = Path(taxonomy_dir)
    if not root.is_dir():
        raise ConfigError(f"taxonomy folder '{taxonomy_dir}' not found (pass --taxonomy DIR holding qna.yaml files)")
    leaves = [_read_leaf(path, root) for path in sorted(root.rglob("qna.yaml"))]
    if not leaves:
        raise ConfigError(f"no qna.yaml files under '{taxonomy_dir}' (each taxonomy leaf is a folder with a qna.yaml)")
    return leaves


def _read_leaf(path: Path, root: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("seed_examples"), list) or not data["seed_examples"]:
        raise ConfigError(f"{path}: needs a non-empty 'seed_examples' list")
    qa = []
    for i, example in enumerate(data["seed_examples"], 1):
        where = f"{path}: seed_examples[{i}]"
        if not isinstance(example, dict):
            raise ConfigError(f"{where} must be a mapping")
        if "questions_and_answers" in example:  # knowledge leaf: one context, several Q/A pairs
            pairs = example["questions_and_answers"]
            if not isinstance(pairs, list):
                raise ConfigError(f"{where}.questions_and_answers must be a list of question/answer mappings")
            qa += [_pair(p, f"{where}.questions_and_answers[{j}]", example.get("context")) for j, p in enumerate(pairs, 1)]
        else:
            qa.append(_pair(example, where, example.get("context")))
    relative = path.parent.relative_to(root)
    kind = "knowledge" if relative.parts[:1] == ("knowledge",) or "document" in data else "skill"
    return {"name": "_".join(relative.parts) or root.name, "kind": kind, "qa": qa}


def _pair(item, where: str, context) -> dict:
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a mapping with 'question' and 'answer'")
    for key in ("question", "answer"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise ConfigError(f"{where}: missing or empty '{key}' (every seed example needs a question and an answer)")
    return {"question": item["question"].strip(), "answer": item["answer"].strip(), "context": context}


def knowledge_mmlu_rows(leaves: list[dict], seed: int = 42) -> list[dict]:
    """Knowledge Q/As as 4-choice MMLU rows; wrong choices are other answers of the same leaf (or taxonomy)."""
    knowledge = [leaf for leaf in leaves if leaf["kind"] == "knowledge"]
    if not knowledge:
        raise ConfigError("the taxonomy has no knowledge leaves (folders under knowledge/) to build MMLU questions from")
    all_answers = sorted({qa["answer"] for leaf in knowledge for qa in leaf["qa"]})
    if len(all_answers) < 4:
        raise ConfigError("the taxonomy's knowledge leaves need at least 4 distinct answers to build 4-choice questions")
    rows = []
    for leaf in knowledge:
        leaf_answers = sorted({qa["answer"] for qa in leaf["qa"]})
        for i, qa in enumerate(leaf["qa"]):
            # String seeds are hashed deterministically by `random`, so the same taxonomy gives the same questions.
            rng = random.Random(f"{seed}:{leaf['name']}:{i}")
            pool = [a for a in (leaf_answers if len(leaf_answers) >= 4 else all_answers) if a != qa["answer"]]
            choices = rng.sample(pool, 3) + [qa["answer"]]
            rng.shuffle(choices)
            rows.append({"question": qa["question"], "subject": leaf["name"], "choices": choices,
                         "answer": choices.index(qa["answer"])})
    return rows
