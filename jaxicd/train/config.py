"""The run configuration schema (ml_collections) shared by every file in ``configs/``, and its
checks.

``configs/*.py`` start from ``base_config()`` and change what their recipe needs; any key can be
overridden on the command line (``--config.train.steps=100``). ``jaxicd.main`` refuses a config
that cannot work before it writes anything: `validate` (keys and values) and, for train and eval,
`validate_data` (against the tokenizer and the documents).
"""

from __future__ import annotations

import difflib
import pathlib
from typing import Any, Sequence

import ml_collections

from jaxicd.errors import ConfigError
from jaxicd.model.config import LORA_TARGETS

SPLITS = ("train", "val", "test")
# Sections whose keys are free-form (not checked against the schema).
FREE_FORM = ("model.overrides",)
# The longest form of an ICD-10-CM code (7 characters and the dot): the seq_len bound's answer.
_LONGEST_CODE = "S72.001A"


def base_config() -> ml_collections.ConfigDict:
  """Every key the code reads, with its default: configs/ change values, never add keys."""
  config = ml_collections.ConfigDict()
  config.mode = "train"              # train | eval | predict | export | plan
  config.seed = 0                    # initialisation of the adapters (and dropout)
  # Extra XLA flags for the CPU backend, added to $XLA_FLAGS by jaxicd.main before JAX starts
  # (e.g. "--xla_cpu_use_onednn=true"; with jax 0.12 it made SmolLM2's bf16 CPU training slower).
  config.cpu_xla_flags = ""
  # JAX's persistent compilation cache, so that a second run (eval after train, predict) reuses
  # the compiled decode loops and steps: "auto" = $XDG_CACHE_HOME/jaxicd/jax (~/.cache/...),
  # "" = off, else a directory. Trusted like code: keep it private to you.
  config.compilation_cache_dir = "auto"
  # mode=predict: the notes to code (a .txt note, a .jsonl of documents or a directory of .txt
  # notes) and the JSONL written ("" = <workdir>/predictions.jsonl); see jaxicd.infer.predict.
  # mode=export writes to `output` too ("" = <workdir>/export).
  config.input = ""
  config.output = ""
  config.report = ""                 # HTML report: "" = report.html beside the output; "none"
  config.allow_untrained = False     # predict without a checkpoint (base model, untrained adapters)
  config.max_note_chars = 200_000    # predict refuses longer notes (0 = no limit)
  # Sharding rules ((logical axis, mesh axis), ...); () = sharding.DEFAULT_RULES.
  config.rules = ()

  config.model = ml_collections.ConfigDict(dict(
      # Base model: "smollm2" (embedded), a preset name (random init), a .gguf file or an HF dir.
      source="smollm2",
      tokenizer="",                  # "" = the source's own tokenizer
      dtype="float32",               # compute dtype: float32 | bfloat16
      param_dtype="float32",         # storage dtype of the frozen base weights
      remat="none",                  # none | full | dots
      # mode=plan: LlamaConfig fields replaced in the source's shapes (e.g. num_layers=2).
      overrides={},
  ))
  config.lora = ml_collections.ConfigDict(dict(
      rank=16,                       # adapter rank
      alpha=32.0,                    # scale alpha / rank
      dropout=0.0,                   # dropout on the adapter input (training only)
      targets=LORA_TARGETS))         # projections with adapters (model.config.LORA_TARGETS)

  # Read by jaxicd.data.pipeline (make_train_iterator / make_eval_iterator) and data.windows.
  config.data = ml_collections.ConfigDict(dict(
      source="demo",                 # demo | jsonl | codiesp | mdace | mimic_iv (data/sources)
      manual_dir="",                 # where a source's files are ("" for demo)
      demo_seed=0,                   # seed of the generated demo corpus
      code_space="demo",             # all | demo | a file of codes (data.demo.code_space)
      spans_per_code=8,              # expansion spans per code of the code space (0 = none)
      negatives=True,                # also negative spans (answer NONE)
      annotated_spans=True,          # training documents' gold evidence as span examples
      span_weight=0.8,               # share of span examples in the training mixture
      doc_weight=0.2,                # share of document windows in the training mixture
      mixture_unit="examples",       # the weights count examples | tokens
      seq_len=1024,                  # tokens per row (a window's example fits it)
      window_overlap=128,            # tokens shared by consecutive windows of a note
      # Span examples share one copy of their prompt prefix per packed row (the same loss and
      # gradients, ~3x fewer tokens per span example; jaxicd.data.pipeline).
      share_prompt=False,
      # Answer lines: "evidence_first" (quote copied from the note, then its code) or
      # "code_first" (code, then quote); see jaxicd.data.prompts. Training and inference agree.
      answer_format="evidence_first",
      batch_size=8,                  # global batch (rows); each process reads its share
      shuffle_seed=0,                # seed of the record order (and of packing)
      on_error="raise",              # a malformed record: raise | skip (counted)
      data_dir="",                   # TFDS cache directory ("" = read the source directly)
      num_threads=2,                 # grain threads encoding records
      span_files="",                 # users' own span JSONL files, comma-separated
      expansion_seed=0,              # seed of the code-space span expansion
      cache_tokens=32_000_000,       # encoded examples kept for later epochs (tokens)
      pack_bins=0,                   # first-fit packing bins (0: from the batch size)
      read_buffer=16,                # grain prefetch buffer per source
      # Named sources mixed in one run, each a source_config() entry (jaxicd.data.mixture); when
      # set, source, manual_dir, span/doc weights and the span keys above are not used.
      sources=ml_collections.ConfigDict()))

  config.train = ml_collections.ConfigDict(dict(
      steps=100,                     # optimizer steps
      lr=2e-4,                       # peak learning rate
      warmup_steps=10,               # linear warmup, then cosine decay
      final_lr_fraction=0.1,         # the decay ends at lr * final_lr_fraction
      weight_decay=0.0,              # AdamW weight decay
      b1=0.9,                        # AdamW beta1
      b2=0.999,                      # AdamW beta2
      eps=1e-8,                      # AdamW epsilon
      clip_norm=1.0,                 # global gradient norm clip (0 = none)
      grad_accum=1,                  # microbatches per optimizer step (same global batch each)
      log_every=10,                  # steps between progress lines
      eval_every=0,                  # steps between validation losses (0 = at the end only)
      eval_batches=4,                # validation batches per evaluation (0 = no val loss)
      eval_at_start=False,           # val loss before the first step of a fresh run
      # The loss eval's documents: a data.sources name ("" = every document source, or
      # data.source) and its split.
      eval_source="", eval_split="val"))

  # Coding metrics (micro/macro/unseen-code F1, evidence F1) on the first `documents` notes of
  # `split`, decoded with the current adapters at every evaluation; 0 turns it off.
  config.eval_coding = ml_collections.ConfigDict(dict(
      documents=0,                   # notes coded per evaluation (0 = no coding metrics)
      split="val",                   # train | val | test
      max_new_tokens=96,             # answer budget per window
      batch_size=8,                  # windows per generation call
      constrained=True,              # decode only codes of the code space (infer.grammar)
      source="",                     # a data.sources name ("" = every document source)
      unique_codes=True,             # constrained: each code at most once per answer
      spans=0,                       # also code N gold evidence spans of the split one by one
      # Re-code each evidence span the document pass found with the span prompt; its code and
      # probability replace the document pass's (jaxicd.infer.coder).
      recode=True,
      recode_batch_size=32,          # spans per re-coding call
      # Also code every clause of the note with the span prompt (the segment scan: evidence the
      # document pass misses, e.g. in note styles the training documents never showed).
      scan=False,
      # "" decodes with the trained model as it is; a dtype decodes with a copy in that dtype
      # with the adapters folded into the base (a CPU without bf16 units: "float32").
      dtype="",
      # Keep codes scored >= threshold; negative: the workdir's calibration.json (none: keep all).
      threshold=-1.0,
      calibrate=False,               # choose the threshold on these notes (on split val only)
      at_start=False))               # also code before training (zero-shot)

  # Devices per mesh axis; -1 takes the devices the others leave.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # mode=plan (jaxicd.cost_model): tokens, FLOPs, hours and HBM per chip of this config on
  # `chips` x `accelerator` (v4, v5e, v5p, v6e, a100, h100, h200; 0 chips = the mesh's size)
  # at `mfu`, and the cost of coding notes of `note_tokens` tokens (() = the data's mean) with
  # `codes_per_note` evidence spans re-coded (negative = the data's codes per document).
  # Token statistics come from up to `sample_documents` documents per split and `sample_spans`
  # spans (0 = all), packing from `packing_batches` batches; data=False skips the data.
  config.plan = ml_collections.ConfigDict(dict(
      accelerator="v5e", chips=0, mfu=0.45, note_tokens=(), codes_per_note=-1.0, data=True,
      sample_documents=64, sample_spans=2000, packing_batches=2))
  # Multi-host: jax.distributed.initialize() (TPU pods discover the rest themselves); the
  # coordinator, process count and id ("" / -1 = discovered) for other clusters.
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=-1, process_id=-1))
  config.checkpoint = ml_collections.ConfigDict(dict(
      every=100,                     # steps between checkpoints (0 = only at the end)
      keep=3,                        # checkpoints kept
      async_save=True,               # write in the background while training goes on
      directory=""))                 # "" = <workdir>/checkpoints; multi-host: shared (gs://...)
  return config


def source_config(**values: Any) -> ml_collections.ConfigDict:
  """One entry of ``config.data.sources`` (jaxicd.data.mixture); ``values`` override defaults,
  ``options``/``splits`` given as dicts."""
  entry = ml_collections.ConfigDict(dict(
      reader="",                     # demo | mimic_iv | mdace | codiesp | jsonl | expansion | span_jsonl
      manual_dir="",                 # the reader's files (span_jsonl: the .jsonl file)
      # Reader options (mixture.READER_OPTIONS): split_file, min_code_count (mimic_iv);
      # split_dir, annotation_dir (mdace); demo_seed (demo); code_space, spans_per_code,
      # negatives, seed (expansion).
      options=ml_collections.ConfigDict(),
      role="documents",              # documents | spans (its spans or gold evidence) | both
      weight=0.0,                    # mixture weight of its documents (role spans: its spans)
      span_weight=0.0,               # role both: mixture weight of its evidence spans
      pool="",                       # a span source whose examples its spans join, at its weight
      # The source's split feeding each split of the run ("" = none).
      splits=ml_collections.ConfigDict(dict(train="train", val="val", test="test")),
      fraction=1.0))                 # of its training documents used, evenly spread
  entry.options.update(values.pop("options", None) or {})
  entry.splits.update(values.pop("splits", None) or {})
  entry.update(values)
  return entry


def checkpoint_directory(config: Any, workdir) -> str:
  """Where the run's checkpoints live: ``checkpoint.directory``, else ``<workdir>/checkpoints``."""
  return str(config.checkpoint.directory or pathlib.Path(workdir) / "checkpoints")


# --- checks -------------------------------------------------------------------------------------


def _unknown_keys(config: Any, schema: Any, prefix: str) -> list[str]:
  problems = []
  valid = sorted(schema)
  for key in config:
    name = f"{prefix}.{key}" if prefix else key
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      problems.append(f"config.{name}: unknown key{hint}; valid keys of "
                      f"config{'.' + prefix if prefix else ''}: {', '.join(valid)}")
    elif name == "data.sources":  # named entries, each with the keys of source_config()
      for entry in config[key]:
        if not isinstance(config[key][entry], (ml_collections.ConfigDict, dict)):
          problems.append(f"config.{name}.{entry} must be a section made by source_config(), "
                          f"got {config[key][entry]!r}")
          continue
        template = source_config()
        del template["options"]  # reader options: checked against the reader
        problems.extend(_unknown_keys({k: v for k, v in config[key][entry].items()
                                       if k != "options"}, template, f"{name}.{entry}"))
    elif isinstance(schema.get(key), ml_collections.ConfigDict) and name not in FREE_FORM:
      if not isinstance(config[key], (ml_collections.ConfigDict, dict)):
        problems.append(f"config.{name} must be a section with keys "
                        f"{', '.join(sorted(schema[key]))}, got {config[key]!r}")
      else:
        problems.extend(_unknown_keys(config[key], schema[key], name))
  return problems


def _at_least(config: Any, key: str, low: float, *, strict: bool = False) -> None:
  section, name = key.split(".")
  value = config[section][name]
  if value < low or (strict and value == low):
    raise ConfigError(f"config.{key}={value!r}: must be {'>' if strict else '>='} {low}")


def _one_of(config: Any, key: str, choices: Sequence[str]) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r}: choose one of {', '.join(choices)}")


def validate(config: Any) -> None:
  """Refuses keys the schema lacks and values that cannot work (`ConfigError` naming the key).

  Needs no data or tokenizer: ``jaxicd.main`` runs it first in every mode. What the mode does
  not use is not checked (e.g. ``train.steps`` in predict mode).
  """
  from jaxicd.data.prompts import ANSWER_FORMATS  # pylint: disable=import-outside-toplevel
  problems = _unknown_keys(config, base_config(), "")
  if problems:
    raise ConfigError("\n".join(problems))
  mode = config.mode
  _at_least(config, "lora.rank", 1)
  if not 0.0 <= config.lora.dropout < 1.0:
    raise ConfigError(f"config.lora.dropout={config.lora.dropout!r}: must be in [0, 1)")
  unknown = [t for t in config.lora.targets if t not in LORA_TARGETS]
  if unknown or not config.lora.targets:
    raise ConfigError(f"config.lora.targets={tuple(config.lora.targets)!r}: choose one or more "
                      f"of {', '.join(LORA_TARGETS)}")
  for key in ("data.seq_len", "data.batch_size"):
    _at_least(config, key, 1)
  for key in ("data.window_overlap", "data.spans_per_code"):
    _at_least(config, key, 0)
  _one_of(config, "data.answer_format", ANSWER_FORMATS)
  _one_of(config, "eval_coding.split", SPLITS)
  _one_of(config, "train.eval_split", SPLITS)
  if mode == "train":
    for key in ("train.steps", "train.grad_accum"):
      _at_least(config, key, 1)
    for key in ("train.warmup_steps", "train.eval_every", "train.eval_batches",
                "checkpoint.every"):
      _at_least(config, key, 0)
    _at_least(config, "train.lr", 0, strict=True)
    _one_of(config, "data.mixture_unit", ("examples", "tokens"))
    for key in ("data.span_weight", "data.doc_weight"):
      _at_least(config, key, 0)
    if not config.data.sources and config.data.span_weight + config.data.doc_weight <= 0:
      raise ConfigError(f"config.data.span_weight={config.data.span_weight!r}, "
                        f"config.data.doc_weight={config.data.doc_weight!r}: at least one must "
                        "be > 0")
  _check_sources(config)
  if _codes_notes(config):
    _at_least(config, "eval_coding.max_new_tokens", 1)
    if config.eval_coding.max_new_tokens >= config.data.seq_len:
      raise ConfigError(f"config.eval_coding.max_new_tokens={config.eval_coding.max_new_tokens} "
                        f"leaves no room for a prompt in config.data.seq_len="
                        f"{config.data.seq_len}")


def _check_sources(config: Any) -> None:
  """The entries of ``data.sources`` and the sources that evaluation names."""
  # pylint: disable=import-outside-toplevel
  from jaxicd.data.mixture import (DOCUMENT_READERS, READER_OPTIONS, READERS, ROLES,
                                   SPAN_READERS)
  sources = config.data.sources
  named = {"train.eval_source": config.train.eval_source,
           "eval_coding.source": config.eval_coding.source}
  if not sources:
    for key, value in named.items():
      if value:
        raise ConfigError(f"config.{key}={value!r} names a source, but config.data.sources is "
                          "empty (one source: data.source)")
    return
  for key, default in (("source", "demo"), ("manual_dir", "")):
    if config.data[key] != default:
      raise ConfigError(f"config.data.{key}={config.data[key]!r} is not used when "
                        "config.data.sources is set: give each source its own reader and "
                        "manual_dir")
  for name in sources:
    entry, key = sources[name], f"config.data.sources.{name}"
    if entry.reader not in READERS:
      raise ConfigError(f"{key}.reader={entry.reader!r}: choose one of {', '.join(READERS)}")
    if entry.role not in ROLES:
      raise ConfigError(f"{key}.role={entry.role!r}: choose one of {', '.join(ROLES)}")
    if entry.reader in SPAN_READERS and entry.role != "spans":
      raise ConfigError(f"{key}.role={entry.role!r}: reader {entry.reader!r} gives spans only; "
                        "set role='spans'")
    if entry.reader not in ("demo", "expansion") and not entry.manual_dir:
      raise ConfigError(f"{key}.manual_dir is empty: reader {entry.reader!r} reads files from "
                        "it")
    unknown = sorted(set(entry.options or {}) - set(READER_OPTIONS[entry.reader]))
    if unknown:
      raise ConfigError(f"{key}.options: {', '.join(unknown)} unknown to reader "
                        f"{entry.reader!r} (it takes: "
                        f"{', '.join(READER_OPTIONS[entry.reader]) or 'no options'})")
    for field in ("weight", "span_weight"):
      if entry[field] < 0:
        raise ConfigError(f"{key}.{field}={entry[field]!r}: must be >= 0")
    if entry.span_weight > 0 and entry.role != "both":
      raise ConfigError(f"{key}.span_weight={entry.span_weight!r} is for role='both'; with "
                        f"role={entry.role!r} set {key}.weight")
    if not 0 < entry.fraction <= 1:
      raise ConfigError(f"{key}.fraction={entry.fraction!r}: must be in (0, 1]")
    for split in SPLITS:
      if entry.splits[split] not in SPLITS + ("",):
        raise ConfigError(f"{key}.splits.{split}={entry.splits[split]!r}: choose one of "
                          f"{', '.join(SPLITS)} or '' (none)")
    if entry.pool:
      target = sources.get(entry.pool)
      if entry.role == "documents":
        raise ConfigError(f"{key}.pool={entry.pool!r}: role='documents' gives no spans to pool")
      if target is None or target.role == "documents" or target.pool or entry.pool == name:
        raise ConfigError(f"{key}.pool={entry.pool!r}: must name another source that gives "
                          "spans of its own (role spans or both, no pool)")
      unused = "weight" if entry.role == "spans" else "span_weight"
      if entry[unused] > 0:
        raise ConfigError(f"{key}.{unused}={entry[unused]!r} is unused: its spans join "
                          f"{entry.pool!r} at that source's weight; set it to 0")
  documents = [n for n in sources if sources[n].reader in DOCUMENT_READERS]
  for key, value in named.items():
    if value and value not in documents:
      raise ConfigError(f"config.{key}={value!r}: no document source of that name in "
                        f"config.data.sources ({', '.join(documents) or 'none'})")
  if config.mode == "train" and not any(sources[n].weight + sources[n].span_weight > 0
                                        for n in sources):
    raise ConfigError("config.data.sources: every weight is 0; give at least one source a "
                      "weight > 0")


def _codes_notes(config: Any) -> bool:
  """Whether the run decodes answers (predict, or coding metrics in train / eval)."""
  return config.mode == "predict" or (config.mode in ("train", "eval")
                                      and config.eval_coding.documents > 0)


def _splits(documents: Sequence[Any]) -> str:
  present = {d.split for d in documents}
  return ", ".join(s for s in SPLITS if s in present) or "no documents"


def validate_data(config: Any, tokenizer: Any, documents: Sequence[Any]) -> None:
  """The checks of a train or eval run that need its tokenizer and documents: room in
  ``data.seq_len`` for a prompt and an answer, a source for every weighted part of the training
  mixture, and the splits that evaluation reads."""
  # pylint: disable=import-outside-toplevel
  from jaxicd.data import pipeline, prompts
  data, mode = config.data, config.mode
  # The shortest example that teaches anything: no note text, one code without a quote. A
  # shifted example of n tokens fills n - 1 positions.
  needed = len(prompts.encode_target(tokenizer, "", [prompts.TargetLine(_LONGEST_CODE)],
                                     data.answer_format)["tokens"])
  if data.seq_len < needed - 1:
    raise ConfigError(
        f"config.data.seq_len={data.seq_len} is too short: the prompt with an empty note and a "
        f"one-code answer (data.answer_format={data.answer_format!r}) takes {needed} tokens; "
        f"set config.data.seq_len >= {needed - 1} (notes and quotes need more)")
  if data.sources:
    _validate_sources_data(config)
    return
  source = f"data.source={data.source!r}"
  if mode == "train" and data.span_weight > 0 and not (
      data.spans_per_code > 0 or data.span_files
      or (data.annotated_spans and pipeline.annotated_spans(documents))):
    why = ("data.annotated_spans=False and no data.span_files" if not data.annotated_spans else
           f"no data.span_files, and the 'train' documents of {source} have no evidence to "
           "make annotated spans")
    raise ConfigError(f"config.data.span_weight={data.span_weight!r} but there is no span "
                      f"source: data.spans_per_code={data.spans_per_code}, {why}; set "
                      "config.data.span_weight=0 to train on documents only")
  if mode == "train" and data.doc_weight > 0 and not any(d.split == "train" for d in documents):
    raise ConfigError(f"config.data.doc_weight={data.doc_weight!r} but {source} has no 'train' "
                      f"documents (it has {_splits(documents)}); set config.data.doc_weight=0 "
                      "to train on spans only")
  if mode == "eval":
    loss_keys, fix = ["config.mode='eval'"], "evaluate a source that has them"
  else:
    loss_keys = [f"config.train.{k}={config.train[k]!r}"
                 for k in ("eval_batches", "eval_every", "eval_at_start") if config.train[k]]
    fix = ("set config.train.eval_batches=0, eval_every=0 and eval_at_start=False to train "
           "without it")
  if loss_keys and not any(d.split == "val" for d in documents):
    raise ConfigError(f"no 'val' documents in {source} (it has {_splits(documents)}), but "
                      f"validation loss needs them ({', '.join(loss_keys)}); {fix}")
  split = config.eval_coding.split
  if _codes_notes(config) and not any(d.split == split for d in documents):
    raise ConfigError(f"no {split!r} documents in {source} (it has {_splits(documents)}), but "
                      f"coding metrics need them (config.eval_coding.split={split!r}, "
                      f"config.eval_coding.documents={config.eval_coding.documents}); set "
                      "config.eval_coding.documents=0 to turn coding off")


def _validate_sources_data(config: Any) -> None:
  """`validate_data` for named sources: every weighted component has records, and the sources
  and splits that evaluation names have documents."""
  from jaxicd.data import mixture  # pylint: disable=import-outside-toplevel
  data, mode = config.data, config.mode
  if mode == "train":
    for part in mixture.components(data):
      if part.weight > 0 and not part.records:
        entry = data.sources[part.source]
        where = (f"its split mapping train={entry.splits.train!r}, fraction={entry.fraction!r}"
                 if part.kind == "documents" or entry.reader in mixture.DOCUMENT_READERS
                 else f"reader {entry.reader!r}")
        raise ConfigError(f"config.{part.weight_key}={part.weight!r} but source "
                          f"{part.source!r} gives no training {part.kind} ({where}); set it to 0")
  checks = [("eval_coding", config.eval_coding.source, config.eval_coding.split,
             _codes_notes(config), "coding metrics", "config.eval_coding.documents=0")]
  loss = mode == "eval" or any(config.train[k] for k in ("eval_batches", "eval_every",
                                                        "eval_at_start"))
  checks.append(("train", config.train.eval_source, config.train.eval_split, loss,
                 "the validation loss", "config.train.eval_batches=0, eval_every=0 and "
                 "eval_at_start=False"))
  for section, source, split, needed, what, off in checks:
    if needed and not any(d.split == split for d in mixture.documents(data, source)):
      key = "source" if section == "eval_coding" else "eval_source"
      raise ConfigError(f"no {split!r} documents in {mixture.describe_source(data, source)} "
                        f"(config.{section}.{key}={source!r}), but {what} need them; name a "
                        f"source whose splits map to {split!r}, or set {off}")
