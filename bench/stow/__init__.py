"""STOW-RS ingest throughput beside C-STORE, on the same node, files and machine."""
