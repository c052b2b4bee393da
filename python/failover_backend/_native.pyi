"""Type stubs for the Rust extension module (rust/native)."""

from os import PathLike
from typing import Any, Final, final

__all__ = [
    "F_LOG_ALL",
    "F_MQ",
    "F_MRG_RXBUF",
    "F_STANDBY",
    "F_VERSION_1",
    "NativeBackend",
    "SettingError",
    "check_settings",
    "feature_names",
    "protocol_feature_names",
]

F_STANDBY: Final[int]
F_LOG_ALL: Final[int]
F_MRG_RXBUF: Final[int]
F_VERSION_1: Final[int]
F_MQ: Final[int]

class SettingError(ValueError): ...

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
        poll_us: int = 50,
        socket_mode: int = 0o600,
        socket_group: int | None = None,
        handshake_timeout: float = 5.0,
    ) -> NativeBackend: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    @property
    def state(self) -> str: ...
    @property
    def failure(self) -> str | None: ...
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
    @property
    def poll_us(self) -> int: ...
    def stats(self) -> list[dict[str, Any]]: ...
    def negotiation(self) -> dict[str, Any]: ...
    @property
    def change_fd(self) -> int: ...
    def events(self, since: int = 0) -> tuple[list[dict[str, Any]], int]: ...
    def announce(self, count: int = 1) -> int: ...
    def steer(self, mode: str, reason: str = "") -> None: ...
    def steering(self) -> dict[str, Any] | None: ...

def feature_names(features: int) -> list[str]: ...
def protocol_feature_names(features: int) -> list[str]: ...
def check_settings(
    socket_path: str | PathLike[str],
    *,
    port: str = "null",
    mac: str | None = None,
    queues: int = 1,
    client: bool = False,
    queue_size: int = 1024,
    mtu: int = 1500,
    poll_us: int = 50,
    socket_mode: int = 0o600,
    socket_group: int | None = None,
    handshake_timeout: float = 5.0,
) -> tuple[str, str | None]: ...
