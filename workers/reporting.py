"""Workers tell the node what happened through the broker's report queue, never its index."""

from __future__ import annotations

from kombu import Connection, Producer

from config.settings import Settings
from node.broker import report_queue
from node.messages import ReportMessage


def publish_report(conn: Connection, settings: Settings, report: ReportMessage) -> None:
    """Publish one report; retried by kombu while the broker reconnects."""
    queue = report_queue(settings)
    producer = Producer(conn)
    producer.publish(
        report.model_dump(mode="json"),
        routing_key=queue.name,
        declare=[queue],
        serializer="json",
        delivery_mode=2,
        retry=True,
        retry_policy={"max_retries": 10, "interval_start": 0.5, "interval_step": 1, "interval_max": 5},
    )
