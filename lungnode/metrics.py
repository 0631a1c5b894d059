"""Prometheus metrics read from the job database at scrape time, so they survive restarts and need
no counters threaded through the node: studies by state, queue depth, pending deliveries and the
processing time of the studies now done (their latest run)."""
from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lungnode.dicom_node.db import DONE, FAILED, NOT_PROCESSED, PENDING, PROCESSING, QUEUED, RECEIVING

STATES = (RECEIVING, QUEUED, PROCESSING, DONE, NOT_PROCESSED, FAILED)
SECONDS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class JobDBCollector(Collector):
    """Reads the node's SQLite job database (read-only, its own connection) on every collect()."""

    def __init__(self, db_path: Path) -> None:
        self.uri = f"{Path(db_path).resolve().as_uri()}?mode=ro"

    def collect(self) -> Iterator[Metric]:
        with closing(sqlite3.connect(self.uri, uri=True, timeout=10)) as db:
            by_state = dict(db.execute("SELECT state, COUNT(*) FROM studies GROUP BY state").fetchall())
            pending = db.execute("SELECT COUNT(*) FROM deliveries WHERE state=?", (PENDING,)).fetchone()[0]
            seconds = [r[0] for r in db.execute(
                "SELECT seconds FROM studies WHERE state=? AND seconds IS NOT NULL", (DONE,))]

        yield CounterMetricFamily("lungnode_studies_received", "Studies the node has received (ever, one per "
                                  "Study Instance UID)", value=sum(by_state.values()))
        states = GaugeMetricFamily("lungnode_studies", "Studies by current state: receiving, queued, processing, "
                                   "done, not_processed, failed", labels=["state"])
        for state in STATES:
            states.add_metric([state], by_state.get(state, 0))
        yield states
        yield GaugeMetricFamily("lungnode_queue_depth", "Studies waiting for or in processing",
                                value=by_state.get(QUEUED, 0) + by_state.get(PROCESSING, 0))
        yield GaugeMetricFamily("lungnode_deliveries_pending", "Result deliveries not yet accepted by their "
                                "destination", value=pending)
        buckets = [(floatToGoString(b), sum(s <= b for s in seconds)) for b in SECONDS_BUCKETS]
        yield HistogramMetricFamily("lungnode_inference_seconds", "Processing time (series selection, volume, "
                                    "detection, report) of each study now done, its latest run",
                                    buckets=[*buckets, ("+Inf", len(seconds))], sum_value=sum(seconds))


def job_metrics(db_path: Path) -> CollectorRegistry:
    """A registry holding only the job-database metrics (no process metrics of the web server)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobDBCollector(db_path))
    return registry
