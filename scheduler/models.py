"""Model-as-a-Service: every model one server answers for, base models and LoRA adapters.

A request's `model` names a base model or an adapter (`Models.resolve`). Each base model is
served by a cluster of its own (scheduler/cluster.py: its TE groups, its warm template per
host, its autoscalers) and a JE of its own (its tokenizer). The bases share the hosts' memory
(`scaling.hosts.Host.machine`), so a base at zero TEs costs only its template's DRAM, and a
base that needs room for a TE first evicts the template of the base used least recently that
has no TE (`Host.make_room`); that one's next TE starts its template again.

An adapter is a PEFT LoRA over one base (`flowserve/lora.py`), registered at start
(`--lora-modules`) or at run time (`/v1/load_lora_adapter`): checked here against the base's
shape before any TE sees it (a bad one is a 400 and changes nothing) and named by its content
digest. Its requests run on the base's TEs, which load it into a slot on first use; the
digest seeds their prefix-cache hashes, so KV never crosses adapters, nor a reload under the
same name. Unloading affects new requests only: those in flight carry the adapter with them.
"""
import time
from dataclasses import dataclass, field

from flowserve.config import ModelConfig
from flowserve.lora import LoraSpec, read_lora
from flowserve.protocol import Adapter
from scaling.autoscaler import ScalePolicy
from scheduler.api import APIError, ModelCard, invalid, model_not_found
from scheduler.cluster import Cluster
from scheduler.je import JobExecutor


@dataclass(eq=False)
class ServedModel:
    name: str
    path: str
    shape: ModelConfig
    cluster: Cluster
    je: JobExecutor
    policies: dict[str, ScalePolicy]    # the autoscaler's, per group
    created: int = field(default_factory=lambda: int(time.time()))
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class LoraModel:
    name: str
    base: ServedModel
    spec: LoraSpec
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def wire(self) -> Adapter:
        """What a task carries to its TEs."""
        return Adapter(self.name, self.spec.path, self.spec.digest)


def parse_named(value: str, flag: str) -> tuple[str, str]:
    """`NAME=PATH` (a --model or --lora-modules value) as (name, path)."""
    name, sep, path = value.partition("=")
    if not (sep and name and path):
        raise SystemExit(f"{flag} takes NAME=PATH, not {value!r}")
    return name, path


class Models:
    def __init__(self, bases: list[ServedModel], max_lora_rank: int):
        self.bases = {b.name: b for b in bases}
        self.default = bases[0]
        self.adapters: dict[str, LoraModel] = {}
        self.max_lora_rank = max_lora_rank

    def resolve(self, name: str | None) -> tuple[ServedModel, LoraModel | None]:
        """The base model and adapter a request's `model` names (none: the default base)."""
        if name is None or name in self.bases:
            base, lora = self.bases.get(name, self.default), None
        elif lora := self.adapters.get(name):
            base = lora.base
        else:
            raise model_not_found(name)
        base.last_used = time.monotonic()
        return base, lora

    def load_adapter(self, name: str, path: str, base_name: str | None = None) -> LoraModel:
        """Register the PEFT adapter at `path` as the model `name` over `base_name` (default:
        the default base). 400 saying what is wrong, and nothing changes, if it is bad."""
        if name in self.bases or name in self.adapters:
            kind = "base model" if name in self.bases else "LoRA adapter"
            raise invalid(f"the model name {name!r} is taken by a {kind}; unload it first or choose another name",
                          "lora_name")
        if base_name is not None and base_name not in self.bases:
            raise invalid(f"no base model {base_name!r}; bases: {sorted(self.bases)}", "base_model_name")
        base = self.bases[base_name] if base_name else self.default
        try:
            spec = read_lora(path, base.shape, self.max_lora_rank)
        except ValueError as e:
            raise invalid(str(e), "lora_path") from None
        self.adapters[name] = lora = LoraModel(name, base, spec)
        return lora

    def unload_adapter(self, name: str, param: str = "lora_name") -> None:
        if name in self.bases:
            raise invalid(f"{name!r} is a base model; only adapters (fine-tuned models too) can be removed", param)
        if self.adapters.pop(name, None) is None:
            raise APIError(404, f"no LoRA adapter {name!r} is loaded", param, code="model_not_found")

    def cards(self) -> list[ModelCard]:
        """`/v1/models`: the bases, then the adapters with their base as `parent` and their
        path as `root`, as vLLM lists them."""
        return ([ModelCard(id=b.name, created=b.created, root=b.path, max_model_len=b.cluster.max_model_len)
                 for b in self.bases.values()] +
                [ModelCard(id=a.name, created=a.created, root=a.spec.path, parent=a.base.name,
                           max_model_len=a.base.cluster.max_model_len) for a in self.adapters.values()])
