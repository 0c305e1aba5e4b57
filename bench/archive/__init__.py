"""``python -m bench.archive``: ``pretrain index`` and ``prepare`` at a million frames."""
