"""A stand-in for shardlab.run.worker in launcher fault tests: the same files and the same parent
watch, no torch. `python -m standin_worker RUN_DIR` (torchrun sets RANK / WORLD_SIZE) writes a start
event, one metrics line every 0.1 s for run.json's steps, then a done event, through file
descriptors opened once at start, as the real worker's Log does."""

import json
import os
import sys
import time
from pathlib import Path

from shardlab.run.watchdog import watch_parents


def main() -> int:
    run_dir = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    steps = json.loads((run_dir / "run.json").read_text())["steps"]
    fds = {n: os.open(run_dir / n, os.O_WRONLY | os.O_APPEND) for n in ("metrics.jsonl", "events.jsonl")}

    def write(name: str, obj: dict) -> None:
        os.write(fds[name], (json.dumps({"t": time.time(), "rank": rank, **obj}) + "\n").encode())

    def stop(why: str) -> None:
        write("events.jsonl", {"event": "error", "message": f"rank {rank} stopped: {why}", "kind": "orphaned"})
        os._exit(1)

    watch_parents(stop, interval=0.2)
    write("events.jsonl", {"event": "start", "pid": os.getpid(), "world_size": world})
    for step in range(1, steps + 1):
        time.sleep(0.1)
        write("metrics.jsonl", {"step": step, "world_size": world, "loss": 1.0, "step_time_s": 0.1})
    write("events.jsonl", {"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
