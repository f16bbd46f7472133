"""The gateway: each node as a drop-in Ollama and OpenAI endpoint for the network.

Point any tool that speaks Ollama's API (``http://127.0.0.1:11435``) or
OpenAI's (``http://127.0.0.1:11435/v1``) at a running node, and every request
runs as a paid job on the best provider in the network, with the same
ranking, failover and waiting in line as ``p2pgpu submit``, streamed back in
the shape the tool expects. An edge: it holds no rules of its own beyond
translating shapes; what it may spend is ``p2pgpu.core.spending``'s, what a
job may carry ``p2pgpu.core.jobparams``'s.

- ``app``: the listener and who may call it.
- ``server``: configuration, the spending budget, request and response helpers.
- ``jobs``: one request's job (reserve, submit, stream, settle).
- ``catalog``: the network's models from the live offers.
- ``ollama_api`` / ``openai_api``: the two surfaces.
"""

from p2pgpu.gateway.app import create_app, serve_gateway
from p2pgpu.gateway.server import DEFAULT_GATEWAY_LISTEN, Gateway, GatewayConfig

__all__ = ["Gateway", "GatewayConfig", "create_app", "serve_gateway", "DEFAULT_GATEWAY_LISTEN"]
