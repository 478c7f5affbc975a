"""The device agent: a long-running service that exposes local TCP
services to authorized peers (``fastpunch agent run``), and the viewer's
side that makes one appear on a local port (``fastpunch forward``).
docs/agent.md describes both, the configuration and the protocol."""

from fastpunch.agent.config import AgentConfig as AgentConfig, Service as Service
from fastpunch.agent.forward import ForwardError as ForwardError, Forwarder as Forwarder
from fastpunch.agent.service import Agent as Agent

__all__ = ["Agent", "AgentConfig", "Forwarder", "ForwardError", "Service"]
