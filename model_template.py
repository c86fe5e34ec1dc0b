"""Triton Python-backend model serving a vLLM ``AsyncLLMEngine`` (decoupled mode).

prepare_qwen_pt.py copies this file to ``model_repository/<name>/1/model.py``.
Engine arguments come from ``1/model.json``; switches from ``config.pbtxt``
parameters. Inputs and outputs follow Triton's official vLLM backend, so its
clients work unchanged; see the README for the reference table.
"""

# The stub's embedded interpreter starts in the C locale, where reading vLLM's
# and torch's UTF-8 sources fails: switch before anything else is imported.
import locale

locale.setlocale(locale.LC_CTYPE, "C.UTF-8")

import os  # noqa: E402
import sys  # noqa: E402

# The triton_vllm_model package beside this file; the engine processes vLLM
# spawns inherit this path (the worker extension of the CPU engine is there).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import asyncio  # noqa: E402
import contextlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import queue  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import typing  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field, fields  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
import uvloop  # noqa: E402
import vllm  # noqa: E402
import vllm.envs  # noqa: E402
from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams  # noqa: E402
from vllm.lora.request import LoRARequest  # noqa: E402
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.usage.usage_lib import UsageContext  # noqa: E402

try:
    from vllm.sampling_params import StructuredOutputsParams
except ImportError:  # vLLM before 0.11
    StructuredOutputsParams = None

ENGINE_ARGS_FILE = "model.json"
LORA_FILE = "multi_lora.json"
LOG_PREFIX = "[vllm]"
SHUTDOWN_GRACE_S = 20.0  # below Triton's default --exit-timeout-secs of 30
CANCEL_POLL_S = 0.2
DEFAULT_MAX_RESPONSES_PER_SECOND = 2000.0  # without the parameter; as serving/model_config.py writes it
# The sender thread releases the GIL for each response's round trip to the server
# and must then win it back from the busy event loop, which Python forces only
# after the switch interval (5 ms by default): a cap of about 170 responses a second.
GIL_SWITCH_INTERVAL_S = 0.0005
MAX_RESPONSE_INTERVAL_S = 0.05  # text that is ready never waits longer than this

BOOL_INPUTS = [
    "stream",
    "exclude_input_in_output",
    "chat",
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
]
STRING_INPUTS = ["sampling_parameters", "messages"]
OUTPUTS = [
    ("text_output", "TYPE_STRING"),
    ("finish_reason", "TYPE_STRING"),
    ("cumulative_logprob", "TYPE_FP32"),
    ("logprobs", "TYPE_STRING"),
    ("num_input_tokens", "TYPE_UINT32"),
    ("num_output_tokens", "TYPE_UINT32"),
]

# Keys of the request's sampling parameters that are not SamplingParams fields.
REQUEST_KEYS = {"lora_name", "priority"}
STRUCTURED_KEYS = {"guided_json": "json", "guided_choice": "choice", "guided_regex": "regex", "guided_grammar": "grammar"}
PRIVATE_SAMPLING_FIELDS = {"output_kind", "skip_clone", "output_text_buffer_length", "detokenize"}


class RequestError(Exception):
    """A client mistake: answered with INVALID_ARG (HTTP 400)."""


class EngineEndedRequest(Exception):
    """The engine ended a request without finishing it (aborted it, or closed its output)."""


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


@dataclass
class Seq:
    """New output of one sequence since the last response."""

    text: str
    token_ids: list
    logprobs: list | None
    cumulative_logprob: float | None
    finish_reason: str | None


@dataclass
class Delta:
    """New output of one request: what one response carries."""

    seqs: dict
    num_input_tokens: int
    prompt: str
    prefix: str = ""

    @classmethod
    def of(cls, out):
        seqs = {
            o.index: Seq(
                o.text, list(o.token_ids), None if o.logprobs is None else list(o.logprobs), o.cumulative_logprob, o.finish_reason
            )
            for o in out.outputs
        }
        return cls(seqs, len(out.prompt_token_ids or []), out.prompt or "")

    def extend(self, later):
        for index, seq in later.seqs.items():
            mine = self.seqs.get(index)
            if mine is None:
                self.seqs[index] = seq
                continue
            mine.text += seq.text
            mine.token_ids += seq.token_ids
            if mine.logprobs is not None and seq.logprobs is not None:
                mine.logprobs += seq.logprobs
            mine.cumulative_logprob = seq.cumulative_logprob
            mine.finish_reason = seq.finish_reason


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(config):
        present = {t["name"] for t in config.as_dict()["input"]} | {t["name"] for t in config.as_dict()["output"]}
        inputs = [{"name": "text_input", "data_type": "TYPE_STRING", "dims": [1], "optional": True}]
        inputs += [{"name": n, "data_type": "TYPE_BOOL", "dims": [1], "optional": True} for n in BOOL_INPUTS]
        inputs += [{"name": n, "data_type": "TYPE_STRING", "dims": [1], "optional": True} for n in STRING_INPUTS]
        for spec in inputs:
            if spec["name"] not in present:
                config.add_input(spec)
        for name, dtype in OUTPUTS:
            if name not in present:
                config.add_output({"name": name, "data_type": dtype, "dims": [-1]})
        config.set_model_transaction_policy({"decoupled": True})
        config.set_max_batch_size(0)
        return config

    # ------------------------------------------------------------------ load

    def initialize(self, args):
        self.logger = pb_utils.Logger
        self.model_config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException("config.pbtxt must set model_transaction_policy { decoupled: true }")
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        engine_config = self._read_engine_config(version_dir)
        self._check_placement(args, engine_config)
        for key, value in _cpu_engine_environment(engine_config).items():
            os.environ.setdefault(key, value)
        self.loras = self._read_loras(version_dir, engine_config)
        self.engine_args = self._engine_args(engine_config)

        self.max_response_rate = self._config_number("MAX_RESPONSES_PER_SECOND", DEFAULT_MAX_RESPONSES_PER_SECOND)
        self.metrics = None
        if self._config_flag("REPORT_CUSTOM_METRICS", default=True) and not self.engine_args.disable_log_stats:
            self.metrics = Metrics({"model": self.model_name, "version": args["model_version"]})

        self.jobs = {}
        self.jobs_lock = threading.Lock()
        self.accepting = True
        self.restarting = False
        self.restart_lock = threading.Lock()
        self.responses = queue.Queue()
        self.loop = uvloop.new_event_loop()  # as `vllm serve` runs: the pure-Python loop costs more per engine output
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="vllm-loop", daemon=True)
        self.loop_thread.start()
        try:
            self.engine = self._run(self._start_engine())
        except Exception as exc:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise pb_utils.TritonModelException(
                f"vLLM engine failed to start with {os.path.join(version_dir, ENGINE_ARGS_FILE)}: {exc}"
            ) from exc
        if hasattr(vllm.envs, "enable_envs_cache"):  # without it, vLLM reads os.environ for every output
            vllm.envs.enable_envs_cache()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.sender_thread = threading.Thread(target=self._send_responses, name="vllm-send", daemon=True)
        self.sender_thread.start()
        self.poller_stop = threading.Event()
        self.poller_thread = threading.Thread(target=self._poll_cancellations, name="vllm-cancel", daemon=True)
        self.poller_thread.start()
        self.logger.log_info(
            f"{LOG_PREFIX} model '{self.model_name}' ready on vLLM {vllm.__version__}: {engine_config}; "
            f"MAX_RESPONSES_PER_SECOND {self.max_response_rate:g}"
        )

    def _read_engine_config(self, version_dir):
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

    def _engine_args(self, config):
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

    def _check_placement(self, args, config):
        kind = args["model_instance_kind"]
        world = int(config.get("tensor_parallel_size", 1)) * int(config.get("pipeline_parallel_size", 1))
        if kind == "GPU":
            if world > 1:
                raise pb_utils.TritonModelException(
                    f"{ENGINE_ARGS_FILE} asks for {world} GPUs (tensor_parallel_size x pipeline_parallel_size) "
                    "but config.pbtxt uses KIND_GPU, which gives each instance one GPU: use KIND_MODEL"
                )
            device = args["model_instance_device_id"]
            self.logger.log_info(f"{LOG_PREFIX} KIND_GPU instance on GPU {device}")
            os.environ["CUDA_VISIBLE_DEVICES"] = str(device)
        elif world > 1 and torch.cuda.is_available() and torch.cuda.device_count() < world:
            raise pb_utils.TritonModelException(
                f"{ENGINE_ARGS_FILE} asks for {world} GPUs (tensor_parallel_size x pipeline_parallel_size) "
                f"but {torch.cuda.device_count()} are visible: lower tensor_parallel_size or set CUDA_VISIBLE_DEVICES"
            )

    def _read_loras(self, version_dir, config):
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

    def _config_value(self, key):
        """A config.pbtxt parameter's string value; "" when it is not set."""
        return self.model_config.get("parameters", {}).get(key, {}).get("string_value", "")

    def _config_flag(self, key, default=False):
        value = self._config_value(key)
        return default if value == "" else value.lower() in ("true", "1", "yes")

    def _config_number(self, key, default):
        value = self._config_value(key)
        try:
            number = default if value == "" else float(value)
        except ValueError:
            number = -1.0
        if not number >= 0:
            raise pb_utils.TritonModelException(f"config.pbtxt: parameter {key} must be a number, 0 or more; got {value!r}")
        return number

    def _new_engine(self):
        loggers = [self.metrics.stat_logger_factory()] if self.metrics else None
        # A server's scheduler defaults (max_num_batched_tokens by GPU), as `vllm serve` gets them.
        return AsyncLLMEngine.from_engine_args(
            self.engine_args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=loggers
        )

    async def _start_engine(self):
        return self._new_engine()

    def _run(self, coro, timeout=None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    # --------------------------------------------------------------- requests

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                job, prompt, params, lora, priority = self._parse(request, sender)
            except RequestError as exc:
                self.logger.log_info(f"{LOG_PREFIX} request {request.request_id() or '(no id)'} rejected: {exc}")
                self._fail(sender, str(exc), pb_utils.TritonError.INVALID_ARG)
                continue
            except Exception as exc:
                self.logger.log_error(f"{LOG_PREFIX} reading a request failed: {traceback.format_exc()}")
                self._fail(sender, f"the request could not be read: {exc}", pb_utils.TritonError.INTERNAL)
                continue
            if not self.accepting:
                self._fail(sender, "the model is shutting down", pb_utils.TritonError.UNAVAILABLE)
                continue
            if self.restarting or self.engine.errored:
                self._engine_died()
                self._fail(sender, "the vLLM engine is restarting; retry shortly", pb_utils.TritonError.UNAVAILABLE)
                continue
            with self.jobs_lock:
                self.jobs[job.id] = job
            asyncio.run_coroutine_threadsafe(self._generate(job, prompt, params, lora, priority), self.loop)
        return None

    def _parse(self, request, sender):
        flags = {name: _bool_input(request, name) for name in BOOL_INPUTS}
        stream = bool(flags["stream"])
        exclude = flags["exclude_input_in_output"]
        if stream and exclude is False:
            raise RequestError("exclude_input_in_output=false cannot be combined with stream=true: streaming sends only new text")
        prompt = self._prompt(request, bool(flags["chat"]))
        params = _sampling_dict(request)
        lora = self._lora(params.pop("lora_name", None))
        priority = params.pop("priority", 0)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise RequestError(f"priority must be an integer, got {priority!r}")
        if priority and getattr(self.engine_args, "scheduling_policy", "fcfs") != "priority":
            raise RequestError(
                f'priority {priority} needs priority scheduling: set "scheduling_policy": "priority" in {ENGINE_ARGS_FILE}'
            )
        outputs = {name[len("return_") :]: bool(flags[name]) for name in BOOL_INPUTS if name.startswith("return_")}
        sampled_logprobs = params.get("logprobs") is not None
        if outputs["cumulative_logprob"] and not sampled_logprobs:
            params["logprobs"] = 0  # vLLM sums log-probabilities only when it computes them; 0: the sampled token's alone
        sampling = _sampling_params(params, stream)
        limit = self.engine_args.max_model_len
        if limit and sampling.max_tokens is not None and sampling.max_tokens > limit:
            raise RequestError(
                f"max_tokens {sampling.max_tokens} is more than the maximum context length {limit} "
                f"(max_model_len in {ENGINE_ARGS_FILE})"
            )
        job = Job(
            id=self._request_id(request),
            sender=sender,
            stream=stream,
            prepend_input=not stream and not exclude,
            outputs=outputs,
            sampled_logprobs=sampled_logprobs,
        )
        return job, prompt, sampling, lora, priority

    def _prompt(self, request, chat):
        messages = _string_input(request, "messages")
        text = _string_input(request, "text_input")
        if messages is not None:
            messages = _parse_messages(messages)
        elif text is None:
            raise RequestError("text_input is required (or messages, a JSON list of {role, content})")
        elif chat:
            messages = [{"role": "user", "content": text}]
        if messages is None:
            return text
        tokenizer = self.engine.get_tokenizer()
        if inspect.isawaitable(tokenizer):
            tokenizer = self._run(tokenizer)
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(f"model '{self.model_name}' has no chat template; send text_input without chat")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:
            raise RequestError(f"messages could not be formatted with the chat template: {exc}") from None

    def _lora(self, name):
        if name is None:
            return None
        if self.loras is None:
            raise RequestError(
                f"lora_name {name!r} given but LoRA is not enabled for this model (enable_lora in {ENGINE_ARGS_FILE})"
            )
        if name not in self.loras:
            raise RequestError(f"unknown LoRA adapter {name!r}; available: {sorted(self.loras)}")
        return self.loras[name]

    def _request_id(self, request):
        rid = request.request_id() or uuid.uuid4().hex
        with self.jobs_lock:
            if rid in self.jobs:
                rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        return rid

    async def _generate(self, job, prompt, params, lora, priority):
        job.task = asyncio.current_task()
        delta = None
        try:
            if self.metrics:
                self.metrics.request_started()
            finished = False
            async for out in self.engine.generate(prompt, params, job.id, lora_request=lora, priority=priority):
                delta = Delta.of(out)
                # An abort the model did not ask for (vLLM can end requests so when its engine dies) is a failure.
                aborted = out.finished and any(o.finish_reason == "abort" for o in out.outputs)
                finished = out.finished and not aborted
                if job.stream:
                    self._queue(job, delta, final=finished)
            if not finished:
                raise EngineEndedRequest("the vLLM engine ended the request before it finished")
            if not job.stream:
                if job.prepend_input:
                    delta.prefix = delta.prompt
                self._queue(job, delta, final=True)
        except asyncio.CancelledError:
            self.logger.log_info(f"{LOG_PREFIX} request {job.id} cancelled by the client; aborted in the engine")
            self._queue(job, _error_response("request cancelled by the client", pb_utils.TritonError.CANCELLED), final=True)
        except Exception as exc:
            code, message = self._classify(exc)
            self.logger.log_warn(f"{LOG_PREFIX} request {job.id} failed: {message}")
            if code == pb_utils.TritonError.INTERNAL:
                self.logger.log_error(f"{LOG_PREFIX} {traceback.format_exc()}")
            self._queue(job, _error_response(message, code), final=True)

    def _engine_died(self):
        """Replace a dead engine once; requests meanwhile get UNAVAILABLE at once."""
        with self.restart_lock:
            if self.restarting or not self.accepting:
                return
            self.restarting = True
        self.logger.log_error(f"{LOG_PREFIX} the vLLM engine died; starting a new one")
        asyncio.run_coroutine_threadsafe(self._restart_engine(), self.loop)

    async def _restart_engine(self):
        old = self.engine
        with contextlib.suppress(Exception):
            old.shutdown()
        while self.accepting:
            try:
                # Building the engine blocks for seconds: keep the event loop free meanwhile.
                self.engine = await self.loop.run_in_executor(None, self._new_engine)
                self.logger.log_info(f"{LOG_PREFIX} new vLLM engine ready")
                break
            except Exception:
                self.logger.log_error(f"{LOG_PREFIX} restarting the engine failed: {traceback.format_exc()}")
                await asyncio.sleep(5)
        self.restarting = False

    def _classify(self, exc):
        name = type(exc).__name__
        if self.engine.errored or name == "EngineDeadError":
            self._engine_died()
            return pb_utils.TritonError.UNAVAILABLE, f"the vLLM engine died; the model restarts it, retry shortly ({exc})"
        if isinstance(exc, (ValueError, TypeError)) or "ClientError" in name or "ValidationError" in name:
            return pb_utils.TritonError.INVALID_ARG, str(exc)
        return pb_utils.TritonError.INTERNAL, f"generation failed: {name}: {exc}"

    def _response(self, job, delta):
        seqs = [delta.seqs.get(i) for i in range(max(delta.seqs, default=-1) + 1)]
        tensors = [pb_utils.Tensor("text_output", _strings([delta.prefix + (s.text if s else "") for s in seqs]))]
        if job.outputs["finish_reason"]:
            reasons = [str(s.finish_reason) if s and s.finish_reason else "" for s in seqs]
            tensors.append(pb_utils.Tensor("finish_reason", _strings(reasons)))
        if job.outputs["cumulative_logprob"]:
            values = [s.cumulative_logprob if s and s.cumulative_logprob is not None else 0.0 for s in seqs]
            tensors.append(pb_utils.Tensor("cumulative_logprob", np.asarray(values, dtype=np.float32)))
        if job.outputs["logprobs"]:
            values = [_logprobs_json(s) if job.sampled_logprobs else "null" for s in seqs]
            tensors.append(pb_utils.Tensor("logprobs", _strings(values)))
        if job.outputs["num_input_tokens"]:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.asarray([delta.num_input_tokens], dtype=np.uint32)))
        if job.outputs["num_output_tokens"]:
            counts = [len(s.token_ids) if s else 0 for s in seqs]
            tensors.append(pb_utils.Tensor("num_output_tokens", np.asarray(counts, dtype=np.uint32)))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    # -------------------------------------------------------------- responses

    def _queue(self, job, payload, final):
        """payload: a Delta of new output, or a ready error response."""
        self.responses.put((job, payload, final))

    def _fail(self, sender, message, code):
        sender.send(_error_response(message, code), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _send_responses(self):
        """Send from one dedicated thread so the engine's event loop never blocks on IPC.

        Each response costs a round trip to the server process, so under load a
        request's new output waits until its interval is up and goes out merged
        (see ``_interval_s``). First and final responses and errors go out at once.
        """
        pending = {}  # job -> [[Delta or error response, final], ...] in arrival order
        while True:
            for item in self._take(self._wait_s(pending)):
                if item is None:
                    self._send_all(pending)
                    return
                job, payload, final = item
                entries = pending.setdefault(job, [])
                if entries and isinstance(entries[-1][0], Delta) and isinstance(payload, Delta) and not entries[-1][1]:
                    entries[-1][0].extend(payload)
                    entries[-1][1] = final
                else:
                    entries.append([payload, final])
            ready_at = time.monotonic() - self._interval_s()
            due = {job: entries for job, entries in pending.items() if job.last_sent <= ready_at or _closes(entries)}
            for job in due:
                del pending[job]
            self._send_all(due)

    def _interval_s(self):
        """Least time between two responses of one request: the requests in flight
        share MAX_RESPONSES_PER_SECOND, so a lone stream gets every engine output."""
        if not self.max_response_rate:
            return 0.0
        return min(MAX_RESPONSE_INTERVAL_S, len(self.jobs) / self.max_response_rate)

    def _wait_s(self, pending):
        """How long the sender may block for new output: until the first held response is due."""
        if not pending:
            return None
        return max(0.0, min(job.last_sent for job in pending) + self._interval_s() - time.monotonic())

    def _take(self, timeout):
        try:
            items = [self.responses.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self.responses.get_nowait())
            except queue.Empty:
                return items

    def _send_all(self, pending):
        for job, entries in pending.items():
            for payload, final in entries:
                self._send(job, payload, final)
            job.last_sent = time.monotonic()

    def _send(self, job, payload, final):
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        try:
            response = self._response(job, payload) if isinstance(payload, Delta) else payload
            with job.lock:
                job.sender.send(response, flags=flags)
                job.done = job.done or final
        except Exception:
            self.logger.log_error(f"{LOG_PREFIX} sending a response of {job.id} failed: {traceback.format_exc()}")
            if not final:
                return
            with contextlib.suppress(Exception), job.lock:
                job.done = True
                job.sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if final:
            with self.jobs_lock:
                self.jobs.pop(job.id, None)
            if self.metrics:
                self.metrics.request_finished()

    def _poll_cancellations(self):
        """Triton marks a request cancelled when its client cancels or disconnects."""
        while not self.poller_stop.wait(CANCEL_POLL_S):
            with self.jobs_lock:
                jobs = [j for j in self.jobs.values() if not j.cancelled and j.task is not None]
            for job in jobs:
                with job.lock:
                    if job.done:
                        continue
                    try:
                        cancelled = job.sender.is_cancelled()
                    except Exception as exc:
                        self.logger.log_warn(f"{LOG_PREFIX} cancellation check of {job.id} failed: {exc}")
                        continue
                if cancelled:
                    job.cancelled = True
                    self.loop.call_soon_threadsafe(job.task.cancel)

    # --------------------------------------------------------------- shutdown

    def finalize(self):
        self.logger.log_info(
            f"{LOG_PREFIX} shutting down: {len(self.jobs)} request(s) in flight, waiting up to {SHUTDOWN_GRACE_S:.0f} s for them"
        )
        self.accepting = False
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        while self.jobs and time.monotonic() < deadline:
            time.sleep(0.1)
        with self.jobs_lock:
            left = [j for j in self.jobs.values() if j.task is not None]
        for job in left:
            self.loop.call_soon_threadsafe(job.task.cancel)
        self.poller_stop.set()
        try:
            self.engine.shutdown()
        except Exception:
            self.logger.log_warn(f"{LOG_PREFIX} engine shutdown: {traceback.format_exc()}")
        self.responses.put(None)
        self.sender_thread.join(timeout=5)
        if self.metrics:
            self.metrics.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(timeout=5)
        self.logger.log_info(f"{LOG_PREFIX} shutdown complete")


# ------------------------------------------------------------------- helpers


def _cpu_engine_environment(config):
    """What the "uni" executor needs on vLLM's CPU build (serving/model_config.py documents it)."""
    if config.get("distributed_executor_backend") != "uni":
        return {}
    return {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) - 1))}


def _closes(entries):
    """Whether held entries end their request or carry an error: those go out at once."""
    return any(final or not isinstance(payload, Delta) for payload, final in entries)


def _string_input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one element, got {values.size}")
    value = values[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name} is not valid UTF-8: {exc}") from None
    return str(value)


def _bool_input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one boolean, got {values.size} elements")
    return bool(values[0])


def _parse_messages(raw):
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestError(f"messages is not valid JSON: {exc}") from None
    if not isinstance(messages, list) or not messages:
        raise RequestError('messages must be a non-empty JSON list of {"role": ..., "content": ...} objects')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}] must be an object with string fields role and content, got {m!r}")
        if m["role"] not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}].role must be system, user or assistant, got {m['role']!r}")
    return messages


def _sampling_dict(request):
    """Sampling parameters from the sampling_parameters input, else the request's parameters."""
    raw = _string_input(request, "sampling_parameters")
    source = "sampling_parameters"
    if raw is None:
        raw, source = request.parameters(), "parameters"
    try:
        params = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        raise RequestError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(params, dict):
        raise RequestError(f"{source} must be a JSON object, got {type(params).__name__}")
    # Triton's own request parameters (triton_enable_empty_final_response, ...), and the
    # generate endpoint's "id", which is already the request id.
    return {k: v for k, v in params.items() if not k.startswith("triton_") and k != "id"}


def _sampling_fields():
    hints = typing.get_type_hints(SamplingParams)
    names = getattr(SamplingParams, "__struct_fields__", None) or list(hints)
    return {n: hints.get(n) for n in names if not n.startswith("_") and n not in PRIVATE_SAMPLING_FIELDS}


SAMPLING_FIELDS = _sampling_fields()


def _check_type(key, value, hint):
    """Reject values of the wrong JSON type, naming key, value and what is allowed."""
    allowed = set(typing.get_args(hint)) or {hint}
    simple = {t for t in allowed if t in (int, float, bool, str, list, dict, type(None))}
    origins = {typing.get_origin(t) or t for t in allowed}
    if not simple and not origins & {list, dict}:
        return
    ok = (
        (value is None and type(None) in allowed)
        or (isinstance(value, bool) and bool in allowed)
        or (isinstance(value, int) and not isinstance(value, bool) and (int in allowed or float in allowed))
        or (isinstance(value, float) and float in allowed)
        or (isinstance(value, str) and str in allowed)
        or (isinstance(value, list) and list in origins)
        or (isinstance(value, dict) and dict in origins)
    )
    if not ok:
        names = sorted({getattr(t, "__name__", str(t)).replace("NoneType", "null") for t in origins})
        raise RequestError(f"sampling parameter {key!r} has value {value!r}; expected {' or '.join(names)}")


def _sampling_params(params, stream):
    params = dict(params)
    structured = {STRUCTURED_KEYS[k]: params.pop(k) for k in list(params) if k in STRUCTURED_KEYS}
    if "structured_outputs" in params:
        value = params.pop("structured_outputs")
        if not isinstance(value, dict):
            raise RequestError(f"sampling parameter 'structured_outputs' must be an object, got {value!r}")
        structured.update(value)
    for key, value in params.items():
        if key not in SAMPLING_FIELDS:
            allowed = sorted(set(SAMPLING_FIELDS) | REQUEST_KEYS | set(STRUCTURED_KEYS) | {"structured_outputs"})
            raise RequestError(f"unknown sampling parameter {key!r} (value {value!r}); allowed: {', '.join(allowed)}")
        _check_type(key, value, SAMPLING_FIELDS[key])
    if structured:
        if StructuredOutputsParams is None:
            raise RequestError("structured output needs vLLM 0.11 or newer")
        try:
            params["structured_outputs"] = StructuredOutputsParams(**structured)
        except (TypeError, ValueError) as exc:
            raise RequestError(f"invalid structured output parameters {structured!r}: {exc}") from None
    params.setdefault("max_tokens", None)  # None: up to the context length, not vLLM's 16
    params["output_kind"] = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    try:
        return SamplingParams(**params)
    except Exception as exc:  # vLLM's validation errors are not all ValueErrors
        raise RequestError(f"invalid sampling parameters: {exc}") from None


def _logprobs_json(seq):
    if seq is None or seq.logprobs is None:
        return "null"
    steps = []
    for token_id, step in zip(seq.token_ids, seq.logprobs, strict=False):
        entry = {}
        for tid, lp in step.items():
            entry[str(tid)] = {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
        steps.append({"token_id": token_id, "candidates": entry})
    return json.dumps(steps)


def _strings(values):
    return np.asarray([v.encode("utf-8") for v in values], dtype=np.object_)


def _error_response(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


# ------------------------------------------------------------------- metrics


class Metrics:
    """vLLM's figures on Triton's metrics port, labelled by model and version.

    Every update of a Triton metric is a round trip to the server process, so
    the hot path only updates numbers in memory; a thread publishes them every
    FLUSH_S seconds.
    """

    FLUSH_S = 0.25
    LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
    LENGTH_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
    COUNTERS = {
        "prompt_tokens": ("vllm:prompt_tokens_total", "Prompt tokens processed"),
        "generation_tokens": ("vllm:generation_tokens_total", "Generation tokens produced"),
    }
    GAUGES = {
        "running": ("vllm:num_requests_running", "Requests in the engine's running batch"),
        "waiting": ("vllm:num_requests_waiting", "Requests waiting in the engine's queue"),
        "in_flight": ("vllm:num_requests_in_flight", "Requests the model has not answered in full yet"),
    }
    HISTOGRAMS = {
        "ttft": ("vllm:time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS),
        "tpot": ("vllm:time_per_output_token_seconds", "Time per output token after the first", LATENCY_BUCKETS),
        "e2e": ("vllm:e2e_request_latency_seconds", "End-to-end request latency", LATENCY_BUCKETS),
        "prompt_len": ("vllm:request_prompt_tokens", "Prompt length of finished requests", LENGTH_BUCKETS),
        "gen_len": ("vllm:request_generation_tokens", "Generation length of finished requests", LENGTH_BUCKETS),
    }

    def __init__(self, labels):
        self._families = []  # a Metric is only valid while its family lives
        self._metrics = {}
        kinds = pb_utils.MetricFamily
        for key, (name, doc) in self.COUNTERS.items():
            self._metrics[key] = self._make(name, doc, kinds.COUNTER, labels)
        for key, (name, doc) in self.GAUGES.items():
            self._metrics[key] = self._make(name, doc, kinds.GAUGE, labels)
        for key, (name, doc, buckets) in self.HISTOGRAMS.items():
            self._metrics[key] = self._make(name, doc, kinds.HISTOGRAM, labels, buckets)
        self._lock = threading.Lock()
        self._counts = {key: 0 for key in self.COUNTERS}
        self._gauges = {key: 0 for key in self.GAUGES}
        self._observations = {key: [] for key in self.HISTOGRAMS}
        self._published_gauges = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._publish_loop, name="vllm-metrics", daemon=True)
        self._thread.start()

    def _make(self, name, doc, kind, labels, buckets=None):
        family = pb_utils.MetricFamily(name=name, description=doc, kind=kind)
        self._families.append(family)
        return family.Metric(labels=labels, buckets=buckets) if buckets else family.Metric(labels=labels)

    def request_started(self):
        with self._lock:
            self._gauges["in_flight"] += 1

    def request_finished(self):
        with self._lock:
            self._gauges["in_flight"] -= 1
            if self._gauges["in_flight"] == 0:
                # vLLM reports scheduler figures only while it steps; idle, it has nothing queued.
                self._gauges["running"] = self._gauges["waiting"] = 0

    def record(self, scheduler_stats, iteration_stats):
        """Called by vLLM after every engine step, on the engine's event loop."""
        with self._lock:
            if scheduler_stats is not None and self._gauges["in_flight"] > 0:
                self._gauges["running"] = scheduler_stats.num_running_reqs
                self._gauges["waiting"] = scheduler_stats.num_waiting_reqs
            if iteration_stats is None:
                return
            prompt_tokens = getattr(iteration_stats, "num_prompt_tokens", None)
            if prompt_tokens is None:  # vLLM 0.30+ keeps them in prompt_token_stats
                prompt_tokens = getattr(getattr(iteration_stats, "prompt_token_stats", None), "total", 0)
            self._counts["prompt_tokens"] += prompt_tokens
            self._counts["generation_tokens"] += iteration_stats.num_generation_tokens
            self._observations["ttft"] += iteration_stats.time_to_first_tokens_iter
            for req in iteration_stats.finished_requests:
                self._observations["e2e"].append(req.e2e_latency)
                self._observations["prompt_len"].append(req.num_prompt_tokens)
                self._observations["gen_len"].append(req.num_generation_tokens)
                if req.num_generation_tokens > 1:
                    self._observations["tpot"].append(req.decode_time / (req.num_generation_tokens - 1))

    def _publish_loop(self):
        while not self._stop.wait(self.FLUSH_S):
            try:
                self.publish()
            except Exception:
                pb_utils.Logger.log_warn(f"{LOG_PREFIX} publishing metrics failed, retrying: {traceback.format_exc()}")

    def publish(self):
        with self._lock:
            counts, self._counts = self._counts, {key: 0 for key in self.COUNTERS}
            gauges = dict(self._gauges)
            observations, self._observations = self._observations, {key: [] for key in self.HISTOGRAMS}
        try:
            for key, value in counts.items():
                if value:
                    self._metrics[key].increment(value)
                    counts[key] = 0
            for key, value in gauges.items():
                if self._published_gauges.get(key) != value:
                    self._metrics[key].set(value)
                    self._published_gauges[key] = value
            for key, values in observations.items():
                while values:
                    self._metrics[key].observe(values[-1])
                    values.pop()
        finally:
            with self._lock:  # what did not go out goes with the next flush
                for key, value in counts.items():
                    self._counts[key] += value
                for key, values in observations.items():
                    self._observations[key][:0] = values

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        with contextlib.suppress(Exception):
            self.publish()
        # Release Triton's metric objects while the stub can still reach the
        # server: released at interpreter exit, they crash the stub.
        self._metrics.clear()
        self._families.clear()

    def stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        metrics = self

        class TritonStatLogger(StatLoggerBase):
            def __init__(self, vllm_config, engine_index=0):
                pass

            def record(self, scheduler_stats, iteration_stats, *args, **kwargs):
                metrics.record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self):
                pass

        return TritonStatLogger
