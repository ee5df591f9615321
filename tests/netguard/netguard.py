"""The suite's socket guard: no test process connects beyond loopback.

An audit hook (PEP 578) sees every ``socket.connect`` and ``socket.sendto``; an address
that is not loopback (nor a Unix socket) is refused with ``ConnectionRefusedError`` and
written to the file named by ``TESTS_NETWORK_LOG``, which the suite's per-test check reads:
a refusal that the code under test swallows (a retry, a fallback mirror) still fails the
test. The test process installs it itself; the Python processes it starts install it from
``sitecustomize`` (this folder is on their ``PYTHONPATH``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys

LOG_VARIABLE = "TESTS_NETWORK_LOG"
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: object) -> bool:
    """Whether ``host`` (an IP address or a name, as a socket call gets it) is loopback."""
    if not isinstance(host, str):
        return False
    name = host.split("%", 1)[0]  # an IPv6 scope
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return name.lower() in _LOCAL_NAMES or name.lower().endswith(".localhost")
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


def beyond_loopback(sock: object, address: object) -> bool:
    """Whether a connect/sendto of ``sock`` to ``address`` leaves this machine."""
    family = getattr(sock, "family", None)
    if family not in (socket.AF_INET, socket.AF_INET6):
        return False  # Unix sockets, netlink: local by nature
    host = address[0] if isinstance(address, tuple) and address else address
    return not is_loopback(host)


def _hook(event: str, args: tuple) -> None:
    if event not in ("socket.connect", "socket.sendto"):
        return
    sock, address = args[0], args[-1]
    if not beyond_loopback(sock, address):
        return
    log = os.environ.get(LOG_VARIABLE)
    line = f"pid {os.getpid()} ({' '.join(sys.argv)[:160]}): {event} {address!r}"
    if log:
        with open(log, "a", encoding="utf-8") as out:
            out.write(line + "\n")
    raise ConnectionRefusedError(f"tests: connection beyond loopback refused: {address!r}")


def install() -> None:
    """Install the guard in this process, once (audit hooks cannot be removed; the mark is
    on ``sys`` because this file may be imported under two names)."""
    if not getattr(sys, "_tests_netguard", False):
        sys.addaudithook(_hook)
        sys._tests_netguard = True
