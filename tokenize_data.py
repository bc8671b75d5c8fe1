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
import json
import os
import re
import shutil
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from config import ConfigError, exit_on_error, load_config

CHUNK_LINES = 512
IGNORE = -100
_worker: dict = {}  # per-process tokenizer state, set once by _init_worker


def _init_worker(model_path: str, chat_template: str | None, max_seq_len: int):
    from model import load_tokenizer
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


# Markers put around each trained string before rendering (private-use characters, so data never contains them;
# transformers' own control-token markers live in plane 15, these in the BMP). A marker is `open id close`, so a
# template that trims, drops or reorders content cannot make one piece's marker pass for another's.
MARK_SETS = [tuple(chr(base + i) for i in range(3)) for base in range(0xE000, 0xE800, 0x100)]
FIELDS = ("reasoning_content", "content")  # reasoning first: templates render it before the answer


def _apply(messages, tools, add_generation_prompt=False) -> str:
    try:
        return _worker["tok"].apply_chat_template(messages, tools=tools, chat_template=_worker["template"],
                                                  add_generation_prompt=add_generation_prompt, tokenize=False)
    except Exception as e:  # jinja raises for roles or orders the template does not accept
        raise ValueError(f"the chat template rejected these messages: {e}") from None


def _piece(messages, piece) -> str:
    k, field = piece
    return messages[k][field] if field in FIELDS else messages[k]["tool_calls"][-1]["function"]["name"]


def _marked(messages, pieces, marks) -> list[dict]:
    """Messages with each trained string as `lead OPEN id CLOSE core END id CLOSE trail`: the edge whitespace stays
    outside the markers, so a template that trims the content still trims it. The piece `tool_call` is the name of
    the turn's last tool call: where it ends, the template's own serialization of the call goes on."""
    out = [dict(m) for m in messages]
    o, e, c = marks
    for i, (k, field) in enumerate(pieces):
        s = _piece(messages, (k, field))
        core = s.strip()
        lead, trail = s[:len(s) - len(s.lstrip())], s[len(s.rstrip()):]
        marked = f"{lead}{o}{i}{c}{core}{e}{i}{c}{trail}"
        if field in FIELDS:
            out[k][field] = marked
        else:
            *calls, last = out[k]["tool_calls"]
            out[k]["tool_calls"] = calls + [{**last, "function": {**last["function"], "name": marked}}]
    return out


def _unmark(text: str, marks, n: int) -> tuple[str, dict[int, tuple[int, int]]]:
    """The text without markers and each piece's span in it. A piece whose markers the template cut, doubled or
    reordered raises ValueError(piece index); a piece the template does not render at all has no span."""
    o, e, c = marks
    parts, opened, spans, removed, last = [], {}, {}, 0, 0
    for m in re.finditer(f"([{o}{e}])(\\d+){c}", text):
        parts.append(text[last:m.start()])
        pos, i, last = m.start() - removed, int(m.group(2)), m.end()
        removed += m.end() - m.start()
        if i >= n or (m.group(1) == o and (i in opened or i in spans)) or (m.group(1) == e and i not in opened):
            raise ValueError(min(i, n - 1))
        if m.group(1) == o:
            opened[i] = pos
        else:
            spans[i] = (opened.pop(i), pos)
    parts.append(text[last:])
    if opened:
        raise ValueError(min(opened))
    text = "".join(parts)
    if any(ch in text for ch in marks):  # a marker the template cut in half
        raise ValueError(0)
    return text, spans


def _render_marked(messages, pieces, marks, tools, add_generation_prompt=False) -> tuple[str, dict]:
    rendered = _apply(_marked(messages, pieces, marks), tools, add_generation_prompt)
    try:
        return _unmark(rendered, marks, len(pieces))
    except ValueError as err:
        k, field = pieces[err.args[0]]
        raise ValueError(f"the chat template cuts or changes messages[{k}].{field} when rendering it (e.g. it drops "
                         "the text before '</think>'), so its trained span cannot be located exactly") from None


def render(sample: dict) -> tuple[str, list[tuple[int, int]], int]:
    """The conversation as text, the character spans to train on, and how many trained turns nothing closes.

    Each trained string (assistant content and reasoning; with `unmask`, every non-system message) is wrapped in
    markers, the conversation is rendered and the markers removed: the text must equal the plain render and every
    piece's markers must survive whole, or the sample is rejected, never mis-masked. A turn's span runs from its
    first piece to its last, with what the template puts between (the `</think>` after reasoning); a tool-call turn
    without content starts where the generation prompt ends. Then its end: see `_closing`."""
    tok, messages = _worker["tok"], sample["messages"]
    if messages[0]["role"] == "pretraining":
        text = "".join(m["content"] + tok.eos_token for m in messages)
        return text, [(0, len(text))], 0
    tools, unmask = sample.get("tools"), sample.get("unmask")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" or (unmask and m["role"] != "system")]
    pieces = [(k, f) for k in turns for f in FIELDS + ("tool_call",)
              if (messages[k].get("tool_calls") if f == "tool_call" else
                  isinstance(messages[k].get(f), str) and messages[k][f].strip())]
    plain = _apply(messages, tools)
    marks = next((s for s in MARK_SETS if not any(ch in plain for ch in s)), None)
    if marks is None:
        raise ValueError("the rendered text uses every private-use character the span markers could use")
    text, located = _render_marked(messages, pieces, marks, tools)
    if text != plain:
        raise ValueError("the chat template renders these messages differently once their content is marked "
                         "(it inspects the content), so the trained spans cannot be located exactly")
    spans, ends = [], []  # ends: [start, end, the turn has tool calls, the truncated render agreed to its end]
    for k in turns:
        own = sorted((located[i][1], i) for i, (j, _) in enumerate(pieces) if j == k and i in located)
        calls = messages[k].get("tool_calls")
        if calls and (k, "tool_call") not in [pieces[i] for _, i in own]:
            raise ValueError(f"the chat template does not render the tool calls of messages[{k}]")
        if not own:
            continue
        texts = [located[i][0] for _, i in own if pieces[i][1] in FIELDS]
        start = min(texts) if texts else _turn_start(messages, tools, k, text, marks)
        anchor, last = own[-1]
        spans.append((start, anchor))
        ends.append([*_closing(messages, pieces, marks, tools, k, text, anchor, last), bool(calls)])
    # A turn the template renders differently when it ends the conversation (Nemotron's final tool call) still gets
    # the marker that closes this sample's plain turns, where the full render has it right after the agreed part
    markers = sorted({text[s:e] for s, e, whole, calls in ends if whole and not calls and text[s:e].strip()}, key=len)
    for end in ends:
        if not end[2]:
            end[1] += len(next((m for m in reversed(markers) if text.startswith(m, end[1])), ""))
    open_turns = sum(not text[s:e].strip() for s, e, _, _ in ends)
    spans += [(s, e) for s, e, _, _ in ends]
    return text, [s for s in spans if s[0] < s[1]], open_turns


def _turn_start(messages, tools, k, text, marks) -> int:
    """Where the model's output for turn k begins: after the previous message's content, the text the generation
    prompt puts there (its closing and this turn's header), found in the full render. Anchored on the previous
    message, as templates may render earlier turns differently (Mistral's system prompt joins the last user turn)."""
    prev = messages[k - 1].get("content") if k else None
    if isinstance(prev, str) and prev.strip():
        probe = [(k - 1, "content")]
        head, head_spans = _render_marked(messages[:k], probe, marks, tools, add_generation_prompt=True)
        full, full_spans = _render_marked(messages, probe, marks, tools)
        if full == text and 0 in head_spans and 0 in full_spans:
            pos = full_spans[0][1]
            return pos + _agreed_header(head[head_spans[0][1]:], text[pos:])
    base = _apply(messages[:k], tools) if k else ""
    prompt = _apply(messages[:k], tools, add_generation_prompt=True) if k else ""
    if not (prompt.startswith(base) and text.startswith(base)):
        raise ValueError(f"the chat template renders the turns before messages[{k}] differently once its tool call "
                         "follows, so the tool call cannot be located")
    return len(base) + _agreed_header(prompt[len(base):], text[len(base):])


def _agreed_header(header: str, rest: str) -> int:
    """How much of a generation prompt the full render has too: all of it, or up to the last whitespace before
    they differ (a prompt may open `<think>` where the training render does not)."""
    n = len(os.path.commonprefix((header, rest)))
    return n if n == len(header) else len(header[:n]) - len(re.search(r"\S*$", header[:n]).group())


def _closing(messages, pieces, marks, tools, k, text, anchor, last) -> tuple[int, int]:
    """What closes turn k: the template's text after the turn when the conversation ends there (the full render
    itself for the last message), as far as the full render agrees with it in whole words. So `<|im_end|>` and
    Llama's `<|eot_id|>` are trained, Phi-3's final `<|end|>\\n<|endoftext|>` only where it is written, the newline
    before Nemotron's `<SPECIAL_12>` too; the content's own trailing whitespace is not."""
    if k == len(messages) - 1:
        alone, alone_anchor = text, anchor
    else:
        alone, alone_spans = _render_marked(messages[:k + 1], pieces[:last + 1], marks, tools)
        if last not in alone_spans:
            return anchor, anchor
        alone_anchor = alone_spans[last][1]
    tail, rest = alone[alone_anchor:], text[anchor:]
    s = _piece(messages, pieces[last])
    trail = s[len(s.rstrip()):]
    if trail and tail.startswith(trail) and rest.startswith(trail):
        tail, rest, anchor = tail[len(trail):], rest[len(trail):], anchor + len(trail)
    n = len(os.path.commonprefix((tail, rest)))
    clean = n == len(tail) or tail[n].isspace() or (n < len(rest) and rest[n].isspace()) \
        or any(tail[:n].endswith(t) for t in _worker["added"])  # a cut between tokens, not inside one
    agreed = tail[:n] if clean else re.sub(r"\S+$", "", tail[:n])
    return anchor, anchor + len(agreed.rstrip()), n >= len(tail.rstrip())


def label_tokens(ids: list[int], offsets: list[tuple[int, int]], spans) -> np.ndarray:
    """Labels for one sample: the tokens that overlap a span (a token may carry the space before the content)."""
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
    trained = np.zeros(len(ids), dtype=bool)
    for s, e in spans:
        trained |= (ends > s) & (starts < e)
    return np.where(trained, np.asarray(ids, dtype=np.int64), IGNORE).astype(np.int32)


def tokenize_chunk(chunk: list[tuple[int, bytes]]) -> dict:
    """Tokenize a chunk of (line number, raw line); runs in a worker process."""
    out = {"ids": [], "labels": [], "lengths": [], "too_long": 0, "no_loss_tokens": 0, "turns_without_end": 0,
           "rejects": []}
    texts, spans, open_turns = [], [], []
    for lineno, raw in chunk:
        try:
            text, sample_spans, n_open = render(parse_line(raw))
        except ValueError as e:
            out["rejects"].append((lineno, str(e), raw.decode("utf-8", "replace").rstrip("\n")))
            continue
        texts.append(text)
        spans.append(sample_spans)
        open_turns.append(n_open)
    if texts:
        # the Rust tokenizer directly: transformers' per-sample dict conversion costs ~15% of tokenization
        encodings = _worker["tok"].backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        for enc, sample_spans, n_open in zip(encodings, spans, open_turns):
            ids, offsets = enc.ids, enc.offsets
            if len(ids) > _worker["max_seq_len"]:
                out["too_long"] += 1
                continue
            labels = label_tokens(ids, offsets, sample_spans)
            if not (labels[1:] != IGNORE).any():  # the first token is never predicted
                out["no_loss_tokens"] += 1
                continue
            out["ids"].append(np.asarray(ids, dtype=np.uint32))
            out["labels"].append(labels)
            out["lengths"].append(len(ids))
            out["turns_without_end"] += n_open
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
    lengths, loss_tokens, open_turns = [], 0, 0
    pool = Pool(num_proc, initializer=_init_pool_worker, initargs=init_args) if num_proc > 1 else None
    results = (pool.imap if pool else map)(tokenize_chunk, read_chunks(data_path, hasher))
    try:
        with open(tmp / "ids.bin", "wb") as fi, open(tmp / "labels.bin", "wb") as fl, \
                open(tmp / "rejects.jsonl", "w") as fr:
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
                for ids, labels in zip(res["ids"], res["labels"]):
                    fi.write(ids.tobytes())
                    fl.write(labels.tobytes())
                    loss_tokens += int((labels[1:] != IGNORE).sum())
                lengths.extend(res["lengths"])
    finally:
        if pool:
            pool.terminate()
    if not lengths:
        raise ConfigError(f"{data_path}: no sample left to train on (dropped: {counts}); check max_seq_len "
                          "and that samples have assistant turns")
    _bin_to_npy(tmp / "ids.bin", tmp / "input_ids.npy", np.uint32)
    _bin_to_npy(tmp / "labels.bin", tmp / "labels.npy", np.int32)
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    if not counts["invalid"]:
        (tmp / "rejects.jsonl").unlink()
    hist, edges = np.histogram(lengths, bins=min(20, len(set(lengths))))
    return {"source": os.path.abspath(data_path), "source_sha256": hasher.hexdigest(), "num_samples": len(lengths),
            "dropped": counts, "total_tokens": int(sum(lengths)), "loss_tokens": loss_tokens,
            "turns_without_end": open_turns,
            "length_histogram": {"edges": [int(e) for e in edges], "counts": hist.tolist()}}


def _bin_to_npy(raw: Path, out: Path, dtype):
    """Raw bytes streamed to disk during tokenization -> .npy, without holding the array in memory."""
    n = raw.stat().st_size // np.dtype(dtype).itemsize
    arr = np.lib.format.open_memmap(out, mode="w+", dtype=dtype, shape=(n,))
    arr[:] = np.memmap(raw, dtype=dtype, mode="r", shape=(n,)) if n else arr[:]
    arr.flush()
    del arr
    raw.unlink()


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
    from model import resolve_model_path
    model_path = resolve_model_path(cfg.model_path)
    meta = tokenize_dataset(cfg.data_path, model_path, cfg.data_output_dir, cfg.max_seq_len, cfg.chat_tmpl_path,
                            cfg.num_proc, args.skip_invalid)
    print(summary(meta, cfg.data_output_dir))
    print("sample 0 (trained tokens in [[...]]):\n" + show_sample(load_tokenized(cfg.data_output_dir), _worker["tok"]))
    if meta["dropped"]["invalid"]:
        print(f"{meta['dropped']['invalid']} rejected line(s) with reasons: {cfg.data_output_dir}/rejects.jsonl")


if __name__ == "__main__":
    sys.exit(exit_on_error(main))
