"""Triton Python-backend model serving a vLLM ``AsyncLLMEngine`` (decoupled mode).

prepare_qwen_pt.py copies this file to ``model_repository/<name>/1/model.py``.
Engine arguments come from ``1/model.json``; switches from ``config.pbtxt``
parameters. Inputs and outputs follow Triton's official vLLM backend, so its
clients work unchanged; see the README for the reference table.

This file wires the parts of the ``triton_vllm_model`` package beside it:
loading (model.json, multi_lora.json, config.pbtxt parameters), inputs (reading
a request), outputs (response tensors), sender (the response budget), metrics
and config (values shared with prepare_qwen_pt.py).
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
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402

import triton_python_backend_utils as pb_utils  # noqa: E402
import uvloop  # noqa: E402
import vllm  # noqa: E402
import vllm.envs  # noqa: E402
from vllm import AsyncLLMEngine  # noqa: E402
from vllm.usage.usage_lib import UsageContext  # noqa: E402

from triton_vllm_model import loading, shared_core  # noqa: E402
from triton_vllm_model.config import (  # noqa: E402
    DEFAULT_MAX_RESPONSES_PER_SECOND,
    ENGINE_ARGS_FILE,
    ENGINE_DIED,
    ENGINE_RESTARTING,
    GENERATION_FAILED,
    LOG_PREFIX,
    MAX_RESPONSES_PER_SECOND,
    REPORT_CUSTOM_METRICS,
    SENDER_THREADS,
    SHUTTING_DOWN,
    UNREADABLE_REQUEST,
    cpu_engine_environment,
    engine_process_environment,
)
from triton_vllm_model.inputs import (  # noqa: E402
    BOOL_INPUTS,
    STRING_INPUTS,
    RequestError,
    bool_input,
    parse_messages,
    sampling_dict,
    sampling_params,
    string_input,
)
from triton_vllm_model.metrics import Metrics  # noqa: E402
from triton_vllm_model.outputs import OUTPUTS, Delta, error_response  # noqa: E402
from triton_vllm_model.sender import Job, ResponseSender  # noqa: E402

SHUTDOWN_GRACE_S = 20.0  # below Triton's default --exit-timeout-secs of 30
CANCEL_POLL_S = 0.2
# The sender thread releases the GIL for each response's round trip to the server
# and must then win it back from the busy event loop, which Python forces only
# after the switch interval (5 ms by default): a cap of about 170 responses a second.
GIL_SWITCH_INTERVAL_S = 0.0005


class EngineEndedRequest(Exception):
    """The engine ended a request without finishing it (aborted it, or closed its output)."""


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
        engine_config = loading.read_engine_config(version_dir)
        loading.check_placement(args, engine_config, self.logger)
        for key, value in {**engine_process_environment(sys.executable), **cpu_engine_environment(engine_config)}.items():
            os.environ.setdefault(key, value)
        self.loras = loading.read_loras(version_dir, engine_config)
        self.engine_args = loading.engine_args(engine_config)
        self.shared_core = loading.shared_core(args, self.model_config)

        self.max_response_rate = loading.config_number(
            self.model_config, MAX_RESPONSES_PER_SECOND, DEFAULT_MAX_RESPONSES_PER_SECOND
        )
        self.sender_threads = int(loading.config_number(self.model_config, SENDER_THREADS, 0))
        self.metrics = None
        if loading.config_flag(self.model_config, REPORT_CUSTOM_METRICS, default=True) and not self.engine_args.disable_log_stats:
            labels = {"model": self.model_name, "version": args["model_version"]}
            if self.shared_core:  # each instance counts what it served
                labels["instance"] = str(self.shared_core.index)
            self.metrics = Metrics(labels)

        self.jobs = {}
        self.jobs_lock = threading.Lock()
        self.accepting = True
        self.restarting = False
        self.restart_lock = threading.Lock()
        self.responses = ResponseSender(lambda: len(self.jobs), self.max_response_rate, self._finished, self.sender_threads)
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
        self.responses.start()
        self.poller_stop = threading.Event()
        self.poller_thread = threading.Thread(target=self._poll_cancellations, name="vllm-cancel", daemon=True)
        self.poller_thread.start()
        self.logger.log_info(
            f"{LOG_PREFIX} model '{self.model_name}' ready on vLLM {vllm.__version__}: {engine_config}; "
            f"MAX_RESPONSES_PER_SECOND {self.max_response_rate:g}"
            + (f"; SENDER_THREADS {len(self.responses.lanes)}" if self.responses.lanes else "")
            + (
                f"; instance {self.shared_core.index} of {self.shared_core.count} on one shared engine core"
                if self.shared_core
                else ""
            )
        )

    def _new_engine(self):
        loggers = [self.metrics.stat_logger_factory()] if self.metrics else None
        # A server's scheduler defaults (max_num_batched_tokens by GPU), as `vllm serve` gets them.
        if self.shared_core is None:
            return AsyncLLMEngine.from_engine_args(
                self.engine_args, usage_context=UsageContext.OPENAI_API_SERVER, stat_loggers=loggers
            )
        vllm_config = self.engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)

        def front_end(**attach):
            return AsyncLLMEngine.from_vllm_config(
                vllm_config,
                usage_context=UsageContext.OPENAI_API_SERVER,
                stat_loggers=loggers,
                enable_log_requests=self.engine_args.enable_log_requests,
                disable_log_stats=self.engine_args.disable_log_stats,
                **attach,
            )

        return self.shared_core.attach(
            vllm_config, not self.engine_args.disable_log_stats, front_end, lambda: self.accepting, self._core_exited
        )

    def _core_exited(self, engine, unloading):
        """The shared engine core stops: instance 0 unloads the model (this instance goes next),
        or the core died. Either way this front end's requests fail at once."""
        if unloading:
            self.accepting = False
            reason = SHUTTING_DOWN
            self.logger.log_info(f"{LOG_PREFIX} instance 0 stops the shared engine core: the model is unloading")
            self.loop.call_soon_threadsafe(engine.shutdown)
        else:
            reason = ENGINE_DIED
            with contextlib.suppress(Exception):
                shared_core.declare_dead(engine)
            self._engine_died()
        # A request that was just starting as the core died can miss vLLM's own error: fail every one here.
        with self.jobs_lock:
            jobs = [j for j in self.jobs.values() if j.task is not None and not j.cancelled]
        for job in jobs:
            self.loop.call_soon_threadsafe(job.task.cancel, reason)

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
                self._fail(sender, f"{UNREADABLE_REQUEST}: {exc}", pb_utils.TritonError.INTERNAL)
                continue
            if not self.accepting:
                self._fail(sender, SHUTTING_DOWN, pb_utils.TritonError.UNAVAILABLE)
                continue
            if self.restarting or self.engine.errored:
                self._engine_died()
                self._fail(sender, ENGINE_RESTARTING, pb_utils.TritonError.UNAVAILABLE)
                continue
            with self.jobs_lock:
                self.jobs[job.id] = job
            asyncio.run_coroutine_threadsafe(self._generate(job, prompt, params, lora, priority), self.loop)
        return None

    def _parse(self, request, sender):
        flags = {name: bool_input(request, name) for name in BOOL_INPUTS}
        stream = bool(flags["stream"])
        exclude = flags["exclude_input_in_output"]
        if stream and exclude is False:
            raise RequestError("exclude_input_in_output=false cannot be combined with stream=true: streaming sends only new text")
        prompt = self._prompt(request, bool(flags["chat"]))
        params = sampling_dict(request)
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
        sampling = sampling_params(params, stream)
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
        messages = string_input(request, "messages")
        text = string_input(request, "text_input")
        if messages is not None:
            messages = parse_messages(messages)
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
                    self.responses.put(job, delta, final=finished)
            if not finished:
                raise EngineEndedRequest("the vLLM engine ended the request before it finished")
            if not job.stream:
                if job.prepend_input:
                    delta.prefix = delta.prompt
                self.responses.put(job, delta, final=True)
        except asyncio.CancelledError as exc:
            if exc.args and exc.args[0] in (ENGINE_DIED, SHUTTING_DOWN):
                self.logger.log_warn(f"{LOG_PREFIX} request {job.id} failed: {exc.args[0]}")
                self.responses.put(job, error_response(exc.args[0], pb_utils.TritonError.UNAVAILABLE), final=True)
                return
            self.logger.log_info(f"{LOG_PREFIX} request {job.id} cancelled by the client; aborted in the engine")
            self.responses.put(job, error_response("request cancelled by the client", pb_utils.TritonError.CANCELLED), final=True)
        except Exception as exc:
            code, message = self._classify(exc)
            self.logger.log_warn(f"{LOG_PREFIX} request {job.id} failed: {message}")
            if code == pb_utils.TritonError.INTERNAL:
                self.logger.log_error(f"{LOG_PREFIX} {traceback.format_exc()}")
            self.responses.put(job, error_response(message, code), final=True)

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
            return pb_utils.TritonError.UNAVAILABLE, f"{ENGINE_DIED} ({exc})"
        if isinstance(exc, (ValueError, TypeError)) or "ClientError" in name or "ValidationError" in name:
            return pb_utils.TritonError.INVALID_ARG, str(exc)
        return pb_utils.TritonError.INTERNAL, f"{GENERATION_FAILED}: {name}: {exc}"

    # -------------------------------------------------------------- responses

    def _fail(self, sender, message, code):
        sender.send(error_response(message, code), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _finished(self, job):
        """The final response of ``job`` went out (or failed to): it is no longer in flight."""
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
        if self.shared_core is not None:
            self.shared_core.close()
        self.responses.stop()
        if self.metrics:
            self.metrics.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(timeout=5)
        self.logger.log_info(f"{LOG_PREFIX} shutdown complete")
