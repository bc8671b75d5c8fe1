"""Local MMLU-format files -> lm-eval task configs that reuse lm-eval's own MMLU template (prompt, choices, metric).

Accepted layout under --data-dir: JSONL, CSV or parquet files whose name marks the split: `test.jsonl` /
`dev.jsonl` (all subjects, `subject` column), `SUBJECT_test.csv` / `SUBJECT_dev.csv` (one file per subject), or
`SUBJECT/test-00000-of-00001.parquet` (the Hugging Face cais/mmlu layout). Columns: question, subject, choices
(4 strings), answer (index 0-3).
"""
from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path

import yaml

from config import ConfigError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
TASK_PREFIX = "minilab_mmlu"
COLUMNS = ("question", "choices", "answer")


# lm-eval's two MMLU formulations: letters (the published MMLU score) and continuation, where each choice's text is
# scored after "Question: ...\nAnswer:" (the cloze form small models are reported in, as they cannot map letters yet)
STYLES = {"letters": ("default", "_default_template_yaml", "multiple choice questions"),
          "continuation": ("continuation", "_continuation_template_yaml", "questions")}


def lm_eval_mmlu_template(style: str = "letters") -> Path:
    """The installed lm-eval MMLU template; our tasks `include` it so prompts and scoring match published MMLU."""
    import lm_eval

    folder, name, _ = STYLES[style]
    path = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / folder / name
    if not path.exists():
        raise ConfigError(f"lm-eval's MMLU template is missing at {path}; reinstall lm-eval: pip install -U lm-eval")
    return path


def split_of(path: Path) -> str | None:
    stem = path.name.split(".")[0]
    for split in ("test", "dev"):
        if stem == split or stem.endswith("_" + split) or stem.startswith(split + "-"):
            return split
    return None


def read_mmlu_dir(data_dir: str) -> dict[str, dict[str, list[dict]]]:
    """{subject: {"test": rows, "dev": rows}} from every test/dev file under data_dir, validated row by row."""
    root = Path(data_dir)
    if not root.is_dir():
        raise ConfigError(f"--data-dir '{data_dir}' is not a folder (it should hold test/dev MMLU files)")
    subjects: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)):
        split = split_of(path)
        if split is None:
            print(f"note: ignoring {path} (not a test or dev file: name it test.jsonl, SUBJECT_test.csv, dev.jsonl, ...)")
            continue
        default_subject = _subject_from_name(path, root, split)
        for where, raw in _read_rows(path):
            row = validate_row(raw, where, default_subject)
            subjects.setdefault(row["subject"], {"test": [], "dev": []})[split].append(row)
    subjects = {name: splits for name, splits in subjects.items() if splits["test"] or splits["dev"]}
    if not any(s["test"] for s in subjects.values()):
        raise ConfigError(f"no test questions under '{data_dir}' (expected files like test.jsonl or SUBJECT_test.csv)")
    return subjects


def _subject_from_name(path: Path, root: Path, split: str) -> str | None:
    stem = path.name.split(".")[0]
    if stem.endswith("_" + split):
        return stem[: -len(split) - 1]
    return path.parent.name if path.parent != root else None


def _read_rows(path: Path):
    """Yield (location for error messages, raw row dict)."""
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}: row {i}", row
    elif path.name.endswith(".csv"):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    else:
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{i}: invalid JSON ({e.msg}); each line must be one JSON object") from None
                yield f"{path}:{i}", row


def validate_row(raw, where: str, default_subject: str | None) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected an object with columns {', '.join(COLUMNS)}, subject")
    missing = [c for c in COLUMNS if c not in raw]
    if missing:
        raise ConfigError(f"{where}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, raw)) or 'none'} "
                          "(MMLU columns: question, subject, choices, answer)")
    question, choices, answer = raw["question"], raw["choices"], raw["answer"]
    if isinstance(choices, str):  # CSV cells hold the list as text: JSON or Python literal
        try:
            choices = ast.literal_eval(choices)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{where}: 'choices' must be a list of 4 strings, e.g. [\"a\", \"b\", \"c\", \"d\"]") from None
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise ConfigError(f"{where}: 'choices' must be a list of exactly 4 strings, got {choices!r}")
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 3:
        raise ConfigError(f"{where}: 'answer' must be the index 0-3 of the right choice, got {answer!r}")
    if not isinstance(question, str) or not question.strip():
        raise ConfigError(f"{where}: 'question' must be a non-empty string")
    subject = raw.get("subject") or default_subject
    if not isinstance(subject, str) or not subject.strip():
        raise ConfigError(f"{where}: no subject; add a 'subject' column or name the file SUBJECT_test.jsonl")
    return {"question": question, "subject": subject.strip(), "choices": list(choices), "answer": answer}


def description(subject: str, style: str = "letters") -> str:
    """Same wording as lm-eval's generated MMLU subject configs of that style."""
    return f"The following are {STYLES[style][2]} (with answers) about {' '.join(subject.split('_'))}.\n\n"


def mmlu_prompt(subject: str, question: str, choices: list[str]) -> str:
    """The zero-shot text lm-eval scores for one row (description + the template's doc_to_text), for training on
    the format; tests/test_learning.py checks it against lm-eval's own rendering."""
    letters = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", choices))
    return f"{description(subject)}{question.strip()}{letters}\nAnswer:"


def continuation_prompt(subject: str, question: str) -> str:
    """The same for lm-eval's continuation (cloze) form, which scores each choice's text after it."""
    return f"{description(subject, 'continuation')}Question: {question.strip()}\nAnswer:"


def task_name(subject: str) -> str:
    return f"{TASK_PREFIX}_" + re.sub(r"[^a-z0-9]+", "_", subject.lower()).strip("_")


def write_task_configs(subjects: dict[str, dict[str, list[dict]]], out_dir: str, few_shots: int,
                       style: str = "letters") -> tuple[str, dict]:
    """Write data + one lm-eval task YAML per subject + a group YAML; returns (group name, {task name: subject})."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = lm_eval_mmlu_template(style)
    tasks = {}
    for subject, splits in sorted(subjects.items()):
        if not splits["test"]:
            raise ConfigError(f"subject '{subject}' has dev questions but no test questions; add them to a test file")
        if few_shots > len(splits["dev"]):
            raise ConfigError(f"subject '{subject}' has {len(splits['dev'])} dev question(s), fewer than "
                              f"--few-shots {few_shots}; add a dev file with more examples or lower --few-shots")
        name = task_name(subject)
        if name in tasks:
            raise ConfigError(f"subjects '{tasks[name]}' and '{subject}' map to the same task name; rename one")
        tasks[name] = subject
        data_files = {}
        for split, rows in splits.items():
            if rows:
                data_files[split] = str(out / f"{name}.{split}.jsonl")
                with open(data_files[split], "w") as f:
                    f.writelines(json.dumps(row) + "\n" for row in rows)
        config = {
            "include": str(template),
            "task": name,
            "task_alias": subject,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files},
            "description": description(subject, style),
        }
        if "dev" not in data_files:
            config["fewshot_split"] = None
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    group = {"group": TASK_PREFIX, "task": sorted(tasks),
             # Micro average over all questions, as lm-eval reports for the mmlu group.
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 1}}
    (out / f"_{TASK_PREFIX}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return TASK_PREFIX, tasks
