"""`python -m serve.chat [--endpoint URL]`: chat in the terminal with any OpenAI-compatible endpoint.

Replies stream as they are generated; the conversation is kept and sent each turn. /reset forgets it, /quit
(or Ctrl-D) leaves. The key comes from MINILAB_API_KEY, else OPENAI_API_KEY.
"""
from __future__ import annotations

import argparse
import sys

import openai

from config import ConfigError, add_profile_option, exit_on_error, fill_from_profile
from serve.client import connect

DEFAULT_ENDPOINT = "http://127.0.0.1:8000/v1"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve.chat", description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"base URL (default {DEFAULT_ENDPOINT})")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    p.add_argument("--system", default=None, help="system prompt (default: none, the chat template's own)")
    p.add_argument("--max-tokens", type=int, help="per reply (default: the profile's evaluate.chat_max_tokens)")
    p.add_argument("--temperature", type=float, default=0.7)
    add_profile_option(p, "evaluate", {"max_tokens": "chat_max_tokens"})
    args = p.parse_args(argv)
    fill_from_profile(args)
    return args


def stream_reply(client: openai.OpenAI, model: str, history: list[dict], max_tokens: int, temperature: float,
                 out=sys.stdout) -> str:
    """Print the reply as it streams in and return it whole."""
    stream = client.chat.completions.create(model=model, messages=history, max_tokens=max_tokens,
                                            temperature=temperature, stream=True)
    pieces = []
    for chunk in stream:
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            pieces.append(delta)
            out.write(delta)
            out.flush()
    out.write("\n")
    return "".join(pieces)


def main(argv=None) -> None:
    args = parse_args(argv)
    client, model = connect(args.endpoint, args.model, timeout_s=600.0, retries=0)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    print(f"chatting with {model} at {args.endpoint} (/reset forgets, /quit leaves)", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            return
        if text == "/reset":
            history = list(system)
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        try:
            reply = stream_reply(client, model, history, args.max_tokens, args.temperature)
        except KeyboardInterrupt:  # stop this reply, keep the session
            print("\n(interrupted)", file=sys.stderr)
            history.pop()
            continue
        except openai.APIError as e:
            raise ConfigError(f"the server failed to answer: {e}") from None
        history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    exit_on_error(main)
