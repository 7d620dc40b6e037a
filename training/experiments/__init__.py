"""Documented experiments: ``captioner experiment <name>`` (table in training/cli.py's EXPERIMENTS)."""
