"""Constants with one home each: units of memory and the exit codes of shardlab's programs.

Memory is labelled GiB (2^30 bytes) or GB (10^9 bytes) everywhere; JSON figures are bytes. The GPU
table's default GPU lives with the table (`shardlab.estimate.gpus.DEFAULT_GPU`) and the run store's
location with the store (`shardlab.run.store.default_runs_dir`, `$SHARDLAB_RUNS_DIR`).
"""

KIB = 2**10
MIB = 2**20
GIB = 2**30  # what torch.cuda and nvidia-smi call "MiB"/"GiB" counts
GB = 10**9  # what the ZeRO paper, GPU datasheets and network links count

EXIT_OK = 0
EXIT_FAILED = 1  # a run that did not complete (`shardlab run`), a worker's failure
EXIT_BAD_INPUT = 2  # bad input: the message on stderr, no traceback (DESIGN.md's CLI contract)
EXIT_OOM = 3  # a worker rank that ran out of memory (the launcher reads it as status oom)
