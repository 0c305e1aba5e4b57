"""The pretraining archive: pulled from a PACS (C-FIND, then C-MOVE or C-GET) or read from an
exported folder, de-identified before anything is written, and kept apart from the clinical store
(nothing here is ever routed to a pipeline)."""
