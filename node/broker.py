"""The broker between node and workers, as Celery and kombu see it.

One place builds the Celery configuration for both sides, so publisher and workers agree on
queues, serialisation and the GPU discipline (late ack, reject on worker loss, prefetch 1, a
visibility timeout longer than any task). Production uses Redis; the embedded default uses
kombu's filesystem transport below the data folder: no server, still a real worker process
consuming real messages, but no redelivery of a message whose worker died, and one host only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Connection, Queue

from config.settings import Settings

QUEUE_PREFIX = "pacsnode."
# Redis transport: lists are read in ascending priority_steps order, so 0 is taken first.
REDIS_PRIORITY = {"urgent": 0, "routine": 9}


def pipeline_queue(pipeline: str) -> str:
    """One Celery queue per pipeline, so hosts can serve only the pipelines their GPUs hold."""
    return f"{QUEUE_PREFIX}{pipeline}"


def embedded_folder(settings: Settings) -> Path:
    return settings.node.data_dir / "broker"


def broker_url(settings: Settings) -> str:
    if settings.broker.url is not None:
        return settings.broker.url.get_secret_value()
    return "filesystem://"


def transport_options(settings: Settings) -> dict[str, Any]:
    if settings.broker.url is not None:
        return {
            "visibility_timeout": settings.broker.visibility_timeout_s,
            "priority_steps": list(range(10)),
            "sep": ":",
            "queue_order_strategy": "priority",
        }
    folder = embedded_folder(settings)
    for sub in ("messages", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder / "messages"),
        "data_folder_out": str(folder / "messages"),
        "control_folder": str(folder / "control"),
        "polling_interval": 0.2,
    }


def make_celery(settings: Settings, name: str = "pacsnode") -> Celery:
    app = Celery(name, broker=broker_url(settings), set_as_current=False)
    embedded = settings.broker.url is None
    app.conf.update(
        broker_transport_options=transport_options(settings),
        broker_connection_timeout=settings.broker.connect_timeout_s,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_priority=REDIS_PRIORITY["routine"],
        worker_enable_remote_control=not embedded,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app


def connection(settings: Settings) -> Connection:
    """A kombu connection to the broker (for the report queue)."""
    return Connection(
        broker_url(settings),
        transport_options=transport_options(settings),
        connect_timeout=settings.broker.connect_timeout_s,
    )


def report_queue(settings: Settings) -> Queue:
    return Queue(settings.broker.report_queue, durable=True)
