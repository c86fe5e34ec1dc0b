"""Intel AMX for vLLM's CPU engine.

Linux lets a process execute AMX tile instructions only after it has asked for
them (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``); the permission
belongs to one process and ``execve`` drops it. vLLM's CPU attention uses AMX
whenever the CPU has it, inside the engine processes that vLLM spawns, without
asking: the first prompt that reaches attention before any of PyTorch's own AMX
kernels has asked kills the engine.

The engine arguments name ``AmxWorkerExtension`` as vLLM's
``worker_extension_cls``: vLLM imports it in every process that runs the
model, before the first forward pass, and importing this module asks for AMX.
On a CPU without AMX the kernel refuses, and nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

SYS_ARCH_PRCTL = 158  # x86-64
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def request_amx() -> str:
    """Ask Linux to let this process use AMX tiles; say what came of it."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return "not asked: not x86-64 Linux"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0:
        return "granted"
    return f"not available: {os.strerror(ctypes.get_errno())}"


class AmxWorkerExtension:
    """Adds nothing to vLLM's worker: vLLM importing it is what counts."""


logging.getLogger(f"vllm.{__name__}").info("AMX tile permission for process %d: %s", os.getpid(), request_amx())
