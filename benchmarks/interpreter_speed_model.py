"""Triton Python-backend model for benchmarks/interpreter_speed.py (copied in as model.py).

Times one pure-Python workload where vLLM's engine core can run: in this
process (the stub, or python3 when the script imports this file), in a forked
copy of it (vLLM's "fork") and in a fresh ``sys.executable`` started from it
(vLLM's "spawn"). One request, one JSON config ``{"repeat": N}``; the response
is a JSON object of the three figures.
"""

import json
import os
import subprocess
import sys
import time


def workload() -> int:
    """Dictionary updates, string sorting and object creation: the kinds of Python a scheduler runs."""
    counts = {}
    for i in range(900_000):
        counts[i % 1000] = counts.get(i % 1000, 0) + i
    words = sorted(str(i) for i in range(180_000))

    class Item:
        def __init__(self, value):
            self.value = value

    items = [Item(i) for i in range(450_000)]
    return sum(item.value for item in items) + len(words) + len(counts)


def measure(repeat: int) -> dict:
    """This process's executable, the libpython it maps (if any) and the best time of ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        workload()
        times.append(time.perf_counter() - start)
    with open("/proc/self/maps", encoding="utf-8") as f:
        libpython = sorted({line.split()[-1] for line in f if "/libpython" in line})
    return {"executable": os.readlink("/proc/self/exe"), "libpython": libpython[0] if libpython else "", "seconds": min(times)}


def forked(repeat: int) -> dict:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(measure(repeat)))
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as result:
        figures = json.loads(result.read())
    os.waitpid(pid, 0)
    return figures


def started_anew(repeat: int) -> dict:
    done = subprocess.run([sys.executable, __file__, str(repeat)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def all_places(repeat: int) -> dict:
    return {"self": measure(repeat), "fork": forked(repeat), "spawn": started_anew(repeat)}


class TritonPythonModel:
    def execute(self, requests):
        import numpy as np
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            config = json.loads(pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[0])
            text = json.dumps(all_places(int(config["repeat"])))
            output = pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_))
            responses.append(pb_utils.InferenceResponse(output_tensors=[output]))
        return responses


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]))))
