"""Model and LoRA hyper-parameters, and presets for the supported checkpoints."""

from __future__ import annotations

import dataclasses

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0                      # 0 disables LoRA
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = LORA_TARGETS

  @property
  def scale(self) -> float:
    return self.alpha / self.rank if self.rank else 0.0

  def __post_init__(self):
    unknown = set(self.targets) - set(LORA_TARGETS)
    if unknown:
      raise ValueError(f"lora.targets: unknown {sorted(unknown)}; choose from {LORA_TARGETS}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 RoPE frequency scaling (transformers' ``rope_type="llama3"``)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """A Llama-family decoder (Llama 2/3.x, SmolLM2, Qwen2 with ``attention_bias``)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  # None, or llama3 scaling: a RopeScaling (a dict with its fields is converted).
  rope_scaling: RopeScaling | None = None
  # Per-frequency divisors of the inverse frequencies ([head_dim // 2]), as llama.cpp stores
  # llama3 scaling in GGUF files (tensor rope_freqs.weight). Applied after rope_scaling.
  rope_freq_factors: tuple[float, ...] | None = None
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  attention_bias: bool = False        # q/k/v bias (Qwen2)
  max_position_embeddings: int = 8192
  param_dtype: str = "float32"       # storage dtype of base weights
  dtype: str = "float32"             # compute dtype
  remat: str = "none"                # none | full | dots (save the projections' outputs)
  lora: LoraConfig = LoraConfig()

  def __post_init__(self):
    # The config is static data of the NNX module (part of its graphdef), so it must be hashable.
    if isinstance(self.rope_scaling, dict):
      scaling = dict(self.rope_scaling)
      scaling.pop("rope_type", None)
      object.__setattr__(self, "rope_scaling", RopeScaling(**scaling))
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"model.remat: {self.remat!r}; choose none, full or dots")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")

  def replace(self, **kw) -> "LlamaConfig":
    return dataclasses.replace(self, **kw)


PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100_000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-3.2-1b": LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500_000.0,
        rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-3.2-3b": LlamaConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_layers=28,
        num_heads=24, num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
        rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=True, max_position_embeddings=131072),
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=False, max_position_embeddings=131072),
    "qwen2.5-7b": LlamaConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, attention_bias=True, max_position_embeddings=32768),
    # For tests: tiny and random.
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=10_000.0, tie_word_embeddings=False,
        max_position_embeddings=512),
}


def preset(name: str) -> LlamaConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
