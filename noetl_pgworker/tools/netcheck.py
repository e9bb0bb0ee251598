"""Where a command's HTTP request may go.

A row names the URL, so without a check it could make the worker call itself (its metrics
port), another service listening only on loopback, or the cloud's metadata service on a
link-local address (which hands out the machine's credentials). :func:`refusal` resolves the
host and refuses the request if any address it resolves to is loopback or unspecified
(``127.0.0.0/8``, ``::1``, ``0.0.0.0``) or link-local (``169.254.0.0/16``, ``fe80::/10``),
unless the operator allows them (``--http-allow-loopback``), and always the worker's own
ports on any of the machine's addresses. :class:`CheckedBackend`, the http tool's connector,
applies the same check where the connection is made: it resolves the name once, checks
every address, and connects to a checked address, so that a name whose answer changes between
a check and the connection (DNS rebinding) cannot lead it elsewhere.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import httpcore

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _addresses(host: str, port: int) -> list[IpAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []  # the client reports what it cannot resolve
    out: list[IpAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        out.append(ip)
    return out


def _is_local(ip: IpAddress) -> bool:
    """Whether ``ip`` is an address of this machine (a socket can be bound to it)."""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((str(ip), 0))
        return True
    return False


def _refusal_of(
    ip: IpAddress, host: str, port: int, allow_loopback: bool, own_ports: Sequence[int]
) -> str | None:
    if port in own_ports and _is_local(ip):
        return f"{host}:{port} is this worker's own port"
    if allow_loopback:
        return None
    if ip.is_loopback or ip.is_unspecified:
        return (
            f"{host} is a loopback address ({ip}); the worker refuses it unless started"
            " with --http-allow-loopback"
        )
    if ip.is_link_local:
        return (
            f"{host} is a link-local address ({ip}: cloud metadata lives there); the"
            " worker refuses it unless started with --http-allow-loopback"
        )
    return None


def refusal(host: str, port: int, *, allow_loopback: bool, own_ports: Sequence[int]) -> str | None:
    """Why a request to ``host``:``port`` is refused, or None if it may go."""
    for ip in _addresses(host, port):
        why = _refusal_of(ip, host, port, allow_loopback, own_ports)
        if why:
            return why
    return None


class CheckedBackend(httpcore.SyncBackend):
    """httpcore's connector, connecting only to addresses that pass :func:`refusal`'s check:
    the name resolved once, every address checked, the connection made to a checked address
    (in the resolver's order, as ``socket.create_connection`` tries them). ``policy()`` gives
    (allow_loopback, own_ports) at each connection."""

    def __init__(self, policy: Callable[[], tuple[bool, Sequence[int]]]) -> None:
        self._policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        allow_loopback, own_ports = self._policy()
        addresses = _addresses(host, port)
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host!r}")
        for ip in addresses:
            why = _refusal_of(ip, host, port, allow_loopback, own_ports)
            if why:
                raise httpcore.ConnectError(f"refused: {why}")
        error: Exception | None = None
        for ip in dict.fromkeys(addresses):
            try:
                return super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        assert error is not None
        raise error


def checked_transport(policy: Callable[[], tuple[bool, Sequence[int]]], **kwargs: Any) -> Any:
    """An ``httpx.HTTPTransport(**kwargs)`` whose connections go through
    :class:`CheckedBackend` (where httpx's pool lets it be given one)."""
    import httpx

    transport = httpx.HTTPTransport(**kwargs)
    pool = getattr(transport, "_pool", None)
    if pool is None or not hasattr(pool, "_network_backend"):
        raise RuntimeError("httpx's transport has no connection pool to give a connector to")
    pool._network_backend = CheckedBackend(policy)
    return transport


__all__ = ["CheckedBackend", "checked_transport", "refusal"]
