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
Documents too long for ``seq_len`` become overlapping windows (``jaxicd.data.windows``); what
could not fit is truncated and counted in ``PipelineStats``.

``data_cfg`` is a run config's ``config.data``: ``jaxicd.train.config.base_config()`` holds every
key read here, with its default.

The returned iterators are grain ``DatasetIterator``s: ``get_state()``/``set_state()`` give
JSON-serialisable states, so ``grain.checkpoint.CheckpointSave/Restore`` work with Orbax.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grain
import numpy as np

from jaxicd.data import demo, expansion, prompts, sources
from jaxicd.data.records import Document, Span, SkipReport
from jaxicd.data.windows import PipelineStats, document_windows, encode_span

log = logging.getLogger(__name__)

# Values of the optional per-token ``sources`` feature (0 stays padding).
SOURCE_IDS = {"spans": 1, "documents": 2}
BATCH_KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")


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
  return read_source(data_cfg.source, data_cfg.manual_dir, on_error=data_cfg.on_error,
                     demo_seed=int(data_cfg.demo_seed), data_dir=data_cfg.data_dir, skips=skips)


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
    # Imported on use: tensorflow_datasets is heavy and only the TFDS cache needs it.
    from jaxicd.data import tfds_builders  # pylint: disable=g-import-not-at-top
    return tuple(tfds_builders.load_documents(source, data_dir=data_dir, manual_dir=manual_dir,
                                              demo_seed=demo_seed, on_error=on_error,
                                              options=dict(options)))
  return tuple(sources.load_documents(source, manual_dir, on_error=on_error, skips=skips,
                                      demo_seed=demo_seed, **dict(options)))


@functools.lru_cache(maxsize=4)
def expansion_spans(code_space: str, *, max_per_code: int, negatives: bool, seed: int,
                    data_dir: str = "") -> tuple[Span, ...]:
  """The code-system expansion spans of ``code_space`` (through the TFDS cache with
  ``data_dir``), memoised: the full code space takes a while to expand."""
  kwargs = dict(seed=seed, max_per_code=max_per_code, negatives=negatives)
  if data_dir:
    # Imported on use: tensorflow_datasets is heavy and only the TFDS cache needs it.
    from jaxicd.data import tfds_builders  # pylint: disable=g-import-not-at-top
    return tuple(tfds_builders.load_spans(code_space, data_dir=data_dir, **kwargs))
  return tuple(expansion.expand(demo.code_space(code_space), **kwargs).spans)


def load_spans(data_cfg: Any, documents: Sequence[Document] = ()) -> list[Span]:
  """Expansion spans of ``data.code_space``, annotated training spans (if enabled) and the
  spans of ``data.span_files`` (JSONL paths, a list or comma-separated; optional)."""
  spans: list[Span] = []
  if int(data_cfg.spans_per_code) > 0:
    spans.extend(expansion_spans(
        data_cfg.code_space, max_per_code=int(data_cfg.spans_per_code),
        negatives=bool(data_cfg.negatives), seed=int(data_cfg.expansion_seed),
        data_dir=data_cfg.data_dir))
  if data_cfg.annotated_spans:
    spans.extend(annotated_spans(documents))
  span_files = data_cfg.span_files or ()
  if isinstance(span_files, str):
    span_files = [f for f in span_files.split(",") if f]
  if span_files:
    for path in span_files:  # users' own spans (JSONL), e.g. synthesized by an LLM
      spans.extend(sources.read_spans(path, on_error=data_cfg.on_error))
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
  batch = int(data_cfg.batch_size)
  if batch % process_count:
    raise ValueError(f"data.batch_size={batch} is not divisible by process_count="
                     f"{process_count}")
  return batch // process_count


def _read_options(data_cfg: Any) -> grain.ReadOptions:
  # Encoding is Python + Rust tokenizer work: a couple of threads overlap it with the
  # training step without fighting it for the (few) cores.
  return grain.ReadOptions(num_threads=int(data_cfg.num_threads),
                           prefetch_buffer_size=int(data_cfg.read_buffer))


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
  # Imported on use: jaxicd.data.mixture imports this module.
  from jaxicd.data import mixture  # pylint: disable=g-import-not-at-top
  seq_len = int(data_cfg.seq_len)
  overlap = int(data_cfg.window_overlap)
  answer_format = data_cfg.answer_format
  seed = int(data_cfg.shuffle_seed)
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
  cache = _ExampleCache(int(data_cfg.cache_tokens))
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

  unit = data_cfg.mixture_unit
  example_weights = {k: weights[k] for k in maps}
  if unit == "tokens":
    # Token fractions -> example weights through each source's mean example length.
    mean_len = {k: _mean_example_tokens(v, 64, kinds[k] == "documents") for k, v in maps.items()}
    example_weights = {k: weights[k] / mean_len[k] for k in maps}
  elif unit != "examples":
    raise ValueError(f"data.mixture_unit={unit!r}: expected 'examples' or 'tokens'")

  share = bool(data_cfg.share_prompt) and "spans" in {kinds[k] for k in maps}
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
  bins = int(data_cfg.pack_bins) or min(max(16 * per_process_batch, 64), 512)
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
  # Imported on use: jaxicd.data.mixture imports this module.
  from jaxicd.data import mixture  # pylint: disable=g-import-not-at-top
  seq_len = int(data_cfg.seq_len)
  overlap = int(data_cfg.window_overlap)
  answer_format = data_cfg.answer_format
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
