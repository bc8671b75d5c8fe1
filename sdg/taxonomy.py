"""The one reader of InstructLab taxonomies (folders of qna.yaml files): sdg, eval and phases all take their
leaves, leaf names and kinds from here.

Validation is InstructLab's own (`ilab taxonomy diff`): each file against the instructlab-schema JSON schema of
its version (a file without `version` is version 1), yamllint with InstructLab's rules from version 2 on, and the
knowledge documents must be found. Every problem is reported as `file:line: message`, all of them at once, so a
user fixes a taxonomy in one pass; lines come from yaml's composed nodes.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import yaml
from instructlab.schema import schema_base, schema_versions
from instructlab.schema.taxonomy import DEFAULT_TAXONOMY_FOLDERS, DEFAULT_YAMLLINT_CONFIG
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from yamllint import linter
from yamllint.config import YamlLintConfig

from config import ConfigError, cache_dir

# a commit hash, or a branch/tag name; never a leading '-', which git would read as an option
SAFE_REF = re.compile(r"[0-9A-Za-z_][0-9A-Za-z_./-]{0,199}")
GIT_URL = re.compile(r"(https?|ssh|git|file)://|git@")
# InstructLab's CLI reports yamllint warnings as errors too (TaxonomyParser(yamllint_strict=True))
YAMLLINT = YamlLintConfig(DEFAULT_YAMLLINT_CONFIG)
TYPES = {"string": "string", "array": "list", "object": "mapping (key: value)", "integer": "whole number"}


@dataclasses.dataclass
class Leaf:
    path: Path  # the qna.yaml
    name: str  # its folder relative to the taxonomy root, e.g. compositional_skills/writing/haiku
    kind: str  # "skill" or "knowledge"
    data: dict
    grounded: bool = False  # a skill whose first seed carries a context (instructlab-sdg's grounded pipeline)
    documents: list[Path] = dataclasses.field(default_factory=list)  # knowledge files, resolved


def leaf_name(path: Path, root: Path) -> str:
    """The leaf's one name: its folder under the taxonomy root, '/'-separated (the root's own name for a qna.yaml
    at the root). It is `metadata.leaf` of every generated record."""
    folder = path.parent.relative_to(root)
    return folder.as_posix() if folder.parts else root.resolve().name


def leaf_kind(name: str, data) -> str:
    """InstructLab's rule: the first folder names the schema (knowledge or compositional_skills); anywhere else
    (foundational_skills, ...) a leaf with a `document` is knowledge."""
    first = name.split("/")[0]
    if first in DEFAULT_TAXONOMY_FOLDERS:
        return "knowledge" if first == "knowledge" else "skill"
    return "knowledge" if isinstance(data, dict) and "document" in data else "skill"


def mmlu_subject(name: str) -> str:
    """A leaf as an MMLU subject (lm-eval's prompt reads its '_' as spaces): the same for training and scoring."""
    return name.replace("/", "_")


def qa_pairs(leaf: Leaf) -> list[dict]:
    """Every seed question and answer of a leaf, each with the context it came with (None for none)."""
    if leaf.kind == "knowledge":
        return [{"question": qa["question"], "answer": qa["answer"], "context": seed["context"]}
                for seed in leaf.data["seed_examples"] for qa in seed["questions_and_answers"]]
    return [{"question": s["question"], "answer": s["answer"], "context": s.get("context")}
            for s in leaf.data["seed_examples"]]


def file_version(data: dict) -> int:
    """InstructLab's reading: no `version` is version 1; a value that is no number is checked as version 1 (the
    schema then names it)."""
    version = data.get("version", 1)
    try:
        return int(version)
    except (TypeError, ValueError):
        return 1


@functools.cache
def schema(version: int, kind: str) -> dict | None:
    """instructlab-schema's JSON schema for a taxonomy version and kind; None for a version it does not have."""
    if f"v{version}" not in {v.name for v in schema_versions()}:
        return None
    name = "knowledge.json" if kind == "knowledge" else "compositional_skills.json"
    return json.loads((schema_base() / f"v{version}" / name).read_text())


@functools.cache
def _validator(version: int, kind: str) -> jsonschema.protocols.Validator:
    folder = schema_base() / f"v{version}"
    registry = Registry(retrieve=lambda uri: Resource.from_contents(json.loads((folder / uri).read_text()),
                                                                     default_specification=DRAFT202012))
    contents = schema(version, kind)
    return jsonschema.validators.validator_for(contents)(contents, registry=registry)


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


def _line(root, path) -> int:
    return _node_at(root, path).start_mark.line + 1


def _describe(error: jsonschema.ValidationError, root, where: str, version: int, local_repo: bool) -> list[str]:
    path = list(error.absolute_path)
    dotted = ".".join(str(p) for p in path) or "top level"
    node = _node_at(root, path)
    line = node.start_mark.line + 1
    if error.validator == "unevaluatedProperties":
        # the top level's `version` is allowed by the schema's $ref to version.json
        allowed = list(error.schema.get("properties", {})) + (["version"] if "$ref" in error.schema else [])
        parts = []
        for key in (k for k in error.instance if k not in allowed):
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed keys: {', '.join(allowed)}"
            parts.append(f"{where}:{_key_node(node, key).start_mark.line + 1}: unknown key '{key}' in {dotted}; {hint}")
        return parts
    if error.validator == "required":
        # a local document folder (minilab's addition) has no commit to pin
        missing = [k for k in error.validator_value if k not in error.instance
                   and not (local_repo and path == ["document"] and k == "commit")]
        return [f"{where}:{line}: {dotted} is missing required key(s) {', '.join(repr(k) for k in missing)}"] if missing else []
    if error.validator == "minItems":
        what = "seed examples" if path and path[-1] == "seed_examples" else "items"
        return [f"{where}:{line}: {dotted} has {len(error.instance)} {what}, at least {error.validator_value} are needed "
                f"in an InstructLab taxonomy version {version} file; add more"]
    if error.validator == "uniqueItems":
        return [f"{where}:{line}: {dotted} has the same item twice; make each one different"]
    if error.validator == "minLength":
        return [f"{where}:{line}: {dotted} is empty; write some text"]
    if error.validator == "const":
        return [f"{where}:{line}: {dotted} must be {error.validator_value!r}, got {error.instance!r}"]
    if error.validator == "type":
        return [f"{where}:{line}: {dotted} must be a {TYPES.get(error.validator_value, error.validator_value)}, "
                f"got {type(error.instance).__name__} {error.instance!r:.40}"]
    return [f"{where}:{line}: {dotted}: {error.message[-200:]}"]


def _schema_problems(data: dict, root, where: str, kind: str) -> tuple[list[str], bool]:
    """InstructLab's schema check of one file, as TaxonomyParser does it, each problem at its line; and whether
    its `document` section passed (then its files can be looked for)."""
    version = file_version(data)
    line = _line(root, ["version"] if "version" in data else [])
    contents = schema(version, kind)
    if contents is None:
        known = ", ".join(v.name[1:] for v in schema_versions())
        return [f"{where}:{line}: version {data.get('version')!r} is not an InstructLab taxonomy version "
                f"(instructlab-schema knows {known})"], False
    if contents.get("deprecated"):  # e.g. knowledge before version 3
        return [f"{where}:{line}: {contents.get('description') or f'version {version} is deprecated'}"], False
    document = data.get("document")
    local_repo = isinstance(document, dict) and isinstance(document.get("repo"), str) and not is_git_url(document["repo"])
    errors = sorted(_validator(version, kind).iter_errors(data), key=lambda e: _line(root, list(e.absolute_path)))
    described = [(e, _describe(e, root, where, version, local_repo)) for e in errors]
    document_ok = "document" in data and not any(m and list(e.absolute_path)[:1] == ["document"] for e, m in described)
    return list(dict.fromkeys(m for _, ms in described for m in ms)), document_ok


def _lint_problems(text: str, where: str) -> list[str]:
    """yamllint with InstructLab's configuration, warnings counted as errors as `ilab` does."""
    problems = []
    for p in linter.run(text, YAMLLINT):
        if p.rule == "key-duplicates":  # yaml.safe_load would keep the last of the two silently
            key = p.desc.split('"')[1] if '"' in p.desc else p.desc
            problems.append(f"{where}:{p.line}: duplicate key '{key}' (the earlier one would be ignored; "
                            "for another seed example start a new '- question:' list item)")
        else:
            problems.append(f"{where}:{p.line}: {p.desc} (yamllint {p.rule})")
    return problems


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
    """A checkout of `commit` (default: the remote's default branch as first cloned), cached: one clone per URL,
    one worktree per commit, so two leaves pinning different commits of one repo each read their own files. A
    commit the clone does not have yet is fetched. Needs git, and the network for remote URLs."""
    problems = git_problems(repo, commit)
    if problems:
        raise ConfigError("; ".join(problems.values()))
    root = cache_dir() / "sdg" / "repos" / hashlib.sha1(repo.encode()).hexdigest()[:16]
    clone, tree = root / "clone", root / "commits" / (commit or "default")

    def git(*args, timeout=600, check=True):  # git_problems refused values starting with '-'
        return subprocess.run(["git", "-C", str(clone), *args], check=check, capture_output=True, timeout=timeout)
    try:
        if not (clone / ".git").exists():
            root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["git", "clone", "--quiet", "--", repo, str(clone)], check=True, capture_output=True,
                           timeout=600)
        if not commit:
            return clone
        if not tree.exists():
            known = git("rev-parse", "--quiet", "--verify", f"{commit}^{{commit}}", check=False).returncode == 0
            if not known:  # pinned after the first clone
                git("fetch", "--quiet", "--tags", "origin")
            git("worktree", "add", "--quiet", "--detach", str(tree), str(commit), timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError) as e:
        detail = getattr(e, "stderr", b"") or b""
        raise ConfigError(f"cannot fetch document repo {repo} at {commit}: {detail.decode(errors='replace').strip() or e}; "
                          "check the URL and commit, or point 'repo' at a local folder") from None
    return tree


def _resolve_documents(leaf: Leaf, root_node, problems: list[str], fetch: bool):
    """InstructLab's document rule: the patterns must find Markdown documents (it also reads PDF; minilab does not)."""
    where = str(leaf.path)
    document = leaf.data["document"]
    repo = document["repo"]
    if is_git_url(repo):
        bad = git_problems(repo, document["commit"])
        for key, message in bad.items():
            problems.append(f"{where}:{_line(root_node, ['document', key])}: {message}")
        if bad or not fetch:
            return
        folder = fetch_git_repo(repo, document["commit"])
    else:
        folder = (leaf.path.parent / repo).resolve()
        if not folder.is_dir():
            problems.append(f"{where}:{_line(root_node, ['document', 'repo'])}: document.repo folder {folder} does not "
                            "exist (a local folder is relative to this qna.yaml's folder, or absolute)")
            return
    unmatched = []
    for i, pattern in enumerate(document["patterns"]):
        matches = sorted(Path(p) for p in glob.glob(str(folder / pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            unmatched.append(f"{where}:{_line(root_node, ['document', 'patterns', i])}: pattern '{pattern}' matches no "
                             f"file in {folder}; files there: {', '.join(sorted(os.listdir(folder))[:8]) or 'none'}")
        for path in matches:
            line = _line(root_node, ["document", "patterns", i])
            if path.suffix != ".md":
                problems.append(f"{where}:{line}: document {path} is not Markdown (.md); convert it "
                                "(InstructLab reads .md and .pdf, minilab .md)")
                continue
            try:
                path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                problems.append(f"{where}:{line}: document {path} is not UTF-8 text")
                continue
            if path not in leaf.documents:
                leaf.documents.append(path)
    if not leaf.documents:  # one pattern finding nothing is fine when another finds the documents
        problems.extend(unmatched or [f"{where}:{_line(root_node, ['document'])}: no knowledge document found"])


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
        problems.append(f"{where}:1: top level must be a mapping with created_by, seed_examples, ... "
                        f"({'the file is empty' if data is None else f'got a {type(data).__name__}'})")
        return None
    name = leaf_name(path, root)
    leaf = Leaf(path=path, name=name, kind=leaf_kind(name, data), data=data)
    found, document_ok = _schema_problems(data, node, where, leaf.kind)
    found = (_lint_problems(text, where) if file_version(data) > 1 else []) + found
    if leaf.kind == "knowledge" and document_ok:  # even when other keys are wrong: one run reports everything
        _resolve_documents(leaf, node, found, fetch)
    problems.extend(sorted(found, key=lambda m: int(m[len(where) + 1:].split(":", 1)[0])))  # in the file's order
    if found:
        return None
    # instructlab-sdg runs the grounded pipeline when the first seed has a context
    leaf.grounded = leaf.kind == "skill" and bool(data["seed_examples"][0].get("context"))
    return leaf


def validate_taxonomy(root: str | Path, fetch: bool = False) -> tuple[list[Leaf], list[str]]:
    """All valid leaves and every problem found; git document repos are only cloned when `fetch`."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"taxonomy folder '{root}' not found (pass the folder holding your qna.yaml files)")
    paths = sorted(root.rglob("qna.yaml"))
    problems: list[str] = []
    for stray in sorted(p for p in root.rglob("*") if p.name.casefold() in ("qna.yml", "qna.yaml") and p.name != "qna.yaml"):
        problems.append(f"{stray}: rename to qna.yaml (InstructLab only reads that name)")
    if not paths and not problems:
        raise ConfigError(f"no qna.yaml found under '{root}'; see sdg/sample_taxonomy for the layout")
    leaves = [leaf for p in paths if (leaf := load_leaf(p, root, problems, fetch))]
    return leaves, problems


def load_taxonomy(root: str | Path, fetch: bool = True) -> list[Leaf]:
    """Valid leaves, or one ConfigError listing every problem; `fetch=False` leaves git document repos alone
    (evaluation reads only the seeds)."""
    leaves, problems = validate_taxonomy(root, fetch=fetch)
    if problems:
        raise ConfigError(f"taxonomy '{root}' has {len(problems)} problem(s):\n" + "\n".join(problems)
                          + f"\nrun: python -m sdg validate {root}")
    return leaves
