"""Triton Python-backend model for benchmarks/send_rate.py (copied in as model.py).

One request, one JSON config: send ``responses`` responses from a sender thread,
as fast as the backend takes them, while (with ``busy``) another thread keeps the
GIL busy with pure Python, as vLLM's output loop does in the real model; the
interpreter's switch interval is ``switch_interval_s``. The final response
reports the responses sent per second and the busy thread's work rate.
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
    def execute(self, requests):
        for request in requests:
            config = json.loads(pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[0])
            sender = request.get_response_sender()
            threading.Thread(target=self._measure, args=(sender, config), daemon=True).start()
        return None

    def _measure(self, sender, config):
        sys.setswitchinterval(config["switch_interval_s"])
        stop = threading.Event()
        rounds = [0]

        def keep_busy():
            while not stop.is_set():
                sum(range(1000))
                rounds[0] += 1

        if config["busy"]:
            threading.Thread(target=keep_busy, daemon=True).start()
        start = time.monotonic()
        for _ in range(config["responses"]):
            sender.send(pb_utils.InferenceResponse(output_tensors=[_text("x")]))
        elapsed = time.monotonic() - start
        stop.set()
        result = {"responses_per_s": config["responses"] / elapsed, "busy_rounds_per_s": rounds[0] / elapsed}
        sender.send(
            pb_utils.InferenceResponse(output_tensors=[_text(json.dumps(result))]),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )
