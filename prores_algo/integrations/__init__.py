"""Integrations with training loops other than Composer's Trainer (Hugging Face, DeepSpeed).

Each submodule imports its framework itself; importing this package imports nothing heavy.
"""
