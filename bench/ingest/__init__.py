"""C-STORE ingest benchmark: pacsnode vs DCMTK storescp vs Orthanc (see bench/README.md).

Run ``python -m bench.ingest`` (full: 2,000 instances, 3 rounds) or ``--quick`` for a smoke run.
"""
