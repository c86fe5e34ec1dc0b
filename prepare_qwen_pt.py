#!/usr/bin/env python3
"""Download Qwen2.5-0.5B and build a Triton model repository that serves it with vLLM.

Creates model_repository/<name>/ with config.pbtxt, 1/model.py (a copy of
model_template.py), 1/model.json (vLLM engine arguments) and 1/weights/.
Idempotent: re-running with other flags rewrites the files, not the weights.

Exit codes: 0 done, 2 bad usage, 3 model hub unreachable, 4 download failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from serving.client import DEFAULT_MODEL, json_or_text, split_option
from serving.download import COMPLETE_MARKER, HubUnreachable, download
from serving.model_config import MAX_RESPONSES_PER_SECOND, SENDER_THREADS, detect_device, engine_args, write_model

PROJECT_ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL_ID = "Qwen/Qwen2.5-0.5B"
DEFAULT_NAME = DEFAULT_MODEL  # the clients ask for this name by default
WEIGHTS_DIR = "weights"  # inside the version folder; model.py resolves it there


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_argument_group("where the weights come from")
    src.add_argument(
        "--source",
        choices=["modelscope", "huggingface"],
        default="modelscope",
        help="model hub to download from (default: %(default)s)",
    )
    src.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="model on the hub (default: %(default)s)")
    src.add_argument("--revision", default=None, help="hub revision, branch or tag (default: the hub's default)")
    src.add_argument(
        "--local-dir",
        type=Path,
        help="serve weights already on disk (a Hugging Face-format folder) instead of downloading",
    )
    src.add_argument(
        "--tiny",
        action="store_true",
        help="make a small offline model of the Qwen2 architecture with random weights (no hub needed)",
    )
    src.add_argument(
        "--random-weights",
        action="store_true",
        help="make a model with Qwen2.5-0.5B's exact configuration but random weights (no hub; for benchmarks)",
    )

    out = parser.add_argument_group("the model repository")
    out.add_argument("--name", default=DEFAULT_NAME, help="served model name (default: %(default)s)")
    out.add_argument(
        "--repository",
        type=Path,
        default=PROJECT_ROOT / "model_repository",
        help="Triton model repository folder (default: %(default)s)",
    )
    out.add_argument(
        "--instance-kind",
        choices=["KIND_MODEL", "KIND_GPU", "KIND_CPU"],
        default="KIND_MODEL",
        help="Triton instance kind; KIND_MODEL lets vLLM place itself (default: %(default)s)",
    )
    out.add_argument(
        "--instances",
        type=int,
        default=1,
        metavar="N",
        help="Triton instances of the model, each its own Python process, all on one vLLM engine core: more than one "
        "spreads the serving work over N processes, as `vllm serve --api-server-count N` does (default: %(default)s)",
    )
    out.add_argument("--no-metrics", action="store_true", help="do not report vLLM metrics on the metrics port")
    out.add_argument(
        "--max-responses-per-second",
        type=float,
        metavar="N",
        help="streamed responses per second shared by the requests in flight: under load each stream's new text "
        "goes out merged, at most every in-flight/N seconds (never more than 50 ms); 0 sends one response "
        "per engine output, from the engine's event loop (default: "
        + ", ".join(f"{rate:g} on the {device.upper()}" for device, rate in MAX_RESPONSES_PER_SECOND.items())
        + ")",
    )
    out.add_argument(
        "--sender-threads",
        type=int,
        metavar="N",
        help="with --max-responses-per-second 0: N threads send the responses while the engine's event loop goes "
        "on; 0 lets the event loop send them itself (default: "
        + ", ".join(f"{count} on the {device.upper()}" for device, count in SENDER_THREADS.items())
        + ")",
    )
    out.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve the PEFT LoRA adapter in DIR as NAME (repeatable); requests pick it with lora_name. "
        "Sets enable_lora and writes 1/multi_lora.json",
    )

    eng = parser.add_argument_group("vLLM engine arguments written to 1/model.json")
    eng.add_argument(
        "--device",
        choices=["auto", "gpu", "cpu"],
        default="auto",
        help="pick defaults for this device; auto = gpu if nvidia-smi finds one (default: %(default)s)",
    )
    eng.add_argument(
        "--gpu-memory-utilization",
        type=float,
        help="share of GPU memory vLLM may use (GPU default 0.85; on the CPU: share of RAM for the KV cache, default 0.2)",
    )
    eng.add_argument("--max-model-len", type=int, help="longest prompt + answer in tokens (GPU default 4096, CPU 2048)")
    eng.add_argument(
        "--dtype",
        help="weight and activation dtype: auto, bfloat16, float16, float32 (GPU default auto; CPU bfloat16 "
        "where the CPU has bfloat16 instructions (AVX-512 BF16, AMX, Arm BF16), else float32)",
    )
    eng.add_argument("--tensor-parallel-size", type=int, help="GPUs to split the model across (default 1)")
    eng.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="disable CUDA graphs / compilation (GPU default off, CPU on: starts faster)",
    )
    eng.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other vLLM engine argument, VALUE parsed as JSON when it can be (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.max_responses_per_second is not None and not args.max_responses_per_second >= 0:
        parser.error(f"--max-responses-per-second must be 0 or more, got {args.max_responses_per_second:g}")
    if args.sender_threads is not None and args.sender_threads < 0:
        parser.error(f"--sender-threads must be 0 or more, got {args.sender_threads}")
    if args.instances < 1:
        parser.error(f"--instances must be 1 or more, got {args.instances}")
    return args


def parse_engine_arg(item: str) -> tuple[str, object]:
    key, raw = split_option(item, "--engine-arg")
    return key.replace("-", "_"), json_or_text(raw)


def parse_lora(item: str) -> tuple[str, str]:
    name, sep, folder = item.partition("=")
    if not sep or not name or not folder:
        raise ValueError(f"--lora expects NAME=DIR, got {item!r}")
    path = Path(folder).resolve()
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"--lora {name}: {path} has no adapter_config.json (a PEFT LoRA adapter folder is expected)")
    return name, str(path)


def fetch_weights(args: argparse.Namespace, version_dir: Path) -> str:
    """Return the ``model`` value for model.json: a folder relative to 1/, or absolute."""
    if args.local_dir:
        path = args.local_dir.resolve()
        if not (path / "config.json").is_file():
            raise ValueError(f"--local-dir {path} has no config.json: is it a Hugging Face-format model folder?")
        return str(path)
    weights = version_dir / WEIGHTS_DIR
    if args.tiny or args.random_weights:
        kind = "tiny" if args.tiny else "qwen2.5-0.5b-shaped"
        marker = weights / COMPLETE_MARKER
        if not marker.is_file() or marker.read_text().strip() != kind:
            from serving import tiny_model

            shutil.rmtree(weights, ignore_errors=True)
            make = tiny_model.make_tiny_model if args.tiny else tiny_model.make_qwen25_shaped_model
            make(weights)
            marker.write_text(f"{kind}\n")
    else:
        download(args.source, args.model_id, args.revision, weights)
    return WEIGHTS_DIR


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if sum(bool(x) for x in (args.tiny, args.random_weights, args.local_dir)) > 1:
        print("error: choose one of --tiny, --random-weights and --local-dir", file=sys.stderr)
        return 2
    try:
        overrides = dict(parse_engine_arg(item) for item in args.engine_arg)
        loras = dict(parse_lora(item) for item in args.lora)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    version_dir = args.repository / args.name / "1"
    try:
        model_path = fetch_weights(args, version_dir)
    except HubUnreachable as exc:
        print(
            f"error: {exc}.\n"
            "  This machine cannot download the model. Either copy the weights here and use\n"
            "  --local-dir PATH, or try everything offline with --tiny (a small random model).",
            file=sys.stderr,
        )
        return 3
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the hubs' clients raise many kinds
        print(f"error: downloading {args.model_id} from {args.source} failed: {exc}", file=sys.stderr)
        return 4

    device = detect_device() if args.device == "auto" else args.device
    overrides.update(
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
    )
    model_dir = write_model(
        args.repository,
        args.name,
        engine_args(model_path, device, overrides),
        instance_kind=args.instance_kind,
        instances=args.instances,
        metrics=not args.no_metrics,
        loras=loras,
        max_responses_per_second=(
            MAX_RESPONSES_PER_SECOND[device] if args.max_responses_per_second is None else args.max_responses_per_second
        ),
        sender_threads=SENDER_THREADS[device] if args.sender_threads is None else args.sender_threads,
    )
    print(f"Model '{args.name}' ready in {model_dir} ({device} defaults; engine arguments in {version_dir / 'model.json'}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
