"""The app's own metrics, as Ray Serve custom metrics (``ray.serve.metrics``).

Ray exports them on each node's Prometheus endpoint (``ray_`` prefixed, with Serve's
``deployment``, ``replica`` and ``application`` tags added), next to Serve's built-in request
metrics, so the dashboards and alerts that scrape Ray see them without another exporter:

    ray_dalle2_stage_latency_seconds{stage}          histogram: a batch's time in a model stage
    ray_dalle2_stage_requests_in_flight{stage}       gauge: requests a stage replica holds
    ray_dalle2_images_generated_total{kind}          counter: images returned (generation/variation/edit)
    ray_dalle2_ingress_image_requests_in_flight      gauge: image requests admitted at the ingress
    ray_dalle2_requests_rejected_total{reason}       counter: overloaded, rate_limited, deadline,
                                                     unauthorized, body_timeout, invalid_request

Created in the replicas' constructors, never at import (Ray imports this module everywhere).
"""

from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

# Seconds: a CPU forward of a tiny model is milliseconds, a 1024px upsampling batch minutes.
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]


class StageMetrics:
    """A model stage's latency histogram and in-flight gauge."""

    def __init__(self, stage: str):
        self.tags = {"stage": stage}
        self.latency = Histogram(
            "dalle2_stage_latency_seconds", "Time a batch spent in a model stage.", LATENCY_BUCKETS, tag_keys=("stage",)
        )
        self.in_flight = Gauge("dalle2_stage_requests_in_flight", "Requests a stage replica holds.", tag_keys=("stage",))
        self._in_flight = 0

    def observe(self, seconds: float) -> None:
        self.latency.observe(seconds, tags=self.tags)

    def change_in_flight(self, delta: int) -> None:
        self._in_flight += delta
        self.in_flight.set(self._in_flight, tags=self.tags)


class IngressMetrics:
    def __init__(self):
        self.images = Counter("dalle2_images_generated_total", "Images returned to clients.", tag_keys=("kind",))
        self.in_flight = Gauge("dalle2_ingress_image_requests_in_flight", "Image requests admitted at the ingress.")
        self.rejected = Counter("dalle2_requests_rejected_total", "Requests refused or cut short.", tag_keys=("reason",))

    def generated(self, kind: str, count: int) -> None:
        self.images.inc(count, tags={"kind": kind})

    def reject(self, reason: str) -> None:
        self.rejected.inc(tags={"reason": reason})
