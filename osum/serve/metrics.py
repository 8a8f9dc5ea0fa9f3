"""Server metrics in the Prometheus text exposition format, written by hand (no client library).

Counters, gauges and histograms keyed by label tuples; `Metrics.render()` is what `GET /metrics` returns.
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _format_labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = list(labels) + ([extra] if extra else [])
    if not items:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in items)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(items, escaped)) + "}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """Thread-safe: the batching thread and the event loop both record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[Labels, Histogram]] = defaultdict(dict)
        self._buckets: dict[str, tuple[float, ...]] = {}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)

    def gauge(self, name: str, help: str) -> None:
        self._help[name] = ("gauge", help)

    def histogram(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self._help[name] = ("histogram", help)
        self._buckets[name] = buckets

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            self._values[name][key] = self._values[name].get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[name][_labels(labels)] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            hist = self._histograms[name].get(key)
            if hist is None:
                hist = self._histograms[name][key] = Histogram(self._buckets[name])
            hist.observe(value)

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values[name].get(_labels(labels), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name, (kind, help) in self._help.items():
                lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]
                if kind != "histogram":
                    for labels, value in sorted(self._values.get(name, {}).items()):
                        lines.append(f"{name}{_format_labels(labels)} {_number(value)}")
                    continue
                for labels, hist in sorted(self._histograms.get(name, {}).items()):
                    cumulative = 0
                    for bound, count in zip(hist.buckets, hist.counts):
                        cumulative += count
                        lines.append(f"{name}_bucket{_format_labels(labels, ('le', _number(bound)))} {cumulative}")
                    lines.append(f"{name}_bucket{_format_labels(labels, ('le', '+Inf'))} {hist.count}")
                    lines.append(f"{name}_sum{_format_labels(labels)} {_number(hist.sum)}")
                    lines.append(f"{name}_count{_format_labels(labels)} {hist.count}")
        return "\n".join(lines) + "\n"


def server_metrics() -> Metrics:
    """Every metric the server records, declared once so /metrics lists them before their first event."""
    m = Metrics()
    m.counter("osum_requests_total", "HTTP requests answered, by route and status code")
    m.counter("osum_errors_total", "requests that failed, by kind of error")
    m.histogram("osum_request_seconds", "time from request to last response byte, by route", LATENCY_BUCKETS)
    m.gauge("osum_queue_depth", "requests admitted and not yet finished (waiting or generating)")
    m.gauge("osum_queue_pieces", "audio pieces waiting for a batch")
    m.counter("osum_batches_total", "batched generate calls")
    m.histogram("osum_batch_size", "pieces per batched generate call", BATCH_BUCKETS)
    m.histogram("osum_generate_seconds", "wall time of one batched generate call", LATENCY_BUCKETS)
    m.counter("osum_generated_tokens_total", "tokens generated, stop tokens excluded")
    m.counter("osum_audio_seconds_total", "seconds of audio in admitted requests")
    m.counter("osum_cancelled_total", "requests whose work was cancelled, by reason")
    m.counter("osum_redecoded_pieces_total", "pieces decoded again because their output looped (loop guard)")
    for name in ("osum_queue_depth", "osum_queue_pieces", "osum_batches_total", "osum_generated_tokens_total",
                 "osum_audio_seconds_total", "osum_redecoded_pieces_total"):
        m.set(name, 0)  # unlabelled series exist from the start
    return m
