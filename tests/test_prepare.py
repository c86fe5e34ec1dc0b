"""prepare_qwen_pt.py: the tiny model, idempotence, flags, and an unreachable hub."""

import json
import time

import pytest
from helpers import MODEL, run_script

from serving.model_config import cpu_dtype, cpu_engine_environment


def prepare(repo, *args, env=None):
    return run_script("prepare_qwen_pt.py", "--repository", str(repo), "--device", "cpu", *args, env=env)


@pytest.mark.cpu
def test_tiny_builds_a_complete_model_repository(tiny_repository):
    model = tiny_repository / MODEL
    config = (model / "config.pbtxt").read_text()
    assert config.count("decoupled: true") == 1
    assert 'key: "MAX_RESPONSES_PER_SECOND", value: { string_value: "500" }' in config
    assert 'key: "SENDER_THREADS", value: { string_value: "0" }' in config
    assert (model / "1" / "model.py").read_text().startswith('"""Triton Python-backend model')
    engine = json.loads((model / "1" / "model.json").read_text())
    assert engine["model"] == "weights"
    assert engine["max_model_len"] == 2048 and engine["enforce_eager"] is True
    assert engine["dtype"] == cpu_dtype()  # bfloat16 where this CPU computes it, else float32
    assert engine["distributed_executor_backend"] == "uni"
    assert engine["worker_extension_cls"] == "triton_vllm_model.amx.AmxWorkerExtension"
    assert (model / "1" / "triton_vllm_model" / "amx.py").is_file()
    assert (model / "1" / "weights" / "config.json").is_file()
    assert "im_start" in (model / "1" / "weights" / "chat_template.jinja").read_text()


def test_rerun_rewrites_the_json_not_the_weights(tmp_path):
    assert prepare(tmp_path, "--tiny").returncode == 0
    weights = tmp_path / MODEL / "1" / "weights" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    time.sleep(0.01)
    done = prepare(
        tmp_path, "--tiny", "--max-model-len", "512", "--engine-arg", "max_num_seqs=8", "--max-responses-per-second", "0"
    )
    assert done.returncode == 0, done.stderr
    assert weights.stat().st_mtime_ns == before
    assert 'string_value: "0"' in (tmp_path / MODEL / "config.pbtxt").read_text()
    engine = json.loads((tmp_path / MODEL / "1" / "model.json").read_text())
    assert engine["max_model_len"] == 512 and engine["max_num_seqs"] == 8


def test_gpu_defaults_fit_an_8gb_card(tmp_path):
    done = run_script("prepare_qwen_pt.py", "--repository", str(tmp_path), "--device", "gpu", "--tiny")
    assert done.returncode == 0, done.stderr
    engine = json.loads((tmp_path / MODEL / "1" / "model.json").read_text())
    assert engine["gpu_memory_utilization"] == 0.85
    assert engine["max_model_len"] == 4096 and engine["enforce_eager"] is False
    assert "distributed_executor_backend" not in engine  # vLLM's own choice on a GPU
    config = (tmp_path / MODEL / "config.pbtxt").read_text()
    assert 'key: "MAX_RESPONSES_PER_SECOND", value: { string_value: "0" }' in config  # no budget
    assert 'key: "SENDER_THREADS", value: { string_value: "4" }' in config  # four threads send


def test_the_uni_executor_gets_its_environment_and_leaves_one_cpu_free():
    uni = {"distributed_executor_backend": "uni"}
    assert cpu_engine_environment(uni, 8) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "7"}
    assert cpu_engine_environment(uni, 1)["OMP_NUM_THREADS"] == "1"
    assert cpu_engine_environment({"distributed_executor_backend": "mp"}, 8) == {}
    assert cpu_engine_environment({}, 8) == {}


def test_unreachable_hub_fails_fast_and_names_the_alternatives(tmp_path):
    for source, var in (("modelscope", "MODELSCOPE_DOMAIN"), ("huggingface", "HF_ENDPOINT")):
        start = time.monotonic()
        done = prepare(tmp_path, "--source", source, env={var: "http://127.0.0.1:9"})
        assert done.returncode == 3, done.stderr
        assert time.monotonic() - start < 30
        assert "--local-dir" in done.stderr and "--tiny" in done.stderr
        assert "Traceback" not in done.stderr


def test_local_dir_without_a_model_is_rejected(tmp_path):
    done = prepare(tmp_path, "--local-dir", str(tmp_path))
    assert done.returncode == 2
    assert "has no config.json" in done.stderr


def test_bad_engine_arg_is_a_usage_error(tmp_path):
    done = prepare(tmp_path, "--tiny", "--engine-arg", "novalue")
    assert done.returncode == 2
    assert "KEY=VALUE" in done.stderr


def test_negative_response_budget_is_a_usage_error(tmp_path):
    done = prepare(tmp_path, "--tiny", "--max-responses-per-second", "-5")
    assert done.returncode == 2
    assert "--max-responses-per-second must be 0 or more, got -5" in done.stderr


def test_negative_sender_threads_is_a_usage_error(tmp_path):
    done = prepare(tmp_path, "--tiny", "--sender-threads", "-1")
    assert done.returncode == 2
    assert "--sender-threads must be 0 or more, got -1" in done.stderr


def test_instances_below_one_is_a_usage_error(tmp_path):
    done = prepare(tmp_path, "--tiny", "--instances", "0")
    assert done.returncode == 2
    assert "--instances must be 1 or more, got 0" in done.stderr
