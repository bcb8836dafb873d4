"""The headless runner's client: a reply that has arrived is read within one slice, never after the timeout."""
import asyncio
import tempfile
import time
from queue import Empty

import nbformat
import pytest
from nbclient import NotebookClient

from peft_lab.benchmarks.notebook_stress import synthetic_notebook
from peft_lab.run_notebooks import POLL_SLICE, SlicedKernelClient, _kernel_config, _SlicedChannel


class FakeSocket:
    """poll answers "nothing" until the message is there, as a poll with a missed wake-up does."""

    def __init__(self, ready_at_call):
        self.calls, self.ready_at_call = [], ready_at_call

    async def poll(self, timeout_ms):
        self.calls.append(timeout_ms)
        return len(self.calls) >= self.ready_at_call


def channel(socket):
    ch = _SlicedChannel.__new__(_SlicedChannel)
    ch.socket = socket

    async def recv():
        return {"msg": "reply"}
    ch._recv = recv
    return ch


def test_get_msg_waits_in_slices_and_finds_the_message():
    socket = FakeSocket(ready_at_call=4)
    assert asyncio.run(channel(socket).get_msg(timeout=None)) == {"msg": "reply"}
    assert socket.calls == [int(POLL_SLICE * 1000)] * 4     # never one poll as long as the whole wait


def test_get_msg_still_times_out():
    socket = FakeSocket(ready_at_call=10**6)
    start = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(channel(socket).get_msg(timeout=0.05))
    assert time.monotonic() - start < 1 and all(ms <= 50 for ms in socket.calls)


def test_the_runner_uses_the_sliced_client(tmp_path):
    from jupyter_client.manager import AsyncKernelManager
    client = AsyncKernelManager(config=_kernel_config(str(tmp_path))).client()
    assert isinstance(client, SlicedKernelClient)
    assert isinstance(client.shell_channel, _SlicedChannel) and isinstance(client.iopub_channel, _SlicedChannel)


def test_widget_cells_are_not_held_until_the_timeout(tmp_path):
    """Cells that display widgets once in a while lost the wake-up for their reply and waited the whole
    cell timeout (here 20 s); with the sliced client no cell waits more than a few seconds."""
    nb = nbformat.read(synthetic_notebook(150, tmp_path), as_version=4)
    slowest = []
    for _ in range(2):
        run = nbformat.from_dict(nb)
        started, took = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            client = NotebookClient(
                run, timeout=20, kernel_name="python3", config=_kernel_config(tmp),
                on_cell_execute=lambda cell, cell_index: started.__setitem__(cell_index, time.perf_counter()),
                on_cell_executed=lambda cell, cell_index, execute_reply: took.__setitem__(
                    cell_index, time.perf_counter() - started[cell_index]))
            client.execute()
        slowest.append(max(took.values()))
    assert max(slowest) < 10, f"a cell waited {max(slowest):.1f} s: a missed wake-up held it"
