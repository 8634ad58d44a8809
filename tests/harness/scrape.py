"""Read one figure from a proxy's /metrics (Prometheus text format)."""

from __future__ import annotations

import requests

from .proxyproc import ProxyServer


def metric(proxy: ProxyServer, name: str, **labels: str) -> float:
    """The sum of the samples of name whose labels include labels (0 when absent)."""
    text = requests.get(f"{proxy.url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if line.startswith("#") or head.split("{")[0] != name:
            continue
        found = dict(
            pair.split("=", 1) for pair in head.partition("{")[2].rstrip("}").split(",") if pair
        )
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            total += float(value)
    return total
