"""``python -m pretrain ...``: the ``pacsnode pretrain`` verbs, for launchers such as torchrun."""

from pretrain.command import app

app(prog_name="pacsnode pretrain")
