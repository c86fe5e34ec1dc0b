"""Triton Python-backend model for benchmarks/send_rate.py (copied in as model.py).

Each request carries a JSON config and gets a sender thread of its own, which sends
``responses`` responses as fast as the backend takes them, while (with ``busy``) one
other thread, shared by the requests in flight, keeps the GIL busy with pure Python,
as vLLM's output loop does in the real model; the interpreter's switch interval is
``switch_interval_s``. Several requests at once are several senders. The final
response reports when the sends began and ended and the busy thread's rounds by then.
"""

import json
import sys
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


def _text(value):
    return pb_utils.Tensor("text_output", np.array([value.encode()], dtype=np.object_))


class TritonPythonModel:
    def initialize(self, args):
        self.busy = threading.Condition()
        self.busy_senders = 0  # senders in flight that asked for the busy thread
        self.rounds = 0
        threading.Thread(target=self._keep_busy, daemon=True).start()

    def execute(self, requests):
        for request in requests:
            config = json.loads(pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[0])
            sender = request.get_response_sender()
            threading.Thread(target=self._measure, args=(sender, config), daemon=True).start()
        return None

    def _keep_busy(self):
        while True:
            with self.busy:
                self.busy.wait_for(lambda: self.busy_senders > 0)
            while self.busy_senders:
                sum(range(1000))
                self.rounds += 1

    def _measure(self, sender, config):
        sys.setswitchinterval(config["switch_interval_s"])
        if config["busy"]:
            with self.busy:
                self.busy_senders += 1
                self.busy.notify()
        start, rounds_at_start = time.monotonic(), self.rounds
        for _ in range(config["responses"]):
            sender.send(pb_utils.InferenceResponse(output_tensors=[_text("x")]))
        result = {"start": start, "end": time.monotonic(), "rounds_at_start": rounds_at_start, "rounds_at_end": self.rounds}
        if config["busy"]:
            with self.busy:
                self.busy_senders -= 1
        sender.send(
            pb_utils.InferenceResponse(output_tensors=[_text(json.dumps(result))]),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )
