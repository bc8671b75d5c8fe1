"""sdg/taxonomy.py, the one taxonomy reader: InstructLab's schemas and rules on the real public taxonomy, problems at
their file:line, and sdg, eval and phases agreeing on every leaf's name and kind."""
import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT
from instructlab.schema.taxonomy import TaxonomyParser

import phases
from eval.heldout import read_heldout
from eval.mt_bench import taxonomy_questions
from eval.taxonomy import knowledge_mmlu_rows
from sdg.generate import Settings, heldout_record, taxonomy_samples
from sdg.heldout import split_leaf
from sdg.taxonomy import load_taxonomy, mmlu_subject, qa_pairs, validate_taxonomy

PUBLIC = ROOT / "tests" / "data" / "instructlab_taxonomy"  # github.com/instructlab/taxonomy, see its README.md
SAMPLE = ROOT / "sdg" / "sample_taxonomy"


def instructlab_errors(path: Path) -> int:
    """What InstructLab's own parser (as `ilab taxonomy diff` runs it) counts as errors in one file."""
    return TaxonomyParser(schema_version=0, yamllint_strict=True, message_format="logging").parse(path).errors


def test_public_instructlab_taxonomy_validates():
    leaves, problems = validate_taxonomy(PUBLIC)
    assert problems == []
    kinds = {leaf.name: (leaf.kind, leaf.grounded) for leaf in leaves}
    assert len(kinds) == 16 == len(list(PUBLIC.rglob("qna.yaml")))
    foundational = [name for name in kinds if name.startswith("foundational_skills/")]
    assert len(foundational) == 11 and all(kinds[name] == ("skill", False) for name in foundational)
    assert all("version" not in leaf.data for leaf in leaves if leaf.name in foundational)  # version 1 files
    assert kinds["compositional_skills/grounded/linguistics/inclusion"] == ("skill", True)
    assert kinds["compositional_skills/linguistics/synonyms"] == ("skill", False)
    assert [n for n, (kind, _) in kinds.items() if kind == "knowledge"] == [
        "knowledge/arts/music/fandom/swifties", "knowledge/science/animals/birds/black_capped_chickadee"]
    assert all(instructlab_errors(leaf.path) == 0 for leaf in leaves)


def line_of(text: str, start: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(start))


def test_broken_copy_reports_each_problem_at_its_line(tmp_path):
    root = tmp_path / "taxonomy"
    shutil.copytree(PUBLIC, root)
    edits = {}

    def edit(leaf: str, change):
        path = root / leaf / "qna.yaml"
        path.write_text(change(path.read_text()))
        edits[leaf] = path
        return path.read_text()

    causal = "foundational_skills/reasoning/logical_reasoning/causal"  # version 1: created_by is required
    edit(causal, lambda t: t.replace("created_by: IBM\n", ""))
    synonyms = "compositional_skills/linguistics/synonyms"
    text = edit(synonyms, lambda t: t.replace("created_by: yanpliu", "created_by: [yanpliu, another]"))
    type_line = line_of(text, "created_by:")
    mathematical = "foundational_skills/reasoning/mathematical_reasoning"  # 3 seeds: enough for version 1 only
    text = edit(mathematical, lambda t: "version: 3\n" + t)
    seeds_line = line_of(text, "seed_examples:") + 1  # the list itself, its first item
    chickadee = "knowledge/science/animals/birds/black_capped_chickadee"
    text = edit(chickadee, lambda t: t.replace("domain: animals", "domain: [animals"))
    yaml_line = line_of(text, "domain:") + 1  # the parser notices at the next key

    leaves, problems = validate_taxonomy(root)
    where = {leaf: str(path) for leaf, path in edits.items()}
    assert problems == [
        f"{where[synonyms]}:{type_line}: created_by must be a string, got list ['yanpliu', 'another']",
        f"{where[causal]}:1: top level is missing required key(s) 'created_by'",
        f"{where[mathematical]}:{seeds_line}: seed_examples has 3 seed examples, at least 5 are needed in an "
        "InstructLab taxonomy version 3 file; add more",
        f"{where[chickadee]}:{yaml_line}: invalid YAML: expected ',' or ']', but got ':' (check indentation and quoting)",
    ], problems
    assert len(leaves) == 12
    # InstructLab's own parser rejects the same files (the bad YAML one it cannot even read)
    assert all(instructlab_errors(edits[leaf]) > 0 for leaf in (causal, synonyms, mathematical))


def test_yamllint_runs_from_version_2_as_in_instructlab(tmp_path):
    seeds = "".join(f"  - question: q{i}\n    answer: a{i}\n" for i in range(5))
    for name, version in (("v1", ""), ("v3", "version: 3\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "qna.yaml").write_text(f"{version}created_by: me\ntask_description: t  \nseed_examples:\n{seeds}")
    leaves, problems = validate_taxonomy(tmp_path)
    assert [leaf.name for leaf in leaves] == ["v1"]
    assert problems == [f"{tmp_path}/v3/qna.yaml:3: trailing spaces (yamllint trailing-spaces)"]
    assert instructlab_errors(tmp_path / "v3" / "qna.yaml") == 1 and instructlab_errors(tmp_path / "v1" / "qna.yaml") == 0


@pytest.fixture
def moved(tmp_path):
    """The sample's leaves outside knowledge/ and compositional_skills/: InstructLab then reads a `document` as
    knowledge (the readers used to disagree here)."""
    root = tmp_path / "moved"
    shutil.copytree(SAMPLE / "knowledge" / "places" / "marrowick", root / "places" / "marrowick")
    shutil.copytree(SAMPLE / "compositional_skills" / "writing", root / "writing")
    return root


@pytest.mark.parametrize("taxonomy", ["public", "sample", "moved"])
def test_sdg_eval_and_phases_agree_on_names_and_kinds(taxonomy, moved, tmp_path):
    root = {"public": PUBLIC, "sample": SAMPLE, "moved": moved}[taxonomy]
    leaves = load_taxonomy(root, fetch=False)
    kinds = {leaf.name: leaf.kind for leaf in leaves}
    knowledge = {name for name, kind in kinds.items() if kind == "knowledge"}
    assert knowledge and set(kinds) - knowledge
    if taxonomy == "moved":
        assert kinds == {"places/marrowick": "knowledge", "writing/thank_you_notes": "skill"}

    # eval: MT-Bench questions name every leaf, MMLU rows every knowledge leaf
    questions = taxonomy_questions(str(root))
    assert list(dict.fromkeys(q["category"] for q in questions)) == list(kinds)
    assert [q["question_id"] for q in questions] == [f"{leaf.name}/{i}" for leaf in leaves
                                                     for i in range(1, len(qa_pairs(leaf)) + 1)]
    assert {r["subject"] for r in knowledge_mmlu_rows(leaves)} == {mmlu_subject(name) for name in knowledge}

    # phases: the generated records split by the same kinds; held-out records carry the same names and kinds
    settings = Settings()
    records = [r for leaf in leaves for r in taxonomy_samples(split_leaf(leaf)[0], settings)[0]]
    held = [heldout_record(p, leaf, settings) for leaf in leaves for p in split_leaf(leaf)[1]]
    for path, rows in ((tmp_path / "train.jsonl", records), (tmp_path / "test.jsonl", held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    phases.main(["split", str(tmp_path / "train.jsonl"), str(tmp_path / "split")])
    for part, names in (("knowledge", knowledge), ("skills", set(kinds) - knowledge)):
        rows = [json.loads(line) for line in (tmp_path / "split" / f"{part}.jsonl").read_text().splitlines()]
        assert {r["metadata"]["leaf"] for r in rows} == names
    heldout = read_heldout(str(tmp_path / "test.jsonl"))
    assert {leaf: recs[0]["metadata"]["kind"] for leaf, recs in heldout.items()} == kinds
