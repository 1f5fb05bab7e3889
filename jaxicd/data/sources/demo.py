"""The built-in demo corpus as a source (generated at run time from a seed; no files)."""

from __future__ import annotations

from jaxicd.data.records import Document

SOURCE = "demo"


def load(*, seed: int = 0) -> list[Document]:
  # Imported here: the demo generator pulls in the ontology and phrase tables, which the
  # file-based readers do not need.
  from jaxicd.data.demo import demo_corpus  # pylint: disable=g-import-not-at-top
  docs = list(demo_corpus(seed=seed).documents)
  for d in docs:  # the same checks as file sources: offsets inside the text, cited codes
    d.validate(f"demo corpus (seed {seed})")
  return docs
