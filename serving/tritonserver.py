"""Install, start and stop a local Triton Inference Server without Docker.

The server comes from the ``nvidia-pytriton`` wheel, which carries a complete
Triton 2.51 build with its Python backend. ``LocalServer`` is the one launcher
used by ``start_triton.sh``'s local mode, the tests and the benchmark.

    python -m serving.tritonserver install WHEEL DEST
    python -m serving.tritonserver start --model-repository DIR [...]
    python -m serving.tritonserver stop [--pid-file FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import requests

from serving.model_config import detect_device

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = PROJECT_ROOT / ".venv"
DEFAULT_LOG = PROJECT_ROOT / "logs" / "tritonserver.log"
DEFAULT_PID_FILE = PROJECT_ROOT / "logs" / "tritonserver.pid"
WHEEL_PREFIX = "pytriton/tritonserver/"
WHEEL_LIBS = "nvidia_pytriton.libs/"
# The model's tensors are strings in CPU memory, so Triton's pinned and CUDA memory pools go unused;
# with them and Triton's GPU metrics on, the engine core stepped slower on a GPU (docs/benchmarks.md).
# start_triton.sh's Docker mode and deploy/ pass the same flags.
UNUSED_GPU_FEATURES_OFF = ("--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0")


def batch_scheduled(command: list[str]) -> list[str]:
    """``command`` under Linux's SCHED_BATCH policy, which its child processes inherit.

    On the CPU the engine core shares a few cores with tritonserver and the model's
    stubs. Under SCHED_BATCH a thread that wakes up waits for the running thread's time
    slice instead of preempting it, so the engine core keeps its CPU for longer
    (docs/benchmarks.md, "SCHED_BATCH on the CPU"). Without ``chrt`` (util-linux) the
    command runs as it is.
    """
    chrt = shutil.which("chrt")
    return [chrt, "--batch", "0", *command] if chrt else command


def batch_scheduling_by_default() -> bool:
    """SCHED_BATCH where the engine runs on the CPU, i.e. where nvidia-smi lists no GPU."""
    return detect_device() == "cpu"


class ServerError(RuntimeError):
    """The server could not be started, or died while starting."""


def install(wheel: Path, dest: Path) -> Path:
    """Unpack the Triton build of an nvidia-pytriton wheel into ``dest``.

    Keeps the exec bits that ``zipfile`` drops, and puts the Python-backend
    stub matching this interpreter where the backend looks for it.
    """
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            for prefix, target in ((WHEEL_PREFIX, tmp), (WHEEL_LIBS, tmp / "lib")):
                if info.filename.startswith(prefix) and not info.is_dir():
                    path = target / info.filename[len(prefix) :]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(archive.read(info))
                    mode = (info.external_attr >> 16) & 0o777
                    path.chmod((mode or 0o644) & 0o755)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tmp / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"{wheel.name} has no Python-backend stub for Python {version}")
    shutil.copy2(stub, tmp / "backends" / "python" / "triton_python_backend_stub")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest / "bin" / "tritonserver"


@dataclass
class LocalServer:
    """A ``tritonserver`` process serving a model repository on this machine.

    Use as a context manager, or call ``start()``/``stop()``. ``start`` returns
    once ``/v2/health/ready`` answers 200 and raises ``ServerError`` at once if
    the process exits first.
    """

    model_repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    venv: Path = DEFAULT_VENV
    log_file: Path = DEFAULT_LOG
    api_key: str = ""
    exit_timeout_s: int = 30
    extra_args: list[str] = field(default_factory=list)
    batch_scheduling: bool | None = None  # SCHED_BATCH (see batch_scheduled); None: when the engine runs on the CPU
    process: subprocess.Popen | None = None

    @classmethod
    def on_free_ports(cls, model_repository: Path, **options) -> LocalServer:
        """A server on three TCP ports nothing uses now (see ``free_port``)."""
        ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
        return cls(model_repository=model_repository, **ports, **options)

    @property
    def triton_dir(self) -> Path:
        return self.venv / "tritonserver"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def command(self) -> list[str]:
        cmd = [
            str(self.triton_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.triton_dir / 'backends'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
            *UNUSED_GPU_FEATURES_OFF,
        ]
        if self.api_key:
            restricted = f"model-repository,shared-memory,trace,logging:x-triton-key={self.api_key}"
            cmd += [f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}"]
        cmd += self.extra_args
        return batch_scheduled(cmd) if self.batch_scheduling else cmd

    def environment(self) -> dict[str, str]:
        """The stub embeds the first ``python3`` on PATH: make it the venv's."""
        env = dict(os.environ)
        libdirs = [str(self.triton_dir / "lib"), sysconfig.get_config_var("LIBDIR") or ""]
        if env.get("LD_LIBRARY_PATH"):
            libdirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(d for d in libdirs if d)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        return env

    def start(self, timeout_s: float = 600) -> LocalServer:
        if not (self.triton_dir / "bin" / "tritonserver").is_file():
            raise ServerError(f"no Triton build under {self.triton_dir}: run scripts/setup.sh")
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            if port_in_use(self.host, port):
                raise ServerError(
                    f"port {port} on {self.host} is already in use: stop the other server "
                    "(./start_triton.sh --stop) or choose other ports (HTTP_PORT, GRPC_PORT, METRICS_PORT)"
                )
        if self.batch_scheduling is None:
            self.batch_scheduling = batch_scheduling_by_default()
        command = self.command()
        print("starting:", " ".join(command), file=sys.stderr)
        self.process = start_logged(command, self.log_file, self.environment())
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        wait_until(lambda: is_ready(self.url), self.process, "tritonserver", self.log_file, timeout_s, interval_s=0.5)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        code = stop_process_group(self.process.pid, self.exit_timeout_s + 15)
        self.process.wait()
        return code

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_logged(command: list[str], log_file: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start ``command`` in a session of its own (so that it is stopped as a group),
    its output appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def wait_until(probe, process: subprocess.Popen, name: str, log_file: Path, timeout_s: float, interval_s: float) -> None:
    """Poll ``probe()`` until it is true; ServerError if ``process`` exits first, TimeoutError after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(
                f"{name} exited with code {process.returncode} while starting; last lines of {log_file}:\n{tail(log_file)}"
            )
        if probe():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{name} was not ready after {timeout_s:.0f} s; see {log_file}")


def stop_recorded(pid_file: Path, timeout_s: float) -> tuple[bool, int | None]:
    """Stop the process group recorded in ``pid_file`` and remove the file.
    Returns (whether a pid was recorded, what stop_process_group returned)."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False, None
    code = stop_process_group(pid, timeout_s)
    pid_file.unlink(missing_ok=True)
    return True, code


def free_port() -> int:
    """A TCP port nothing uses now, below the range the OS hands out to outgoing
    connections: one of those could take a port from that range before a slow
    starting server binds it (Triton binds its metrics port last, after loading)."""
    ephemeral_low = 32768
    with contextlib.suppress(OSError, ValueError):
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(ephemeral_low // 2, ephemeral_low)
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no free TCP port found below the ephemeral range")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def is_ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def stop_process_group(pid: int, timeout_s: float) -> int | None:
    """Stop the server gracefully, then end whatever is left of its process group.

    SIGTERM goes to tritonserver alone: it lets requests in flight finish, then
    unloads the model, which shuts vLLM's engine down. Signalling the whole
    group at once would kill the engine under those requests. After
    ``timeout_s`` (or once the server is gone) the group, which holds the stub
    and the engine processes, gets SIGTERM and then SIGKILL, so nothing is left
    behind. Returns the signal that ended the server, or None if it was gone.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        _end_group(pid)  # leftovers of a server that had already exited
        return None
    exited = _wait_gone(lambda: os.kill(pid, 0), pid, timeout_s)
    _end_group(pid)
    return signal.SIGTERM if exited else signal.SIGKILL


def _end_group(pgid: int) -> None:
    """SIGTERM, then SIGKILL whatever is left of the process group."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        if _wait_gone(lambda: os.killpg(pgid, 0), pgid, 5):
            return


def _wait_gone(probe, pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        try:
            probe()
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _tree(pid: int) -> list:
    """A process and all its descendants (empty if it is gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB (0 if it is gone)."""
    return sum(_safe(lambda p: p.memory_info().rss, p) for p in _tree(pid)) / 2**20


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and all its live descendants."""
    return sum(_cpu_s(p) for p in _tree(pid))


# vLLM's title for its engine core process, cut to the 15 characters of the kernel's process name.
ENGINE_CORE_NAME = "VLLM::EngineCor"


def engine_core_cpu_s(pid: int) -> float:
    """CPU seconds used so far by the vLLM engine core processes among a process and its live descendants."""
    return sum(_cpu_s(p) for p in _tree(pid) if _safe(lambda p: p.name(), p, "").startswith(ENGINE_CORE_NAME))


def _cpu_s(proc) -> float:
    return _safe(lambda p: sum(p.cpu_times()[:2]), proc)


def _safe(read, proc, gone=0):
    """read(proc), or ``gone`` if the process has ended."""
    import psutil

    try:
        return read(proc)
    except psutil.NoSuchProcess:
        return gone


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _cli_start(args: argparse.Namespace) -> int:
    server = LocalServer(
        model_repository=args.model_repository.resolve(),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        venv=args.venv.resolve(),
        log_file=args.log_file.resolve(),
        api_key=args.api_key,
        batch_scheduling=args.batch_scheduling,
    )
    try:
        server.start(args.timeout)
    except (ServerError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.pid_file.parent.mkdir(parents=True, exist_ok=True)
    args.pid_file.write_text(f"{server.process.pid}\n")
    return 0


def _cli_stop(args: argparse.Namespace) -> int:
    recorded, code = stop_recorded(args.pid_file, args.timeout)
    if not recorded:
        print(f"no running local server recorded in {args.pid_file}", file=sys.stderr)
        return 0
    if code is None:
        print("the local server had already exited", file=sys.stderr)
    elif code == signal.SIGKILL:
        print(f"tritonserver did not exit within {args.timeout:.0f} s and was killed", file=sys.stderr)
    else:
        print("tritonserver stopped", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("install", help="unpack Triton from an nvidia-pytriton wheel")
    p.add_argument("wheel", type=Path, help="path of the nvidia_pytriton-*.whl file")
    p.add_argument("dest", type=Path, help="folder to create (replaced if it exists)")

    p = sub.add_parser("start", help="start tritonserver in the background and wait until ready")
    p.add_argument("--model-repository", type=Path, required=True, help="Triton model repository folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind HTTP, gRPC and metrics to")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="project virtual environment")
    p.add_argument("--log-file", type=Path, default=DEFAULT_LOG, help="server log (appended)")
    p.add_argument("--pid-file", type=Path, default=DEFAULT_PID_FILE, help="where to record the server's pid")
    p.add_argument("--api-key", default="", help="key that guards the model-control and shared-memory APIs")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for readiness")
    p.add_argument(
        "--batch-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run tritonserver, the model's processes and the engine under Linux's SCHED_BATCH policy, so that "
        "waking threads do not preempt the engine core (default: on where no NVIDIA GPU answers nvidia-smi, "
        "i.e. an engine on the CPU)",
    )

    p = sub.add_parser("stop", help="stop the server recorded in the pid file")
    p.add_argument("--pid-file", type=Path, default=DEFAULT_PID_FILE, help="pid file written by start")
    p.add_argument("--timeout", type=float, default=45, help="seconds before SIGKILL")

    args = parser.parse_args(argv)
    if args.command == "install":
        print(install(args.wheel, args.dest))
        return 0
    return _cli_start(args) if args.command == "start" else _cli_stop(args)


if __name__ == "__main__":
    sys.exit(main())
