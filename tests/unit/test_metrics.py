"""Publishing vLLM's figures (triton_vllm_model/metrics.py) with a metric family that records calls."""

from types import SimpleNamespace

import pytest
import triton_python_backend_utils as pb_utils

from triton_vllm_model.metrics import Metrics


@pytest.fixture
def metrics(monkeypatch):
    monkeypatch.setattr(Metrics, "FLUSH_S", 3600.0)  # the tests publish themselves
    pb_utils.MetricFamily.created.clear()
    m = Metrics({"model": "m", "version": "1"})
    yield m
    m.close()


def calls(name):
    (metric,) = pb_utils.MetricFamily.created[name].metrics
    return metric.calls


def metric(name):
    (metric,) = pb_utils.MetricFamily.created[name].metrics
    return metric


def iteration(prompt=0, generated=0, ttft=(), finished=()):
    return SimpleNamespace(
        num_prompt_tokens=prompt,
        num_generation_tokens=generated,
        time_to_first_tokens_iter=list(ttft),
        finished_requests=finished,
    )


def test_families_and_labels(metrics):
    created = pb_utils.MetricFamily.created
    assert {n for n, _ in Metrics.COUNTERS.values()} | {n for n, _ in Metrics.GAUGES.values()} <= set(created)
    assert created["vllm:prompt_tokens_total"].kind == pb_utils.MetricFamily.COUNTER
    assert created["vllm:num_requests_running"].kind == pb_utils.MetricFamily.GAUGE
    assert created["vllm:e2e_request_latency_seconds"].kind == pb_utils.MetricFamily.HISTOGRAM
    assert metric("vllm:e2e_request_latency_seconds").buckets == Metrics.LATENCY_BUCKETS
    assert metric("vllm:request_prompt_tokens").buckets == Metrics.LENGTH_BUCKETS
    assert metric("vllm:iteration_tokens_total").buckets == Metrics.STEP_BUCKETS
    assert metric("vllm:num_requests_in_flight").labels == {"model": "m", "version": "1"}


def test_counters_gauges_histograms(metrics):
    metrics.request_started()
    finished = SimpleNamespace(e2e_latency=1.5, num_prompt_tokens=3, num_generation_tokens=5, decode_time=2.0)
    metrics.record(SimpleNamespace(num_running_reqs=1, num_waiting_reqs=2), iteration(3, 5, [0.1], [finished]))
    metrics.publish()
    assert calls("vllm:prompt_tokens_total") == [("increment", 3)]
    assert calls("vllm:generation_tokens_total") == [("increment", 5)]
    assert calls("vllm:num_requests_running") == [("set", 1)]
    assert calls("vllm:num_requests_waiting") == [("set", 2)]
    assert calls("vllm:num_requests_in_flight") == [("set", 1)]
    assert calls("vllm:time_to_first_token_seconds") == [("observe", 0.1)]
    assert calls("vllm:e2e_request_latency_seconds") == [("observe", 1.5)]
    assert calls("vllm:time_per_output_token_seconds") == [("observe", 0.5)]
    assert calls("vllm:request_generation_tokens") == [("observe", 5)]
    assert calls("vllm:iteration_tokens_total") == [("observe", 8)]  # the step's prefill and decode

    metrics.publish()  # nothing new: no calls, gauges unchanged are not set again
    assert calls("vllm:prompt_tokens_total") == [("increment", 3)]
    assert calls("vllm:num_requests_running") == [("set", 1)]

    metrics.request_finished()  # idle: the scheduler's figures drop to 0
    metrics.publish()
    assert calls("vllm:num_requests_running")[-1] == ("set", 0)
    assert calls("vllm:num_requests_waiting")[-1] == ("set", 0)
    assert calls("vllm:num_requests_in_flight")[-1] == ("set", 0)


def test_scheduler_figures_ignored_while_idle(metrics):
    metrics.record(SimpleNamespace(num_running_reqs=4, num_waiting_reqs=4), None)
    metrics.publish()
    assert calls("vllm:num_requests_running") == [("set", 0)]


def test_prompt_tokens_of_newer_vllm(metrics):
    stats = iteration(generated=1)
    del stats.num_prompt_tokens
    stats.prompt_token_stats = SimpleNamespace(total=7, computed=5)  # 2 from the prefix cache
    metrics.record(None, stats)
    metrics.publish()
    assert calls("vllm:prompt_tokens_total") == [("increment", 7)]
    assert calls("vllm:iteration_tokens_total") == [("observe", 6)]  # only what the step computed


def test_failed_publish_is_retried_next_flush(metrics):
    metrics.record(None, iteration(prompt=2, ttft=[0.1, 0.2]))
    metric("vllm:prompt_tokens_total").fail = 1
    with pytest.raises(RuntimeError):
        metrics.publish()
    assert calls("vllm:prompt_tokens_total") == []
    metrics.record(None, iteration(prompt=3, ttft=[0.3]))
    metrics.publish()
    assert calls("vllm:prompt_tokens_total") == [("increment", 5)]
    assert sorted(v for _, v in calls("vllm:time_to_first_token_seconds")) == [0.1, 0.2, 0.3]


def test_failed_observation_is_not_repeated(metrics):
    metrics.record(None, iteration(ttft=[0.1, 0.2]))
    metric("vllm:time_to_first_token_seconds").fail = 1  # the first of two observations fails
    with pytest.raises(RuntimeError):
        metrics.publish()
    metrics.publish()
    assert sorted(v for _, v in calls("vllm:time_to_first_token_seconds")) == [0.1, 0.2]


def test_stat_logger_records(metrics):
    logger_class = metrics.stat_logger_factory()
    stat_logger = logger_class(vllm_config=None)
    stat_logger.record(None, iteration(prompt=4))
    stat_logger.log_engine_initialized()
    metrics.publish()
    assert calls("vllm:prompt_tokens_total") == [("increment", 4)]
