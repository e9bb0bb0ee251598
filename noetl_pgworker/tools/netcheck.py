"""Where a command's HTTP request may go.

A row names the URL, so without a check it could make the worker call itself (its metrics
port), another service listening only on loopback, or the cloud's metadata service on a
link-local address (which hands out the machine's credentials). :func:`refusal` resolves the
host and refuses the request if any address it resolves to is loopback or unspecified
(``127.0.0.0/8``, ``::1``, ``0.0.0.0``) or link-local (``169.254.0.0/16``, ``fe80::/10``),
unless the operator allows them (``--http-allow-loopback``), and always the worker's own
ports on any of the machine's addresses. (The client resolves the name again when it
connects: a name whose answer changes between the two — DNS rebinding — is not caught.)
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Sequence

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


def refusal(host: str, port: int, *, allow_loopback: bool, own_ports: Sequence[int]) -> str | None:
    """Why a request to ``host``:``port`` is refused, or None if it may go."""
    for ip in _addresses(host, port):
        if port in own_ports and _is_local(ip):
            return f"{host}:{port} is this worker's own port"
        if allow_loopback:
            continue
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


__all__ = ["refusal"]
