"""What the model reads when it loads: model.json, multi_lora.json, config.pbtxt's parameters and instances."""

import json
import os
from dataclasses import fields

import torch
import triton_python_backend_utils as pb_utils
from vllm import AsyncEngineArgs
from vllm.lora.request import LoRARequest

from .config import ENGINE_ARGS_FILE, LOG_PREFIX, LORA_FILE
from .shared_core import SharedCore, addresses_file, instance_index


def read_engine_config(version_dir):
    """model.json's engine arguments; a "model" folder relative to the version folder made absolute."""
    path = os.path.join(version_dir, ENGINE_ARGS_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise pb_utils.TritonModelException(f"{path} is missing: run prepare_qwen_pt.py") from None
    except json.JSONDecodeError as exc:
        raise pb_utils.TritonModelException(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or "model" not in config:
        raise pb_utils.TritonModelException(f'{path} must be a JSON object with a "model" field')
    model = str(config["model"])
    if not os.path.isabs(model) and os.path.exists(os.path.join(version_dir, model)):
        config["model"] = os.path.join(version_dir, model)
    return config


def engine_args(config):
    known = {f.name for f in fields(AsyncEngineArgs)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise pb_utils.TritonModelException(
            f"{ENGINE_ARGS_FILE}: unknown engine argument(s) {unknown}; see vLLM's AsyncEngineArgs for the accepted fields"
        )
    try:
        return AsyncEngineArgs(**config)
    except (TypeError, ValueError) as exc:
        raise pb_utils.TritonModelException(f"{ENGINE_ARGS_FILE}: {exc}") from None


def check_placement(args, config, logger):
    """Check the GPUs model.json asks for against the instance kind; a KIND_GPU instance sees only its GPU."""
    kind = args["model_instance_kind"]
    world = int(config.get("tensor_parallel_size", 1)) * int(config.get("pipeline_parallel_size", 1))
    if kind == "GPU":
        if world > 1:
            raise pb_utils.TritonModelException(
                f"{ENGINE_ARGS_FILE} asks for {world} GPUs (tensor_parallel_size x pipeline_parallel_size) "
                "but config.pbtxt uses KIND_GPU, which gives each instance one GPU: use KIND_MODEL"
            )
        device = args["model_instance_device_id"]
        logger.log_info(f"{LOG_PREFIX} KIND_GPU instance on GPU {device}")
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
    elif world > 1 and torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise pb_utils.TritonModelException(
            f"{ENGINE_ARGS_FILE} asks for {world} GPUs (tensor_parallel_size x pipeline_parallel_size) "
            f"but {torch.cuda.device_count()} are visible: lower tensor_parallel_size or set CUDA_VISIBLE_DEVICES"
        )


def read_loras(version_dir, config):
    """multi_lora.json's adapters as LoRARequests by name; None when LoRA is not enabled."""
    if str(config.get("enable_lora", False)).lower() != "true":
        return None
    path = os.path.join(version_dir, LORA_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            loras = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise pb_utils.TritonModelException(
            f"{ENGINE_ARGS_FILE} sets enable_lora, so {path} must map adapter names to folders: {exc}"
        ) from None
    resolved = {}
    for name, folder in loras.items():
        folder = folder if os.path.isabs(folder) else os.path.join(version_dir, folder)
        resolved[name] = LoRARequest(name, len(resolved) + 1, folder)
    return resolved


def config_value(model_config, key):
    """A config.pbtxt parameter's string value; "" when it is not set."""
    return model_config.get("parameters", {}).get(key, {}).get("string_value", "")


def config_flag(model_config, key, default=False):
    value = config_value(model_config, key)
    return default if value == "" else value.lower() in ("true", "1", "yes")


def config_number(model_config, key, default):
    value = config_value(model_config, key)
    try:
        number = default if value == "" else float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise pb_utils.TritonModelException(f"config.pbtxt: parameter {key} must be a number, 0 or more; got {value!r}")
    return number


def shared_core(args, model_config):
    """For a group of several instances, this instance's part in sharing one engine core; None for one."""
    groups = model_config.get("instance_group", [])
    count = sum(int(group.get("count", 1)) for group in groups)
    if count <= 1:
        return None
    if len(groups) > 1:
        raise pb_utils.TritonModelException(
            f"config.pbtxt has {len(groups)} instance groups; instances share one engine core only within one group: "
            "use one instance_group with the count you want"
        )
    index = instance_index(args["model_instance_name"])
    path = addresses_file(args["model_name"], args["model_version"], os.getppid())  # the stubs' parent: tritonserver
    return SharedCore(count, index, path)
