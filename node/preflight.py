"""What a configuration will do that its author may not mean: said by ``pacsnode config check``
and at ``pacsnode serve`` start, before the first study arrives rather than after it ended
``unmatched`` or without results.
"""

from __future__ import annotations

import os

from config.registry_layout import installed_versions
from config.settings import Settings


def settings_warnings(settings: Settings) -> list[str]:
    """One sentence per surprise: no routing, a routed pipeline without a model, nowhere to send results."""
    said: list[str] = []
    rules = settings.routing.rules
    if not rules:
        said.append("no routing rules (routing.rules is empty): every study will end 'unmatched' and no model runs")
    models_dir = settings.workers.models_dir
    # The node sees the registry when its own worker reads it, or when the folder is mounted here.
    readable = models_dir.is_dir() and os.access(models_dir, os.R_OK | os.X_OK)
    if readable or settings.workers.embedded:
        for pipeline in sorted({rule.pipeline for rule in rules}):
            if not readable or not installed_versions(models_dir, pipeline):
                users = ", ".join(rule.name for rule in rules if rule.pipeline == pipeline)
                said.append(f"pipeline '{pipeline}' (routing rule {users}) has no installed model in "
                            f"workers.models_dir {models_dir}: its studies will end 'not_applicable'")
    if not settings.destinations:
        said.append("no destinations: results stay in the node's store and are not sent to any PACS")
    return said
