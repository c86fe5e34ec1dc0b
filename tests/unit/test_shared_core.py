"""Several instances on one engine core (triton_vllm_model/shared_core.py): names, the
addresses file, what vLLM's launch yields, the watch on the core's processes."""

import os
import subprocess
import threading
from types import SimpleNamespace

import pytest

from triton_vllm_model import shared_core
from triton_vllm_model.shared_core import (
    addresses_file,
    instance_index,
    manager_and_addresses,
    publish,
    publish_failure,
    publish_stopping,
    read_published,
    stopping,
)


@pytest.mark.parametrize("name, index", [("qwen2.5-0.5b_0_0", 0), ("qwen2.5-0.5b_0_1", 1), ("m_3_12", 12), ("no-index", 0)])
def test_instance_index_is_the_last_number_of_its_name(name, index):
    assert instance_index(name) == index


def test_one_addresses_file_per_model_version_and_server(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_core.tempfile, "gettempdir", lambda: str(tmp_path))
    path = addresses_file("qwen/2.5 b", "1", 4242)
    assert os.path.dirname(path) == str(tmp_path)
    assert os.path.basename(path) == "triton-vllm-core-qwen_2.5_b-1-4242.json"
    assert path != addresses_file("qwen/2.5 b", "2", 4242) != addresses_file("qwen/2.5 b", "1", 4243)


def test_files_of_servers_that_no_longer_run_are_removed(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f"triton-vllm-core-m-1-{gone.pid}.json"
    live = tmp_path / f"triton-vllm-core-m-1-{os.getpid()}.json"
    other = tmp_path / f"unrelated-{gone.pid}.json"
    for path in (stale, live, other):
        path.write_text("{}")
    shared_core.remove_stale(str(tmp_path))
    assert not stale.exists()
    assert live.exists() and other.exists()


def addresses(tag, count=2):
    return SimpleNamespace(
        inputs=[f"ipc://in-{tag}-{i}" for i in range(count)], outputs=[f"ipc://out-{tag}-{i}" for i in range(count)]
    )


def test_each_instance_reads_its_own_addresses_and_the_core_pids(tmp_path):
    path = str(tmp_path / "core.json")
    publish(path, addresses("a"), [11, 12])
    assert read_published(path, 1) == (("ipc://in-a-1", "ipc://out-a-1"), [11, 12])
    assert read_published(path, 0) == (("ipc://in-a-0", "ipc://out-a-0"), [11, 12])
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_after_a_restart_an_instance_waits_for_the_new_core(tmp_path):
    path = str(tmp_path / "core.json")
    publish(path, addresses("old"), [11])
    old = read_published(path, 1)[0]
    later = threading.Timer(0.3, publish, (path, addresses("new"), [21]))
    later.start()
    assert read_published(path, 1, previous=old, timeout_s=10) == (("ipc://in-new-1", "ipc://out-new-1"), [21])


def test_a_failure_of_an_earlier_load_does_not_fail_the_next_one(tmp_path, monkeypatch):
    path = str(tmp_path / "core.json")
    monkeypatch.setattr(shared_core.time, "time", lambda: 1000.0)
    publish_failure(path, "ValueError: not enough memory")
    monkeypatch.setattr(shared_core.time, "time", lambda: 1060.0)
    later = threading.Timer(0.3, publish, (path, addresses("new"), [21]))
    later.start()
    assert read_published(path, 1, timeout_s=10) == (("ipc://in-new-1", "ipc://out-new-1"), [21])


def test_no_addresses_in_time_says_where_to_look(tmp_path):
    with pytest.raises(TimeoutError, match="instance 0 of the model starts the core"):
        read_published(str(tmp_path / "missing.json"), 1, timeout_s=0.3)


def test_a_core_that_failed_to_start_fails_the_waiting_instances_at_once(tmp_path):
    path = str(tmp_path / "core.json")
    publish_failure(path, "ValueError: not enough memory")
    with pytest.raises(RuntimeError, match="could not start the engine core: ValueError: not enough memory"):
        read_published(path, 1, timeout_s=600)


def test_an_unloading_instance_stops_waiting(tmp_path):
    with pytest.raises(TimeoutError, match="the model is unloading"):
        read_published(str(tmp_path / "missing.json"), 1, timeout_s=600, alive=lambda: False)


def test_what_launch_yields_in_each_vllm_version():
    manager, found = object(), addresses("x")
    assert manager_and_addresses((manager, None, found)) == (manager, found)  # 0.26
    assert manager_and_addresses((manager, None, found, None)) == (manager, found)  # 0.27
    launch = SimpleNamespace(engine_manager=manager, coordinator=None, addresses=found)  # 0.32
    assert manager_and_addresses(launch) == (manager, found)


def test_the_watch_reports_a_core_process_that_ended_once():
    process = subprocess.Popen(["sleep", "30"])
    exits = []
    stop = threading.Event()
    watcher = threading.Thread(target=shared_core.watch, args=([process.pid], exits.append, stop, 0.05))
    watcher.start()
    process.kill()  # left unreaped: a zombie counts as ended
    watcher.join(5)
    assert exits == [False] and not watcher.is_alive()
    process.wait()


def test_a_stopped_watch_reports_nothing():
    stop = threading.Event()
    stop.set()
    exits = []
    shared_core.watch([os.getpid()], exits.append, stop, 0.05)
    assert exits == []


def test_the_watch_reports_an_announced_stop_before_the_core_ends():
    announced = threading.Event()
    exits = []
    watcher = threading.Thread(
        target=shared_core.watch,
        args=([os.getpid()], exits.append, threading.Event(), 0.05),
        kwargs={"unloading": announced.is_set},
    )
    watcher.start()
    announced.set()
    watcher.join(5)
    assert exits == [True] and not watcher.is_alive()


def test_a_stop_is_announced_for_one_core_only(tmp_path):
    path = str(tmp_path / "core.json")
    publish(path, addresses("a"), [11, 12])
    assert not stopping(path, [11, 12])
    publish_stopping(path, [11, 12])
    assert stopping(path, [11, 12])
    assert not stopping(path, [21, 22])  # a later core's watch
    assert not stopping(str(tmp_path / "missing.json"), [11, 12])


def test_a_stop_announcement_is_no_address_to_attach_to(tmp_path):
    path = str(tmp_path / "core.json")
    publish_stopping(path, [11])
    with pytest.raises(TimeoutError):
        read_published(path, 1, timeout_s=0.3)


def test_instance_0_announces_the_stop_before_it_stops_the_core(tmp_path, monkeypatch):
    monkeypatch.setattr(shared_core, "STOP_NOTICE_S", 0)
    path = str(tmp_path / "core.json")
    seen = []
    core = shared_core.SharedCore(count=2, index=0, path=path)
    core.manager = SimpleNamespace(shutdown=lambda: seen.append(stopping(path, [11])))
    core.pids = [11]
    publish(path, addresses("a"), [11])
    core.close()
    assert seen == [True]  # announced when the core stopped
    assert not os.path.exists(path)
