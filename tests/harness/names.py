"""Names the end-to-end tests share: the test user, and the port-less upstream alias."""

from __future__ import annotations

USER, PASSWORD = "alice", "s3cret-pw"
ALIAS, ALIAS_IP = "upstream.test", "127.0.0.2"
