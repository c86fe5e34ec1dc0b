"""Values the model and the side that prepares its folder (serving/model_config.py) share.

Plain Python only: prepare_qwen_pt.py imports this without vLLM, torch or
Triton's Python backend, and vLLM's engine processes import amx.py, not this.
"""

from __future__ import annotations

import os

# Files in the model's version folder, beside model.py.
ENGINE_ARGS_FILE = "model.json"  # vLLM engine arguments
LORA_FILE = "multi_lora.json"  # LoRA adapter names -> folders, when enable_lora is set

# config.pbtxt parameters the model reads.
REPORT_CUSTOM_METRICS = "REPORT_CUSTOM_METRICS"
MAX_RESPONSES_PER_SECOND = "MAX_RESPONSES_PER_SECOND"
SENDER_THREADS = "SENDER_THREADS"

# Streamed responses per second, shared by the requests in flight (0: one response
# per engine output). The Python backend pays a round trip between processes for
# each response; see docs/streaming.md. prepare_qwen_pt.py writes
# it into config.pbtxt; the model uses it for a config.pbtxt without the parameter.
DEFAULT_MAX_RESPONSES_PER_SECOND = 500

LOG_PREFIX = "[vllm]"  # the model's log lines

# How the model's error messages begin when it cannot serve a request now (UNAVAILABLE:
# retry later) or failed on its own side (INTERNAL). A gRPC stream's errors carry no
# status code, so front ends over gRPC (serving/openai_api) tell these from a client's
# mistake (INVALID_ARG) by these beginnings.
SHUTTING_DOWN = "the model is shutting down"
ENGINE_RESTARTING = "the vLLM engine is restarting; retry shortly"
ENGINE_DIED = "the vLLM engine died; the model restarts it, retry shortly"
UNAVAILABLE_MESSAGES = (SHUTTING_DOWN, ENGINE_RESTARTING, ENGINE_DIED)
GENERATION_FAILED = "generation failed"
UNREADABLE_REQUEST = "the request could not be read"
INTERNAL_MESSAGES = (GENERATION_FAILED, UNREADABLE_REQUEST)


def engine_process_environment(executable: str) -> dict[str, str]:
    """Environment that makes vLLM start its engine processes from ``executable`` (the stub's ``sys.executable``).

    ``vllm serve`` starts them that way ("spawn"). vLLM's default, "fork",
    would copy the stub, whose Python is libpython's shared build: on Ubuntu
    that took a third longer for the same Python code than its python3 (see
    docs/benchmarks.md). Without a python to start, vLLM's default stays.
    """
    if executable and os.path.isfile(executable) and os.access(executable, os.X_OK):
        return {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    return {}


def cpu_engine_environment(engine_args: dict, cpus: int | None = None) -> dict[str, str]:
    """Environment for a vLLM CPU engine started with ``engine_args``; the model applies it before starting one.

    vLLM's CPU build swaps the "uni" executor for a worker process unless V1
    multiprocessing is off (the engine core keeps its own process either way).
    Its own worker leaves one CPU to the serving processes; so does this.
    ``cpus``: the CPUs the engine may use; by default this process's.
    """
    if engine_args.get("distributed_executor_backend") != "uni":
        return {}
    if cpus is None:
        cpus = len(os.sched_getaffinity(0))
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(max(1, cpus - 1))}
