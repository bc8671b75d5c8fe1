"""Read what a (small, messy) teacher wrote, and drop duplicates.

Parsers return None for a reply they cannot use; the pipeline counts those and moves on.
"""
from __future__ import annotations

import re
import string

from rouge_score import rouge_scorer

# A label at the start of a line, however the model decorates it: "Question:", "**Q1.**", "2) Answer -", "### Context:".
_LABEL = r"(?im)^[ \t>#*_\-\d.)]*(?:{names})[ \t]*\d*[ \t*_]*[:.)\-][ \t*_]*"
QUESTION_LABEL = re.compile(_LABEL.format(names="question|q"))
ANSWER_LABEL = re.compile(_LABEL.format(names="answer|a|response"))
CONTEXT_LABEL = re.compile(_LABEL.format(names="context|passage|notes|text"))
_BULLET = re.compile(r"^\s*(?:[-*•>]|\d+\s*[.):]|#+)\s*")
_CHAT_TOKENS = re.compile(r"<\|[^|>]*\|>|</?s>")
_STATED_SCORE = re.compile(r"\bscore\s*[:=]?\s*\**\s*(\d+)(?![\d.]\d)", re.I)
_ECHOED_RANGE = re.compile(r"\bfrom\s+\d+\s*(?:\([^)]*\))?\s*to\s+\d+", re.I)


def _tidy(text: str) -> str:
    return text.strip().strip("*_ \t\n").strip('"“”').strip()


def _after_label(text: str, label: re.Pattern) -> str | None:
    """Text after the first `label`, up to the next label of any kind (small models keep writing the pattern)."""
    found = label.search(text)
    if not found:
        return None
    rest = text[found.end():]
    stops = [m.start() for pattern in (QUESTION_LABEL, ANSWER_LABEL, CONTEXT_LABEL) if (m := pattern.search(rest))]
    return rest[: min(stops)] if stops else rest


def parse_question(text: str, min_chars: int = 10, max_chars: int = 600) -> str | None:
    text = _CHAT_TOKENS.sub("", text)  # leaked special tokens would hide a leading label
    labelled = _after_label(text, QUESTION_LABEL)
    if labelled is None:
        # Skip chatty preambles such as "Sure! Here is a new question:".
        lines = [line for line in text.splitlines() if line.strip() and not line.rstrip().endswith(":")]
        labelled = _BULLET.sub("", lines[0]) if lines else ""
    question = _tidy(labelled)
    return question if min_chars <= len(question) <= max_chars else None


def parse_answer(text: str, min_chars: int = 2) -> str | None:
    return _parse_labelled(text, ANSWER_LABEL, min_chars)


def parse_context(text: str, min_chars: int = 40) -> str | None:
    return _parse_labelled(text, CONTEXT_LABEL, min_chars)


def _parse_labelled(text: str, label, min_chars: int) -> str | None:
    """The text after `label`, or, unlabelled, the whole reply minus any follow-up question the model invented."""
    text = _CHAT_TOKENS.sub("", text)  # leaked special tokens would hide a leading label
    labelled = _after_label(text, label)
    if labelled is None:
        follow_up = QUESTION_LABEL.search(text)
        labelled = text[: follow_up.start()] if follow_up and follow_up.start() > 0 else text
    found = _tidy(labelled)
    return found if len(found) >= min_chars else None


def parse_qa_pair(text: str) -> tuple[str, str] | None:
    text = _CHAT_TOKENS.sub("", text)  # leaked special tokens would hide a leading label
    question = _after_label(text, QUESTION_LABEL)
    answer = _after_label(text, ANSWER_LABEL)
    if question is None and answer is None:
        # No labels at all, as in "Here is one:\nWhat makes bread rise? The yeast.": split after the first "?".
        body = "\n".join(line for line in text.splitlines() if not line.rstrip().endswith(":"))
        question, mark, answer = body.partition("?")
        question, answer = (_BULLET.sub("", question.strip()) + "?", answer) if mark else (None, None)
    if question is None or answer is None:
        return None
    question, answer = parse_question(question), parse_answer(answer)
    return (question, answer) if question and answer else None


def parse_score(text: str, low: int = 1, high: int = 5) -> int | None:
    """The judge's score: the last 'Score: N' in range, else the first whole number in range once an echo of the
    instruction's range ('from 1 (useless) to 5') is taken out: '4', 'I rate it **5**.', '2 out of 5'."""
    text = _CHAT_TOKENS.sub("", text)
    stated = [int(m.group(1)) for m in _STATED_SCORE.finditer(text) if low <= int(m.group(1)) <= high]
    if stated:
        return stated[-1]
    for match in re.finditer(r"(?<![\d.])\d+(?![\d.]\d)", _ECHOED_RANGE.sub(" ", text)):
        value = int(match.group())
        if low <= value <= high:
            return value
    return None


def reaches_cut(reply: str, parsed) -> bool:
    """Whether what a parser kept runs into the end of a reply that the teacher's max_tokens cut off: a question
    followed by the start of another is whole, an answer that ends where the reply stopped is not."""
    if not isinstance(parsed, (str, tuple)):  # a score is whole once read
        return False
    kept = re.sub(r"\W+", "", " ".join(parsed) if isinstance(parsed, tuple) else parsed)
    tail = re.sub(r"\W+", "", " ".join(_CHAT_TOKENS.sub("", reply).split()[-3:]))
    return bool(tail) and kept.endswith(tail)


def normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def deduplicate(samples: list[dict], key, near_threshold: float) -> tuple[list[dict], int, int]:
    """Keep the first of each group: exact after normalization, then ROUGE-L F1 >= near_threshold.

    Returns (kept, exact duplicates, near duplicates). Pairwise against kept samples, so quadratic: fine for the
    thousands of samples one taxonomy yields.
    """
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    seen: set[str] = set()
    kept, kept_texts = [], []
    exact = near = 0
    for sample in samples:
        text = key(sample)
        normal = normalize(text)
        if normal in seen:
            exact += 1
            continue
        if near_threshold < 1.0 and any(scorer.score(other, text)["rougeL"].fmeasure >= near_threshold for other in kept_texts):
            near += 1
            continue
        seen.add(normal)
        kept.append(sample)
        kept_texts.append(text)
    return kept, exact, near
