"""One adapter per training framework: `composer/` (the algorithm and its method card), `hf` and `deepspeed`.

Each imports its framework itself; importing this package imports nothing heavy.
"""
