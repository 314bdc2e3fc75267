"""Plan -> the real tools' formats, one module per target. Pure functions, no I/O."""
