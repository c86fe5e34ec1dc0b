"""vLLM's engine figures, published as Triton metrics."""

import contextlib
import threading
import traceback

import triton_python_backend_utils as pb_utils

from .config import LOG_PREFIX


def prompt_token_counts(iteration_stats) -> tuple[int, int]:
    """(prompt tokens, those the step computed rather than took from the prefix cache)."""
    stats = getattr(iteration_stats, "prompt_token_stats", None)
    if stats is None:  # older vLLM: no cache split
        return iteration_stats.num_prompt_tokens, iteration_stats.num_prompt_tokens
    return stats.total, getattr(stats, "computed", stats.total)


class Metrics:
    """vLLM's figures on Triton's metrics port, labelled by model and version.

    Every update of a Triton metric is a round trip to the server process, so
    the hot path only updates numbers in memory; a thread publishes them every
    FLUSH_S seconds.
    """

    FLUSH_S = 0.25
    LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
    LENGTH_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    STEP_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]  # vLLM's own
    COUNTERS = {
        "prompt_tokens": ("vllm:prompt_tokens_total", "Prompt tokens processed"),
        "generation_tokens": ("vllm:generation_tokens_total", "Generation tokens produced"),
    }
    GAUGES = {
        "running": ("vllm:num_requests_running", "Requests in the engine's running batch"),
        "waiting": ("vllm:num_requests_waiting", "Requests waiting in the engine's queue"),
        "in_flight": ("vllm:num_requests_in_flight", "Requests the model has not answered in full yet"),
    }
    HISTOGRAMS = {
        "ttft": ("vllm:time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS),
        "tpot": ("vllm:time_per_output_token_seconds", "Time per output token after the first", LATENCY_BUCKETS),
        "e2e": ("vllm:e2e_request_latency_seconds", "End-to-end request latency", LATENCY_BUCKETS),
        "prompt_len": ("vllm:request_prompt_tokens", "Prompt length of finished requests", LENGTH_BUCKETS),
        "gen_len": ("vllm:request_generation_tokens", "Generation length of finished requests", LENGTH_BUCKETS),
        "step_tokens": ("vllm:iteration_tokens_total", "Tokens of this model's requests per engine step", STEP_BUCKETS),
    }

    def __init__(self, labels):
        self._families = []  # a Metric is only valid while its family lives
        self._metrics = {}
        kinds = pb_utils.MetricFamily
        for key, (name, doc) in self.COUNTERS.items():
            self._metrics[key] = self._make(name, doc, kinds.COUNTER, labels)
        for key, (name, doc) in self.GAUGES.items():
            self._metrics[key] = self._make(name, doc, kinds.GAUGE, labels)
        for key, (name, doc, buckets) in self.HISTOGRAMS.items():
            self._metrics[key] = self._make(name, doc, kinds.HISTOGRAM, labels, buckets)
        self._lock = threading.Lock()
        self._counts = {key: 0 for key in self.COUNTERS}
        self._gauges = {key: 0 for key in self.GAUGES}
        self._observations = {key: [] for key in self.HISTOGRAMS}
        self._published_gauges = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish_loop, name="vllm-metrics", daemon=True)
        self._thread.start()

    def _make(self, name, doc, kind, labels, buckets=None):
        family = pb_utils.MetricFamily(name=name, description=doc, kind=kind)
        self._families.append(family)
        return family.Metric(labels=labels, buckets=buckets) if buckets else family.Metric(labels=labels)

    def request_started(self):
        with self._lock:
            self._gauges["in_flight"] += 1

    def request_finished(self):
        with self._lock:
            self._gauges["in_flight"] -= 1
            if self._gauges["in_flight"] == 0:
                # vLLM reports scheduler figures only while it steps; idle, it has nothing queued.
                self._gauges["running"] = self._gauges["waiting"] = 0

    def record(self, scheduler_stats, iteration_stats):
        """Called by vLLM after every engine step, on the engine's event loop."""
        with self._lock:
            if scheduler_stats is not None and self._gauges["in_flight"] > 0:
                self._gauges["running"] = scheduler_stats.num_running_reqs
                self._gauges["waiting"] = scheduler_stats.num_waiting_reqs
            if iteration_stats is None:
                return
            prompt_tokens, computed = prompt_token_counts(iteration_stats)
            self._counts["prompt_tokens"] += prompt_tokens
            self._counts["generation_tokens"] += iteration_stats.num_generation_tokens
            self._observations["step_tokens"].append(computed + iteration_stats.num_generation_tokens)
            self._observations["ttft"] += iteration_stats.time_to_first_tokens_iter
            for req in iteration_stats.finished_requests:
                self._observations["e2e"].append(req.e2e_latency)
                self._observations["prompt_len"].append(req.num_prompt_tokens)
                self._observations["gen_len"].append(req.num_generation_tokens)
                if req.num_generation_tokens > 1:
                    self._observations["tpot"].append(req.decode_time / (req.num_generation_tokens - 1))

    def _publish_loop(self):
        while not self._stop.wait(self.FLUSH_S):
            try:
                self.publish()
            except Exception:
                pb_utils.Logger.log_warn(f"{LOG_PREFIX} publishing metrics failed, retrying: {traceback.format_exc()}")

    def publish(self):
        with self._lock:
            counts, self._counts = self._counts, {key: 0 for key in self.COUNTERS}
            gauges = dict(self._gauges)
            observations, self._observations = self._observations, {key: [] for key in self.HISTOGRAMS}
        try:
            for key, value in counts.items():
                if value:
                    self._metrics[key].increment(value)
                    counts[key] = 0
            for key, value in gauges.items():
                if self._published_gauges.get(key) != value:
                    self._metrics[key].set(value)
                    self._published_gauges[key] = value
            for key, values in observations.items():
                while values:
                    self._metrics[key].observe(values[-1])
                    values.pop()
        finally:
            with self._lock:  # what did not go out goes with the next flush
                for key, value in counts.items():
                    self._counts[key] += value
                for key, values in observations.items():
                    self._observations[key][:0] = values

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(Exception):
            self.publish()
        # Release Triton's metric objects while the stub can still reach the
        # server: released at interpreter exit, they crash the stub.
        self._metrics.clear()
        self._families.clear()

    def stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        metrics = self

        class TritonStatLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index=0):
                pass

            def record(self, scheduler_stats, iteration_stats, *args, **kwargs):
                metrics.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self):
                pass

        return TritonStatLogger
