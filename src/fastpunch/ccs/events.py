"""The CCS's log: one JSON object a line (``{"event": kind, ...}``) on the
``fastpunch.ccs`` logger, for operators and their log shippers."""

from __future__ import annotations

import json
import logging

log = logging.getLogger("fastpunch.ccs")

__all__ = ["event", "log"]


def event(kind: str, **fields) -> None:
    """One structured (JSON) log line."""
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps({"event": kind, **fields}, default=str))
