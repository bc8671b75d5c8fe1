"""train.py whose rank 1 raises once, on its third optimizer step, to exercise torchrun --max-restarts."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
import train  # noqa: E402

marker = os.environ["CRASH_MARKER"]
real_step = train.train_step
calls = {"n": 0}


def crash_once(model, optimizer, step, data, rank, world_size, ctx):
    calls["n"] += 1
    if rank == 1 and calls["n"] == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("injected crash")
    return real_step(model, optimizer, step, data, rank, world_size, ctx)


train.train_step = crash_once
sys.exit(train.exit_on_error(train.main))
