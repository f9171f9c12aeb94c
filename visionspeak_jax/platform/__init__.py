"""Where the code meets the machine: XLA:CPU settings, huge pages, multi-
process start-up, paths."""
