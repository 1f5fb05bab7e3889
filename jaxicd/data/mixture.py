"""Named data sources -> the components of the training mixture, and the documents evaluated.

``config.data.sources`` is a ConfigDict of named entries (keys and defaults:
``jaxicd.train.config.source_config``), taken in name order. Each entry reads one dataset
(``reader``) and gives, by its ``role``:

* ``documents``: its documents, one mixture component named after the source (``weight``);
* ``spans``: span examples, one component named after the source (``weight``): the spans of a
  span reader (``expansion``: code-system expansion; ``span_jsonl``: a JSONL file of spans), or
  the gold evidence quotes of a document reader's training documents;
* ``both``: both, the spans as a second component ``<name>.spans`` (``span_weight``).

A source whose spans set ``pool`` adds them to that span source's component instead (after its
own spans, in name order), sharing its weight: how expansion spans and annotated evidence become
one pool, as the single-source keys make them. ``splits`` says which split of the source feeds
each split of the run; ``fraction`` keeps an evenly spread part of its training documents.

Empty ``sources``: the single-source keys (``data.source``, ``span_weight``, ``doc_weight``, ...)
make the two components ``spans`` and ``documents`` exactly as they always did.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jaxicd.data import pipeline
from jaxicd.data.records import Document, Span
from jaxicd.data.sources import SOURCES as DOCUMENT_READERS

SPAN_READERS = ("expansion", "span_jsonl")
READERS = DOCUMENT_READERS + SPAN_READERS
ROLES = ("documents", "spans", "both")
SPLITS = ("train", "val", "test")
# The options each reader takes (``options`` of a source entry).
READER_OPTIONS = {
    "demo": ("demo_seed",), "mimic_iv": ("split_file", "min_code_count"),
    "mdace": ("split_dir", "annotation_dir"), "codiesp": (), "jsonl": (),
    "expansion": ("code_space", "spans_per_code", "negatives", "seed"), "span_jsonl": ()}


@dataclasses.dataclass(frozen=True)
class Component:
  """One stream of the training mixture: its examples are all spans or all documents."""

  name: str
  kind: str                  # "spans" | "documents"
  weight: float
  records: Sequence[Any]     # Span or (training) Document records
  weight_key: str            # the config key of its weight, for errors
  source: str = ""           # the data.sources entry ("" for the single-source keys)


def named_sources(data_cfg: Any) -> dict[str, Any]:
  """The entries of ``data.sources`` in name order ({} for a single-source config)."""
  sources = data_cfg.sources or {}
  return {name: sources[name] for name in sorted(sources)}


def _options(entry: Any) -> dict[str, Any]:
  options = entry.options
  return dict(options.items()) if options is not None else {}


def source_documents(data_cfg: Any, name: str) -> list[Document]:
  """All documents of source ``name``, each split renamed by the source's ``splits`` (a split
  of the source that feeds no split of the run is left out; one feeding two is in both)."""
  entry = named_sources(data_cfg)[name]
  if entry.reader not in DOCUMENT_READERS:
    raise ValueError(f"data.sources.{name}.reader={entry.reader!r} reads spans, not documents")
  options = _options(entry)
  demo_seed = int(options.pop("demo_seed", 0)) if entry.reader == "demo" else 0
  docs = pipeline.read_source(entry.reader, entry.manual_dir or "",
                              on_error=data_cfg.on_error,
                              demo_seed=demo_seed,
                              data_dir=data_cfg.data_dir,
                              options=tuple(sorted(options.items())))
  out = []
  for split in SPLITS:
    theirs = entry.splits[split]
    if theirs:
      out.extend(d if d.split == split else dataclasses.replace(d, split=split)
                 for d in docs if d.split == theirs)
  return out


def evenly_spread(items: Sequence[Any], fraction: float) -> list[Any]:
  """``round(fraction * len(items))`` items spread evenly over ``items``, in order."""
  n = round(fraction * len(items))
  if n >= len(items):
    return list(items)
  return [items[(i * len(items)) // n] for i in range(n)]


def training_documents(data_cfg: Any, name: str) -> list[Document]:
  """The training documents source ``name`` gives the mixture (``fraction`` of its train split)."""
  entry = named_sources(data_cfg)[name]
  train = [d for d in source_documents(data_cfg, name) if d.split == "train"]
  return evenly_spread(train, float(entry.fraction))


def _source_spans(data_cfg: Any, name: str, entry: Any) -> list[Span]:
  if entry.reader == "expansion":
    options = _options(entry)
    return list(pipeline.expansion_spans(
        str(options.get("code_space", "demo")), max_per_code=int(options.get("spans_per_code", 8)),
        negatives=bool(options.get("negatives", True)), seed=int(options.get("seed", 0)),
        data_dir=data_cfg.data_dir))
  if entry.reader == "span_jsonl":
    from jaxicd.data.sources import read_spans  # pylint: disable=g-import-not-at-top
    return read_spans(entry.manual_dir, on_error=data_cfg.on_error)
  return pipeline.annotated_spans(training_documents(data_cfg, name))


def components(data_cfg: Any, documents: Sequence[Document] | None = None,
               spans: Sequence[Span] | None = None) -> list[Component]:
  """The mixture's components in order (weight-0 ones too: their place fixes the seeds).

  ``documents``/``spans`` (tests, benchmarks) stand for what the single-source keys load.
  """
  sources = named_sources(data_cfg)
  if not sources or documents is not None or spans is not None:
    return _single_source_components(data_cfg, documents, spans)
  out: list[Component] = []
  pooled: dict[str, list[Span]] = {}
  for name, entry in sources.items():
    if entry.role in ("documents", "both"):
      out.append(Component(name, "documents", float(entry.weight),
                           training_documents(data_cfg, name), f"data.sources.{name}.weight", name))
    if entry.role in ("spans", "both"):
      records = _source_spans(data_cfg, name, entry)
      if entry.pool:
        pooled.setdefault(entry.pool, []).extend(records)
        continue
      both = entry.role == "both"
      out.append(Component(f"{name}.spans" if both else name, "spans",
                           float(entry.span_weight if both else entry.weight), records,
                           f"data.sources.{name}.{'span_weight' if both else 'weight'}", name))
  for target, records in pooled.items():
    i = next((i for i, c in enumerate(out) if c.kind == "spans"
              and c.name in (target, f"{target}.spans")), None)
    if i is None:
      raise ValueError(f"data.sources.*.pool={target!r}: no source named {target!r} gives spans "
                       "of its own")
    out[i] = dataclasses.replace(out[i], records=list(out[i].records) + records)
  return out


def _single_source_components(data_cfg: Any, documents, spans) -> list[Component]:
  if documents is None:
    documents = pipeline.load_documents(data_cfg)
  train_docs = [d for d in documents if d.split == "train"]
  if spans is None:
    spans = pipeline.load_spans(data_cfg, train_docs)
  return [Component("spans", "spans", float(data_cfg.span_weight),
                    spans, "data.span_weight"),
          Component("documents", "documents", float(data_cfg.doc_weight),
                    train_docs, "data.doc_weight")]


def document_sources(data_cfg: Any) -> list[str]:
  """The sources that read documents (any role): what evaluation can name."""
  return [n for n, e in named_sources(data_cfg).items() if e.reader in DOCUMENT_READERS]


def documents(data_cfg: Any, source: str = "") -> list[Document]:
  """The documents evaluation reads: those of ``source``; "" = every document source (name
  order), or ``data.source`` for a single-source config."""
  if not named_sources(data_cfg):
    if source:
      raise ValueError(f"source {source!r} is named, but config.data.sources is empty")
    return list(pipeline.load_documents(data_cfg))
  names = [source] if source else document_sources(data_cfg)
  for name in names:
    if name not in document_sources(data_cfg):
      raise ValueError(f"source {name!r}: config.data.sources has no document source of that name "
                       f"(document sources: {', '.join(document_sources(data_cfg)) or 'none'})")
  return [d for name in names for d in source_documents(data_cfg, name)]


def trained_codes(data_cfg: Any) -> frozenset[str]:
  """Codes of the documents the mixture trains on (weight > 0): "seen" for unseen-code F1."""
  return frozenset(c for comp in components(data_cfg) if comp.kind == "documents"
                   and comp.weight > 0 for d in comp.records for c in d.codes)


def describe_source(data_cfg: Any, source: str) -> str:
  """``source`` for messages: the named source, or the single-source key."""
  if source:
    return f"source {source!r}"
  if named_sources(data_cfg):
    return f"sources {', '.join(document_sources(data_cfg))}"
  return f"data.source={data_cfg.source!r}"
