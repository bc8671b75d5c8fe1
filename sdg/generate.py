"""The pipelines: taxonomy leaves in, messages-format train/test JSONL out.

skills:          new questions from the seeds -> answers -> judge -> dedup
grounded skills: new contexts -> a question about each -> answers -> judge -> dedup
knowledge:       document chunks -> question-answer pairs grounded in a chunk -> faithfulness judge -> dedup

Prompts are the editable Jinja templates in sdg/prompts/ (or --prompts-dir). Every stage counts what it asked,
found in the cache, could not parse, and kept; the counts are printed and saved to OUT/stats.json.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter
from pathlib import Path

import jinja2

from config import ConfigError
from sdg.heldout import HELDOUT_FRACTION, held_out_question, record_hash, split_leaf
from sdg.mix import write_jsonl_atomic
from sdg.parse import (deduplicate, parse_answer, parse_context, parse_qa_pair, parse_question, parse_score,
                       reaches_cut)
from sdg.taxonomy import Leaf, mmlu_subject
from sdg.teacher import Teacher, job_id

PROMPTS_DIR = Path(__file__).parent / "prompts"
TEMPLATES = ("skill_question", "grounded_context", "grounded_question", "answer", "judge_answer", "knowledge_qa",
             "judge_faithful")


@dataclasses.dataclass
class Settings:
    num_instructions: int = 10  # generation requests per leaf
    judge_threshold: int = 3  # keep pairs the judge scores at least this (1-5); 0 skips the judge
    dedup_threshold: float = 0.9  # ROUGE-L F1 at or above this is a near duplicate; 1.0 = exact match only
    max_tokens: int = 256  # per answer / question-answer pair
    temperature: float = 0.7
    chunk_words: int = 180
    restatements: int = 2  # extra copies of each knowledge seed's context, sentences reordered (restated)
    examples_per_prompt: int = 3
    system_prompt: str | None = None
    heldout_fraction: float = HELDOUT_FRACTION  # of each leaf's seed pairs, kept out of training for evaluation


def load_templates(prompts_dir: Path) -> dict[str, jinja2.Template]:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(prompts_dir)), undefined=jinja2.StrictUndefined)
    templates = {}
    for name in TEMPLATES:
        try:
            templates[name] = env.get_template(f"{name}.jinja")
        except jinja2.TemplateNotFound:
            raise ConfigError(f"prompt template {prompts_dir / (name + '.jinja')} not found; "
                              f"copy it from {PROMPTS_DIR}") from None
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"{e.filename}:{e.lineno}: template syntax error: {e.message}") from None
    return templates


def render(templates, name: str, **values) -> str:
    try:
        return templates[name].render(**values)
    except jinja2.UndefinedError as e:
        raise ConfigError(f"prompt template {name}.jinja: {e.message}; available: {', '.join(sorted(values))}") from None


def chunk_document(text: str, words: int) -> list[str]:
    """Chunks of at most `words` words (plus a heading) along paragraph boundaries; a longer paragraph is cut at
    sentence ends (a longer sentence at `words`). A heading starts a chunk and stays with the text after it."""
    pieces = []
    for paragraph in (p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()):
        pieces += [paragraph] if len(paragraph.split()) <= words else _cut(paragraph, words)
    chunks, current, size = [], [], 0
    for piece in pieces:
        n = len(piece.split())
        heading = piece.startswith("#")
        if current and (size + n > words or heading) and not current[-1].startswith("#"):
            chunks.append("\n\n".join(current))
            current, size = [], 0
        current.append(piece)
        size += n
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _cut(paragraph: str, words: int) -> list[str]:
    """A paragraph as pieces of at most `words` words, ending at sentence ends where a sentence fits."""
    pieces, current = [], []
    for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
        tokens = sentence.split()
        while len(tokens) > words:  # one sentence longer than a chunk: cut it by words
            if current:
                pieces.append(" ".join(current))
                current = []
            pieces.append(" ".join(tokens[:words]))
            tokens = tokens[words:]
        if current and len(current) + len(tokens) > words:
            pieces.append(" ".join(current))
            current = []
        current += tokens
    return pieces + ([" ".join(current)] if current else [])


class Stage:
    """One teacher stage of one leaf: build jobs, ask, parse, and count every outcome."""

    def __init__(self, teacher: Teacher, leaf: Leaf, name: str, stats: dict):
        self.teacher, self.leaf, self.name = teacher, leaf, name
        self.counts = stats.setdefault(name, Counter())
        self.jobs: list[dict] = []

    def add(self, prompt: str, max_tokens: int, temperature: float, index: int, payload=None):
        seed = index  # a different but reproducible sample per job
        job = {"id": job_id(self.leaf.name, self.name, prompt, max_tokens, temperature, seed, self.teacher.model),
               "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "seed": seed, "payload": payload}
        self.jobs.append(job)

    def run(self, parse) -> list[tuple[object, object]]:
        """(payload, parsed) for every reply that parsed."""
        cache_name = f"{self.leaf.name.replace('/', '__')}.{self.name}"
        replies, counts = self.teacher.ask(cache_name, self.jobs, label=f"{self.leaf.name.rsplit('/', 1)[-1]} {self.name}")
        self.counts.update(counts)
        results = []
        for job in self.jobs:
            if job["id"] not in replies:
                continue
            reply = replies[job["id"]]
            parsed = parse(reply["reply"])
            if parsed is not None and reply.get("finish_reason") == "length" and reaches_cut(reply["reply"], parsed):
                self.counts["truncated"] += 1  # cut off mid-answer at max_tokens: never trained on
                continue
            self.counts["parsed" if parsed is not None else "unparsable"] += 1
            if parsed is not None:
                results.append((job["payload"], parsed))
        return results


def _seeds(leaf: Leaf) -> list[dict]:
    return [{"question": s["question"], "answer": s["answer"], "context": s.get("context")} for s in leaf.data["seed_examples"]]


def _pick(items: list, k: int, leaf: Leaf, index: int) -> list:
    return random.Random(f"{leaf.name}:{index}").sample(items, min(k, len(items)))


def _judge(teacher, leaf, templates, settings, stats, pairs: list[dict], template: str, extra) -> list[dict]:
    if settings.judge_threshold <= 0:
        return pairs
    stage = Stage(teacher, leaf, "judge", stats)
    for pair in pairs:
        prompt = render(templates, template, question=pair["question"], answer=pair["answer"], **extra(pair))
        stage.add(prompt, max_tokens=16, temperature=0.0, index=pair["origin"], payload=pair)
    kept = []
    for pair, score in stage.run(parse_score):
        pair["score"] = score
        if score >= settings.judge_threshold:
            kept.append(pair)
    stage.counts["kept"] = len(kept)
    stage.counts["rejected"] = stage.counts["parsed"] - len(kept)
    return kept


def skill_pairs(teacher, leaf, templates, settings, stats) -> list[dict]:
    seeds = _seeds(leaf)
    task = leaf.data["task_description"]
    k, n = settings.examples_per_prompt, settings.num_instructions
    if leaf.grounded:
        grounded = [s for s in seeds if s["context"]]  # InstructLab lets some seeds of a grounded skill go without
        contexts = Stage(teacher, leaf, "contexts", stats)
        for i in range(n):
            examples = [s["context"] for s in _pick(grounded, min(k, 2), leaf, i)]
            contexts.add(render(templates, "grounded_context", task_description=task, examples=examples),
                         settings.max_tokens, settings.temperature, i, payload=i)
        questions = Stage(teacher, leaf, "questions", stats)
        # each later request is numbered by the first one it came from, not by its place among the replies that
        # parsed: a request that failed once and later succeeds shifts no other prompt, so the cache still hits
        for origin, context in contexts.run(parse_context):
            example = _pick(grounded, 1, leaf, origin)[0]
            questions.add(render(templates, "grounded_question", task_description=task, context=context,
                                 example_context=example["context"], example_question=example["question"]),
                          64, settings.temperature, origin, payload={"origin": origin, "context": context})
    else:
        questions = Stage(teacher, leaf, "questions", stats)
        for i in range(n):
            examples = [s["question"] for s in _pick(seeds, k, leaf, i)]
            questions.add(render(templates, "skill_question", task_description=task, examples=examples),
                          64, settings.temperature, i, payload={"origin": i, "context": None})
    answers = Stage(teacher, leaf, "answers", stats)
    for asked, question in questions.run(parse_question):
        origin, context = asked["origin"], asked["context"]
        prompt = render(templates, "answer", task_description=task, examples=_pick(seeds, min(k, 2), leaf, origin),
                        question=question, context=context)
        answers.add(prompt, settings.max_tokens, settings.temperature, origin,
                    payload={"origin": origin, "question": question, "context": context})
    pairs = [dict(payload, answer=answer) for payload, answer in answers.run(parse_answer)]
    return _judge(teacher, leaf, templates, settings, stats, pairs, "judge_answer",
                  lambda pair: {"task_description": task, "context": pair["context"]})


def knowledge_pairs(teacher, leaf, templates, settings, stats) -> list[dict]:
    chunks = [c for path in leaf.documents for c in chunk_document(path.read_text(encoding="utf-8"), settings.chunk_words)]
    if not chunks:
        raise ConfigError(f"{leaf.path}: its documents ({', '.join(map(str, leaf.documents))}) hold no text")
    stats["chunks"] = Counter(documents=len(leaf.documents), chunks=len(chunks))
    seeds = leaf.data["seed_examples"]
    stage = Stage(teacher, leaf, "qa_pairs", stats)
    for i in range(max(settings.num_instructions, len(chunks))):  # every chunk is asked about at least once
        chunk = chunks[i % len(chunks)]
        seed = seeds[i % len(seeds)]
        prompt = render(templates, "knowledge_qa", domain=leaf.data["domain"], document_outline=leaf.data["document_outline"],
                        example_context=seed["context"], example_qas=seed["questions_and_answers"], chunk=chunk)
        stage.add(prompt, settings.max_tokens, settings.temperature, i, payload=(i, chunk))
    pairs = [{"question": q, "answer": a, "context": None, "chunk": chunk, "origin": origin}
             for (origin, chunk), (q, a) in stage.run(parse_qa_pair)]
    return _judge(teacher, leaf, templates, settings, stats, pairs, "judge_faithful", lambda pair: {"chunk": pair["chunk"]})


def to_messages(question: str, answer: str, context: str | None, leaf: Leaf, pipeline: str, settings: Settings) -> dict:
    user = f"{context.strip()}\n\n{question}" if context else question
    messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "metadata": {"leaf": leaf.name, "kind": leaf.kind, "pipeline": pipeline}}


def heldout_record(pair: dict, leaf: Leaf, settings: Settings) -> dict:
    """A held-out seed pair for evaluation (never trained on), with what eval.heldout needs in its metadata."""
    context = pair.get("context") if leaf.kind == "skill" else None  # knowledge questions are asked without it
    record = to_messages(pair["question"], pair["answer"], context, leaf, "heldout", settings)
    record["metadata"].update(question=pair["question"], answer=pair["answer"],
                              sha256=record_hash(record))
    return record


def taxonomy_samples(leaf: Leaf, settings: Settings) -> tuple[list[dict], Counter]:
    """What the taxonomy itself teaches, whatever the teacher does: the training seed pairs, and for knowledge
    the documents chunked as raw text (role pretraining, every token trained: continual pretraining), each seed
    context restated (`restate`) and the training pairs as MMLU-format practice (letters and continuation)."""
    samples = [to_messages(p["question"], p["answer"], p.get("context") if leaf.kind == "skill" else None,
                           leaf, "seed", settings) for p in _training_pairs(leaf)]
    chunks = [c for path in leaf.documents for c in chunk_document(path.read_text(encoding="utf-8"),
                                                                   settings.chunk_words)]
    contexts = [seed["context"] for seed in leaf.data["seed_examples"]] if leaf.kind == "knowledge" else []
    restated = [r for i, c in enumerate(contexts) for r in restate(c, settings.restatements, f"{leaf.name}:{i}")]
    seeds = len(samples)
    samples += [{"messages": [{"role": "pretraining", "content": c}],
                 "metadata": {"leaf": leaf.name, "kind": leaf.kind, "pipeline": pipeline}}
                for texts, pipeline in ((chunks, "document"), (restated, "restated_context")) for c in texts]
    choice = multiple_choice_samples(leaf) if leaf.kind == "knowledge" else []
    return samples + choice, Counter(seed_pairs=seeds, document_chunks=len(chunks), restated_contexts=len(restated),
                                     multiple_choice=len(choice))


def restate(text: str, count: int, seed: str) -> list[str]:
    """`count` copies of a passage (a seed's context, an excerpt of the documents), each with its sentences in
    another seeded order. The same facts in new places and neighbours: trained on the documents as written, a
    small model learns to continue them; restated, it learns the facts well enough to answer questions about
    them, as the permutation augmentation of Allen-Zhu and Li (Physics of Language Models 3.1) showed. Measured in
    README "Learning you can see"."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    rng = random.Random(f"{seed}:restated")
    seen, copies = {tuple(range(len(sentences)))}, []
    for _ in range(count):  # each copy a new order: fewer copies when a passage has too few sentences for them
        order = next((o for o in (tuple(rng.sample(range(len(sentences)), len(sentences))) for _ in range(100))
                      if o not in seen), None)
        if order is None:
            break
        seen.add(order)
        copies.append(" ".join(sentences[i] for i in order))
    return copies


def multiple_choice_samples(leaf: Leaf) -> list[dict]:
    """The training seed pairs once more in both of lm-eval's MMLU prompts (raw text): as 4-choice questions
    answered by letter (distractors from the other training answers) and in the continuation form, the answer's
    own text after "Question: ...\nAnswer:". A 135M model learns the formats from these, the facts of the
    held-out questions only from the documents."""
    from eval.mmlu_tasks import continuation_prompt, mmlu_prompt

    pairs = _training_pairs(leaf)
    answers = list(dict.fromkeys(p["answer"] for p in pairs))
    subject = mmlu_subject(leaf.name)
    texts = []
    for i, p in enumerate(pairs):
        pool = [a for a in answers if a != p["answer"]]
        if len(pool) < 3:
            return []
        rng = random.Random(f"{leaf.name}:choices:{i}")
        choices = rng.sample(pool, 3) + [p["answer"]]
        rng.shuffle(choices)
        texts.append(mmlu_prompt(subject, p["question"], choices) + " " + "ABCD"[choices.index(p["answer"])])
        texts.append(continuation_prompt(subject, p["question"]) + " " + p["answer"])
    return [{"messages": [{"role": "pretraining", "content": text}],
             "metadata": {"leaf": leaf.name, "kind": leaf.kind, "pipeline": "multiple_choice"}} for text in texts]


def _training_pairs(leaf: Leaf) -> list[dict]:
    if leaf.kind == "knowledge":
        return [qa for seed in leaf.data["seed_examples"] for qa in seed["questions_and_answers"]]
    return list(leaf.data["seed_examples"])


def generate(leaves: list[Leaf], teacher: Teacher, output_dir: Path, settings: Settings,
             prompts_dir: Path = PROMPTS_DIR) -> dict:
    templates = load_templates(prompts_dir)
    train, test, report = [], [], {}
    for full_leaf in leaves:
        leaf, held = split_leaf(full_leaf, settings.heldout_fraction)  # before the teacher sees any seed
        pipeline = "knowledge" if leaf.kind == "knowledge" else "grounded_skills" if leaf.grounded else "skills"
        stats: dict = {}
        make_pairs = knowledge_pairs if leaf.kind == "knowledge" else skill_pairs
        pairs = make_pairs(teacher, leaf, templates, settings, stats)
        kept, exact, near = deduplicate(
            pairs, key=lambda p: f"{p['context'] or ''}\n{p['question']}", near_threshold=settings.dedup_threshold)
        clean = [p for p in kept if not held_out_question(p["question"], held)]
        stats["dedup"] = Counter(input=len(pairs), exact_duplicates=exact, near_duplicates=near,
                                 held_out_questions=len(kept) - len(clean), kept=len(clean))
        own, stats["taxonomy"] = taxonomy_samples(leaf, settings)
        stats["taxonomy"]["held_out"] = len(held)
        train += [to_messages(p["question"], p["answer"], p["context"], leaf, pipeline, settings) for p in clean] + own
        test += [heldout_record(p, full_leaf, settings) for p in held]
        report[leaf.name] = {"pipeline": pipeline, "stages": {k: dict(v) for k, v in stats.items()},
                             "samples": len(clean) + len(own), "generated": len(clean),
                             "requested": settings.num_instructions, "held_out": len(held)}
        if len(clean) < settings.num_instructions / 2:
            report[leaf.name]["note"] = (f"the teacher's output was mostly rejected ({len(clean)} of "
                                         f"{settings.num_instructions} requests kept): this leaf trains mainly on "
                                         f"its {sum(stats['taxonomy'].values()) - len(held)} seed pairs and "
                                         "document chunks; a stronger teacher (--endpoint) gives more")
    output_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(output_dir / "train.jsonl", train)
    write_jsonl_atomic(output_dir / "test.jsonl", test)
    summary = {"leaves": report, "train_samples": len(train), "test_samples": len(test),
               "requests": dict(teacher.counts), "teacher": {"endpoint": teacher.endpoint, "model": teacher.model},
               "settings": dataclasses.asdict(settings)}
    tmp = output_dir / ".stats.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(output_dir / "stats.json")
    return summary


def format_report(summary: dict) -> str:
    lines = []
    for name, leaf in summary["leaves"].items():
        lines.append(f"{name} ({leaf['pipeline']}): {leaf['samples']} samples, {leaf['held_out']} held out")
        if leaf.get("note"):
            lines.append(f"  note: {leaf['note']}")
        for stage, counts in leaf["stages"].items():
            lines.append(f"  {stage:<10} " + "  ".join(f"{k}={v}" for k, v in counts.items()))
    requests = summary["requests"]
    lines.append(f"train: {summary['train_samples']}  test (held-out seeds): {summary['test_samples']}  "
                 f"requests sent: {requests.get('sent', 0)}  from cache: {requests.get('cached', 0)}  "
                 f"rejected: {requests.get('failed', 0)}")
    cut = sum(c.get("truncated", 0) for leaf in summary["leaves"].values() for c in leaf["stages"].values())
    if cut:
        lines.append(f"{cut} replies stopped at max_tokens inside the text kept and were dropped (truncated=); "
                     "raise --max-tokens to keep them")
    return "\n".join(lines)
