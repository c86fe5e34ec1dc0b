"""Sending responses (triton_vllm_model/sender.py): the budget's intervals, waits, what goes out
at once; the sender threads used without a budget."""

import threading
import time

import pytest
import triton_python_backend_utils as pb_utils

from triton_vllm_model import sender as sender_module
from triton_vllm_model.outputs import Delta, Seq
from triton_vllm_model.sender import MAX_RESPONSE_INTERVAL_S, Job, ResponseSender, closes

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TEXT_ONLY = dict.fromkeys(["finish_reason", "cumulative_logprob", "logprobs", "num_input_tokens", "num_output_tokens"], False)


class TritonSender:
    def __init__(self, fail=False):
        self.sent = []  # (response, flags)
        self.fail = fail

    def send(self, response=None, flags=0):
        if self.fail and response is not None:
            raise RuntimeError("gone")
        self.sent.append((response, flags))


def new_job(name="r", last_sent=0.0, fail=False):
    return Job(id=name, sender=TritonSender(fail), stream=True, prepend_input=False, outputs=TEXT_ONLY, last_sent=last_sent)


def delta(text):
    return Delta({0: Seq(text, [1], None, None, None)}, 1, "")


def budget(in_flight, rate):
    return ResponseSender(lambda: in_flight, rate, on_final=lambda job: None)


@pytest.mark.parametrize(
    "in_flight, rate, interval",
    [
        (1, 2000, 1 / 2000),  # a lone stream: every engine output
        (10, 2000, 10 / 2000),
        (100, 10, MAX_RESPONSE_INTERVAL_S),  # ready text never waits longer than this
        (100, 0, 0.0),  # 0: no budget
        (0, 2000, 0.0),
    ],
)
def test_interval(in_flight, rate, interval):
    assert budget(in_flight, rate).interval_s() == pytest.approx(interval)


def test_wait(monkeypatch):
    monkeypatch.setattr(sender_module.time, "monotonic", lambda: 100.0)
    sender = budget(10, 100)  # interval 0.05 s
    assert sender.wait_s({}) is None  # nothing held: block until something arrives
    assert sender.wait_s({new_job(last_sent=99.98): [], new_job(last_sent=99.99): []}) == pytest.approx(0.03)
    assert sender.wait_s({new_job(last_sent=50.0): []}) == 0.0  # overdue: at once


def test_which_entries_close_a_request():
    error = pb_utils.InferenceResponse(error=pb_utils.TritonError("x"))
    assert not closes([[delta("a"), False]])
    assert closes([[delta("a"), True]])
    assert closes([[delta("a"), False], [error, True]])
    assert closes([[error, False]])  # an error goes out at once
    assert not closes([])


def run(sender, items):
    for item in items:
        sender.put(*item)
    sender.stop()
    thread = threading.Thread(target=sender.run)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()


def texts(job):
    return [(r.tensor("text_output").as_numpy().tolist() if r else None, flags) for r, flags in job.sender.sent]


def test_held_output_is_merged_and_final_reported():
    finished = []
    sender = ResponseSender(lambda: 1, 0.001, on_final=finished.append)  # a budget that holds everything
    job = new_job(last_sent=time.monotonic())
    run(sender, [(job, delta("a"), False), (job, delta("b"), False), (job, delta("c"), True)])
    assert texts(job) == [([b"abc"], FINAL)]
    assert finished == [job] and job.done and job.last_sent > 0


def test_error_after_output_goes_out_after_it():
    sender = budget(1, 0)
    job = new_job()
    error = pb_utils.InferenceResponse(error=pb_utils.TritonError("late", pb_utils.TritonError.INTERNAL))
    run(sender, [(job, delta("a"), False), (job, error, True)])
    assert [flags for _, flags in job.sender.sent] == [0, FINAL]
    assert job.sender.sent[1][0] is error


def test_failed_final_send_still_completes_the_request():
    finished = []
    sender = ResponseSender(lambda: 1, 0, on_final=finished.append)
    job = new_job(fail=True)
    run(sender, [(job, delta("a"), True)])
    assert job.sender.sent == [(None, FINAL)]  # an empty final response closes it
    assert job.done and finished == [job]
    assert any(level == "error" and "[vllm] sending a response of r failed" in line for level, line in pb_utils.Logger.lines)


def test_without_a_budget_put_sends_at_once_and_no_thread_starts():
    finished = []
    sender = ResponseSender(lambda: 1, 0, on_final=finished.append)
    sender.start()
    job = new_job()
    sender.put(job, delta("a"), False)
    assert texts(job) == [([b"a"], 0)]  # sent by the caller, before any thread ran
    sender.put(job, delta("b"), True)
    assert texts(job) == [([b"a"], 0), ([b"b"], FINAL)] and finished == [job]
    assert sender.thread is None
    sender.stop()


def test_with_a_budget_the_thread_sends_and_stop_ends_it():
    sender = budget(1, 2000)
    sender.start()
    job = new_job()
    sender.put(job, delta("a"), True)
    sender.stop()
    assert not sender.thread.is_alive()
    assert texts(job) == [([b"a"], FINAL)]


class SlowSender(TritonSender):
    """A send that takes a while, as the round trip to the server does; releases the GIL."""

    def send(self, response=None, flags=0):
        time.sleep(0.002)
        super().send(response, flags)


def test_sender_threads_keep_each_request_in_order_and_merge_what_waits():
    finished = []
    sender = ResponseSender(lambda: 8, 0, on_final=finished.append, threads=3)
    sender.start()
    assert len(sender.lane_threads) == 3 and sender.thread is None
    jobs = [new_job(f"r{i}") for i in range(8)]
    for job in jobs:
        job.sender = SlowSender()
    for step in range(20):
        for job in jobs:
            sender.put(job, delta(f"{step},"), step == 19)
    sender.stop()
    assert not any(thread.is_alive() for thread in sender.lane_threads)
    expected = "".join(f"{step}," for step in range(20))
    for job in jobs:
        sent = texts(job)
        assert "".join(text[0].decode() for text, _ in sent) == expected  # every piece, in order
        assert [flags for _, flags in sent][-1] == FINAL and job.done
        assert len(sent) < 20  # outputs that waited for a busy thread went out merged
    assert sorted(job.id for job in finished) == sorted(job.id for job in jobs)


def test_sender_threads_are_not_started_with_a_budget():
    sender = ResponseSender(lambda: 1, 2000, on_final=lambda job: None, threads=4)
    sender.start()
    job = new_job()
    sender.put(job, delta("a"), True)
    sender.stop()
    assert sender.lane_threads == [] and texts(job) == [([b"a"], FINAL)]
