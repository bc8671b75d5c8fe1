"""The teacher: any OpenAI-compatible endpoint, asked many prompts at once, every reply cached as it arrives.

No more requests are in flight than the server computes at once (its `/props` slots, else --concurrency): a
request queued behind others at a one-slot llama.cpp server would spend its timeout waiting, and the client's
retry would send the same work again. Retries with exponential backoff are the openai client's own
(`max_retries`). A request that still times out is skipped with a warning (a rerun asks it again); a connection,
authentication or server error stops the run with a clear error. What already arrived stays in the cache.
Replies are streamed: a run that stops (an error, Ctrl-C, a kill) closes its connections, and the server stops
computing the replies in flight at their next token instead of finishing them for nobody.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import sys
from collections import Counter
from pathlib import Path

import openai
from tqdm import tqdm

from config import ConfigError
from serve import client as server_client

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
    started: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))  # requests begun

    def _complete(self, job: dict) -> dict:
        """One streamed reply. A stream that ends without a finish_reason was cut off (IncompleteReply)."""
        number, parts, finish = next(self.started), [], None
        with self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": job["prompt"]}], stream=True,
                max_tokens=job["max_tokens"], temperature=job["temperature"], seed=job["seed"]) as stream:
            for chunk in stream:
                if not parts and os.environ.get("MINILAB_TEST_HOOK"):  # fault tests (README, "Test hooks")
                    from checkpoint import fault_point
                    fault_point("in_flight", number)
                choice = chunk.choices[0] if chunk.choices else None  # a usage-only chunk has none
                parts.append((choice.delta.content or "") if choice and choice.delta else "")
                finish = (choice.finish_reason if choice else None) or finish
        if finish is None:
            raise IncompleteReply
        return {"id": job["id"], "reply": "".join(parts), "finish_reason": finish}

    def ask(self, stage: str, jobs: list[dict], label: str = "") -> tuple[dict[str, dict], Counter]:
        """Reply records ({"reply", "finish_reason"}) by job id for every job that got one; cached jobs are not
        sent again.

        jobs: dicts with id, prompt, max_tokens, temperature, seed. The cache file is one JSONL per stage.
        """
        path = self.cache_dir / f"{stage}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        cached = load_cache(path)
        todo = [job for job in jobs if job["id"] not in cached]
        counts = Counter(requested=len(jobs), cached=len(jobs) - len(todo))
        self.counts["cached"] += counts["cached"]
        replies = {job["id"]: cached[job["id"]] for job in jobs if job["id"] in cached}
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
                        if isinstance(e, openai.APITimeoutError):  # a connection error's subclass, but this
                            self._skip(stage, counts, bar, "timed out after retries; a rerun asks it again "
                                                           "(or raise --timeout)")  # request only: the server lives
                            continue
                        raise ConfigError(
                            f"teacher at {self.endpoint} failed after retries: {type(e).__name__}: {e}. "
                            f"Work so far is kept in {self.cache_dir}; rerun the same command to resume "
                            "(check --endpoint, the API key in $MINILAB_API_KEY or $OPENAI_API_KEY, or raise --retries/--timeout)"
                        ) from None
                    except IncompleteReply:
                        self._skip(stage, counts, bar, "was cut off by the server (its stream ended with no "
                                                       "finish_reason); a rerun asks it again")
                        continue
                    except openai.APIError as e:  # this prompt only, e.g. longer than the teacher's context
                        status = f"{e.status_code}" if isinstance(e, openai.APIStatusError) else "in its stream"
                        self._skip(stage, counts, bar, f"was rejected ({status}): {str(e)[:200]}")
                        continue
                    # Flushed and synced one by one: a kill or Ctrl-C loses at most the requests in flight.
                    cache.write(json.dumps(record, ensure_ascii=False) + "\n")
                    cache.flush()
                    os.fsync(cache.fileno())
                    replies[record["id"]] = record
                    self.counts["written"] += 1
                    if os.environ.get("MINILAB_TEST_HOOK"):  # fault tests (README, "Test hooks"); imports torch
                        from checkpoint import fault_point
                        fault_point("after_request", self.counts["written"])
        except BaseException:  # the run stops: close the streams in flight, so the server stops computing them
            self.client.close()
            raise
        finally:
            bar.close()
            pool.shutdown(wait=False, cancel_futures=True)
        return replies, counts

    def _skip(self, stage: str, counts: Counter, bar, why: str):
        counts["failed"] += 1
        self.counts["failed"] += 1
        bar.write(f"warning: {stage}: a request {why}")


class IncompleteReply(Exception):
    """The server closed a reply's stream before saying why the reply ended."""


def connect(endpoint: str, model: str | None, cache_dir: Path, concurrency: int, timeout_s: float,
            retries: int) -> Teacher:
    client, model = server_client.connect(endpoint, model, timeout_s, retries, role="teacher", verify=False)
    slots = server_client.server_slots(endpoint)
    if slots and slots < concurrency:
        print(f"the teacher computes {slots} request(s) at a time (its /props): sending {slots} at once, not "
              f"--concurrency {concurrency}, so no request waits out its timeout in the server's queue",
              file=sys.stderr)
        concurrency = slots
    return Teacher(client=client, model=model, endpoint=endpoint, cache_dir=cache_dir, concurrency=concurrency)
