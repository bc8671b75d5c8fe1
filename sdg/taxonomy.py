"""Load and validate an InstructLab v3 taxonomy: folders of qna.yaml files, skills and knowledge.

Every problem is reported as `file:line: message`, all of them at once, so a user fixes a taxonomy in one pass.
Lines come from yaml's composed nodes; the schema check itself is jsonschema's.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import hashlib
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import yaml

from config import ConfigError, cache_dir

MIN_SEEDS = 5
MIN_KNOWLEDGE_QA = 3
# a commit hash, or a branch/tag name; never a leading '-', which git would read as an option
SAFE_REF = re.compile(r"[0-9A-Za-z_][0-9A-Za-z_./-]{0,199}")
GIT_URL = re.compile(r"(https?|ssh|git|file)://|git@")

_TEXT = {"type": "string", "minLength": 1}
_QA = {"type": "object", "required": ["question", "answer"], "additionalProperties": False,
       "properties": {"question": _TEXT, "answer": _TEXT}}
SKILL_SCHEMA = {
    "type": "object",
    "required": ["version", "created_by", "task_description", "seed_examples"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": 3},
        "created_by": _TEXT,
        "task_description": _TEXT,
        "seed_examples": {"type": "array", "minItems": MIN_SEEDS, "items": {
            "type": "object", "required": ["question", "answer"], "additionalProperties": False,
            "properties": {"question": _TEXT, "answer": _TEXT, "context": _TEXT}}},
    },
}
KNOWLEDGE_SCHEMA = {
    "type": "object",
    "required": ["version", "created_by", "domain", "document_outline", "seed_examples", "document"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": 3},
        "created_by": _TEXT,
        "domain": _TEXT,
        "document_outline": _TEXT,
        "seed_examples": {"type": "array", "minItems": MIN_SEEDS, "items": {
            "type": "object", "required": ["context", "questions_and_answers"], "additionalProperties": False,
            "properties": {"context": _TEXT,
                           "questions_and_answers": {"type": "array", "minItems": MIN_KNOWLEDGE_QA, "items": _QA}}}},
        "document": {"type": "object", "required": ["repo", "patterns"], "additionalProperties": False,
                     "properties": {"repo": _TEXT, "commit": _TEXT,
                                    "patterns": {"type": "array", "minItems": 1, "items": _TEXT}}},
    },
}
KNOWLEDGE_ONLY_KEYS = {"domain", "document_outline", "document"}


@dataclasses.dataclass
class Leaf:
    path: Path  # the qna.yaml
    name: str  # its folder relative to the taxonomy root, e.g. compositional_skills/writing/haiku
    kind: str  # "skill" or "knowledge"
    data: dict
    grounded: bool = False  # a skill whose seeds carry a context
    documents: list[Path] = dataclasses.field(default_factory=list)  # knowledge files, resolved


def _node_at(node, path) -> yaml.Node:
    """The deepest composed node along a jsonschema error path (keys and list indices)."""
    for step in path:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == step]
            if not match:
                break
            node = match[-1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            node = node.value[step]
        else:
            break
    return node


def _key_node(mapping, key):
    return next((k for k, _ in mapping.value if k.value == key), mapping) if isinstance(mapping, yaml.MappingNode) else mapping


def _duplicate_keys(node, where: str, problems: list[str]):
    """yaml.safe_load keeps the last of two equal keys silently; a seed would vanish without this."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            if key.value in seen:
                problems.append(f"{where}:{key.start_mark.line + 1}: duplicate key '{key.value}' (the earlier one would be ignored; "
                                "for another seed example start a new '- question:' list item)")
            seen.add(key.value)
            _duplicate_keys(value, where, problems)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _duplicate_keys(item, where, problems)


def _describe(error: jsonschema.ValidationError, root, where: str) -> list[str]:
    path = list(error.absolute_path)
    dotted = ".".join(str(p) for p in path) or "top level"
    node = _node_at(root, path)
    line = node.start_mark.line + 1
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in allowed]
        parts = []
        for key in extra:
            line = _key_node(node, key).start_mark.line + 1
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
            parts.append(f"{where}:{line}: unknown key '{key}' in {dotted}; {hint}")
        return parts
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        return [f"{where}:{line}: {dotted} is missing required key(s) {', '.join(repr(k) for k in missing)}"]
    if error.validator == "minItems":
        what = "seed examples" if path and path[-1] == "seed_examples" else "items"
        return [f"{where}:{line}: {dotted} has {len(error.instance)} {what}, at least {error.validator_value} are needed; "
                "add more examples"]
    if error.validator == "minLength":
        return [f"{where}:{line}: {dotted} is empty; write some text"]
    if error.validator == "const":
        return [f"{where}:{line}: {dotted} must be {error.validator_value} (InstructLab taxonomy v3), got {error.instance!r}"]
    if error.validator == "type":
        return [f"{where}:{line}: {dotted} must be a {error.validator_value}, got {type(error.instance).__name__}"]
    return [f"{where}:{line}: {dotted}: {error.message}"]


def is_git_url(repo: str) -> bool:
    return "://" in repo or repo.startswith("git@")


def git_problems(repo: str, commit) -> dict[str, str]:
    """What is wrong with a document repo URL and commit before either reaches git, by key."""
    problems = {}
    if str(repo).startswith("-"):
        problems["repo"] = f"document.repo '{repo}' starts with '-' (git would read it as an option); give a git URL"
    elif not GIT_URL.match(str(repo)):
        problems["repo"] = (f"document.repo '{repo}' is not a git URL (https://, ssh://, git://, file:// or "
                            "git@host:path) nor a local folder")
    if commit is not None and (not SAFE_REF.fullmatch(str(commit)) or ".." in str(commit)):
        problems["commit"] = (f"document.commit '{commit}' is not a commit hash or a branch or tag name "
                              "(letters, digits, '_', '.', '/', '-', not starting with '-')")
    return problems


def fetch_git_repo(repo: str, commit: str | None) -> Path:
    """Clone (once, cached) and check out `commit`; needs git and network."""
    problems = git_problems(repo, commit)
    if problems:
        raise ConfigError("; ".join(problems.values()))
    dest = cache_dir() / "sdg" / "repos" / hashlib.sha1(repo.encode()).hexdigest()[:16]
    try:
        if not (dest / ".git").exists():
            subprocess.run(["git", "clone", "--quiet", "--", repo, str(dest)], check=True, capture_output=True,
                           timeout=600)
        if commit:  # checks out a revision only (before `--`); git_problems refused a leading '-'
            subprocess.run(["git", "-C", str(dest), "checkout", "--quiet", "--detach", str(commit), "--"],
                           check=True, capture_output=True, timeout=60)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise ConfigError(f"cannot fetch document repo {repo} at {commit}: {detail.decode(errors='replace').strip() or e}; "
                          "check the URL and commit, or point 'repo' at a local folder") from None
    return dest


def _resolve_documents(leaf: Leaf, root_node, problems: list[str], fetch: bool):
    where = str(leaf.path)
    document = leaf.data["document"]
    repo = document["repo"]
    if is_git_url(repo):
        if not document.get("commit"):
            line = _node_at(root_node, ["document"]).start_mark.line + 1
            problems.append(f"{where}:{line}: document.commit is required for a git repo (pin the exact version)")
            return
        bad = git_problems(repo, document["commit"])
        for key, message in bad.items():
            problems.append(f"{where}:{_node_at(root_node, ['document', key]).start_mark.line + 1}: {message}")
        if bad or not fetch:
            return
        folder = fetch_git_repo(repo, document["commit"])
    else:
        folder = (leaf.path.parent / repo).resolve()
        if not folder.is_dir():
            line = _node_at(root_node, ["document", "repo"]).start_mark.line + 1
            problems.append(f"{where}:{line}: document.repo folder {folder} does not exist "
                            "(a local folder is relative to this qna.yaml's folder, or absolute)")
            return
    for i, pattern in enumerate(document["patterns"]):
        matches = sorted(Path(p) for p in glob.glob(str(folder / pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            line = _node_at(root_node, ["document", "patterns", i]).start_mark.line + 1
            problems.append(f"{where}:{line}: pattern '{pattern}' matches no file in {folder}; "
                            f"files there: {', '.join(sorted(os.listdir(folder))[:8]) or 'none'}")
        for path in matches:
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                problems.append(f"{where}: document {path} is not UTF-8 text (convert PDFs or other formats to Markdown)")
                continue
            if path not in leaf.documents:
                leaf.documents.append(path)


def load_leaf(path: Path, root: Path, problems: list[str], fetch: bool = True) -> Leaf | None:
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        problems.append(f"{where}: not UTF-8 text")
        return None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problems.append(f"{where}{line}: invalid YAML: {getattr(e, 'problem', None) or e} (check indentation and quoting)")
        return None
    if not isinstance(data, dict):
        problems.append(f"{where}:1: top level must be a mapping with version, created_by, seed_examples, ...")
        return None
    before = len(problems)
    _duplicate_keys(node, where, problems)
    name = path.parent.relative_to(root).as_posix()
    kind = "knowledge" if "knowledge" in Path(name).parts or KNOWLEDGE_ONLY_KEYS & set(data) else "skill"
    schema = KNOWLEDGE_SCHEMA if kind == "knowledge" else SKILL_SCHEMA
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data),
                    key=lambda e: _node_at(node, list(e.absolute_path)).start_mark.line)
    problems.extend(message for e in errors for message in _describe(e, node, where))
    leaf = Leaf(path=path, name=name, kind=kind, data=data)
    # Document files are checked even when other keys are wrong, so one run reports everything.
    if kind == "knowledge" and isinstance(data.get("document"), dict) and not any(
            list(e.absolute_path)[:1] == ["document"] for e in errors):
        _resolve_documents(leaf, node, problems, fetch)
    if len(problems) > before:
        return None
    with_context = [i for i, seed in enumerate(data["seed_examples"]) if "context" in seed]
    if kind == "skill" and 0 < len(with_context) < len(data["seed_examples"]):
        missing = next(i for i in range(len(data["seed_examples"])) if i not in with_context)
        line = _node_at(node, ["seed_examples", missing]).start_mark.line + 1
        problems.append(f"{where}:{line}: seed_examples.{missing} has no context while others do; "
                        "a grounded skill needs a context in every seed example")
        return None
    leaf.grounded = bool(with_context) and kind == "skill"
    return leaf


def validate_taxonomy(root: str | Path, fetch: bool = False) -> tuple[list[Leaf], list[str]]:
    """All valid leaves and every problem found; git document repos are only cloned when `fetch`."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"taxonomy folder '{root}' not found (pass the folder holding your qna.yaml files)")
    paths = sorted(root.rglob("qna.yaml"))
    problems: list[str] = []
    for stray in sorted(root.rglob("qna.yml")):
        problems.append(f"{stray}: rename to qna.yaml (InstructLab only reads that name)")
    if not paths and not problems:
        raise ConfigError(f"no qna.yaml found under '{root}'; see sdg/sample_taxonomy for the layout")
    leaves = [leaf for p in paths if (leaf := load_leaf(p, root, problems, fetch))]
    return leaves, problems


def load_taxonomy(root: str | Path) -> list[Leaf]:
    """Leaves ready for generation, or one ConfigError listing every problem."""
    leaves, problems = validate_taxonomy(root, fetch=True)
    if problems:
        raise ConfigError(f"taxonomy '{root}' has {len(problems)} problem(s):\n" + "\n".join(problems)
                          + f"\nrun: python -m sdg validate {root}")
    return leaves
