"""Where the trained text is in a rendered conversation: the span locator tokenize_data.py uses.

Each trained string (assistant content, reasoning, the name of a tool call) is wrapped in private-use markers,
the conversation is rendered by the chat template, and the markers are removed again: what they enclosed are the
character spans to train, exact whatever text the template puts around them. A template that drops, duplicates or
rewrites a marked string rejects the sample instead of mis-masking it. The end of each assistant turn is what the
template writes after it when the conversation ends there.
"""
from __future__ import annotations

import itertools
import os
import re

_worker: dict = {}  # tok, template, added (the tokenizer's added tokens): set by tokenize_data's worker init

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


def _apply_many(chats: list[tuple[list, list | None]]) -> list[str | ValueError]:
    """_apply of each (messages, tools), batched: apply_chat_template's own work per call is a third of a short
    conversation's render. Runs of equal tools share a call; a batch the template rejects is redone one by one, so
    only the conversations it rejects fail."""
    out = []
    for tools, run in itertools.groupby(chats, key=lambda chat: chat[1]):
        run = [messages for messages, _ in run]
        try:
            out += _worker["tok"].apply_chat_template(run, tools=tools, chat_template=_worker["template"],
                                                      tokenize=False)
        except Exception:  # one call each, to find the conversations it rejects
            for messages in run:
                try:
                    out.append(_apply(messages, tools))
                except ValueError as e:
                    out.append(e)
    return out


def _render_marked(messages, pieces, marks, tools, add_generation_prompt=False) -> tuple[str, dict]:
    return _located(_apply(_marked(messages, pieces, marks), tools, add_generation_prompt), pieces, marks)


def _located(rendered: str, pieces, marks) -> tuple[str, dict]:
    try:
        return _unmark(rendered, marks, len(pieces))
    except ValueError as err:
        k, field = pieces[err.args[0]]
        raise ValueError(f"the chat template cuts or changes messages[{k}].{field} when rendering it (e.g. it drops "
                         "the text before '</think>'), so its trained span cannot be located exactly") from None


def render_all(samples: list[dict]) -> list[tuple[str, list[tuple[int, int]], int] | ValueError]:
    """Each sample as text, the character spans to train on, and how many trained turns nothing closes; or the
    ValueError that rejects it.

    Each trained string (assistant content and reasoning; with `unmask`, every non-system message) is wrapped in
    markers, the conversation is rendered and the markers removed: the text must equal the plain render and every
    piece's markers must survive whole, or the sample is rejected, never mis-masked. Both renders of all samples
    are batched. A turn's span runs from its first piece to its last, with what the template puts between (the
    `</think>` after reasoning); a tool-call turn without content starts where the generation prompt ends. Then its
    end: see `_closing`."""
    results = [None] * len(samples)
    chats = []  # (index, turns, pieces) of each chat sample
    for i, sample in enumerate(samples):
        messages = sample["messages"]
        if messages[0]["role"] == "pretraining":
            text = "".join(m["content"] + _worker["tok"].eos_token for m in messages)
            results[i] = text, [(0, len(text))], 0
            continue
        turns = [k for k, m in enumerate(messages)
                 if m["role"] == "assistant" or (sample.get("unmask") and m["role"] != "system")]
        pieces = [(k, f) for k in turns for f in FIELDS + ("tool_call",)
                  if (messages[k].get("tool_calls") if f == "tool_call" else
                      isinstance(messages[k].get(f), str) and messages[k][f].strip())]
        chats.append((i, turns, pieces))
    plains = _apply_many([(samples[i]["messages"], samples[i].get("tools")) for i, _, _ in chats])
    marks = [None if isinstance(p, ValueError) else next((s for s in MARK_SETS if not any(ch in p for ch in s)), None)
             for p in plains]
    marked = iter(_apply_many([(_marked(samples[i]["messages"], pieces, m), samples[i].get("tools"))
                               for (i, _, pieces), m in zip(chats, marks) if m]))
    for (i, turns, pieces), plain, m in zip(chats, plains, marks):
        if isinstance(plain, ValueError):
            results[i] = plain
        elif m is None:
            results[i] = ValueError("the rendered text uses every private-use character the span markers could use")
        else:
            try:
                results[i] = _spans(samples[i], turns, pieces, plain, m, next(marked))
            except ValueError as e:
                results[i] = e
    return results


def _spans(sample, turns, pieces, plain, marks, marked) -> tuple[str, list[tuple[int, int]], int]:
    messages, tools = sample["messages"], sample.get("tools")
    if isinstance(marked, ValueError):
        raise marked
    text, located = _located(marked, pieces, marks)
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
