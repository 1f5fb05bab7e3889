"""TFDS builders (array_record) caching canonical documents and expansion spans.

Two builders, both readable without TensorFlow through ``builder.as_data_source()``:

- ``JaxicdDocuments``: the documents of one source (demo | mimic_iv | mdace | codiesp |
  jsonl), one TFDS split per document split (train / val / test). Credentialed sources are
  never downloaded: their files are placed in ``manual_dir`` by the user
  (``MANUAL_DOWNLOAD_INSTRUCTIONS``); the demo corpus is generated from code.
- ``JaxicdSpans``: code-centric expansion spans of a code space (one ``train`` split),
  generated from code.

What a build depends on (source, seed, manual_dir, code space and its contents, expansion
settings) is encoded in the builder config name, so different settings never collide in one
``data_dir``. For a source read from files that includes the files themselves: each input
file's path, size, modification time and SHA-256, and the reader options (``on_error``,
``split_file``, ...). Appending documents to a source file, or fixing one, is a new config and
a new build, never the old dataset served again; a file that changes while it is being read
fails the build. Records go in and come back as ``jaxicd.data.records`` dataclasses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from jaxicd.data import demo, expansion, sources
from jaxicd.data.records import Document, Evidence, RecordError, SkipReport, Span
from jaxicd.data.sources.common import DocumentStream, InMemoryStream

DOCUMENT_SOURCES = ("demo", "mimic_iv", "mdace", "codiesp", "jsonl")
CREDENTIALED_SOURCES = ("mimic_iv", "mdace")

_MANUAL_INSTRUCTIONS = """\
jaxicd never downloads clinical data. Obtain it yourself and pass its folder as
`manual_dir` (config.data.manual_dir):

* mimic_iv: credentialed PhysioNet access to MIMIC-IV v2.2 and MIMIC-IV-Note
  (https://physionet.org/content/mimiciv/ and .../mimic-iv-note/). Place
  `hosp/diagnoses_icd.csv.gz` and `note/discharge.csv.gz` under manual_dir (optionally a
  split file as documented in the README).
* mdace: the MDACE annotations (https://github.com/3mcloud/MDACE,
  `data/Inpatient/ICD-10/1.0/*.json`) plus MIMIC-III v1.4 `NOTEEVENTS.csv` (credentialed
  PhysioNet access) under manual_dir.
* codiesp: the public CodiEsp corpus (CC BY 4.0, https://zenodo.org/record/3837305):
  the extracted `final_dataset_v4_to_publish` folder as manual_dir.
* jsonl: your own documents, one JSON object per line, under manual_dir.
"""


def _text(x: Any) -> str:
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def _slug(s: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.]+", "_", s).strip("_") or "x"


def _digest(*parts: str) -> str:
  return hashlib.sha1("\x00".join(parts).encode("utf-8")).hexdigest()[:10]


# ----------------------------------------------------------------------------- conversions


def document_to_example(doc: Document) -> dict[str, Any]:
  return {
      "id": doc.id, "text": doc.text, "codes": list(doc.codes),
      "evidence": {"code": [e.code for e in doc.evidence],
                   "begin": np.asarray([e.begin for e in doc.evidence], np.int64),
                   "end": np.asarray([e.end for e in doc.evidence], np.int64)},
      "split": doc.split, "source": doc.source,
  }


def document_from_example(ex: dict[str, Any]) -> Document:
  ev = ex["evidence"]
  evidence = tuple(Evidence(_text(c), int(b), int(e))
                   for c, b, e in zip(ev["code"], ev["begin"], ev["end"]))
  return Document(id=_text(ex["id"]), text=_text(ex["text"]),
                  codes=tuple(_text(c) for c in ex["codes"]), evidence=evidence,
                  split=_text(ex["split"]), source=_text(ex["source"]))


def span_to_example(span: Span) -> dict[str, Any]:
  return {"text": span.text, "code": span.code or "", "origin": span.origin,
          "context": span.context}


def span_from_example(ex: dict[str, Any]) -> Span:
  code = _text(ex["code"])
  return Span(text=_text(ex["text"]), code=code or None, origin=_text(ex["origin"]),
              context=_text(ex["context"]))


# ----------------------------------------------------------------------------- config names


FileState = tuple[str, int, int]  # (path, size, mtime_ns)


def _file_states(source: str, manual_dir: str, options: Mapping[str, Any]) -> list[FileState]:
  out = []
  for p in sources.input_files(source, manual_dir, **options):
    st = os.stat(p)
    out.append((os.path.abspath(p), st.st_size, st.st_mtime_ns))
  return out


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _documents_key(source: str, demo_seed: int, manual_dir: str, on_error: str,
                   options: Mapping[str, Any] | None) -> tuple[str, list[FileState]]:
  """(config name, the input files' states the name was computed from)."""
  if source not in DOCUMENT_SOURCES:
    raise ValueError(f"unknown document source {source!r}; expected one of {DOCUMENT_SOURCES}")
  if source == "demo":
    # The generator's fingerprint: a corpus cached by an older generator is never reused.
    from jaxicd.data import demo  # pylint: disable=g-import-not-at-top
    return f"demo-seed{int(demo_seed)}-{demo.fingerprint()}", []
  options = dict(options or {})
  # States are taken before hashing: a file written meanwhile fails the build's own check.
  states = _file_states(source, manual_dir, options)
  key = {"manual_dir": os.path.abspath(manual_dir or "."), "on_error": on_error,
         "options": {k: str(v) for k, v in sorted(options.items())},
         "files": [[p, size, mtime, _sha256(p)] for p, size, mtime in states]}
  return f"{source}-{_digest(json.dumps(key, sort_keys=True))}", states


def documents_config_name(source: str, demo_seed: int = 0, manual_dir: str = "", *,
                          on_error: str = "raise",
                          options: Mapping[str, Any] | None = None) -> str:
  """``demo-seed0-<generator fingerprint>``; a source read from files: ``<source>-<digest>`` of
  its path, reader options and the contents of its input files (see the module docstring).

  Reads every input file once to hash it, on each call.
  """
  return _documents_key(source, demo_seed, manual_dir, on_error, options)[0]


def code_space_tag(spec: str) -> str:
  """``all`` / ``demo`` as is; a code file by name and a digest of its contents."""
  if spec in ("all", "demo"):
    return spec
  if not os.path.exists(spec):
    raise FileNotFoundError(f"code space file {spec!r} does not exist")
  with open(spec, "rb") as f:
    content = f.read()
  return f"file_{_slug(os.path.basename(spec))[:24]}_{hashlib.sha1(content).hexdigest()[:10]}"


def spans_config_name(code_space: str, *, seed: int = 0, max_per_code: int = 8,
                      negatives: bool = True) -> str:
  return (f"{code_space_tag(code_space)}-n{int(max_per_code)}-neg{int(bool(negatives))}"
          f"-seed{int(seed)}")


# ----------------------------------------------------------------------------- builders

_EVIDENCE = tfds.features.Sequence({
    "code": tfds.features.Text(),
    "begin": tfds.features.Scalar(np.int64),
    "end": tfds.features.Scalar(np.int64),
})


class _CodePath:
  """A fixed code path (TFDS otherwise probes it via `importlib_resources`, which is not
  installed without TensorFlow's extras)."""

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    return epath.Path(__file__)


class _Builder(_CodePath, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Examples from one generator per split (TFDS collects and sorts them before writing)."""


# Documents per array_record shard. TFDS holds one shard's examples in memory while it writes
# it: ~12 MB of MIMIC-IV discharge text.
DOCUMENTS_PER_SHARD = 1000


class JaxicdDocuments(_CodePath, tfds.core.ShardBasedBuilder, skip_registration=True):
  """Canonical documents of one source, split by document split.

  Written shard by shard (``DOCUMENTS_PER_SHARD``) straight from the source's
  ``DocumentStream``, in its order: no step holds a whole split, and TFDS's sort of a split
  (which keeps up to 1 GB in memory and, beyond that, needs TensorFlow) is not used.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Document records: id, text, codes, evidence offsets, split.",
      "1.1.0": "Keyed on the input files' contents and the reader options; readers accept a "
               "UTF-8 BOM and refuse lone surrogates.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = _MANUAL_INSTRUCTIONS

  def __init__(self, *, source: str = "demo", demo_seed: int = 0, manual_dir: str = "",
               on_error: str = "raise", options: Mapping[str, Any] | None = None,
               data_dir: str | None = None,
               loader: Callable[[], Sequence[Document]] | None = None, **kwargs):
    """``options``: reader options (``split_file``, ``min_code_count``, ``split_dir``, ...).
    ``loader`` replaces ``sources.load_documents`` (e.g. records built in memory)."""
    self._source, self._demo_seed, self._manual_dir = source, int(demo_seed), manual_dir
    self._on_error, self._options, self._loader = on_error, dict(options or {}), loader
    self.skips = SkipReport()
    self.read_stats: dict[str, Any] = {}
    name, self._inputs = _documents_key(source, demo_seed, manual_dir, on_error, self._options)
    config = tfds.core.BuilderConfig(name=name, version=self.VERSION,
                                     description=f"documents of source {source!r}")
    super().__init__(data_dir=data_dir, config=config, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Clinical documents with ICD-10-CM codes and evidence offsets (jaxicd).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "text": tfds.features.Text(),
            "codes": tfds.features.Sequence(tfds.features.Text()),
            "evidence": _EVIDENCE,
            "split": tfds.features.Text(), "source": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True)

  def _open(self, dl_manager) -> DocumentStream:
    if self._loader is not None:
      return InMemoryStream(self._loader())
    manual_dir = self._manual_dir
    if self._source != "demo" and not (manual_dir and os.path.exists(manual_dir)):
      # Raises TFDS's error quoting MANUAL_DOWNLOAD_INSTRUCTIONS. (A jsonl manual_dir may be
      # one file, which TFDS's own check rejects, so existing paths are used as given.)
      manual_dir = os.fspath(dl_manager.manual_dir)
    stream = sources.open_documents(self._source, manual_dir, on_error=self._on_error,
                                    skips=self.skips, demo_seed=self._demo_seed, **self._options)
    # Every input file has been read to its end by now (what the stream yields later comes
    # from its own copy).
    now = _file_states(self._source, self._manual_dir, self._options)
    if now != self._inputs:
      stream.close()
      # The config name hashes the files as they were before: refuse to file other contents
      # under it.
      changed = sorted({p for p, *_ in set(now) ^ set(self._inputs)})
      raise RecordError(f"{self._source}: input files changed while the dataset was being built "
                        f"({', '.join(changed[:3])}); run again once they are complete")
    return stream

  def download_and_prepare(self, *args, **kwargs):
    try:
      return super().download_and_prepare(*args, **kwargs)
    finally:  # the stream opened by _shard_iterators_per_split, with its temporary file
      stream, self._stream = getattr(self, "_stream", None), None
      if stream is not None:
        stream.close()

  def _shard_iterators_per_split(self, dl_manager):
    self._stream = stream = self._open(dl_manager)
    if not stream.counts:
      raise ValueError(f"source {self._source!r} produced no documents")
    self.info.metadata["skips"] = self.skips.as_dict()
    self.info.metadata["documents"] = dict(stream.counts)
    self.read_stats = dict(getattr(stream, "stats", {}))  # the reader's timings and sizes
    return {split: [functools.partial(self._generate_examples, stream, split, start,
                                      min(start + DOCUMENTS_PER_SHARD, n))
                    for start in range(0, n, DOCUMENTS_PER_SHARD)]
            for split, n in stream.counts.items()}

  def _generate_examples(self, stream: DocumentStream, split: str, start: int, stop: int
                         ) -> Iterator[tuple[int, dict]]:
    for i, d in enumerate(stream.documents(split, start=start, stop=stop), start):
      yield i, document_to_example(d)


class JaxicdSpans(_Builder):
  """Code-centric expansion spans of a code space (generated from code)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Span records: text, code ('' for negatives), origin, context."}

  def __init__(self, *, code_space: str = "demo", seed: int = 0, max_per_code: int = 8,
               negatives: bool = True, data_dir: str | None = None,
               loader: Callable[[], Sequence[Span]] | None = None, **kwargs):
    self._code_space, self._seed = code_space, int(seed)
    self._max_per_code, self._negatives, self._loader = int(max_per_code), negatives, loader
    self.report: dict[str, Any] = {}
    config = tfds.core.BuilderConfig(
        name=spans_config_name(code_space, seed=seed, max_per_code=max_per_code,
                               negatives=negatives),
        version=self.VERSION, description=f"expansion spans of code space {code_space!r}")
    super().__init__(data_dir=data_dir, config=config, file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Short evidence spans generated from ICD-10-CM (jaxicd expansion).",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(), "code": tfds.features.Text(),
            "origin": tfds.features.Text(), "context": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True)

  def _load(self) -> Sequence[Span]:
    if self._loader is not None:
      return self._loader()
    codes = demo.code_space(self._code_space)
    result = expansion.expand(codes, seed=self._seed, max_per_code=self._max_per_code,
                              negatives=self._negatives)
    self.report = dict(result.report)
    return result.spans

  def _split_generators(self, dl_manager):
    del dl_manager
    spans = self._load()
    if not spans:
      raise ValueError(f"code space {self._code_space!r} produced no spans")
    self.info.metadata["spans"] = len(spans)
    return {"train": self._generate_examples(spans)}

  def _generate_examples(self, spans: Sequence[Span]) -> Iterator[tuple[str, dict]]:
    for i, s in enumerate(spans):
      yield f"{i:09d}", span_to_example(s)


# ----------------------------------------------------------------------------- reading


class RecordSource(Sequence):
  """Random-access records over a TFDS data source, converted on access."""

  def __init__(self, data_source: Any, convert: Callable[[dict], Any]):
    self._source, self._convert = data_source, convert

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    if not -len(self) <= i < len(self):
      raise IndexError(f"record {i} out of range [0, {len(self)})")
    return self._convert(self._source[i % len(self)])

  def __iter__(self) -> Iterator[Any]:
    for i in range(len(self)):
      yield self[i]


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str = "") -> None:
  """Builds once; a prepared config in ``data_dir`` is reused."""
  if builder.is_prepared():
    return
  kwargs = {}
  if manual_dir and os.path.isdir(manual_dir):
    kwargs["download_config"] = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(**kwargs)


def read_documents(builder: JaxicdDocuments, split: str | None = None) -> list[Document]:
  """Documents of one split (or all splits, train first) read back from the array_record files."""
  splits = [split] if split else sorted(builder.info.splits.keys(),
                                        key=lambda s: (s != "train", s))
  out: list[Document] = []
  for s in splits:
    out.extend(RecordSource(builder.as_data_source(split=s), document_from_example))
  return out


def read_spans(builder: JaxicdSpans) -> RecordSource:
  return RecordSource(builder.as_data_source(split="train"), span_from_example)


def load_documents(source: str, *, data_dir: str, manual_dir: str = "", demo_seed: int = 0,
                   on_error: str = "raise", options: Mapping[str, Any] | None = None
                   ) -> list[Document]:
  """Builds (if needed) and reads back all documents of ``source`` from ``data_dir``.

  A build is reused while the input files and reader options are unchanged (see the module
  docstring); ``options`` are the reader options of ``sources.load_documents``.
  """
  builder = JaxicdDocuments(source=source, demo_seed=demo_seed, manual_dir=manual_dir,
                            on_error=on_error, options=options, data_dir=data_dir)
  prepare(builder, manual_dir if source != "demo" else "")
  return read_documents(builder)


def load_spans(code_space: str, *, data_dir: str, seed: int = 0, max_per_code: int = 8,
               negatives: bool = True) -> list[Span]:
  """Builds (if needed) and reads back the expansion spans of ``code_space``."""
  builder = JaxicdSpans(code_space=code_space, seed=seed, max_per_code=max_per_code,
                        negatives=negatives, data_dir=data_dir)
  prepare(builder)
  return list(read_spans(builder))
