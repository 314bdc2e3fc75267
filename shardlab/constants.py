"""Exit codes of shardlab's programs: one home, read by the CLI, the worker and the launcher.

The other constants with one home each: units of memory in `shardlab.units` (GiB, GB, ...), the GPU
table's default GPU in `shardlab.estimate.gpus.DEFAULT_GPU`, the run store's location and its
environment variable in `shardlab.run.store` (`default_runs_dir`, `RUNS_DIR_ENV`).
"""

EXIT_OK = 0
EXIT_FAILED = 1  # a run that did not complete (`shardlab run`), a worker's failure
EXIT_BAD_INPUT = 2  # bad input: the message on stderr, no traceback (DESIGN.md's CLI contract)
EXIT_OOM = 3  # a worker rank that ran out of memory (the launcher reads it as status oom)
