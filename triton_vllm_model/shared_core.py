"""Several instances of the model on one vLLM engine core (``instance_group`` count above 1).

Each Triton instance is its own stub process with its own GIL. Instance 0 starts one
engine core for all of them and publishes the core's ZMQ addresses in a file; every
instance, 0 included, then attaches a front end (``AsyncLLM``) to the core under its
own index, as ``vllm serve --api-server-count N`` attaches its API processes.

Attaching is public (``AsyncLLM.from_vllm_config(client_addresses=...)``); starting a
core for front ends in other processes is not, and its call differs between vLLM
versions: ``launch`` holds that difference.
"""

import contextlib
import inspect
import json
import os
import re
import tempfile
import threading
import time

ATTACH_TIMEOUT_S = 600.0  # instance 0 may still be loading; the core's own start-up comes after
POLL_S = 0.2
WATCH_S = 0.25
CLOCK_SLACK_S = 1.0  # instance 0 may fail just before another instance starts waiting
STOP_NOTICE_S = 4 * WATCH_S  # how long the other instances get to close their front ends before the core stops
FILE_PREFIX = "triton-vllm-core-"


def instance_index(instance_name):
    """Triton names instances ``<model>_<group>_<index>``; the index within the group."""
    match = re.search(r"_(\d+)$", instance_name)
    return int(match.group(1)) if match else 0


def addresses_file(model_name, version, server_pid):
    """Where instance 0 publishes the core's addresses: one file per model version and server."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{model_name}-{version}")
    return os.path.join(tempfile.gettempdir(), f"{FILE_PREFIX}{safe}-{server_pid}.json")


def remove_stale(directory=None):
    """Remove the addresses files of Triton servers that no longer run: a server killed, or a
    model whose core failed to start (no finalize follows a failed load), leaves its file."""
    directory = directory or tempfile.gettempdir()
    for name in os.listdir(directory):
        match = re.fullmatch(re.escape(FILE_PREFIX) + r".+-(\d+)\.json", name)
        if match and not running(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))


def write(path, content):
    """Replace the addresses file whole, so that no reader sees half of it."""
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:
        json.dump(content, f)
    os.replace(partial, path)


def publish(path, addresses, pids):
    """The front ends' addresses and the core's process ids."""
    write(path, {"inputs": list(addresses.inputs), "outputs": list(addresses.outputs), "pids": pids})


def publish_failure(path, message):
    """Tell the waiting instances at once that the core did not start, and why."""
    write(path, {"error": message, "time": time.time()})


def publish_stopping(path, pids):
    """Tell the other instances that the model is unloading and instance 0 stops the core."""
    write(path, {"stopping": True, "pids": pids})


def read(path):
    """What the addresses file holds; empty while there is no file."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            return json.load(f)
    return {}


def stopping(path, pids):
    """Whether instance 0 announced that it stops the core with these process ids."""
    published = read(path)
    return published.get("stopping") is True and published.get("pids") == pids


def read_published(path, index, previous=None, timeout_s=ATTACH_TIMEOUT_S, alive=lambda: True):
    """This instance's (input, output) addresses and the core's process ids, once published and
    different from ``previous`` (after a restart the old core's addresses may still be there).
    A failure published before this wait began belongs to an earlier load of the model."""
    began = time.time()
    deadline = time.monotonic() + timeout_s
    while alive():
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            published = read(path)
            if "error" in published and published.get("time", began) >= began - CLOCK_SLACK_S:
                raise RuntimeError(f"instance 0 of the model could not start the engine core: {published['error']}")
            found = (published["inputs"][index], published["outputs"][index])
            if found != previous:
                return found, [int(pid) for pid in published["pids"]]
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    else:
        raise TimeoutError(f"stopped waiting for the engine core's addresses in {path}: the model is unloading")
    raise TimeoutError(
        f"no engine core addresses for instance {index} in {path} after {timeout_s:.0f} s: "
        "instance 0 of the model starts the core; see its log for why it did not"
    )


@contextlib.contextmanager
def launch(vllm_config, client_count, log_stats):
    """Start the engine core for ``client_count`` front ends; yields the core's process manager
    (``shutdown()`` stops it) and the front ends' addresses, then waits until the core is up."""
    from vllm.v1.engine import utils
    from vllm.v1.executor import Executor

    executor_class = Executor.get_class(vllm_config)
    if "addresses" in inspect.signature(utils.launch_core_engines).parameters:
        # vLLM 0.27 and later: the caller names one input and one output address per front end.
        from vllm.utils.network_utils import get_open_zmq_ipc_path

        wanted = utils.EngineZmqAddresses(
            inputs=[get_open_zmq_ipc_path() for _ in range(client_count)],
            outputs=[get_open_zmq_ipc_path() for _ in range(client_count)],
        )
        starting = utils.launch_core_engines(vllm_config, executor_class, log_stats, wanted)
    else:
        # vLLM 0.26: it makes the addresses itself for a number of front ends.
        starting = utils.launch_core_engines(vllm_config, executor_class, log_stats, num_api_servers=client_count)
    with starting as started:
        yield manager_and_addresses(started)


def running(pid):
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch(pids, on_exit, stop, interval_s=WATCH_S, unloading=lambda: False):
    """Call ``on_exit(unloading)`` once, unless ``stop`` is set first: with True when instance 0
    announces that it stops the core, with False when a core process ended unannounced."""
    while not stop.wait(interval_s):
        if unloading():
            on_exit(True)
            return
        if not all(running(pid) for pid in pids):
            on_exit(unloading())
            return


def declare_dead(engine):
    """What vLLM's own monitor does when the core it started exits: a front end attached to a
    core started elsewhere has no monitor, so its requests would wait forever."""
    client = engine.engine_core
    client.resources.engine_dead = True
    client.shutdown()


def manager_and_addresses(started):
    """What ``launch_core_engines`` yields: a tuple (0.26, 0.27) or a ``CoreEngineLaunch`` (0.32)."""
    if isinstance(started, tuple):
        return started[0], started[2]
    return started.engine_manager, started.addresses


class SharedCore:
    """One instance's part in sharing the engine core.

    count: the instances in the group; index: this one's; path: the addresses file.
    """

    def __init__(self, count, index, path):
        self.count = count
        self.index = index
        self.path = path
        self.manager = None  # instance 0's engine core processes
        self.pids = []  # the core's processes
        self.addresses = None  # this instance's (input, output) addresses
        self.watcher_stop = threading.Event()

    def attach(self, vllm_config, log_stats, front_end, alive, on_core_exit):
        """A new front end on the core; instance 0 first starts a new core (at load and after
        the core died). ``front_end(**attach_kwargs)`` makes the AsyncLLM; ``alive()`` is
        false once the model is unloading; ``on_core_exit(engine, unloading)`` runs once
        instance 0 announces that it stops the core (unloading True) or the core's processes
        end unannounced (False)."""
        self.watcher_stop.set()
        if self.index == 0:
            self.stop_core()
            remove_stale()
            try:
                with launch(vllm_config, self.count, log_stats) as (self.manager, addresses):
                    pass  # leaving waits until the core is up
                pids = [process.pid for process in self.manager.processes]
                # Only now: a front end attached to a core that failed would wait for it in vain.
                publish(self.path, addresses, pids)
            except BaseException as exc:
                self.stop_core()
                with contextlib.suppress(OSError):
                    publish_failure(self.path, f"{type(exc).__name__}: {exc}")
                raise
            self.addresses = (addresses.inputs[0], addresses.outputs[0])
        else:
            self.addresses, pids = read_published(self.path, self.index, previous=self.addresses, alive=alive)
        self.pids = pids
        engine = front_end(
            client_addresses={"input_address": self.addresses[0], "output_address": self.addresses[1]},
            client_count=self.count,
            client_index=self.index,
        )
        self.watcher_stop = threading.Event()
        threading.Thread(
            target=watch,
            args=(pids, lambda unloading: on_core_exit(engine, unloading), self.watcher_stop),
            kwargs={"unloading": lambda: stopping(self.path, pids)},
            name="vllm-core-watch",
            daemon=True,
        ).start()
        return engine

    def stop_core(self):
        """Instance 0 stops the core it started; the others' front ends then see it dead."""
        if self.manager is not None:
            with contextlib.suppress(Exception):
                self.manager.shutdown()
            self.manager = None

    def close(self):
        self.watcher_stop.set()
        if self.manager is not None:
            # Triton unloads the instances one by one: the others close their front ends first
            # instead of finding the core dead and starting a new one.
            with contextlib.suppress(OSError):
                publish_stopping(self.path, self.pids)
            time.sleep(STOP_NOTICE_S)
        self.stop_core()
        if self.index == 0:
            with contextlib.suppress(OSError):
                os.remove(self.path)
