"""tokenize_data.py with the real SmolLM2 tokenizer: loss masks, templates, drops and bad input."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import FAMILIES, ROOT, build_tiny_family, write_jsonl

from config import ConfigError
from tokenize_data import load_tokenized, load_tokenizer, tokenize_dataset

# A second template, Llama-3 like in shape: a BOS, plain-text role headers, <|endoftext|> ends each turn,
# content trimmed, unknown roles rejected.
OTHER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('Unknown role: ' + m['role']) }}"
    "{% endif %}{{ '### ' + m['role'] | capitalize + ':\\n' + m['content'] | trim + '<|endoftext|>\\n' }}"
    "{% endfor %}")

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "Name a color."}, {"role": "assistant", "content": " Blue \n"}]},
    {"messages": [{"role": "user", "content": "Unicode?"},
                  {"role": "assistant", "content": "Café ☕, naïve, 日本語, emoji 🚀 — done."}]},
]


def trained_runs(data, tok, i):
    """Decoded runs of consecutive trained tokens, whitespace a merged token carries stripped."""
    a, b = data["offsets"][i], data["offsets"][i + 1]
    ids, labels = np.asarray(data["input_ids"][a:b]), np.asarray(data["labels"][a:b])
    assert np.array_equal(labels[labels != -100], ids[labels != -100].astype(np.int32))
    trained = np.flatnonzero(labels != -100)
    # a new run starts where untrained non-whitespace text lies between two trained tokens
    cuts = [k + 1 for k in range(len(trained) - 1)
            if tok.decode(ids[trained[k] + 1:trained[k + 1]].tolist()).strip()]
    return [tok.decode(ids[r].tolist()).strip() for r in np.split(trained, cuts)]


@pytest.mark.parametrize("template", [None, OTHER_TEMPLATE], ids=["smollm2-chatml", "llama3-style-file"])
def test_only_assistant_content_and_end_of_turn_are_trained(tmp_path, embedded_dir, tokenizer, template):
    src = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    tmpl_path = None
    if template:
        tmpl_path = tmp_path / "tmpl.jinja"
        tmpl_path.write_text(template)
    eot = "<|endoftext|>" if template else "<|im_end|>"
    meta = tokenize_dataset(src, embedded_dir, str(tmp_path / "out"), 512, tmpl_path and str(tmpl_path))
    data = load_tokenized(str(tmp_path / "out"))
    assert meta["num_samples"] == 3 and len(data["offsets"]) == 4
    for i, conv in enumerate(CONVERSATIONS):
        expected = [m["content"].strip() + eot for m in conv["messages"] if m["role"] == "assistant"]
        assert trained_runs(data, tokenizer, i) == expected
    first = np.asarray(data["input_ids"][: data["offsets"][1]]).tolist()
    # SmolLM2's BOS is <|im_start|>: the file template writes it once; ChatML opens each of the 3 turns with it
    # (its default system turn, user, assistant), and the tokenizer adds no other
    assert first[0] == tokenizer.bos_token_id and first.count(tokenizer.bos_token_id) == (1 if template else 3)
    assert first[1] != tokenizer.bos_token_id  # no double BOS
    assert meta["total_tokens"] == int(data["offsets"][-1]) == len(data["input_ids"])
    assert data["input_ids"].dtype == np.uint32 and data["labels"].dtype == np.int32
    assert data["offsets"].dtype == np.int64


def test_unmask_pretraining_and_drops(tmp_path, embedded_dir, tokenizer):
    rows = [
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Question here"},
                      {"role": "assistant", "content": "Answer here"}], "unmask": True},
        {"messages": [{"role": "pretraining", "content": "Raw text to learn, all of it."}]},
        {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "too long"}]},
        {"messages": [{"role": "user", "content": "no assistant turn at all"}]},
        {"messages": [{"role": "user", "content": "kept"}, {"role": "assistant", "content": "yes"}]},
    ]
    meta = tokenize_dataset(write_jsonl(tmp_path / "d.jsonl", rows), embedded_dir, str(tmp_path / "o"), 128)
    data = load_tokenized(str(tmp_path / "o"))
    assert meta["num_samples"] == 3
    assert meta["dropped"] == {"too_long": 1, "no_loss_tokens": 1, "invalid": 0}
    assert trained_runs(data, tokenizer, 0) == ["Question here<|im_end|>", "Answer here<|im_end|>"]
    a, b = data["offsets"][1], data["offsets"][2]
    assert (np.asarray(data["labels"][a:b]) != -100).all()
    assert tokenizer.decode(np.asarray(data["input_ids"][a:b]).tolist()) == "Raw text to learn, all of it.<|im_end|>"
    assert meta["loss_tokens"] == sum(int((np.asarray(data["labels"][data["offsets"][i] + 1:data["offsets"][i + 1]])
                                           != -100).sum()) for i in range(3))
    assert sum(meta["length_histogram"]["counts"]) == 3


BAD_LINES = [
    ('{"messages": [', "invalid JSON"),
    ('{"text": "no messages"}', "expected"),
    ('{"messages": []}', "at least one message"),
    ('{"messages": [{"role": "user", "content": 5}]}', "must be a string"),
    ('{"messages": [{"role": "user", "content": "a"}], "unmask": "yes"}', "unmask"),
    ('{"messages": [{"role": "pretraining", "content": "a"}, {"role": "user", "content": "b"}]}', "cannot be mixed"),
    ('{"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}', "rejected"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_names_file_and_line_and_leaves_no_output(tmp_path, embedded_dir, line, reason):
    good = json.dumps(CONVERSATIONS[0])
    src = write_jsonl(tmp_path / "bad.jsonl", [good, good, line])
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text(OTHER_TEMPLATE)
    with pytest.raises(ConfigError, match=rf"bad.jsonl:3: .*{reason}"):
        tokenize_dataset(src, embedded_dir, str(tmp_path / "out"), 512, str(tmpl))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_skip_invalid_writes_rejects(tmp_path, embedded_dir):
    good = json.dumps(CONVERSATIONS[0])
    src = write_jsonl(tmp_path / "mixed.jsonl", [good, BAD_LINES[0][0], good, BAD_LINES[3][0]])
    meta = tokenize_dataset(src, embedded_dir, str(tmp_path / "out"), 512, skip_invalid=True)
    assert meta["num_samples"] == 2 and meta["dropped"]["invalid"] == 2
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 4] and "invalid JSON" in rejects[0]["reason"]


def test_a_line_the_template_rejects_fails_alone_and_the_first_bad_line_is_reported(tmp_path, embedded_dir):
    """Conversations are rendered in batches: the tool-role line the template raises for is redone alone, the
    conversations around it come out as they do without it, and of two bad lines the earlier one is named."""
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text(OTHER_TEMPLATE)
    good = [json.dumps(c) for c in CONVERSATIONS]
    rejected = BAD_LINES[-1][0]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [good[0], rejected, good[1], good[2]])
    meta = tokenize_dataset(mixed, embedded_dir, str(tmp_path / "mixed"), 512, str(tmpl), skip_invalid=True)
    alone = write_jsonl(tmp_path / "good.jsonl", good)
    tokenize_dataset(alone, embedded_dir, str(tmp_path / "good"), 512, str(tmpl))
    got, want = load_tokenized(str(tmp_path / "mixed")), load_tokenized(str(tmp_path / "good"))
    assert meta["num_samples"] == 3 and meta["dropped"]["invalid"] == 1
    for key in ("input_ids", "labels", "offsets"):
        assert np.array_equal(got[key], want[key]), key
    reject, = [json.loads(x) for x in (tmp_path / "mixed" / "rejects.jsonl").read_text().splitlines()]
    assert reject["line"] == 2 and "rejected" in reject["reason"]
    both = write_jsonl(tmp_path / "both.jsonl", [good[0], rejected, BAD_LINES[0][0]])  # render, then parse error
    with pytest.raises(ConfigError, match=r"both.jsonl:2: .*rejected"):
        tokenize_dataset(both, embedded_dir, str(tmp_path / "out"), 512, str(tmpl))


def test_empty_file_missing_model_and_cli_errors_without_traceback(tmp_path, embedded_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.jsonl is empty"):
        tokenize_dataset(str(empty), embedded_dir, str(tmp_path / "out"), 512)
    src = write_jsonl(tmp_path / "bad.jsonl", ['{"messages": ['])
    for args, expect in ([f"--data-path={src}", f"--model-path={embedded_dir}"], "bad.jsonl:1"), \
                        ([f"--data-path={src}", "--model-path=/no/such/model"], "/no/such/model"):
        r = subprocess.run([sys.executable, "tokenize_data.py", *args, f"--data-output-dir={tmp_path}/cli"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "cli").exists()


def test_parallel_matches_single_process(tmp_path, embedded_dir):
    src = write_jsonl(tmp_path / "many.jsonl", CONVERSATIONS * 400)  # several chunks
    one = tokenize_dataset(src, embedded_dir, str(tmp_path / "one"), 512, num_proc=1)
    two = tokenize_dataset(src, embedded_dir, str(tmp_path / "two"), 512, num_proc=2)
    assert one["num_samples"] == two["num_samples"] == 1200
    a, b = load_tokenized(str(tmp_path / "one")), load_tokenized(str(tmp_path / "two"))
    for key in ("input_ids", "labels", "offsets"):
        assert np.array_equal(a[key], b[key])
        saved = io.BytesIO()  # streamed to disk under a header written first: byte for byte what np.save writes
        np.save(saved, np.asarray(a[key]))
        assert (tmp_path / "two" / f"{key}.npy").read_bytes() == saved.getvalue()


# Real chat templates (tests/data/chat_templates/, sources in LICENSES.md), each with the special tokens its model
# registers, put on a copy of the SmolLM2 tokenizer so that they tokenize as one token each, as in that model.
TEMPLATES = ROOT / "tests" / "data" / "chat_templates"
TEMPLATE_NAMES = sorted(p.stem for p in TEMPLATES.glob("*.jinja"))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = {"type": "function", "id": "call00001", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def template_tokenizer(tokenizer, name, tmp_path, register=True):
    """A tokenizer folder: SmolLM2's vocabulary plus the template model's special tokens (when `register`)."""
    import copy
    spec = json.loads((TEMPLATES / f"{name}.json").read_text())
    tok = copy.deepcopy(tokenizer)
    if register:
        added = {"additional_special_tokens": spec["special"]}
        added.update({k + "_token": spec[k] for k in ("bos", "eos") if spec[k]})
        tok.add_special_tokens(added, replace_extra_special_tokens=False)
        assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in spec["special"])
    out = tmp_path / f"tok-{name}-{register}"
    tok.save_pretrained(out)
    return str(out), tok, spec


def conversations(spec):
    """Conversations with the expected trained text of each assistant turn (content, reasoning and tool calls the
    template renders, plus the turn's end marker), built from the messages and the template's own markers."""
    system = [{"role": "system", "content": "You are terse. Answer user questions."}] if spec["system"] else []
    short = ["a", "s", "end", "start", "user", "A"]
    turns = []
    for k, answer in enumerate(short):
        turns += [{"role": "user", "content": f"Question {k}: give a one-word answer"},
                  {"role": "assistant", "content": answer}]
    spaced = [{"role": "user", "content": "  Unicode? \n"},
              {"role": "assistant", "content": "  Café ☕, naïve, 日本語, emoji 🚀 — done.\n\n"},
              {"role": "user", "content": "A color?"}, {"role": "assistant", "content": " Blue \n"}]
    reasoning = [{"role": "user", "content": "What is 2+2?"},
                 {"role": "assistant", "reasoning_content": " Two plus two: start at 2, add 2, get 4.\n",
                  "content": "4"}]
    samples = [{"messages": system + turns}, {"messages": system + spaced}, {"messages": reasoning}]
    if spec.get("tool_call"):
        samples.append({"tools": TOOLS, "messages": system + [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp_c": 21}'},
            {"role": "assistant", "content": "It is 21 °C in Paris."}]})
    expected = []
    for sample in samples:
        assistant = [m for m in sample["messages"] if m["role"] == "assistant"]
        runs = []
        for i, m in enumerate(assistant):
            end = spec.get("last_end", spec["end"]) if i == len(assistant) - 1 else spec["end"]
            if "tool_calls" in m:
                fn = m["tool_calls"][0]["function"]
                text = spec["tool_call"].replace("{name}", fn["name"]).replace("{id}", m["tool_calls"][0]["id"])
                text = text.replace("{args}", json.dumps(fn["arguments"]))
            elif "reasoning_content" in m and spec.get("reasoning_between"):
                text = m["reasoning_content"].strip() + spec["reasoning_between"] + m["content"].strip()
            else:
                text = m["content"].strip()
            runs.append(text + end)
        expected.append(runs)
    return samples, expected


def trained_text_runs(data, tok, i):
    """The trained tokens of sample i decoded, one string per run of trained tokens with nothing but whitespace
    untrained between them (the content's own trailing whitespace is not trained)."""
    a, b = data["offsets"][i], data["offsets"][i + 1]
    ids, labels = np.asarray(data["input_ids"][a:b]), np.asarray(data["labels"][a:b])
    assert np.array_equal(labels[labels != -100], ids[labels != -100].astype(np.int32))
    trained = np.flatnonzero(labels != -100)
    cuts = [k + 1 for k in range(len(trained) - 1) if tok.decode(ids[trained[k] + 1:trained[k + 1]].tolist()).strip()]
    return [tok.decode(ids[r].tolist()) for r in np.split(trained, cuts)]


def assert_runs(got, expected):
    assert len(got) == len(expected), (got, expected)
    for run, exp in zip(got, expected):
        # a token may carry the one whitespace character the template puts before the content
        assert run == exp or (run[:1].isspace() and run[1:] == exp), (run, exp)


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_real_templates_train_exactly_the_assistant_turns(tmp_path, tokenizer, name):
    model_dir, tok, spec = template_tokenizer(tokenizer, name, tmp_path)
    samples, expected = conversations(spec)
    src = write_jsonl(tmp_path / "chat.jsonl", samples)
    meta = tokenize_dataset(src, model_dir, str(tmp_path / "out"), 1024, str(TEMPLATES / f"{name}.jinja"))
    data = load_tokenized(str(tmp_path / "out"))
    assert meta["num_samples"] == len(samples) and meta["dropped"]["invalid"] == 0
    assert meta["turns_without_end"] == 0
    for i, exp in enumerate(expected):
        assert_runs(trained_text_runs(data, tok, i), exp)


@pytest.mark.parametrize("name", ["gemma-2", "granite-3.3", "phi-3.5", "nemotron-nano-v2"])
def test_end_markers_that_are_not_registered_tokens_are_still_trained(tmp_path, tokenizer, name):
    """Without the model's special tokens the end marker is several ordinary tokens (`<`, `end`, `_`, ...), and the
    headers share them: the marker after each answer is trained in full, the headers' pieces are not."""
    model_dir, tok, spec = template_tokenizer(tokenizer, name, tmp_path, register=False)
    spec = {**spec, "last_end": spec.get("last_end", spec["end"]).replace("<|endoftext|>", tok.eos_token)}
    samples, expected = conversations(spec)
    assert len(tok.encode(spec["end"].strip(), add_special_tokens=False)) > 3
    src = write_jsonl(tmp_path / "chat.jsonl", samples)
    tokenize_dataset(src, model_dir, str(tmp_path / "out"), 1024, str(TEMPLATES / f"{name}.jinja"))
    data = load_tokenized(str(tmp_path / "out"))
    for i, exp in enumerate(expected):
        assert_runs(trained_text_runs(data, tok, i), exp)


REJECTED = [  # (template, sample, reason): templates that would make the spans wrong reject the line instead
    ("deepseek-r1-distill-qwen", {"messages": [{"role": "user", "content": "2+2?"},
                                               {"role": "assistant", "content": "<think>easy</think>4"}]},
     r"cuts or changes messages\[1\]\.content"),
    ("gemma-2", {"messages": [{"role": "user", "content": "Weather?"},
                              {"role": "assistant", "content": "", "tool_calls": [CALL]}]},
     r"does not render the tool calls of messages\[1\]"),
]


@pytest.mark.parametrize("name,sample,reason", REJECTED, ids=["drops-think", "no-tool-calls"])
def test_templates_that_rewrite_or_drop_trained_text_reject_the_line(tmp_path, tokenizer, name, sample, reason):
    model_dir, _, _ = template_tokenizer(tokenizer, name, tmp_path)
    src = write_jsonl(tmp_path / "d.jsonl", [CONVERSATIONS[0], sample])
    with pytest.raises(ConfigError, match=rf"d.jsonl:2: .*{reason}"):
        tokenize_dataset(src, model_dir, str(tmp_path / "out"), 512, str(TEMPLATES / f"{name}.jinja"))


def test_a_template_without_end_markers_is_reported_once(tmp_path, embedded_dir, capsys):
    from tokenize_data import main
    tmpl = tmp_path / "bare.jinja"
    tmpl.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    src = write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS)
    main(["--config", "", f"--data-path={src}", f"--model-path={embedded_dir}",
          f"--data-output-dir={tmp_path}/out", f"--chat-tmpl-path={tmpl}", "--num-proc=1"])
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["turns_without_end"] == 4
    assert out.count("nothing closes 4 trained turn(s)") == 1


MESSAGE_ERRORS = [
    ({"role": "user", "content": "a", "tool_calls": [CALL]}, "only allowed on assistant"),
    ({"role": "assistant", "content": None}, "may be null only on an assistant message with tool_calls"),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}, r"tool_calls\[0\] must be"),
    ({"role": "assistant", "content": "a", "reasoning_content": 3}, "reasoning_content must be a string"),
]


@pytest.mark.parametrize("message,reason", MESSAGE_ERRORS)
def test_message_formats_are_validated(tmp_path, embedded_dir, message, reason):
    src = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"}, message]}])
    with pytest.raises(ConfigError, match=rf"d.jsonl:1: messages\[1\].*{reason}"):
        tokenize_dataset(src, embedded_dir, str(tmp_path / "out"), 512)
    src = write_jsonl(tmp_path / "t.jsonl", [{**CONVERSATIONS[0], "tools": {"name": "f"}}])
    with pytest.raises(ConfigError, match="t.jsonl:1: 'tools' must be a list"):
        tokenize_dataset(src, embedded_dir, str(tmp_path / "out"), 512)


def test_tokenize_cli_takes_any_max_seq_len(tmp_path, embedded_dir):
    """Tokenization checks its own settings only: max_batch_len is train.py's business, against the data."""
    src = write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS)
    r = subprocess.run([sys.executable, "tokenize_data.py", "--config", "", f"--data-path={src}",
                        f"--model-path={embedded_dir}", f"--data-output-dir={tmp_path}/out", "--max-seq-len", "4096"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["max_seq_len"] == 4096


def test_tokenized_data_is_reused_only_while_template_and_data_are_the_same(tmp_path, tiny_model_dir):
    import checkpoint
    import train
    from config import load_config
    tmpl = tmp_path / "t.jinja"
    tmpl.write_text((TEMPLATES / "gemma-2.jinja").read_text())
    src = write_jsonl(tmp_path / "d.jsonl", [CONVERSATIONS[0], CONVERSATIONS[2]])  # Gemma takes no system turn
    cfg = load_config(None, [f"model_path={tiny_model_dir}", f"data_path={src}", f"chat_tmpl_path={tmpl}",
                             f"data_output_dir={tmp_path}/out", "num_proc=1"])
    meta_file = tmp_path / "out" / "meta.json"
    before = checkpoint.fingerprint(cfg, train.prepare_data(cfg, tiny_model_dir, 0)["meta"])
    assert train._tokenized_matches(cfg, tiny_model_dir, meta_file)
    tmpl.write_text(tmpl.read_text().replace("<end_of_turn>", "<eot>"))  # edited in place: same path
    assert not train._tokenized_matches(cfg, tiny_model_dir, meta_file)
    data = train.prepare_data(cfg, tiny_model_dir, 0)
    assert "<eot>" in tokenize_decode(tiny_model_dir, data) and train._tokenized_matches(cfg, tiny_model_dir, meta_file)
    after = checkpoint.fingerprint(cfg, data["meta"])  # resuming across the edit is refused: same path, new text
    assert "chat_tmpl_path" not in after and before["chat_template_sha256"] != after["chat_template_sha256"]
    with open(src, "a") as f:
        f.write(json.dumps(CONVERSATIONS[0]) + "\n")
    assert not train._tokenized_matches(cfg, tiny_model_dir, meta_file)
    os.remove(src)
    with pytest.raises(ConfigError, match=f"data_path '{src}' not found"):
        train.prepare_data(cfg, tiny_model_dir, 0)


def tokenize_decode(model_dir, data):
    from model import load_tokenizer
    return load_tokenizer(model_dir).decode(np.asarray(data["input_ids"][: data["offsets"][1]]).tolist())


def test_checkpoint_renders_prompts_with_the_training_template(tmp_path, tiny_model_dir, dataset, tokenizer):
    from test_train import base_args, run_train
    from model import load_tokenizer
    tmpl = TEMPLATES / "gemma-2.jinja"
    out = tmp_path / "run"
    run_train(base_args(tiny_model_dir, {"data_path": dataset["data_path"], "data_output_dir": str(tmp_path / "tok")},
                        out, chat_tmpl_path=tmpl, max_steps=1, checkpoint_at_epoch=True))
    saved = load_tokenizer(str(out / "hf_format" / "last_epoch"))
    messages = [{"role": "user", "content": "Hi"}]
    prompt = saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer.apply_chat_template(messages, chat_template=tmpl.read_text(), tokenize=False,
                                                   add_generation_prompt=True)
    assert prompt.endswith("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_direct_tokenizer_load_is_what_autotokenizer_loads(tmp_path, tokenizer, family):
    """AutoTokenizer's class is remembered per folder, so the next load skips AutoTokenizer (which imports torch)
    where it picked the generic TokenizersBackend: the same class, Rust tokenizer, special tokens, added vocabulary
    and template for every model type (Qwen2's folders get Qwen2Tokenizer, from AutoTokenizer every time)."""
    from transformers import AutoTokenizer
    folder = build_tiny_family(tokenizer, tmp_path / family, family)
    first, direct, auto = load_tokenizer(folder), load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert type(first) is type(direct) is type(auto)
    assert direct.backend_tokenizer.to_str() == auto.backend_tokenizer.to_str()
    assert direct.special_tokens_map == auto.special_tokens_map and direct.get_added_vocab() == auto.get_added_vocab()
    assert direct.chat_template == auto.chat_template and direct.model_max_length == auto.model_max_length
    messages = CONVERSATIONS[0]["messages"]
    assert direct.apply_chat_template(messages, tokenize=True) == auto.apply_chat_template(messages, tokenize=True)


def test_tokenize_cli_never_imports_torch(tmp_path, embedded_dir):
    """Start-up is most of a small run's time, and torch most of the start-up: the embedded default (once exported)
    and a model folder (once loaded) both tokenize without it."""
    src = write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS)
    load_tokenizer(embedded_dir)  # AutoTokenizer's class for it, remembered (a first load on a new machine)
    for model in ("embedded", embedded_dir):
        code = ("import sys, tokenize_data; tokenize_data.main(['--config', '', '--data-path', sys.argv[1], "
                "'--model-path', sys.argv[2], '--data-output-dir', sys.argv[3]]); assert 'torch' not in sys.modules")
        r = subprocess.run([sys.executable, "-c", code, str(src), model, str(tmp_path / "out")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("text", ["🦜🚀 parrot rocket 🦜", "日本語のテキスト", " ☕☕ coffee\n\n", "x" * 40])
def test_labels_are_every_token_that_overlaps_a_span(tokenizer, text):
    """label_tokens takes a span's end tokens from char_to_token: the same tokens as testing every token's offsets
    against the span, also where a span's first or last character is split over several byte tokens."""
    from tokenize_data import label_tokens
    rendered = f"<|im_start|>assistant\n{text}<|im_end|>"
    enc = tokenizer.backend_tokenizer.encode(rendered, add_special_tokens=False)
    start = rendered.index(text)
    split_edges = 0
    for span in [(start, start + len(text)), (start + 1, start + len(text) - 1), (start, start + 1)]:
        labels = label_tokens(enc, np.asarray(enc.ids, dtype=np.uint32), [span])
        overlap = [e > span[0] and s < span[1] for s, e in enc.offsets]
        assert labels.tolist() == [i if t else -100 for i, t in zip(enc.ids, overlap)], span
        split_edges += sum(enc.offsets.count(enc.offsets[enc.char_to_token(c)]) > 1 for c in (span[0], span[1] - 1))
    if any(ord(c) > 0x3000 for c in text):  # this vocabulary splits these characters into byte tokens
        assert split_edges
