"""The one writer of a model's Triton files: ``config.pbtxt``, ``1/model.json``, ``1/model.py``
with the ``triton_vllm_model`` package beside it and, when LoRA adapters are served,
``1/multi_lora.json``.

``prepare_qwen_pt.py`` calls ``write_model`` with the engine arguments made by
``engine_args``; the model reads ``model.json`` once at load time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from triton_vllm_model import AMX_WORKER_EXTENSION
from triton_vllm_model.config import (
    DEFAULT_MAX_RESPONSES_PER_SECOND,
    ENGINE_ARGS_FILE,
    LORA_FILE,
    cpu_engine_environment,
)
from triton_vllm_model.config import MAX_RESPONSES_PER_SECOND as MAX_RESPONSES_PARAMETER
from triton_vllm_model.config import REPORT_CUSTOM_METRICS as METRICS_PARAMETER
from triton_vllm_model.config import SENDER_THREADS as SENDER_THREADS_PARAMETER

__all__ = [
    "MAX_RESPONSES_PER_SECOND",
    "SENDER_THREADS",
    "config_pbtxt",
    "cpu_dtype",
    "cpu_engine_environment",
    "detect_device",
    "engine_args",
    "write_model",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODEL_TEMPLATE = PROJECT_ROOT / "model_template.py"
MODEL_PACKAGE = PROJECT_ROOT / "triton_vllm_model"

# Defaults that fit the reference card, an RTX 3060 Ti with 8 GB: Qwen2.5-0.5B's
# weights take about 1 GB, the rest is KV cache and CUDA graphs.
GPU_DEFAULTS = {
    "gpu_memory_utilization": 0.85,
    "max_model_len": 4096,
    "max_num_seqs": 64,
    "dtype": "auto",
    "tensor_parallel_size": 1,
    "enforce_eager": False,
}

# On the CPU ``gpu_memory_utilization`` is the share of the NUMA node's memory
# reserved for the KV cache; eager mode starts several times faster there. The
# "uni" executor runs the model in the engine-core process: no worker process
# busy-waiting on a shared-memory queue (see ``cpu_engine_environment``). The
# worker extension asks for Intel AMX in that process (see triton_vllm_model/amx.py).
# ``dtype`` depends on the CPU: see ``cpu_dtype``.
CPU_DEFAULTS = {
    "gpu_memory_utilization": 0.2,
    "max_model_len": 2048,
    "max_num_seqs": 64,
    "tensor_parallel_size": 1,
    "enforce_eager": True,
    "distributed_executor_backend": "uni",
    "worker_extension_cls": AMX_WORKER_EXTENSION,
}


# CPU flags (x86 ``flags``, Arm ``Features`` in /proc/cpuinfo) of instructions that compute bfloat16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_dtype(cpuinfo: str | None = None) -> str:
    """The CPU engine's dtype: bfloat16 where the CPU computes it, else float32.

    Without those instructions (an AVX2-only x86, say) every bfloat16 operation
    is converted to float32 and back, and float32 itself is faster. ``cpuinfo``
    is the text of /proc/cpuinfo, read when not given; without it, bfloat16.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "bfloat16"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return "bfloat16" if NATIVE_BF16_FLAGS & set(value.split()) else "float32"
    return "bfloat16"


def engine_args(model_path: str, device: str, overrides: dict | None = None) -> dict:
    """vLLM engine arguments for ``model.json``: device defaults, then overrides."""
    defaults = GPU_DEFAULTS if device == "gpu" else {**CPU_DEFAULTS, "dtype": cpu_dtype()}
    args = {"model": model_path, **defaults, "disable_log_stats": False}
    args.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return args


# prepare_qwen_pt.py's --max-responses-per-second by device (see docs/streaming.md): on a GPU the
# event loop sends every output itself (0); on the CPU the budget leaves the cores to the engine.
MAX_RESPONSES_PER_SECOND = {"gpu": 0, "cpu": DEFAULT_MAX_RESPONSES_PER_SECOND}

# prepare_qwen_pt.py's --sender-threads by device, used without a budget (docs/streaming.md): on a
# GPU four threads send while the event loop goes on; on two CPU cores they cost the engine its share.
SENDER_THREADS = {"gpu": 4, "cpu": 0}


def config_pbtxt(
    name: str,
    instance_kind: str = "KIND_MODEL",
    metrics: bool = True,
    max_responses_per_second: float = DEFAULT_MAX_RESPONSES_PER_SECOND,
    instances: int = 1,
    sender_threads: int = 0,
) -> str:
    """A few lines: the model fills in its inputs and outputs (auto-complete).

    Several instances share one vLLM engine core, each its own Python process.
    """
    return f"""name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
instance_group [{{ count: {instances}, kind: {instance_kind} }}]
parameters: {{ key: "{METRICS_PARAMETER}", value: {{ string_value: "{str(metrics).lower()}" }} }}
parameters: {{ key: "{MAX_RESPONSES_PARAMETER}", value: {{ string_value: "{max_responses_per_second:g}" }} }}
parameters: {{ key: "{SENDER_THREADS_PARAMETER}", value: {{ string_value: "{sender_threads}" }} }}
"""


def write_model(
    repository: Path,
    name: str,
    args: dict,
    instance_kind: str = "KIND_MODEL",
    metrics: bool = True,
    loras: dict[str, str] | None = None,
    max_responses_per_second: float = DEFAULT_MAX_RESPONSES_PER_SECOND,
    instances: int = 1,
    sender_threads: int = 0,
) -> Path:
    """Create or refresh ``repository/name``; weights elsewhere are left untouched.

    ``loras`` maps adapter names to adapter folders; giving any enables LoRA.
    """
    model_dir = repository / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    lora_file = version_dir / LORA_FILE
    lora_file.unlink(missing_ok=True)
    if loras:
        args = {**args, "enable_lora": True}
        lora_file.write_text(json.dumps(loras, indent=2) + "\n")
    (model_dir / "config.pbtxt").write_text(
        config_pbtxt(name, instance_kind, metrics, max_responses_per_second, instances, sender_threads)
    )
    (version_dir / ENGINE_ARGS_FILE).write_text(json.dumps(args, indent=2) + "\n")
    shutil.copyfile(MODEL_TEMPLATE, version_dir / "model.py")
    package = version_dir / MODEL_PACKAGE.name
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(MODEL_PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    return model_dir


def detect_device() -> str:
    """'gpu' when an NVIDIA GPU answers ``nvidia-smi -L``, else 'cpu'."""
    import subprocess

    try:
        subprocess.run(["nvidia-smi", "-L"], check=True, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "cpu"
    return "gpu"
