"""Estimators: memory, communication, step time and what fits. Pure arithmetic, fast."""
