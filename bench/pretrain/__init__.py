"""Pretraining benchmark: image supply (shards vs DICOM on the fly), SwAV step vs lightly, index speed.

Run ``python -m bench.pretrain`` (full, ~5 min on 2 cores) or ``--quick`` for a smoke run; see
bench/README.md.
"""
