"""Sending responses: one thread sends them all under a budget of responses per second;
without a budget, a pool of sender threads, or the event loop itself, sends each output as it comes."""

import contextlib
import queue
import threading
import time
import traceback
import typing
from dataclasses import dataclass, field

import triton_python_backend_utils as pb_utils

from .config import LOG_PREFIX
from .outputs import Delta, response

MAX_RESPONSE_INTERVAL_S = 0.05  # text that is ready never waits longer than this


@dataclass(eq=False)
class Job:
    """One request in flight."""

    id: str
    sender: typing.Any
    stream: bool
    prepend_input: bool
    outputs: dict
    sampled_logprobs: bool = False  # the request asked for per-token log-probabilities
    start: float = field(default_factory=time.monotonic)
    task: typing.Any = None
    cancelled: bool = False
    # Asking Triton whether a finished request was cancelled reads freed memory:
    # the final send and the cancellation check exclude each other.
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False
    last_sent: float = 0.0  # monotonic time of the last response


def closes(entries):
    """Whether held entries end their request or carry an error: those go out at once."""
    return any(final or not isinstance(payload, Delta) for payload, final in entries)


def take(source, timeout=None):
    """What ``source`` holds: wait up to ``timeout`` (None: for ever) for one item, then take the rest."""
    try:
        items = [source.get(timeout=timeout)]
    except queue.Empty:
        return []
    while True:
        try:
            items.append(source.get_nowait())
        except queue.Empty:
            return items


def hold(pending, job, payload, final):
    """Add an output to ``pending`` (job -> [[payload, final], ...]), merged into the job's last held Delta."""
    entries = pending.setdefault(job, [])
    if entries and isinstance(entries[-1][0], Delta) and isinstance(payload, Delta) and not entries[-1][1]:
        entries[-1][0].extend(payload)
        entries[-1][1] = final
    else:
        entries.append([payload, final])


class ResponseSender:
    """Sends under a budget from one dedicated thread (``run``), so the engine's event loop
    never blocks on IPC. Without a budget, ``threads`` sender threads send each output as
    it comes (``run`` on a lane each); with none, the caller of ``put`` sends at once.

    in_flight: a function giving the number of requests in flight.
    max_rate: MAX_RESPONSES_PER_SECOND, shared by the requests in flight (0: no budget).
    on_final: called with a job once its final response went out (or failed to).
    threads: SENDER_THREADS, used without a budget (0: the event loop sends).
    """

    def __init__(self, in_flight, max_rate, on_final, threads=0):
        self.in_flight = in_flight
        self.max_rate = max_rate
        self.on_final = on_final
        self.responses = queue.Queue()
        self.thread = None
        self.lanes = [] if max_rate else [queue.SimpleQueue() for _ in range(threads)]
        self.lane_threads = []

    def start(self):
        """Start the sending thread (with a budget) or the sender threads (without one)."""
        if self.max_rate:
            self.thread = threading.Thread(target=self.run, name="vllm-send", daemon=True)
            self.thread.start()
        for index, lane in enumerate(self.lanes):
            thread = threading.Thread(target=self.run, args=(lane,), name=f"vllm-send-{index}", daemon=True)
            thread.start()
            self.lane_threads.append(thread)

    def put(self, job, payload, final):
        """payload: a Delta of new output, or a ready error response.

        Without a budget, one of the sender threads sends it, or with none the calling thread
        (the engine's event loop) sends it now: no other thread has to win the GIL back from
        the busy loop for each response, and while a send blocks, vLLM merges the request's
        next outputs into one.
        """
        if self.max_rate:
            self.responses.put((job, payload, final))
        elif self.lanes:
            # One lane per request keeps its responses in order.
            self.lanes[hash(job.id) % len(self.lanes)].put((job, payload, final))
        else:
            self.send(job, payload, final)

    def stop(self, timeout_s=5.0):
        """Send what is held, then end the sending threads."""
        self.responses.put(None)
        for lane in self.lanes:
            lane.put(None)
        for thread in [self.thread, *self.lane_threads]:
            if thread is not None:
                thread.join(timeout=timeout_s)

    def run(self, source=None):
        """Each response costs a round trip to the server process, so under load a
        request's new output waits until its interval is up and goes out merged
        (see ``interval_s``). First and final responses and errors go out at once.

        A sender thread runs this on its lane (``source``) without a budget: each output is
        due at once, and a request's outputs that waited for the thread go out merged. The
        Python backend releases the GIL for each send's round trip to the server and serves
        several at once, so several threads send in parallel while the event loop goes on.
        """
        source = self.responses if source is None else source
        pending = {}  # job -> [[Delta or error response, final], ...] in arrival order
        while True:
            for item in take(source, self.wait_s(pending)):
                if item is None:
                    self._send_all(pending)
                    return
                hold(pending, *item)
            ready_at = time.monotonic() - self.interval_s()
            due = {job: entries for job, entries in pending.items() if job.last_sent <= ready_at or closes(entries)}
            for job in due:
                del pending[job]
            self._send_all(due)

    def interval_s(self):
        """Least time between two responses of one request: the requests in flight
        share MAX_RESPONSES_PER_SECOND, so a lone stream gets every engine output."""
        if not self.max_rate:
            return 0.0
        return min(MAX_RESPONSE_INTERVAL_S, self.in_flight() / self.max_rate)

    def wait_s(self, pending):
        """How long the sender may block for new output: until the first held response is due."""
        if not pending:
            return None
        return max(0.0, min(job.last_sent for job in pending) + self.interval_s() - time.monotonic())

    def _send_all(self, pending):
        for job, entries in pending.items():
            for payload, final in entries:
                self.send(job, payload, final)
            job.last_sent = time.monotonic()

    def send(self, job, payload, final):
        """Send one response of ``job`` now, from the calling thread."""
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            sent = response(job, payload) if isinstance(payload, Delta) else payload
            with job.lock:
                job.sender.send(sent, flags=flags)
                job.done = job.done or final
        except Exception:
            pb_utils.Logger.log_error(f"{LOG_PREFIX} sending a response of {job.id} failed: {traceback.format_exc()}")
            if not final:
                return
            with contextlib.suppress(Exception), job.lock:
                job.done = True
                job.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if final:
            self.on_final(job)
