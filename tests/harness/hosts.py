"""Idempotent /etc/hosts aliases so registries can be reached by port-less names."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

HOSTS_FILE = Path("/etc/hosts")


class HostsError(RuntimeError):
    """Raised when an alias cannot be added or does not resolve as expected."""


def _mapped_ips(name: str, hosts_file: Path) -> list[str]:
    """Return every IP that ``hosts_file`` maps ``name`` to, in file order."""
    ips: list[str] = []
    for raw in hosts_file.read_text().splitlines():
        fields = raw.split("#", 1)[0].split()
        if len(fields) >= 2 and name in fields[1:]:
            ips.append(fields[0])
    return ips


def ensure_alias(name: str, ip: str, hosts_file: Path = HOSTS_FILE) -> None:
    """Make ``name`` resolve to ``ip`` via ``hosts_file``, appending a line only if needed."""
    ipaddress.ip_address(ip)  # reject garbage early
    existing = _mapped_ips(name, hosts_file) if hosts_file.exists() else []
    if existing and existing[0] != ip:
        raise HostsError(
            f"{hosts_file} already maps {name!r} to {existing[0]}, not {ip}; "
            "remove that line or pick another alias"
        )
    if not existing:
        if hosts_file == HOSTS_FILE and os.geteuid() != 0:
            raise HostsError(
                f"adding '{ip} {name}' to {hosts_file} requires root (euid={os.geteuid()}); "
                "run the e2e tests as root or add the line by hand"
            )
        # Append in place: /etc/hosts is often a bind mount, so no rename-over.
        with hosts_file.open("a") as fh:
            if hosts_file.stat().st_size and not hosts_file.read_bytes().endswith(b"\n"):
                fh.write("\n")
            fh.write(f"{ip} {name}\n")
    if hosts_file == HOSTS_FILE:
        resolved = socket.gethostbyname(name)
        if resolved != ip:
            raise HostsError(f"{name!r} resolves to {resolved}, expected {ip} (check nsswitch)")
