"""The kernel pump of a blocking notebook cell: comm messages now, the others after the cell."""

from __future__ import annotations

from typing import Any

from dfbatch.execute._pump import KernelPump, open_pump


class _Socket:
    def __init__(self, msgs: list[str]) -> None:
        self.msgs = msgs

    def poll(self, timeout: int = 0) -> bool:
        return bool(self.msgs)

    def recv_multipart(self, copy: bool) -> str:
        return self.msgs.pop(0)


class _Session:
    def feed_identities(self, raw: str, copy: bool) -> tuple[list[str], str]:
        return ["ident"], raw

    def deserialize(self, frames: str, content: bool, copy: bool) -> dict[str, Any]:
        kind, _, body = frames.partition(":")
        return {"header": {"msg_type": kind}, "content": {"body": body} if content else None}


class _Comms:
    def __init__(self) -> None:
        self.got: list[str] = []

    def comm_msg(self, stream: Any, ident: Any, msg: dict[str, Any]) -> None:
        self.got.append(msg["content"]["body"])


class _Loop:
    def __init__(self) -> None:
        self.later: list[tuple[Any, ...]] = []

    def add_callback(self, *call: Any) -> None:
        self.later.append(call)


class _Stream:
    def __init__(self, msgs: list[str]) -> None:
        self.socket, self.io_loop = _Socket(msgs), _Loop()
        self.ran: list[str] = []

    def _recv_callback(self, raw: str) -> None:
        self.ran.append(raw)

    def _run_callback(self, callback: Any, raw: str) -> None:
        callback(raw)


class _Kernel:
    def __init__(self) -> None:
        self.session, self.comm_manager = _Session(), _Comms()


def test_comm_messages_are_handled_while_waiting_and_the_rest_given_back_in_order() -> None:
    kernel = _Kernel()
    stream = _Stream(["execute_request:a", "comm_msg:click", "execute_request:b",
                      "comm_msg:update"])
    pump = KernelPump(kernel, stream)
    pump.idle(0.01)  # a message is there: no wait
    assert pump.poll() == 2
    assert kernel.comm_manager.got == ["click", "update"]
    assert stream.ran == []  # held until the cell ends
    pump.close()
    for call in stream.io_loop.later:  # the kernel's loop runs them after the cell
        call[0](*call[1:])
    assert stream.ran == ["execute_request:a", "execute_request:b"]


def test_no_pump_outside_a_kernel() -> None:
    assert open_pump() is None
