"""The teacher: any OpenAI-compatible endpoint, asked many prompts at once, every reply cached as it arrives.

Retries with exponential backoff are the openai client's own (`max_retries`); a request that still fails on a
connection, timeout or server error stops the run with a clear error, and what already arrived stays in the cache.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import openai
from tqdm import tqdm

from config import ConfigError

API_KEY_ENVS = ("MINILAB_API_KEY", "OPENAI_API_KEY")  # first one set wins; local servers need none
# Errors that say the endpoint itself is unusable: stop instead of failing every remaining request.
FATAL_ERRORS = (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError,
                openai.NotFoundError, openai.RateLimitError, openai.InternalServerError)


def load_cache(path: Path) -> dict[str, dict]:
    """Records by id. A crash can leave half a last line: cut it so the next append starts on a clean line."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    records = {}
    for lineno, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{lineno}: corrupt cache line; delete that file to redo its stage") from None
        records[record["id"]] = record
    return records


def job_id(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


@dataclasses.dataclass
class Teacher:
    client: openai.OpenAI
    model: str
    endpoint: str
    cache_dir: Path
    concurrency: int = 4
    counts: Counter = dataclasses.field(default_factory=Counter)  # requests sent / cached / failed, whole run

    def _complete(self, job: dict) -> dict:
        response = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": job["prompt"]}],
            max_tokens=job["max_tokens"], temperature=job["temperature"], seed=job["seed"])
        choice = response.choices[0] if response.choices else None
        return {"id": job["id"], "reply": (choice.message.content or "") if choice else "",
                "finish_reason": choice.finish_reason if choice else None}

    def ask(self, stage: str, jobs: list[dict], label: str = "") -> tuple[dict[str, str], Counter]:
        """Replies by job id for every job that got one; cached jobs are not sent again.

        jobs: dicts with id, prompt, max_tokens, temperature, seed. The cache file is one JSONL per stage.
        """
        path = self.cache_dir / f"{stage}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        cached = load_cache(path)
        todo = [job for job in jobs if job["id"] not in cached]
        counts = Counter(requested=len(jobs), cached=len(jobs) - len(todo))
        self.counts["cached"] += counts["cached"]
        replies = {job["id"]: cached[job["id"]]["reply"] for job in jobs if job["id"] in cached}
        if not todo:
            return replies, counts
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency)
        bar = tqdm(total=len(jobs), initial=counts["cached"], desc=label or stage, unit="req", dynamic_ncols=True)
        try:
            with open(path, "a", encoding="utf-8") as cache:
                futures = [pool.submit(self._complete, job) for job in todo]
                for future in concurrent.futures.as_completed(futures):
                    bar.update(1)
                    self.counts["sent"] += 1
                    try:
                        record = future.result()
                    except FATAL_ERRORS as e:
                        raise ConfigError(
                            f"teacher at {self.endpoint} failed after retries: {type(e).__name__}: {e}. "
                            f"Work so far is kept in {self.cache_dir}; rerun the same command to resume "
                            "(check --endpoint, the API key in $MINILAB_API_KEY or $OPENAI_API_KEY, or raise --retries/--timeout)"
                        ) from None
                    except openai.APIStatusError as e:  # this prompt only, e.g. longer than the teacher's context
                        counts["failed"] += 1
                        self.counts["failed"] += 1
                        bar.write(f"warning: {stage}: request rejected ({e.status_code}): {str(e)[:200]}")
                        continue
                    # Flushed and synced one by one: a kill or Ctrl-C loses at most the requests in flight.
                    cache.write(json.dumps(record, ensure_ascii=False) + "\n")
                    cache.flush()
                    os.fsync(cache.fileno())
                    replies[record["id"]] = record["reply"]
                    self.counts["written"] += 1
                    if os.environ.get("MINILAB_TEST_HOOK"):  # fault tests (README, "Test hooks"); imports torch
                        from checkpoint import fault_point
                        fault_point("after_request", self.counts["written"])
        finally:
            bar.close()
            pool.shutdown(wait=False, cancel_futures=True)
        return replies, counts


def connect(endpoint: str, model: str | None, cache_dir: Path, concurrency: int, timeout_s: float,
            retries: int) -> Teacher:
    api_key = next((os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), "unused")
    client = openai.OpenAI(base_url=endpoint, api_key=api_key, timeout=timeout_s, max_retries=retries)
    if model is None:
        try:
            served = client.models.list().data
        except (openai.APIConnectionError, openai.APIStatusError) as e:
            raise ConfigError(f"cannot reach the teacher at {endpoint} after {retries} retries ({type(e).__name__}: {e}); "
                              "start one with `python -m serve`, or pass a working --endpoint (and --model)") from None
        if not served:
            raise ConfigError(f"the teacher at {endpoint} serves no model; pass --model NAME")
        model = served[0].id
    return Teacher(client=client, model=model, endpoint=endpoint, cache_dir=cache_dir, concurrency=concurrency)
