"""grain input pipeline: spans and documents -> mixed, packed, sharded training batches.

Flow for training (one process of ``process_count``)::

  spans     ─ slice(process) ─ shuffle ─ repeat ─ encode (cached) ───────────────┐
  documents ─ slice(process) ─ shuffle ─ repeat ─ windows + encode (cached) ─ flat┤
                                                     IterDataset.mix(weights) ◄───┘
        ─ shift (inputs/targets/loss_weights) ─ first-fit pack (segment ids, positions)
        ─ batch(per_process_batch) ─ background-thread prefetch

With ``data.share_prompt`` span examples lose the prompt prefix they all start with (system +
instruction, most of a span example) and are packed into rows of their own that hold one copy
of it; their segment ids are negative, which lets them attend to the row's first segment, the
prefix (see ``jaxicd.model.llama``), and their positions continue after it. Document windows
are packed apart and the two kinds of rows are mixed by the weights::

  spans     ─ ... ─ encode ─ strip prefix ─ shift ─ pack(seq_len - prefix) ─ prepend prefix ─┐
  documents ─ ... ─ windows + encode ─ flat ─ shift ─ pack(seq_len) ───── IterDataset.mix ◄──┘
        ─ batch(per_process_batch) ─ background-thread prefetch

Every element is an example encoded by ``prompts.encode_example``: the instruction and
note (or span) as the user turn, the target as the assistant turn, loss on the target only.
Documents whose encoded example would not fit ``seq_len`` are split into overlapping
windows of note text; each window's target lists only the codes whose evidence lies in it
(``prompts.document_target(doc, begin, end)``). An example that cannot fit even alone (e.g.
a target longer than ``seq_len``) is truncated and counted in ``PipelineStats``; nothing is
dropped silently.

The returned iterators are grain ``DatasetIterator``s: ``get_state()``/``set_state()`` give
JSON-serialisable states, so ``grain.checkpoint.CheckpointSave/Restore`` work with Orbax.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grain
import numpy as np

from jaxicd.data.records import Document, Span, SkipReport

log = logging.getLogger(__name__)

# Values of the optional per-token ``sources`` feature (0 stays padding).
SOURCE_IDS = {"spans": 1, "documents": 2}
BATCH_KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
  """Reads a field from an ml_collections ConfigDict, a dict or an object."""
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  try:
    return getattr(cfg, name)
  except (AttributeError, KeyError):
    return default


# ----------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class PipelineStats:
  """What the pipeline did to the data; shared by the worker threads of one iterator."""

  documents_encoded: int = 0
  windows: int = 0            # document examples produced (a short document is one window)
  multi_window_documents: int = 0
  spans_encoded: int = 0
  truncated: int = 0          # examples cut to seq_len because they could not fit otherwise
  truncated_tokens: int = 0
  split_evidence: int = 0     # evidence quotes no window holds whole (too long for seq_len)
  unshared_spans: int = 0     # share_prompt: span examples kept whole (not after the prefix)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def add(self, **counts: int) -> None:
    with self._lock:
      for k, v in counts.items():
        setattr(self, k, getattr(self, k) + v)

  def as_dict(self) -> dict[str, int]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if not f.name.startswith("_")}


# ----------------------------------------------------------------------------- encoding


def _prompts():
  # Imported lazily so that this module imports without the prompt module's dependencies.
  from jaxicd.data import prompts  # pylint: disable=g-import-not-at-top
  return prompts


def _as_example(encoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = np.asarray(encoded["tokens"], dtype=np.int32)
  mask = np.asarray(encoded["loss_mask"], dtype=np.int32)
  if tokens.shape != mask.shape or tokens.ndim != 1:
    raise ValueError(f"encode_example returned tokens {tokens.shape} and loss_mask "
                     f"{mask.shape}; expected two equal 1-D arrays")
  return {"tokens": tokens, "loss_mask": mask}


def _truncate(example: dict[str, np.ndarray], budget: int,
              stats: PipelineStats | None) -> dict[str, np.ndarray]:
  n = len(example["tokens"])
  if n <= budget:
    return example
  if stats is not None:
    stats.add(truncated=1, truncated_tokens=n - budget)
  return {k: v[:budget] for k, v in example.items()}


def encode_span(tokenizer: Any, span: Span, seq_len: int,
                stats: PipelineStats | None = None, *,
                answer_format: str = "code_first") -> dict[str, np.ndarray]:
  """Encodes one span example; the shifted example fits ``seq_len`` (truncated if not)."""
  prompts = _prompts()
  example = _as_example(prompts.encode_target(tokenizer, span.text, prompts.span_lines(span),
                                              answer_format))
  if stats is not None:
    stats.add(spans_encoded=1)
  return _truncate(example, seq_len + 1, stats)


def _snap_back(text: str, lo: int, e: int) -> int:
  """Moves ``e`` back to just after whitespace in (lo, e] so words stay whole."""
  if e >= len(text):
    return len(text)
  cut = max(text.rfind("\n", lo + 1, e + 1), text.rfind(" ", lo + 1, e + 1))
  return cut + 1 if cut > lo else e


def _snap_forward(text: str, s: int, hi: int) -> int:
  """Moves a window start ``s`` forward to the next word start before ``hi``."""
  if s <= 0 or text[s - 1].isspace():
    return max(s, 0)
  j = s
  while j < hi and not text[j].isspace():
    j += 1
  while j < hi and text[j].isspace():
    j += 1
  return j if j < hi else s


def plan_windows(text: str, measure: Callable[[int, int], int], budget: int, *,
                 overlap_chars: int, protected: Sequence[tuple[int, int]] = (),
                 max_tries: int = 8) -> list[tuple[int, int, bool]]:
  """Splits ``text`` into overlapping ``[begin, end)`` windows whose examples fit ``budget``.

  Args:
    text: the note text.
    measure: ``measure(begin, end)`` -> token length of the full encoded example of that
      window (prompt, note window and target): the real tokenizer decides, so every
      accepted window provably fits.
    budget: maximum tokens of an example.
    overlap_chars: characters of note text shared by consecutive windows.
    protected: character ranges (evidence) that a window boundary should not cut.
    max_tries: encodings tried per window before giving up on growing it.

  Returns:
    ``(begin, end, fits)`` triples covering ``text`` in order; ``fits`` is False only when
    even the smallest window tried does not fit (the caller truncates and counts it).
  """
  n = len(text)
  full = measure(0, n)
  if full <= budget:
    return [(0, n, True)]
  chars_per_token = n / full  # prompt/target overhead makes this conservative

  def avoid_cutting(b: int, e: int) -> int:
    for pb, pe in protected:
      if pb < e < pe and pb > b:
        e = pb
    return e

  windows = []
  b = 0
  while b < n:
    best_fit = None
    smallest_seen = None
    e = min(n, b + max(1, int(budget * chars_per_token)))
    for _ in range(max_tries):
      e = avoid_cutting(b, _snap_back(text, b, e)) if e < n else n
      e = max(e, b + 1)
      m = measure(b, e)
      if smallest_seen is None or e < smallest_seen:
        smallest_seen = e
      if m <= budget:
        if best_fit is None or e > best_fit:
          best_fit = e
        if e >= n or m >= 0.95 * budget:
          break
        grown = b + int((e - b) * budget / m * 0.98)
        if grown <= e:
          break
        e = min(n, grown)
      else:
        shrunk = b + int((e - b) * budget / m * 0.95)
        if best_fit is not None and shrunk <= best_fit:
          break
        if shrunk <= b:
          break
        e = shrunk
    fits = best_fit is not None
    end = best_fit if fits else (smallest_seen or min(n, b + 1))
    windows.append((b, end, fits))
    if end >= n:
      break
    # Overlap at most half a window, so a large window_overlap cannot multiply the windows.
    nb = _snap_forward(text, max(b + 1, b + (end - b) // 2, end - overlap_chars), end)
    for pb, pe in protected:  # start before evidence rather than inside it
      if pb < nb < pe and pb > b:
        nb = pb
    b = nb if b < nb < end else end
  return windows


@dataclasses.dataclass(frozen=True)
class DocumentWindow:
  """One window of a document: character offsets into ``Document.text`` and its encoding."""

  doc_id: str
  index: int
  begin: int
  end: int
  tokens: np.ndarray              # full training example, or the prompt for inference
  loss_mask: np.ndarray | None    # None for inference prompts
  fits: bool                      # False: truncated to fit
  # Inference prompts: tokens[note_lo:note_hi] lie inside the note (evidence-first quotes copy
  # them); 0, 0 when not computed.
  note_lo: int = 0
  note_hi: int = 0


def _overlap_chars(tokenizer: Any, text: str, overlap_tokens: int) -> int:
  if overlap_tokens <= 0:
    return 0
  sample = text[:4000]
  n_tok = max(1, len(tokenizer.encode(sample)))
  return int(overlap_tokens * len(sample) / n_tok)


def document_windows(doc: Document, tokenizer: Any, *, seq_len: int, window_overlap: int,
                     stats: PipelineStats | None = None,
                     answer_format: str = "code_first") -> list[DocumentWindow]:
  """Training examples of a document: one per window, each fitting ``seq_len`` once shifted."""
  prompts = _prompts()
  cache: dict[tuple[int, int], dict[str, np.ndarray]] = {}

  def encode(b: int, e: int) -> dict[str, np.ndarray]:
    if (b, e) not in cache:
      cache[(b, e)] = _as_example(prompts.encode_target(
          tokenizer, doc.text[b:e], prompts.target_lines(doc, b, e), answer_format))
    return cache[(b, e)]

  budget = seq_len + 1  # the shift drops one token
  spans = plan_windows(doc.text, lambda b, e: len(encode(b, e)["tokens"]), budget,
                       overlap_chars=_overlap_chars(tokenizer, doc.text, window_overlap),
                       protected=[(ev.begin, ev.end) for ev in doc.evidence])
  out = []
  for i, (b, e, fits) in enumerate(spans):
    ex = _truncate(encode(b, e), budget, stats)
    out.append(DocumentWindow(doc.id, i, b, e, ex["tokens"], ex["loss_mask"], fits))
  if stats is not None:
    split = sum(not any(w.begin <= ev.begin and ev.end <= w.end for w in out)
                for ev in doc.evidence)
    stats.add(documents_encoded=1, windows=len(out), split_evidence=split,
              multi_window_documents=int(len(out) > 1))
  return out


def inference_windows(doc: Document, tokenizer: Any, *, seq_len: int, window_overlap: int,
                      max_new_tokens: int, note_range: bool = False) -> list[DocumentWindow]:
  """Prompts for the inference loop: windows whose prompt + ``max_new_tokens`` fit seq_len.

  ``tokens`` holds ``prompts.encode_prompt`` of the window text (it ends with the assistant
  header); ``begin``/``end`` map quotes found in the window back to the note. With
  `note_range`, ``note_lo``/``note_hi`` give the note's tokens in the prompt.
  """
  prompts = _prompts()
  budget = seq_len - max_new_tokens
  if budget <= 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                     f"seq_len={seq_len}")
  cache: dict[tuple[int, int], tuple[np.ndarray, int, int]] = {}

  def encode(b: int, e: int) -> tuple[np.ndarray, int, int]:
    if (b, e) not in cache:
      if note_range:
        enc = prompts.encode_prompt_with_note(tokenizer, doc.text[b:e])
        cache[(b, e)] = (enc.tokens, enc.note_lo, enc.note_hi)
      else:
        cache[(b, e)] = (np.asarray(prompts.encode_prompt(tokenizer, doc.text[b:e]), np.int32),
                         0, 0)
    return cache[(b, e)]

  spans = plan_windows(doc.text, lambda b, e: len(encode(b, e)[0]), budget,
                       overlap_chars=_overlap_chars(tokenizer, doc.text, window_overlap))
  for b, e, fits in spans:
    if not fits:  # a cut prompt would lose the assistant header: refuse instead
      raise ValueError(f"document {doc.id!r}: the prompt of window [{b}, {e}) needs "
                       f"{len(encode(b, e)[0])} tokens; seq_len={seq_len} minus max_new_tokens="
                       f"{max_new_tokens} leaves {budget}")
  return [DocumentWindow(doc.id, i, b, e, encode(b, e)[0], None, True, *encode(b, e)[1:])
          for i, (b, e, _) in enumerate(spans)]


# ----------------------------------------------------------------------------- records


def annotated_spans(documents: Iterable[Document]) -> list[Span]:
  """Gold evidence quotes of training documents as spans (deduplicated, in order)."""
  seen, out = set(), []
  for doc in documents:
    if doc.split != "train":
      continue
    for ev in doc.evidence:
      text = doc.quote(ev).strip()
      if text and (text, ev.code) not in seen:
        seen.add((text, ev.code))
        out.append(Span(text=text, code=ev.code, origin="annotated"))
  return out


def load_documents(data_cfg: Any, *, skips: SkipReport | None = None) -> Sequence[Document]:
  """All documents of ``data.source``; through the TFDS cache when ``data.data_dir`` is set.

  Results are memoised per setting (the trainer builds an eval iterator at every eval), unless
  a ``skips`` report is requested. Named sources (``data.sources``): ``jaxicd.data.mixture``.
  """
  return read_source(cfg_get(data_cfg, "source", "demo"), cfg_get(data_cfg, "manual_dir", "") or "",
                     on_error=cfg_get(data_cfg, "on_error", "raise"),
                     demo_seed=int(cfg_get(data_cfg, "demo_seed", 0)),
                     data_dir=cfg_get(data_cfg, "data_dir", "") or "", skips=skips)


def read_source(reader: str, manual_dir: str, *, on_error: str = "raise", demo_seed: int = 0,
                data_dir: str = "", options: tuple[tuple[str, Any], ...] = (),
                skips: SkipReport | None = None) -> tuple[Document, ...]:
  """The documents of one reader (``options``: its reader options as sorted pairs), memoised
  unless a ``skips`` report is requested."""
  key = (reader, manual_dir, on_error, demo_seed, data_dir, options)
  if skips is not None:
    return _load_documents(*key, skips=skips)
  return _load_documents_cached(*key)


@functools.lru_cache(maxsize=8)
def _load_documents_cached(*key) -> tuple[Document, ...]:
  return _load_documents(*key)


def _load_documents(source: str, manual_dir: str, on_error: str, demo_seed: int,
                    data_dir: str, options: tuple[tuple[str, Any], ...] = (), *,
                    skips: SkipReport | None = None) -> tuple[Document, ...]:
  if data_dir:
    from jaxicd.data import tfds_builders  # pylint: disable=g-import-not-at-top
    return tuple(tfds_builders.load_documents(source, data_dir=data_dir, manual_dir=manual_dir,
                                              demo_seed=demo_seed, on_error=on_error,
                                              options=dict(options)))
  from jaxicd.data.sources import load_documents as load  # pylint: disable=g-import-not-at-top
  return tuple(load(source, manual_dir, on_error=on_error, skips=skips, demo_seed=demo_seed,
                    **dict(options)))


@functools.lru_cache(maxsize=4)
def expansion_spans(code_space: str, *, max_per_code: int, negatives: bool, seed: int,
                    data_dir: str = "") -> tuple[Span, ...]:
  """The code-system expansion spans of ``code_space`` (through the TFDS cache with
  ``data_dir``), memoised: the full code space takes a while to expand."""
  kwargs = dict(seed=seed, max_per_code=max_per_code, negatives=negatives)
  if data_dir:
    from jaxicd.data import tfds_builders  # pylint: disable=g-import-not-at-top
    return tuple(tfds_builders.load_spans(code_space, data_dir=data_dir, **kwargs))
  from jaxicd import ontology  # pylint: disable=g-import-not-at-top
  from jaxicd.data import expansion  # pylint: disable=g-import-not-at-top
  return tuple(expansion.expand(ontology.get_ontology().code_space(code_space), **kwargs).spans)


def load_spans(data_cfg: Any, documents: Sequence[Document] = ()) -> list[Span]:
  """Expansion spans of ``data.code_space``, annotated training spans (if enabled) and the
  spans of ``data.span_files`` (JSONL paths, a list or comma-separated; optional)."""
  spans: list[Span] = []
  if int(cfg_get(data_cfg, "spans_per_code", 8)) > 0:
    spans.extend(expansion_spans(
        cfg_get(data_cfg, "code_space", "demo"),
        max_per_code=int(cfg_get(data_cfg, "spans_per_code", 8)),
        negatives=bool(cfg_get(data_cfg, "negatives", True)),
        seed=int(cfg_get(data_cfg, "expansion_seed", 0)),
        data_dir=cfg_get(data_cfg, "data_dir", "") or ""))
  if cfg_get(data_cfg, "annotated_spans", True):
    spans.extend(annotated_spans(documents))
  span_files = cfg_get(data_cfg, "span_files", ()) or ()
  if isinstance(span_files, str):
    span_files = [f for f in span_files.split(",") if f]
  if span_files:
    from jaxicd.data.sources import read_spans  # pylint: disable=g-import-not-at-top
    for path in span_files:  # users' own spans (JSONL), e.g. synthesized by an LLM
      spans.extend(read_spans(path, on_error=cfg_get(data_cfg, "on_error", "raise")))
  return spans


# ----------------------------------------------------------------------------- grain stages


class _ExampleCache:
  """Thread-safe cache of encoded examples by record index, bounded by total tokens.

  Encoding a 2k-token note (several tokenizer calls while fitting windows) costs
  milliseconds; each epoch after the first reads the cache instead.
  """

  def __init__(self, max_tokens: int):
    self._max_tokens = max_tokens
    self._tokens = 0
    self._items: dict[int, Any] = {}
    self._lock = threading.Lock()

  def get(self, index: int, compute: Callable[[], Any], size: Callable[[Any], int]) -> Any:
    item = self._items.get(index)
    if item is not None:
      return item
    item = compute()
    n = size(item)
    with self._lock:
      if self._tokens + n <= self._max_tokens and index not in self._items:
        self._items[index] = item
        self._tokens += n
    return item


class _Flatten(grain.experimental.FlatMapTransform):
  """A list of examples -> its examples (checkpointable through grain's flat map)."""

  max_fan_out = 1 << 16

  def flat_map(self, element):
    return element


def _shift(example: Mapping[str, np.ndarray], source_id: int | None) -> dict[str, np.ndarray]:
  tokens, mask = example["tokens"], example["loss_mask"]
  out = {"inputs": tokens[:-1], "targets": tokens[1:],
         "loss_weights": mask[1:].astype(np.float32)}
  if source_id is not None:
    out["sources"] = np.full(len(tokens) - 1, source_id, np.int32)
  return out


def _rekey_packed(x: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {k: x[k] for k in ("inputs", "targets", "loss_weights")}
  out["segment_ids"] = x["inputs_segment_ids"]
  out["positions"] = x["inputs_positions"]
  if "sources" in x:
    out["sources"] = x["sources"]
  return out


def _shard(n: int, process_index: int, process_count: int, what: str) -> grain.MapDataset:
  """Indices of this process's records: a strided slice, disjoint across processes."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if n < process_count:
    raise ValueError(f"{n} {what} cannot be split across {process_count} processes")
  return grain.MapDataset.range(n)[process_index::process_count]


def _per_process_batch(data_cfg: Any, process_count: int) -> int:
  batch = int(cfg_get(data_cfg, "batch_size", 8))
  if batch % process_count:
    raise ValueError(f"data.batch_size={batch} is not divisible by process_count="
                     f"{process_count}")
  return batch // process_count


def _read_options(data_cfg: Any) -> grain.ReadOptions:
  # Encoding is Python + Rust tokenizer work: a couple of threads overlap it with the
  # training step without fighting it for the (few) cores.
  return grain.ReadOptions(num_threads=int(cfg_get(data_cfg, "num_threads", 2)),
                           prefetch_buffer_size=int(cfg_get(data_cfg, "read_buffer", 16)))


def _span_examples(spans: Sequence[Span], tokenizer: Any, seq_len: int, seed: int,
                   shard: grain.MapDataset, stats: PipelineStats, cache: _ExampleCache,
                   shuffle: bool = True, repeat: bool = True,
                   answer_format: str = "code_first") -> grain.MapDataset:
  ds = shard
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()
  return ds.map(lambda i: cache.get(
      int(i), lambda: encode_span(tokenizer, spans[int(i)], seq_len, stats,
                                  answer_format=answer_format),
      lambda ex: len(ex["tokens"])))


def _document_examples(documents: Sequence[Document], tokenizer: Any, seq_len: int,
                       window_overlap: int, seed: int, shard: grain.MapDataset,
                       stats: PipelineStats, cache: _ExampleCache, shuffle: bool = True,
                       repeat: bool = True, answer_format: str = "code_first"
                       ) -> grain.MapDataset:
  ds = shard
  if shuffle:
    ds = ds.shuffle(seed=seed)
  if repeat:
    ds = ds.repeat()

  def encode(i: int) -> list[dict[str, np.ndarray]]:
    windows = document_windows(documents[i], tokenizer, seq_len=seq_len,
                               window_overlap=window_overlap, stats=stats,
                               answer_format=answer_format)
    return [{"tokens": w.tokens, "loss_mask": w.loss_mask} for w in windows]

  return ds.map(lambda i: cache.get(int(i), lambda: encode(int(i)),
                                    lambda exs: sum(len(e["tokens"]) for e in exs)))


def count_sources(batch: Mapping[str, np.ndarray], ids: Mapping[str, int] | None = None
                  ) -> dict[str, dict[str, int]]:
  """Examples, tokens and target tokens per source in a batch built ``with_sources=True``.

  The mixture weights are fractions of examples (or of tokens with
  ``mixture_unit="tokens"``); this reports both, plus loss-bearing tokens. ``ids``: component
  name -> ``sources`` value (the iterator's ``summary["source_ids"]``; default ``SOURCE_IDS``).
  """
  seg, src = batch["segment_ids"], batch["sources"]
  weights = batch["loss_weights"]
  # An example starts where the segment changes; a shared prompt prefix is no example.
  prev = np.pad(seg[:, :-1], ((0, 0), (1, 0)))
  prefix = (seg == 1) & (seg < 0).any(axis=1, keepdims=True)
  starts_any = (seg != prev) & (seg != 0) & ~prefix
  out = {}
  for name, sid in (SOURCE_IDS if ids is None else ids).items():
    mask = src == sid
    starts = mask & starts_any
    out[name] = {"examples": int(starts.sum()), "tokens": int(mask.sum()),
                 "target_tokens": int(weights[mask].sum())}
  return out


def _mean_example_tokens(ds: grain.MapDataset, n: int, flat: bool) -> float:
  lengths = []
  for i in range(n):
    item = ds[i]
    for ex in (item if flat else [item]):
      lengths.append(len(ex["tokens"]) - 1)
  return float(np.mean(lengths)) if lengths else 1.0


def span_prompt_prefix(tokenizer: Any) -> np.ndarray:
  """The tokens span examples start with: the prompt up to the span text (the common prefix
  of prompts for texts that start differently, so no token reaching into a text is in it)."""
  prompts = _prompts()
  probes = [prompts.encode_prompt(tokenizer, t) for t in ("A", "z", "1", "(", " x")]
  return probes[0][:prompts.shared_prefix_length(probes)].copy()


def _strip_prefix(example: Mapping[str, np.ndarray], prefix: np.ndarray,
                  stats: PipelineStats) -> dict[str, np.ndarray]:
  """A span example without `prefix` (``shared``: 1) or whole when it does not start with it
  or has a target inside it (``shared``: 0, counted)."""
  tokens, mask = example["tokens"], example["loss_mask"]
  n = len(prefix)
  if (len(tokens) > n + 1 and np.array_equal(tokens[:n], prefix)
      and not mask[:n + 1].any()):
    return {"tokens": tokens[n:], "loss_mask": mask[n:],
            "shared": np.ones(len(tokens) - n, np.int32)}
  stats.add(unshared_spans=1)
  return {**example, "shared": np.zeros(len(tokens), np.int32)}


def _prepend_prefix(row: Mapping[str, np.ndarray], prefix: np.ndarray,
                    source_id: int | None) -> dict[str, np.ndarray]:
  """A packed row of stripped span examples -> [prefix | row]: the prefix is segment 1 at
  positions 0.., each stripped example a negative segment whose positions continue after it
  (as if it followed its own copy), an example kept whole a positive segment from 0."""
  n = len(prefix)
  seg, pos = row["inputs_segment_ids"], row["inputs_positions"]
  shared = row["shared"].astype(bool) & (seg > 0)
  seg = np.where(seg > 0, seg + 1, 0)
  out = {"inputs": np.concatenate([prefix, row["inputs"]]),
         "targets": np.concatenate([prefix[1:], row["inputs"][:1], row["targets"]]),
         "loss_weights": np.concatenate([np.zeros(n, np.float32), row["loss_weights"]]),
         "segment_ids": np.concatenate([np.ones(n, np.int32),
                                        np.where(shared, -seg, seg)]).astype(np.int32),
         "positions": np.concatenate([np.arange(n), np.where(shared, pos + n, pos)]
                                     ).astype(np.int32)}
  if source_id is not None:
    out["sources"] = np.concatenate([np.full(n, source_id, np.int32), row["sources"]])
  return out


def _pack(ds: grain.IterDataset, features: Sequence[str], length: int, bins: int, seed: int
          ) -> grain.IterDataset:
  return grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={k: length for k in features}, num_packing_bins=bins, seed=seed,
      shuffle_bins=True)


def build_train_dataset(data_cfg: Any, tokenizer: Any, *, process_index: int = 0,
                        process_count: int = 1, documents: Sequence[Document] | None = None,
                        spans: Sequence[Span] | None = None, with_sources: bool = False,
                        ) -> tuple[grain.IterDataset, PipelineStats, dict[str, Any]]:
  """The training ``IterDataset`` (before background prefetch), its stats and a summary.

  The mixture's components come from ``jaxicd.data.mixture`` (``data.sources``, or the
  single-source keys: ``spans`` and ``documents``). ``documents``/``spans`` override loading
  the single-source keys' data (tests, benchmarks); only the ``train`` split of the documents is
  used. ``with_sources`` adds a ``sources`` feature (per token: the component's number,
  ``summary["source_ids"]``; 1 span, 2 document for the single-source keys; 0 padding) for
  measuring the mixture.
  """
  from jaxicd.data import mixture  # pylint: disable=g-import-not-at-top
  seq_len = int(cfg_get(data_cfg, "seq_len", 1024))
  overlap = int(cfg_get(data_cfg, "window_overlap", 128))
  answer_format = cfg_get(data_cfg, "answer_format", "code_first")
  seed = int(cfg_get(data_cfg, "shuffle_seed", 0))
  per_process_batch = _per_process_batch(data_cfg, process_count)
  parts = mixture.components(data_cfg, documents, spans)
  weights = {c.name: c.weight for c in parts}
  if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
    keys = ", ".join(f"{c.weight_key}={c.weight}" for c in parts)
    raise ValueError(f"mixture weights must be >= 0 with a positive sum: {keys}")
  for c in parts:
    if c.weight > 0 and not c.records:
      raise ValueError(f"{c.weight_key}={c.weight} but there are no training {c.kind} "
                       f"({mixture.describe_source(data_cfg, c.source)})")
  # Each component's place fixes its shuffle seed, its `sources` number and its cache keys.
  seeds = {c.name: seed + i for i, c in enumerate(parts)}
  source_ids = {c.name: i + 1 for i, c in enumerate(parts)}
  offsets = dict(zip(weights, np.cumsum([0] + [len(c.records) for c in parts[:-1]]).tolist()))
  kinds = {c.name: c.kind for c in parts}

  stats = PipelineStats()
  cache = _ExampleCache(int(cfg_get(data_cfg, "cache_tokens", 32_000_000)))
  read = _read_options(data_cfg)
  maps: dict[str, grain.MapDataset] = {}
  for c in parts:
    if c.weight <= 0:
      continue
    # Record indices are offset so that every component shares one cache.
    part_cache = _OffsetCache(cache, offset=offsets[c.name]) if offsets[c.name] else cache
    what = "spans" if c.kind == "spans" else "training documents"
    shard = _shard(len(c.records), process_index, process_count,
                   what if c.name in ("spans", "documents") else f"{what} of {c.name!r}")
    if c.kind == "spans":
      maps[c.name] = _span_examples(c.records, tokenizer, seq_len, seeds[c.name], shard, stats,
                                    part_cache, answer_format=answer_format)
    else:
      maps[c.name] = _document_examples(c.records, tokenizer, seq_len, overlap, seeds[c.name],
                                        shard, stats, part_cache, answer_format=answer_format)

  unit = cfg_get(data_cfg, "mixture_unit", "examples")
  example_weights = {k: weights[k] for k in maps}
  if unit == "tokens":
    # Token fractions -> example weights through each source's mean example length.
    mean_len = {k: _mean_example_tokens(v, 64, kinds[k] == "documents") for k, v in maps.items()}
    example_weights = {k: weights[k] / mean_len[k] for k in maps}
  elif unit != "examples":
    raise ValueError(f"data.mixture_unit={unit!r}: expected 'examples' or 'tokens'")

  share = bool(cfg_get(data_cfg, "share_prompt", False)) and "spans" in set(
      kinds[k] for k in maps)
  prefix = span_prompt_prefix(tokenizer) if share else np.zeros(0, np.int32)
  if share and len(prefix) >= seq_len // 2:
    raise ValueError(f"data.share_prompt: the {len(prefix)}-token prompt prefix leaves too "
                     f"little of data.seq_len={seq_len} for span examples")
  iters = {}
  for name, ds in maps.items():
    it = ds.to_iter_dataset(read)
    if kinds[name] == "documents":
      it = grain.experimental.FlatMapIterDataset(it, _Flatten())
    sid = source_ids[name] if with_sources else None
    if share and kinds[name] == "spans":
      it = it.map(lambda ex: _strip_prefix(ex, prefix, stats)).map(
          lambda ex, sid=sid: {**_shift(ex, sid), "shared": ex["shared"][1:]})
    else:
      it = it.map(lambda ex, sid=sid: _shift(ex, sid))
    iters[name] = it

  features = ["inputs", "targets", "loss_weights"] + (["sources"] if with_sources else [])
  # More bins leave less padding when ~1k-token windows meet ~60-token spans (bench/data.py:
  # 32 -> 128 bins took the 80/20 mix from 97.3% to 98.0% non-pad); rows are small, so cheap.
  bins = int(cfg_get(data_cfg, "pack_bins", 0)) or min(max(16 * per_process_batch, 64), 512)
  if not share:
    rows = _pack(_mix(iters, example_weights, kinds), features, seq_len, bins, seed
                 ).map(_rekey_packed)
  else:
    # Span and document components pack into rows of their own, mixed by their token weights
    # (rows are ~full, so a row weight is a token weight).
    packed = {}
    for name, it in iters.items():
      if kinds[name] == "spans":
        sid = source_ids[name] if with_sources else None
        packed[name] = _pack(it, features + ["shared"], seq_len - len(prefix), bins,
                             seeds[name]).map(lambda r, sid=sid: _prepend_prefix(r, prefix, sid))
      else:
        packed[name] = _pack(it, features, seq_len, bins, seeds[name]).map(_rekey_packed)
    token_weights = ({k: weights[k] for k in packed} if unit == "tokens" else
                     {k: weights[k] * _mean_example_tokens(maps[k], 64,
                                                           kinds[k] == "documents")
                      for k in packed})
    rows = _mix(packed, token_weights, kinds)
  batched = rows.batch(per_process_batch, drop_remainder=True)
  count = {k: len(c.records) for k, c in zip(weights, parts)}
  summary = {"seq_len": seq_len, "per_process_batch": per_process_batch,
             "share_prompt": share, "prompt_prefix_tokens": len(prefix),
             "train_documents": sum(n for k, n in count.items() if kinds[k] == "documents"),
             "spans": sum(n for k, n in count.items() if kinds[k] == "spans"),
             "weights": weights, "mixture_unit": unit, "example_weights": example_weights,
             "records": count, "source_ids": source_ids, "source_kinds": kinds,
             "pack_bins": bins, "process_index": process_index,
             "process_count": process_count}
  return batched, stats, summary


def _mix(streams: Mapping[str, grain.IterDataset], weights: Mapping[str, float],
         kinds: Mapping[str, str]) -> grain.IterDataset:
  """The streams mixed by weight, documents before spans in grain's order. The single-source
  components go by name ("documents", "spans": grain sorts them so), which keeps the
  checkpoints of earlier runs readable; named sources by position, so the mixture of an explicit
  config equal to the single-source keys is the same, bit for bit."""
  if len(streams) == 1:
    return next(iter(streams.values()))
  if set(streams) <= set(SOURCE_IDS):
    return grain.IterDataset.mix(dict(streams), dict(weights))
  order = sorted(streams, key=lambda name: kinds[name] != "documents")  # stable
  return grain.IterDataset.mix([streams[k] for k in order], [weights[k] for k in order])


class _OffsetCache:
  """A view of an ``_ExampleCache`` whose keys are shifted (second source, same budget)."""

  def __init__(self, cache: _ExampleCache, offset: int):
    self._cache, self._offset = cache, offset

  def get(self, index, compute, size):
    return self._cache.get(index + self._offset, compute, size)


def make_train_iterator(data_cfg: Any, tokenizer: Any, *, process_index: int = 0,
                        process_count: int = 1, documents: Sequence[Document] | None = None,
                        spans: Sequence[Span] | None = None, with_sources: bool = False,
                        prefetch: int = 2) -> grain.DatasetIterator:
  """Infinite iterator of packed batches ``[batch_size // process_count, seq_len]``.

  Yields dicts of numpy arrays: ``inputs`` int32, ``targets`` int32 (next token within each
  example), ``loss_weights`` float32 (1 on target tokens), ``segment_ids`` int32 (0 =
  padding, 1.. per packed example; with ``data.share_prompt`` span rows start with the shared
  prompt prefix as segment 1 and their examples are negative), ``positions`` int32 (restart
  at 0 per example; after the prefix for negative segments).
  ``get_state()``/``set_state()`` checkpoint it (JSON); ``.stats`` counts windows and
  truncations; ``.summary`` describes the mixture.
  """
  ds, stats, summary = build_train_dataset(
      data_cfg, tokenizer, process_index=process_index, process_count=process_count,
      documents=documents, spans=spans, with_sources=with_sources)
  if prefetch > 0:
    # Packing and batching run in a background thread while the jitted step runs.
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  it = iter(ds)
  it.stats = stats
  it.summary = summary
  if prefetch > 0:
    _close_at_exit(it)
  log.info("train pipeline: %s", summary)
  return it


def _close_at_exit(it: grain.DatasetIterator) -> None:
  """Stops the prefetch thread before interpreter teardown (else grain warns at exit)."""
  ref = weakref.ref(it)

  def close():
    target = ref()
    if target is not None:
      target.close()
      # grain's __del__ closes again during teardown, when module globals are gone.
      target.close = lambda: None

  atexit.register(close)


# ----------------------------------------------------------------------------- evaluation


def empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """An all-padding batch (segment 0, weight 0): a filler step that adds nothing."""
  return {k: np.zeros((rows, seq_len), np.float32 if k == "loss_weights" else np.int32)
          for k in BATCH_KEYS}


def pad_batch(batch: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """Pads a short batch to ``rows`` rows with all-padding rows (segment 0, weight 0)."""
  n = next(iter(batch.values())).shape[0]
  if n == rows:
    return dict(batch)
  return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def make_eval_iterator(data_cfg: Any, tokenizer: Any, split: str = "val", *,
                       source: str = "", process_index: int = 0, process_count: int = 1,
                       documents: Sequence[Document] | None = None,
                       spans: Sequence[Span] | None = None,
                       num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Finite, deterministic iterator over all windows of ``split`` documents (and ``spans``).

  Same batch format as training; no shuffling; packed in order; the last batch is padded
  with all-zero rows (segment_ids 0, loss_weights 0) so every batch has the same shape.
  ``num_batches`` fixes the length (cut, or padded with all-zero batches): processes of a
  multi-host run hold different shards and must all run the same number of eval steps.
  ``source`` names the ``data.sources`` entry read ("" = every document source, or
  ``data.source``; see ``jaxicd.data.mixture.documents``).
  """
  from jaxicd.data import mixture  # pylint: disable=g-import-not-at-top
  seq_len = int(cfg_get(data_cfg, "seq_len", 1024))
  overlap = int(cfg_get(data_cfg, "window_overlap", 128))
  answer_format = cfg_get(data_cfg, "answer_format", "code_first")
  per_process_batch = _per_process_batch(data_cfg, process_count)
  if documents is None:
    documents = mixture.documents(data_cfg, source)
  docs = [d for d in documents if d.split == split]
  spans = list(spans or ())
  if not docs and not spans:
    raise ValueError(f"no {split!r} documents to evaluate on "
                     f"({mixture.describe_source(data_cfg, source)})")
  stats = PipelineStats()
  cache = _ExampleCache(0)  # one pass: nothing to reuse
  parts = []
  if docs:
    shard = grain.MapDataset.range(len(docs))[process_index::process_count]
    parts.append(_document_examples(docs, tokenizer, seq_len, overlap, 0, shard, stats,
                                    cache, shuffle=False, repeat=False,
                                    answer_format=answer_format))
  if spans:
    shard = grain.MapDataset.range(len(spans))[process_index::process_count]
    parts.append(_span_examples(spans, tokenizer, seq_len, 0, shard, stats, cache,
                                shuffle=False, repeat=False,
                                answer_format=answer_format).map(lambda ex: [ex]))
  items = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
  ds = grain.experimental.FlatMapIterDataset(
      items.to_iter_dataset(grain.ReadOptions(num_threads=0)), _Flatten())
  ds = ds.map(lambda ex: _shift(ex, None))
  packed = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct={k: seq_len for k in ("inputs", "targets", "loss_weights")},
      num_packing_bins=per_process_batch, shuffle_bins=False)
  batched = (packed.map(_rekey_packed).batch(per_process_batch)
             .map(lambda b: pad_batch(b, per_process_batch)))
  it = iter(batched)
  it.stats = stats
  if num_batches is not None:
    return _FixedLength(it, num_batches, empty_batch(per_process_batch, seq_len), stats)
  return it


class _FixedLength:
  """Exactly ``n`` batches from ``it``: cut, or padded with copies of ``empty``."""

  def __init__(self, it: Iterator, n: int, empty: dict[str, np.ndarray], stats: PipelineStats):
    self._it, self._n, self._empty, self.stats = it, n, empty, stats
    self._done = 0
    self.padding_batches = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done >= self._n:
      raise StopIteration
    self._done += 1
    try:
      return next(self._it)
    except StopIteration:
      self.padding_batches += 1
      return {k: v.copy() for k, v in self._empty.items()}
