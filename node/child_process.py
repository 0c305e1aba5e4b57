"""How pacsnode starts Python child processes: never with the working directory on ``sys.path``.

``python -c`` and ``python -m`` put the working directory first on the child's import path. With
an editable install a folder there named like one of our packages (a demo's ``node/`` data folder,
an ML engineer's ``models/``) becomes a namespace package ahead of ours and its subfolders shadow
our modules. ``-P`` (Python 3.11+, "safe path") prepends nothing; it is also passed on to the
children that ``multiprocessing``'s spawn start method makes from such a process.
"""

from __future__ import annotations

import sys


def pacsnode_command(*args: str) -> list[str]:
    """The argv that runs ``pacsnode ARGS...`` in a fresh interpreter of this environment."""
    return [sys.executable, "-P", "-m", "node.cli", *args]
