"""What the network offers, as the gateway's model listings show it.

Built from the node's live offers (``NodeView.offers``) on every call, so a
listing is never staler than the offer book: one entry per model with how
many providers serve it now, the cheapest of their prices, free slots and
whether any has it loaded. The node's own offer is left out: the gateway
routes to *other* people's GPUs (the consumer never picks its own offer).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from p2pgpu.api import NodeView
from p2pgpu.core.jobs import Prices, job_cost
from p2pgpu.core.offers import normalize_model_name
from p2pgpu.core.units import format_coins

__all__ = ["NetworkModel", "network_models", "find_model", "cheapest_worst_case", "capabilities_of", "digest_of"]


@dataclass(frozen=True, slots=True)
class NetworkModel:
    name: str  # normalized: "llama3.2:latest"
    providers: int
    price_in: int  # the cheapest offer's (by output price, then input price), base units per million tokens
    price_out: int
    slots_free: int
    warm: bool
    prices: tuple[tuple[int, int], ...]  # every provider's (price_in, price_out)

    def info(self) -> dict[str, object]:
        """The ``p2pgpu`` field the listings add to each model."""
        return {
            "providers": self.providers,
            "price_in": self.price_in,
            "price_out": self.price_out,
            "price_in_coins": format_coins(self.price_in),
            "price_out_coins": format_coins(self.price_out),
            "slots_free": self.slots_free,
            "warm": self.warm,
        }


def network_models(view: NodeView, me: str) -> list[NetworkModel]:
    """Every model some node other than ``me`` (our peer id) offers now, by name."""
    by_model: dict[str, list[tuple[int, int, int, bool]]] = {}
    for offer in view.offers(None):
        if offer["provider"] == me:
            continue
        for model in offer["models"]:
            by_model.setdefault(model["name"], []).append(
                (offer["price_in"], offer["price_out"], offer["slots_free"], bool(model["warm"])))
    models = []
    for name in sorted(by_model):
        offers = by_model[name]
        best_in, best_out = min((p_out, p_in) for p_in, p_out, _, _ in offers)[::-1]
        models.append(NetworkModel(name, len(offers), best_in, best_out, sum(o[2] for o in offers),
                                   any(o[3] for o in offers), tuple((o[0], o[1]) for o in offers)))
    return models


def find_model(models: list[NetworkModel], name: str) -> NetworkModel | None:
    wanted = normalize_model_name(name)
    return next((m for m in models if m.name == wanted), None)


def cheapest_worst_case(model: NetworkModel, prompt_tokens: int, max_tokens: int) -> int:
    """The least any provider of ``model`` could charge at most for a job of
    these bounds (what its hold must cover)."""
    return min(job_cost(Prices(p_in, p_out), prompt_tokens, max_tokens) for p_in, p_out in model.prices)


_EMBEDDING = re.compile(r"embed|minilm|bge")
_VISION = re.compile(r"llava|vision|moondream|gemma3|minicpm-v|-vl|vl$")
_THINKING = re.compile(r"qwen3|deepseek-r1|gpt-oss|magistral|reasoning|cogito|think")
_NO_TOOLS = re.compile(r"gemma|llava|moondream|tinyllama|codellama|llama2|phi3|minicpm-v|vision")


def capabilities_of(name: str) -> list[str]:
    """What a model can do, as ``/api/show`` reports it. Offers name models
    but not their capabilities, so the name decides, by the naming the
    Ollama library follows (embedding models say embed, minilm or bge;
    vision models llava, vision, -vl...). Only a listing reads this: a
    request a provider's model cannot serve fails there, with its Ollama's
    own message."""
    base = normalize_model_name(name).rsplit(":", 1)[0].rsplit("/", 1)[-1]
    if _EMBEDDING.search(base):
        return ["embedding"]
    capabilities = ["completion"]
    if not _NO_TOOLS.search(base):
        capabilities.append("tools")
    if _THINKING.search(base):
        capabilities.append("thinking")
    if _VISION.search(base):
        capabilities.append("vision")
    return capabilities


def digest_of(name: str) -> str:
    """A stable stand-in for a model digest: the network has no single blob
    per name (every provider has its own), so this names the name."""
    return hashlib.sha256(normalize_model_name(name).encode()).hexdigest()
