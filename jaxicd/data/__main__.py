"""Inspect a document source: ``python -m jaxicd.data --source=... --manual_dir=DIR --stats``.

Prints ONE JSON object on stdout: documents per split, evidence spans, distinct codes, invalid
codes, skipped and filtered records with reasons, and tokens per document (mean, p95) with the
configured tokenizer. It never prints note text. With ``--on_error=raise`` (the default) bad
input stops the run; the JSON then holds ``"error"`` (file and line) and the exit status is 1.
"""

from __future__ import annotations

import collections
import json
import math
import random
import sys
from typing import Sequence

from absl import app
from absl import flags

from jaxicd.data.records import Document, SkipReport
from jaxicd.data.sources import FILTERED, SOURCES, load_documents
from jaxicd.data.sources.common import ON_ERROR, MissingDataError

_SOURCE = flags.DEFINE_enum("source", "demo", SOURCES, "Document source to read.")
_MANUAL_DIR = flags.DEFINE_string(
    "manual_dir", "", "Folder holding the source's files (a .jsonl file or folder for jsonl).")
_STATS = flags.DEFINE_bool("stats", True, "Print statistics as one JSON object.")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", ON_ERROR,
                              "raise: stop at the first bad record; skip: count and go on.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "smollm2", "Tokenizer for token counts ('smollm2', a .gguf file, an HF "
    "tokenizer folder); 'none' skips token counts.")
_TOKEN_SAMPLE = flags.DEFINE_integer(
    "token_sample", 2000, "Measure tokens on at most this many documents (a seeded sample); "
    "0 measures all.")
_DEMO_SEED = flags.DEFINE_integer("demo_seed", 0, "Seed of the demo corpus.")
_SPLIT_FILE = flags.DEFINE_string("split_file", None, "mimic_iv: CSV hadm_id,split.")
_MIN_CODE_COUNT = flags.DEFINE_integer(
    "min_code_count", 0, "mimic_iv: drop codes with fewer occurrences (Edin et al. use 10).")
_SPLIT_DIR = flags.DEFINE_string("split_dir", None, "mdace: folder of split lists.")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
  """Linear-interpolation percentile (numpy's default) of already sorted values."""
  if not sorted_values:
    return 0.0
  pos = (len(sorted_values) - 1) * q / 100.0
  lo, hi = math.floor(pos), math.ceil(pos)
  return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def _summary(values: list[int]) -> dict:
  values = sorted(values)
  if not values:
    return {"count": 0}
  return {"count": len(values), "mean": round(sum(values) / len(values), 2),
          "p50": _percentile(values, 50), "p95": _percentile(values, 95), "max": values[-1]}


def token_stats(docs: Sequence[Document], tokenizer: str, sample: int) -> dict:
  """Tokens per document with ``tokenizer``; an explanation instead when it is unavailable."""
  out: dict = {"tokenizer": tokenizer}
  if tokenizer.lower() == "none":
    out["error"] = "not measured (--tokenizer=none)"
    return out
  try:
    # Optional (a failure is reported, not raised); loading tokenizers on use keeps --help fast.
    from jaxicd.model.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
    tok = load_tokenizer(tokenizer)
  except Exception as e:  # pylint: disable=broad-except
    # Token counts are a convenience: say why they are missing rather than fail the report.
    out["error"] = f"tokenizer unavailable: {type(e).__name__}: {e}"
    return out
  chosen = list(docs)
  if sample and len(chosen) > sample:
    chosen = random.Random(0).sample(chosen, sample)
  texts = [d.text for d in chosen]
  encode_batch = getattr(tok, "encode_batch", None)
  ids = encode_batch(texts) if encode_batch else [tok.encode(t) for t in texts]
  out["documents_measured"] = len(chosen)
  out.update(_summary([len(x) for x in ids]))
  return out


def compute_stats(docs: Sequence[Document], skips: SkipReport, *, tokenizer: str = "smollm2",
                  token_sample: int = 2000) -> dict:
  """The statistics object the CLI prints (counts, codes, reasons; never text)."""
  by_split = collections.Counter(d.split for d in docs)
  codes_by_split: dict[str, set[str]] = collections.defaultdict(set)
  for d in docs:
    codes_by_split[d.split].update(d.codes)
  all_codes = set().union(*codes_by_split.values()) if codes_by_split else set()
  train_codes = codes_by_split.get("train", set())
  errors = {k: v for k, v in skips.counts.items() if not k.startswith(FILTERED)}
  filtered = {k[len(FILTERED):]: v for k, v in skips.counts.items() if k.startswith(FILTERED)}
  return {
      "documents": {"total": len(docs), "by_split": dict(sorted(by_split.items()))},
      "documents_without_codes": sum(1 for d in docs if not d.codes),
      "documents_with_evidence": sum(1 for d in docs if d.evidence),
      "evidence_spans": sum(len(d.evidence) for d in docs),
      "code_assignments": sum(len(d.codes) for d in docs),
      "distinct_codes": {
          "total": len(all_codes),
          "by_split": {s: len(c) for s, c in sorted(codes_by_split.items())},
          "only_outside_train": len(all_codes - train_codes),
      },
      "invalid_codes": {"distinct": len(skips.invalid_codes),
                        "occurrences": sum(skips.invalid_codes.values()),
                        "codes": dict(sorted(skips.invalid_codes.items()))},
      "skipped": {"total": sum(errors.values()), "by_reason": errors,
                  "examples": {k: v for k, v in skips.examples.items() if k in errors}},
      "filtered": {"total": sum(filtered.values()), "by_reason": filtered,
                   "examples": {k[len(FILTERED):]: v for k, v in skips.examples.items()
                                if k.startswith(FILTERED)}},
      "characters_per_document": _summary([len(d.text) for d in docs]),
      "tokens_per_document": token_stats(docs, tokenizer, token_sample),
  }


def _reader_options() -> dict:
  source = _SOURCE.value
  options = {}
  if source == "mimic_iv":
    if _SPLIT_FILE.value:
      options["split_file"] = _SPLIT_FILE.value
    options["min_code_count"] = _MIN_CODE_COUNT.value
  elif source == "mdace" and _SPLIT_DIR.value:
    options["split_dir"] = _SPLIT_DIR.value
  return options


def _emit(obj: dict) -> None:
  sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
  sys.stdout.flush()


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _STATS.value:
    raise app.UsageError("nothing to do: pass --stats")
  header = {"source": _SOURCE.value, "manual_dir": _MANUAL_DIR.value,
            "on_error": _ON_ERROR.value}
  skips = SkipReport()
  try:
    docs = load_documents(_SOURCE.value, _MANUAL_DIR.value, on_error=_ON_ERROR.value,
                          skips=skips, demo_seed=_DEMO_SEED.value, **_reader_options())
  except (ValueError, FileNotFoundError, MissingDataError) as e:
    # RecordError is a ValueError; its message names file and line, never note text.
    _emit({**header, "error": f"{type(e).__name__}: {e}",
           "skipped_before_error": skips.as_dict()})
    sys.exit(1)
  _emit({**header, **compute_stats(docs, skips, tokenizer=_TOKENIZER.value,
                                   token_sample=_TOKEN_SAMPLE.value)})


if __name__ == "__main__":
  app.run(main)
