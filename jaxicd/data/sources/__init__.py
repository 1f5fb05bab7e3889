"""Readers that turn document sources into canonical ``Document`` records.

``load_documents(source, manual_dir)`` with ``source`` one of:

* ``demo``: the built-in synthetic corpus (``jaxicd.data.demo``), no files;
* ``mimic_iv``: MIMIC-IV ICD-10 diagnoses + MIMIC-IV-Note discharge summaries (credentialed);
* ``mdace``: MDACE evidence annotations + MIMIC-III ``NOTEEVENTS.csv`` (credentialed);
* ``codiesp``: CodiEsp D and X tracks (public, downloaded by hand);
* ``jsonl``: users' own documents (``manual_dir`` is a ``.jsonl`` file or a folder of them).

``open_documents`` (same arguments) returns a ``DocumentStream`` instead: documents per split
known up front, then yielded one at a time; the MIMIC-IV reader holds no note text meanwhile.

Credentialed data is never downloaded: a reader whose files are missing raises
``MissingDataError`` with the PhysioNet address and where to put each file. Bad input raises
``RecordError`` naming the file and line (or field) with ``on_error="raise"``; with
``on_error="skip"`` it is counted by reason in ``skips`` (a ``SkipReport``). Data left out by
design (ICD-9 rows, ICD-10-PCS annotations, CodiEsp procedures, rare codes) is always counted
under reasons that start with ``"filtered: "``.
"""

from __future__ import annotations

from pathlib import Path

from absl import logging

from jaxicd.data.records import Document, RecordError, SkipReport
from jaxicd.data.sources import common
from jaxicd.data.sources.common import FILTERED, DocumentStream, MissingDataError

SOURCES = ("demo", "mimic_iv", "mdace", "codiesp", "jsonl")

__all__ = ["SOURCES", "load_documents", "open_documents", "input_files", "read_spans",
           "DocumentStream", "MissingDataError", "RecordError", "FILTERED"]


def _reader(source: str):
  # Imported on use: each reader pulls in only what its format needs.
  if source == "mimic_iv":
    from jaxicd.data.sources import mimic_iv as reader  # pylint: disable=g-import-not-at-top
  elif source == "mdace":
    from jaxicd.data.sources import mdace as reader  # pylint: disable=g-import-not-at-top
  elif source == "codiesp":
    from jaxicd.data.sources import codiesp as reader  # pylint: disable=g-import-not-at-top
  else:
    from jaxicd.data.sources import jsonl as reader  # pylint: disable=g-import-not-at-top
  return reader


def input_files(source: str, manual_dir: str | Path = "", **options) -> list[Path]:
  """The files that ``load_documents(source, manual_dir, **options)`` would read, those that
  exist (none for ``demo``): what a cache of its documents must be keyed on."""
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
  if source == "demo" or not manual_dir:
    return []
  return _reader(source).input_files(manual_dir, **options)


def load_documents(source: str, manual_dir: str | Path = "", *, on_error: str = "raise",
                   skips: SkipReport | None = None, demo_seed: int = 0, ontology=None,
                   **options) -> list[Document]:
  """Reads ``source`` into Documents (splits ``train``/``val``/``test``).

  Args:
    source: one of ``SOURCES``.
    manual_dir: where the dataset's files were placed by hand (unused for ``demo``).
    on_error: ``"raise"`` (RecordError naming file:line) or ``"skip"`` (count in ``skips``).
    skips: receives counts by reason (errors skipped and data filtered) and invalid codes.
    demo_seed: seed of the demo corpus.
    ontology: anything with ``is_valid(code)``; default ``jaxicd.ontology.get_ontology()``.
    **options: reader options: ``split_file``, ``min_code_count`` (mimic_iv); ``split_dir``,
      ``annotation_dir`` (mdace).
  """
  return _read(source, manual_dir, on_error, skips, demo_seed, ontology, options, stream=False)


def open_documents(source: str, manual_dir: str | Path = "", *, on_error: str = "raise",
                   skips: SkipReport | None = None, demo_seed: int = 0, ontology=None,
                   **options) -> DocumentStream:
  """``load_documents`` as a ``DocumentStream`` (close it, or use ``with``): every skipped or
  filtered record is counted in ``skips`` when it returns; ``stream.documents(split)`` then
  yields the documents. MIMIC-IV's are read back one at a time from a temporary file."""
  return _read(source, manual_dir, on_error, skips, demo_seed, ontology, options, stream=True)


def _read(source, manual_dir, on_error, skips, demo_seed, ontology, options, *, stream: bool):
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
  skips = skips if skips is not None else SkipReport()
  if source == "demo":
    if options:
      raise ValueError(f"source demo takes no options, got {sorted(options)}")
    # Imported on use, like the readers: the demo generator's tables load only for demo.
    from jaxicd.data.sources import demo  # pylint: disable=g-import-not-at-top
    docs = demo.load(seed=demo_seed)
    return common.InMemoryStream(docs) if stream else docs
  if not manual_dir:
    raise ValueError(f"source {source!r} needs manual_dir (--manual_dir / "
                     "config.data.manual_dir): the folder where its files were placed")
  issues = common.Issues(on_error, skips, ontology)
  if stream and source == "mimic_iv":
    out = _reader(source).open_documents(manual_dir, issues=issues, **options)
  else:
    out = _reader(source).load(manual_dir, issues=issues, **options)
  if skips.total:
    logging.info("%s: read %d documents; skipped or filtered %d records: %s", source,
                 len(out), skips.total, skips.counts)
  return common.InMemoryStream(out) if stream and not isinstance(out, DocumentStream) else out


def read_spans(path: str | Path, *, on_error: str = "raise", skips: SkipReport | None = None,
               ontology=None) -> list:
  """Spans from a JSONL file (see ``jaxicd.data.sources.jsonl``)."""
  # Imported on use, like the readers (_reader).
  from jaxicd.data.sources import jsonl  # pylint: disable=g-import-not-at-top
  return jsonl.read_spans(path, on_error=on_error, skips=skips, ontology=ontology)
