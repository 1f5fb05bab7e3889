"""jaxicd: Code-Centric Learning for LLM-based ICD-10 coding in JAX/Flax."""

__version__ = "0.1.0"


def load_model(source: str = "smollm2", **kwargs):
  """Returns ``(model, tokenizer)``; see ``jaxicd.model.weights.load_model``."""
  from jaxicd.model.weights import load_model as _load  # lazy: keeps `import jaxicd` light
  return _load(source, **kwargs)
