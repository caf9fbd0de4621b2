"""The server's Prometheus metrics (GET /metrics): requests by route and status, prompt and
generated tokens, queue length and running batch size, time to first token and between tokens, and
what speculative decoding achieves (zeros without a draft)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
                   30.0)


class Metrics:
    """One app's metrics, in their own registry. The gauges read the scheduler when scraped."""

    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self, queue_length: Callable[[], int], running_batch_size: Callable[[], int],
                 speculative: Callable[[], Any] = lambda: None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "tokens generated", registry=r)
        Gauge("lmforge_queue_length", "requests waiting for a slot", registry=r).set_function(queue_length)
        Gauge("lmforge_running_batch_size", "sequences in the running batch",
              registry=r).set_function(running_batch_size)
        for name, what, attr in (
                ("draft_tokens", "tokens guessed by the draft and checked by the model", "proposed"),
                ("accepted_tokens", "guessed tokens the model accepted", "accepted"),
                ("acceptance_rate", "accepted / guessed tokens", "acceptance_rate"),
                ("tokens_per_target_forward", "tokens per forward pass of the model in decode steps",
                 "tokens_per_target_forward")):
            Gauge(f"lmforge_spec_decode_{name}", f"speculative decoding: {what}", registry=r).set_function(
                lambda attr=attr: getattr(speculative(), attr, 0.0))
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "time from request to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmforge_time_per_output_token_seconds", "time between consecutive tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=r)

    def tokens_generated(self, n: int, seconds: float, first: bool) -> None:
        """`n` new tokens of one sequence, `seconds` after its request (`first`) or its previous tokens."""
        (self.ttft if first else self.itl).observe(seconds)
        self.generation_tokens.inc(n)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
