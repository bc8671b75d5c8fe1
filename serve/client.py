"""The one way sdg, eval and chat reach an OpenAI-compatible server: the key, the client, the model, the slots.

The key comes from MINILAB_API_KEY, else OPENAI_API_KEY; local servers without a key need neither.
"""
from __future__ import annotations

import os

import httpx
import openai

from config import ConfigError

API_KEY_ENVS = ("MINILAB_API_KEY", "OPENAI_API_KEY")  # the first one set wins


def api_key() -> str | None:
    return next((os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)


def connect(endpoint: str, model: str | None, timeout_s: float, retries: int, role: str = "server",
            verify: bool = True) -> tuple[openai.OpenAI, str]:
    """A client and the model to ask (the first one served when `model` is None); a clear error when the
    endpoint cannot be used. `role` names it in errors: teacher, judge, model. verify=False with a named model
    sends nothing yet, so work that is all cached needs no server."""
    client = openai.OpenAI(base_url=endpoint.rstrip("/"), api_key=api_key() or "unused", timeout=timeout_s,
                           max_retries=retries)
    if model is not None and not verify:
        return client, model
    try:
        served = [m.id for m in client.models.list().data]
    except openai.AuthenticationError:
        raise ConfigError(f"the {role} at {endpoint} rejected the API key; export {API_KEY_ENVS[0]}=<the server's "
                          "key>") from None
    except (openai.APIConnectionError, openai.APIStatusError) as e:
        raise ConfigError(f"cannot reach the {role} at {endpoint} after {retries} retries ({type(e).__name__}: {e}); "
                          "start one with `python -m serve`, or pass a working endpoint (and model)") from None
    if model is None:
        if not served:
            raise ConfigError(f"the {role} at {endpoint} serves no model; pass --model NAME")
        model = served[0]
    return client, model


def server_slots(endpoint: str) -> int | None:
    """How many requests the server computes at once, from llama.cpp's `GET /props` (`total_slots`; `python -m
    serve` answers it too); None when the server does not say (vLLM, hosted APIs)."""
    root = endpoint.rstrip("/").removesuffix("/v1")
    key = api_key()
    try:
        reply = httpx.get(f"{root}/props", timeout=10.0, headers={"Authorization": f"Bearer {key}"} if key else {})
        slots = int(reply.json()["total_slots"]) if reply.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):  # no such route, not JSON, no such field
        return None
    return slots if slots and slots > 0 else None
