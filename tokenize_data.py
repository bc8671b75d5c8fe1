"""Messages JSONL -> flat memory-mappable token arrays with loss masks.

    python tokenize_data.py [--config run.yaml] [--data-path F] [--model-path M] [--data-output-dir D] ...

Each line is {"messages": [{"role", "content"}, ...], "tools": [...]?, "unmask": bool?}. Assistant messages may carry
`reasoning_content` and `tool_calls` (OpenAI format; content may then be null); `tool` messages hold tool results.
The chat template (the tokenizer's own or --chat-tmpl-path) renders each conversation; labels are -100 except on
what the assistant writes as the template renders it (content, reasoning, tool calls) and the text that closes each
such turn (with `unmask`, every non-system message; role `pretraining`: the raw text, all trained). Tool results
and headers are never trained; a line whose trained text the template rewrites is rejected, never mis-masked.
Output, written to a temp folder and renamed when complete: input_ids.npy (uint32), labels.npy (int32),
offsets.npy (int64, n+1 sample boundaries) and meta.json.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import sys
from array import array
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from chat_spans import _worker, render_all  # _worker: this process's tokenizer state, set by _init_worker
from config import EMBEDDED_MODEL, ConfigError, cache_dir, embedded_export_dir, exit_on_error, load_config
from eval.report import write_atomic

CHUNK_LINES = 512
IGNORE = -100


def load_tokenizer(model_path: str):
    """AutoTokenizer's choice for the folder. Here, not in model.py (which imports it from here), so tokenizing need
    not import torch: AutoTokenizer does, to read the model config (two thirds of this script's start-up). So the
    class it picked is remembered per folder content and transformers version, and a remembered generic
    TokenizersBackend (what it picks for most folders transformers 5 saved, the embedded export's) loads directly."""
    memo = _tokenizer_class_memo(model_path)
    try:
        if memo and memo.is_file() and memo.read_text() == "TokenizersBackend":
            from transformers import TokenizersBackend
            return TokenizersBackend.from_pretrained(model_path)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from '{model_path}': {e}") from None
    try:
        if memo:
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(memo, type(tok).__name__)
    except OSError:  # a read-only cache: the next load asks AutoTokenizer again
        pass
    return tok


def _tokenizer_class_memo(model_path: str) -> Path | None:
    """The file that remembers AutoTokenizer's class for this folder: keyed by what the choice depends on (the
    tokenizer files, config.json's model type, transformers' version). None for a hub id."""
    config = Path(model_path) / "config.json"
    if not os.path.isdir(model_path):
        return None
    from transformers import __version__
    key = hashlib.sha256(f"{tokenizer_sha256(model_path)} {__version__} ".encode()
                         + (config.read_bytes() if config.is_file() else b"")).hexdigest()
    return cache_dir() / "tokenizer_class" / key


def _init_worker(model_path: str, chat_template: str | None, max_seq_len: int):
    tok = load_tokenizer(model_path)
    _worker.update(tok=tok, template=chat_template, max_seq_len=max_seq_len, added=tuple(tok.get_added_vocab()),
                   args=(model_path, chat_template, max_seq_len))


def _init_pool_worker(*args):
    """Processes share the cores, so each encodes on one thread (a single process lets the tokenizer use all).
    A forked worker already holds the parent's tokenizer; only a spawned one loads its own."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if _worker.get("args") != args:
        _init_worker(*args)


def parse_line(raw: bytes) -> dict:
    """Validate one input line; raises ValueError with a message for the rejects report."""
    try:
        sample = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(sample, dict) or not isinstance(sample.get("messages"), list) or not sample["messages"]:
        raise ValueError('expected {"messages": [{"role": ..., "content": ...}, ...]} with at least one message')
    for k, m in enumerate(sample["messages"]):
        _check_message(k, m)
    if not isinstance(sample.get("unmask", False), bool):
        raise ValueError("'unmask' must be true or false")
    tools = sample.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("'tools' must be a list of tool objects (JSON schemas), as passed to apply_chat_template")
    roles = {m["role"] for m in sample["messages"]}
    if "pretraining" in roles and roles - {"pretraining"}:
        raise ValueError("role 'pretraining' cannot be mixed with chat roles in one sample")
    return sample


def _check_message(k: int, m) -> None:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ValueError(f"messages[{k}] needs a string 'role'")
    calls = m.get("tool_calls")
    if calls is not None:
        if m["role"] != "assistant":
            raise ValueError(f"messages[{k}].tool_calls is only allowed on assistant messages")
        if not isinstance(calls, list) or not calls:
            raise ValueError(f"messages[{k}].tool_calls must be a non-empty list")
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not isinstance(fn.get("arguments"), (dict, str)):
                raise ValueError(f'messages[{k}].tool_calls[{j}] must be {{"type": "function", "function": '
                                 '{"name": "...", "arguments": {...} or "..."}}')
    content = m.get("content")
    if not isinstance(content, str) and not (calls and content in (None, "")):
        hint = " (it may be null only on an assistant message with tool_calls)" if content is None else ""
        raise ValueError(f"messages[{k}].content must be a string, got {type(content).__name__}{hint}")
    reasoning = m.get("reasoning_content")
    if reasoning is not None and (m["role"] != "assistant" or not isinstance(reasoning, str)):
        raise ValueError(f"messages[{k}].reasoning_content must be a string on an assistant message")


def label_tokens(enc, ids: np.ndarray, spans) -> np.ndarray:
    """Labels for one sample (its encoding and ids): the tokens that overlap a span (a token may carry the space
    before the content). Where a span's first and last characters are in tokens, those come from the tokenizer's own
    char_to_token (two calls, not a pass over every offset), widened over tokens that share a character (a byte-split
    one)."""
    labels = np.full(len(ids), IGNORE, dtype=np.int32)  # token ids < 2^31: int32 holds them unchanged
    for s, e in spans:
        first, last = enc.char_to_token(s), enc.char_to_token(e - 1)
        if first is None or last is None:  # a character the normalizer dropped: test every token's offsets
            starts, ends = (np.fromiter((o[k] for o in enc.offsets), np.int64, len(ids)) for k in (0, 1))
            trained = (ends > s) & (starts < e)
            labels[trained] = ids[trained]
            continue
        while first > 0 and enc.token_to_chars(first - 1)[1] > s:
            first -= 1
        while last + 1 < len(ids) and enc.token_to_chars(last + 1)[0] < e:
            last += 1
        labels[first:last + 1] = ids[first:last + 1]
    return labels


def tokenize_chunk(chunk: list[tuple[int, bytes]]) -> dict:
    """Tokenize a chunk of (line number, raw line); runs in a worker process. The kept samples come back as one
    array of ids and one of labels, with their lengths and trained-token count."""
    out = {"ids": [], "labels": [], "lengths": [], "loss_tokens": 0, "too_long": 0, "no_loss_tokens": 0,
           "turns_without_end": 0, "rejects": []}

    def reject(lineno, raw, e):
        out["rejects"].append((lineno, str(e), raw.decode("utf-8", "replace").rstrip("\n")))

    parsed, samples = [], []
    for lineno, raw in chunk:
        try:
            samples.append(parse_line(raw))
            parsed.append((lineno, raw))
        except ValueError as e:
            reject(lineno, raw, e)
    texts, spans, open_turns = [], [], []
    for (lineno, raw), rendered in zip(parsed, render_all(samples)):
        if isinstance(rendered, ValueError):
            reject(lineno, raw, rendered)
            continue
        text, sample_spans, n_open = rendered
        texts.append(text)
        spans.append(sample_spans)
        open_turns.append(n_open)
    out["rejects"].sort()  # by line: the first is the one reported
    if texts:
        # the Rust tokenizer directly: transformers' per-sample dict conversion costs ~15% of tokenization
        encodings = _worker["tok"].backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        for enc, sample_spans, n_open in zip(encodings, spans, open_turns):
            if len(enc) > _worker["max_seq_len"]:
                out["too_long"] += 1
                continue
            ids = np.asarray(enc.ids, dtype=np.uint32)
            labels = label_tokens(enc, ids, sample_spans)
            loss_tokens = int(np.count_nonzero(labels[1:] != IGNORE))  # the first token is never predicted
            if not loss_tokens:
                out["no_loss_tokens"] += 1
                continue
            out["ids"].append(ids)
            out["labels"].append(labels)
            out["lengths"].append(len(enc))
            out["loss_tokens"] += loss_tokens
            out["turns_without_end"] += n_open
    for key, dtype in (("ids", np.uint32), ("labels", np.int32)):
        out[key] = np.concatenate(out[key]) if out[key] else np.zeros(0, dtype)
    return out


def read_chunks(path: str, hasher):
    chunk = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            hasher.update(raw)
            if raw.strip():
                chunk.append((lineno, raw))
            if len(chunk) == CHUNK_LINES:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def tokenize_dataset(data_path: str, model_path: str, output_dir: str, max_seq_len: int,
                     chat_tmpl_path: str | None = None, num_proc: int = 1, skip_invalid: bool = False) -> dict:
    if not os.path.isfile(data_path):
        raise ConfigError(f"data_path '{data_path}' not found: point --data-path at a messages JSONL file")
    if os.path.getsize(data_path) == 0:
        raise ConfigError(f"{data_path} is empty: it needs one JSON object with 'messages' per line")
    template = Path(chat_tmpl_path).read_text() if chat_tmpl_path else None
    if chat_tmpl_path and not template.strip():
        raise ConfigError(f"chat template file '{chat_tmpl_path}' is empty")
    _init_worker(model_path, template, max_seq_len)  # fails early on a missing model; also serves num_proc=1
    tok = _worker["tok"]
    final = Path(output_dir)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _write_arrays(data_path, tmp, num_proc, skip_invalid, (model_path, template, max_seq_len))
        meta.update(model=model_path, max_seq_len=max_seq_len, chat_tmpl_path=chat_tmpl_path,
                    chat_template_sha256=hashlib.sha256(Path(chat_tmpl_path).read_bytes() if chat_tmpl_path
                                                        else (tok.chat_template or "").encode()).hexdigest(),
                    tokenizer_sha256=tokenizer_sha256(model_path))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


def tokenizer_sha256(model_path: str) -> str:
    """sha256 over the tokenizer files of a model folder (the built-in chat template included); a hub id hashes
    its name only."""
    h = hashlib.sha256(model_path.encode() if not os.path.isdir(model_path) else b"")
    for name in TOKENIZER_FILES:
        path = Path(model_path) / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _write_arrays(data_path: str, tmp: Path, num_proc: int, skip_invalid: bool, init_args) -> dict:
    hasher = hashlib.sha256()
    counts = {"too_long": 0, "no_loss_tokens": 0, "invalid": 0}
    lengths, loss_tokens, open_turns = array("q"), 0, 0  # 8 bytes a sample: all the memory that grows with the data
    chunks = read_chunks(data_path, hasher)
    head = list(itertools.islice(chunks, 2))
    # a single chunk would keep one worker busy and the rest idle: in this process encode_batch can use every core
    pool = Pool(num_proc, initializer=_init_pool_worker, initargs=init_args) if num_proc > 1 and len(head) > 1 \
        else None
    results = (pool.imap if pool else map)(tokenize_chunk, itertools.chain(head, chunks))
    try:
        with open(tmp / "input_ids.npy", "wb") as fi, open(tmp / "labels.npy", "wb") as fl, \
                open(tmp / "rejects.jsonl", "w") as fr:
            _npy_header(fi, np.uint32, 0)
            _npy_header(fl, np.int32, 0)
            for res in results:
                if res["rejects"] and not skip_invalid:
                    lineno, reason, _ = res["rejects"][0]
                    raise ConfigError(f"{data_path}:{lineno}: {reason} (fix the line, or pass --skip-invalid "
                                      "to write rejected lines to rejects.jsonl and go on)")
                for lineno, reason, raw in res["rejects"]:
                    fr.write(json.dumps({"line": lineno, "reason": reason, "raw": raw}) + "\n")
                counts["invalid"] += len(res["rejects"])
                counts["too_long"] += res["too_long"]
                counts["no_loss_tokens"] += res["no_loss_tokens"]
                open_turns += res["turns_without_end"]
                fi.write(res["ids"])
                fl.write(res["labels"])
                loss_tokens += res["loss_tokens"]
                lengths.extend(res["lengths"])
            total = sum(lengths)
            for f, dtype in ((fi, np.uint32), (fl, np.int32)):
                f.seek(0)
                _npy_header(f, dtype, total)
    finally:
        if pool:
            pool.terminate()
    if not lengths:
        raise ConfigError(f"{data_path}: no sample left to train on (dropped: {counts}); check max_seq_len "
                          "and that samples have assistant turns")
    lengths = np.frombuffer(lengths, dtype=np.int64)
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    if not counts["invalid"]:
        (tmp / "rejects.jsonl").unlink()
    hist, edges = np.histogram(lengths, bins=min(20, len(np.unique(lengths))))
    return {"source": os.path.abspath(data_path), "source_sha256": hasher.hexdigest(), "num_samples": len(lengths),
            "dropped": counts, "total_tokens": int(total), "loss_tokens": loss_tokens,
            "turns_without_end": open_turns,
            "length_histogram": {"edges": [int(e) for e in edges], "counts": hist.tolist()}}


def _npy_header(f, dtype, n: int):
    """The header np.save writes for n values of dtype. Its length does not depend on n (numpy pads it for growing
    arrays), so it is written before the values, whose count is known only at the end, and rewritten over then:
    the arrays stream to their files, never held in memory nor copied."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": (n,)})


def load_tokenized(data_dir: str) -> dict:
    """Memory-mapped arrays and meta of a tokenized folder."""
    d = Path(data_dir)
    return {"input_ids": np.load(d / "input_ids.npy", mmap_mode="r"), "labels": np.load(d / "labels.npy", mmap_mode="r"),
            "offsets": np.load(d / "offsets.npy"), "meta": json.loads((d / "meta.json").read_text())}


def show_sample(data: dict, tok, index: int = 0) -> str:
    """Decode one sample with trained spans in [[...]] so the loss mask can be checked by eye."""
    a, b = data["offsets"][index], data["offsets"][index + 1]
    ids, trained = np.asarray(data["input_ids"][a:b]), np.asarray(data["labels"][a:b]) != IGNORE
    out, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or trained[t] != trained[start]:
            text = tok.decode(ids[start:t].tolist())
            out.append(f"[[{text}]]" if trained[start] else text)
            start = t
    return "".join(out)


def summary(meta: dict, output_dir: str) -> str:
    text = (f"tokenized {meta['num_samples']} samples, {meta['total_tokens']} tokens "
            f"({meta['loss_tokens']} trained) -> {output_dir}; dropped: {meta['dropped']}")
    if meta.get("turns_without_end"):
        text += (f"\nnote: nothing closes {meta['turns_without_end']} trained turn(s): the chat template writes no "
                 "end-of-turn text after them, so the model does not learn to stop there")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="run.yaml" if os.path.exists("run.yaml") else None)
    for flag in ("data-path", "model-path", "data-output-dir", "chat-tmpl-path"):
        p.add_argument(f"--{flag}")
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--num-proc", type=int)
    p.add_argument("--skip-invalid", action="store_true", help="write bad lines to rejects.jsonl and go on")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "skip_invalid")}
    cfg = load_config(args.config, overrides)
    model_path = cfg.model_path
    if model_path in (EMBEDDED_MODEL, "embedded") and embedded_export_dir().is_dir():
        model_path = str(embedded_export_dir())  # exported before: no need for model.py, whose torch takes seconds
    elif not os.path.isdir(model_path):
        from model import resolve_model_path
        model_path = resolve_model_path(model_path)
    meta = tokenize_dataset(cfg.data_path, model_path, cfg.data_output_dir, cfg.max_seq_len, cfg.chat_tmpl_path,
                            cfg.num_proc, args.skip_invalid)
    print(summary(meta, cfg.data_output_dir))
    print("sample 0 (trained tokens in [[...]]):\n" + show_sample(load_tokenized(cfg.data_output_dir), _worker["tok"]))
    if meta["dropped"]["invalid"]:
        print(f"{meta['dropped']['invalid']} rejected line(s) with reasons: {cfg.data_output_dir}/rejects.jsonl")


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
