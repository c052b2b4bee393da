"""Type stubs for the Rust extension module (rust/native)."""

from os import PathLike
from typing import Any, Final, final

__all__ = [
    "F_LOG_ALL",
    "F_MQ",
    "F_MRG_RXBUF",
    "F_STANDBY",
    "F_VERSION_1",
    "BackendError",
    "NativeBackend",
    "feature_names",
    "protocol_feature_names",
]

F_STANDBY: Final[int]
F_LOG_ALL: Final[int]
F_MRG_RXBUF: Final[int]
F_VERSION_1: Final[int]
F_MQ: Final[int]

class BackendError(Exception): ...

@final
class NativeBackend:
    def __new__(
        cls,
        socket_path: str | PathLike[str],
        *,
        port: str = "null",
        mac: str | None = None,
        queues: int = 1,
        client: bool = False,
        queue_size: int = 1024,
        mtu: int = 1500,
    ) -> NativeBackend: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def state(self) -> str: ...
    @property
    def socket_path(self) -> str: ...
    @property
    def mac(self) -> str: ...
    @property
    def port(self) -> str: ...
    @property
    def queues(self) -> int: ...
    @property
    def client(self) -> bool: ...
    @property
    def mtu(self) -> int: ...
    def stats(self) -> list[dict[str, Any]]: ...
    def negotiation(self) -> dict[str, Any]: ...
    def events(self, since: int = 0, timeout: float = 0.0) -> tuple[list[dict[str, Any]], int]: ...
    def wait_state(self, states: list[str], timeout: float) -> str: ...
    def announce(self, count: int = 1) -> int: ...

def feature_names(features: int) -> list[str]: ...
def protocol_feature_names(features: int) -> list[str]: ...
