"""Real runs: launcher, worker, metrics schema and run store."""
