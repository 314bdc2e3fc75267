"""The `shardlab` subcommands, one module per group; `shardlab.cli` assembles them into one parser.

Each group module has `register(add)`: it adds its subcommands through `add(name, help, **kw)` (which
returns the subparser) and sets each one's handler as `fn`. Handlers are thin shells over library
functions and import heavy modules inside themselves, so `shardlab --help` stays fast.

- `configs`: validate, export, diff, import, translate (plan and config files, no model).
- `estimating`: estimate, calibrate (a plan on a model, predicted; a GPU measured).
- `running`: run, runs, report, app, doctor (real processes and the run store).
- `common`: what the handlers share (reading the plan argument, writing -o, the --model argument).
"""
