"""A model's shape from its config.json, and where that file is found: the sizes the memory plan counts.

No weights are read. A name resolves as the stages resolve it (engine.models.loading): `tiny:<name>` is the
shipped tiny model's folder, an existing path is a local folder, anything else is a hub id, read from the
Hugging Face cache, else fetched alone (`hf_hub_download` of config.json, a few KB) when the hub answers.
Offline and not cached: PlanError naming the config key, and the dims cannot be guessed.

The parameter count follows the decoder families the pipeline uses (Qwen2 / Llama: RMSNorm, bias on q/k/v for
Qwen2; StableLM: LayerNorm with bias, optional q/k/v bias), checked exactly against torch in the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.models.shipped import ASSETS, is_tiny, tiny_name
from engine.runner import hub


class PlanError(Exception):
    """A model's config.json cannot be found; the message names the config key and what to do."""


@dataclass(frozen=True)
class ModelDims:
    """The sizes of a decoder-only causal LM that decide its memory."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool  # input and output embeddings share one matrix
    qkv_bias: bool
    layer_norm: bool  # LayerNorm (weight + bias) instead of RMSNorm (weight)
    norms_per_layer: int = 2  # 1 with StableLM's parallel residual

    @classmethod
    def from_config(cls, name: str, config: dict) -> ModelDims:
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        model_type = config.get("model_type", "")
        return cls(
            name=name,
            hidden=hidden,
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("use_qkv_bias", config.get("attention_bias", model_type == "qwen2"))),
            layer_norm=model_type == "stablelm",
            norms_per_layer=1 if config.get("use_parallel_residual") else 2,
        )

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """(module name, in features, out features) of one decoder layer's linear layers."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [
            ("q_proj", h, q),
            ("k_proj", h, kv),
            ("v_proj", h, kv),
            ("o_proj", q, h),
            ("gate_proj", h, i),
            ("up_proj", h, i),
            ("down_proj", i, h),
        ]

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' linear layers: what 4-bit quantizes and LoRA adapts."""
        return self.layers * sum(n_in * n_out for _, n_in, n_out in self.linear_shapes())

    @property
    def embedding_params(self) -> int:
        """The input embedding and, when not tied, the lm head."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def other_params(self) -> int:
        """Norms and biases: small, never quantized."""
        norm = self.hidden * (2 if self.layer_norm else 1)
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.layers * (self.norms_per_layer * norm + bias) + norm

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.other_params

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache per token in 16-bit: keys and values of every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


def config_json(name: str, key: str, download: bool = True) -> dict:
    """The parsed config.json of model `name` (from config key `key`); PlanError when it cannot be found.
    `download=False` never touches the network (the panel: a hub id must then be in the cache)."""
    return json.loads(_config_path(name, key, download).read_text(encoding="utf-8"))


def load_dims(name: str, key: str, download: bool = True) -> ModelDims:
    try:
        return ModelDims.from_config(name, config_json(name, key, download))
    except (KeyError, TypeError, ValueError) as exc:
        raise PlanError(f"{key}: {name}'s config.json lacks a size the plan needs ({exc})") from None


def _config_path(name: str, key: str, download: bool) -> Path:
    if is_tiny(name):
        path = ASSETS / "tiny" / tiny_name(name) / "config.json"
        if not path.is_file():
            raise PlanError(f"{key}: {name} is not a shipped tiny model (engine/assets/tiny holds none by that name)")
        return path
    folder = Path(name).expanduser()
    if folder.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not (folder / "config.json").is_file():
            raise PlanError(f"{key}: {name} holds no config.json (not a Hugging Face model folder)")
        return folder / "config.json"
    return _hub_config(name, key, download)


def _hub_config(name: str, key: str, download: bool) -> Path:
    """config.json of hub id `name`: the local HF cache first, else downloaded alone when the hub answers."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    if not download:
        raise PlanError(
            f"{key}: {name}'s config.json is not in the local Hugging Face cache; `tas plan` fetches it (a few KB)"
        )
    reason = hub.unreachable_reason()
    if reason is not None:
        raise PlanError(
            f"{key}: {name}'s config.json is not in the local Hugging Face cache and the hub is unreachable "
            f"({reason}); run `hf download {name} config.json` where there is internet, or set {key} to a "
            "local model folder"
        )
    try:
        return Path(hf_hub_download(name, "config.json"))
    except Exception as exc:  # no such repo, gated, network trouble: the plan cannot size this model
        raise PlanError(f"{key}: cannot read {name}'s config.json from the hub ({type(exc).__name__}: {exc})") from None
