"""Values the model and prepare_qwen_pt.py share (triton_vllm_model/config.py)."""

import subprocess
import sys

import pytest

from serving import model_config
from triton_vllm_model import config

UNI = {"distributed_executor_backend": "uni"}


def test_response_budget_defaults():
    assert config.DEFAULT_MAX_RESPONSES_PER_SECOND == 500  # a config.pbtxt without the parameter
    assert model_config.MAX_RESPONSES_PER_SECOND == {"gpu": 0, "cpu": config.DEFAULT_MAX_RESPONSES_PER_SECOND}
    assert f"{config.DEFAULT_MAX_RESPONSES_PER_SECOND:g}" == "500"
    assert model_config.SENDER_THREADS == {"gpu": 4, "cpu": 0}  # used where the budget is 0


def test_sender_threads_are_written():
    assert 'parameters: { key: "SENDER_THREADS", value: { string_value: "0" } }' in model_config.config_pbtxt("m")
    pbtxt = model_config.config_pbtxt("m", max_responses_per_second=0, sender_threads=4)
    assert 'parameters: { key: "SENDER_THREADS", value: { string_value: "4" } }' in pbtxt


def test_file_and_parameter_names():
    assert (config.ENGINE_ARGS_FILE, config.LORA_FILE) == ("model.json", "multi_lora.json")
    pbtxt = model_config.config_pbtxt("m")
    assert 'parameters: { key: "REPORT_CUSTOM_METRICS", value: { string_value: "true" } }' in pbtxt
    assert 'parameters: { key: "MAX_RESPONSES_PER_SECOND", value: { string_value: "500" } }' in pbtxt
    assert config.REPORT_CUSTOM_METRICS in pbtxt and config.MAX_RESPONSES_PER_SECOND in pbtxt
    assert "instance_group [{ count: 1, kind: KIND_MODEL }]" in pbtxt


def test_several_instances_are_one_group():
    assert "instance_group [{ count: 4, kind: KIND_MODEL }]" in model_config.config_pbtxt("m", instances=4)


@pytest.mark.parametrize(
    "engine_args, cpus, expected",
    [
        (UNI, 8, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "7"}),
        (UNI, 1, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}),
        ({"distributed_executor_backend": "mp"}, 8, {}),
        ({}, 8, {}),
    ],
)
def test_cpu_engine_environment(engine_args, cpus, expected):
    assert config.cpu_engine_environment(engine_args, cpus) == expected


def test_cpu_engine_environment_defaults_to_this_process_cpus(monkeypatch):
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert config.cpu_engine_environment(UNI)["OMP_NUM_THREADS"] == "2"
    assert model_config.cpu_engine_environment is config.cpu_engine_environment


def test_engine_processes_start_from_the_python_that_runs_the_model():
    assert config.engine_process_environment(sys.executable) == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


def test_without_a_python_to_start_vllm_keeps_its_start_method(tmp_path):
    not_executable = tmp_path / "python3"
    not_executable.write_text("")
    for executable in ("", str(tmp_path / "missing"), str(tmp_path), str(not_executable)):
        assert config.engine_process_environment(executable) == {}, executable


def test_write_model_copies_the_package(tmp_path):
    model_dir = model_config.write_model(tmp_path, "m", {"model": "weights"}, loras={"a": "/x"})
    version = model_dir / "1"
    assert (version / config.ENGINE_ARGS_FILE).is_file() and (version / config.LORA_FILE).is_file()
    assert (version / "model.py").is_file()
    for module in ("__init__", "amx", "config", "inputs", "loading", "metrics", "outputs", "sender"):
        assert (version / "triton_vllm_model" / f"{module}.py").is_file(), module


def test_preparation_side_stays_light():
    """prepare_qwen_pt.py imports serving.model_config: no vLLM, torch, numpy, Triton or amx.py."""
    code = (
        "import sys, serving.model_config, triton_vllm_model.config; "
        "print(sorted(m for m in ('vllm', 'torch', 'numpy', 'triton_python_backend_utils', 'triton_vllm_model.amx') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


AMX_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
AVX2_CPU = "processor\t: 0\nflags\t\t: fpu sse2 fma avx avx2\nbugs\t\t: sysret_ss_attrs\n"
ARM_CPU = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        (AMX_CPU, "bfloat16"),
        (AVX2_CPU.replace("avx2", "avx2 avx512_bf16"), "bfloat16"),  # AVX-512 BF16 without AMX
        (ARM_CPU, "bfloat16"),
        (AVX2_CPU, "float32"),
        (AVX2_CPU.replace("avx2", "avx2 avx512f"), "float32"),  # AVX-512 without its BF16 instructions
        (ARM_CPU.replace(" bf16", ""), "float32"),
        ("processor\t: 0\n", "bfloat16"),  # no flags to go by: vLLM's own CPU default
    ],
)
def test_cpu_dtype_follows_the_cpus_bfloat16_instructions(cpuinfo, expected):
    assert model_config.cpu_dtype(cpuinfo) == expected


def test_cpu_engine_args_take_this_cpus_dtype(monkeypatch):
    monkeypatch.setattr(model_config, "cpu_dtype", lambda: "float32")
    assert model_config.engine_args("w", "cpu")["dtype"] == "float32"
    assert model_config.engine_args("w", "cpu", {"dtype": "bfloat16"})["dtype"] == "bfloat16"
    assert model_config.engine_args("w", "gpu")["dtype"] == "auto"
