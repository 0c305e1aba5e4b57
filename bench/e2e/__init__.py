"""End-to-end benchmark: study completion to SR at the destination, per family, on CPU (see bench/README.md).

Run ``python -m bench.e2e`` (5 studies a family, 1 and 2 workers) or ``--quick`` for a smoke run.
"""
