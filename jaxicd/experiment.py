"""The headline experiment: does Code-Centric Learning code whole notes better than document SFT?

  python -m jaxicd.experiment            # make experiment: every arm, then docs/results.*
  python -m jaxicd.experiment --quick    # the same pipeline at toy sizes (minutes)

Arms, all SmolLM2-135M-Instruct with LoRA on the demo corpus, one training budget (``--steps``
optimizer steps of 4 x 256 packed tokens, the recipe of ``configs/mixed.py`` otherwise):

* ``zero_shot``: untrained adapters (the constrained grammar alone).
* ``doc_only``: document SFT on twice the budget (``DOC_ONLY_BUDGET``): it learns slower than
  the span recipes and still gained at the end of one budget; checkpoints at each quarter, the
  one with the best validation micro-F1 is evaluated ("trained to its best validation F1"), and
  its tokens are those up to that checkpoint.
* ``span_only``: expansion + annotated spans, no documents.
* ``mixed``: Code-Centric Learning (spans + a few documents), evidence-first answers.
* ``mixed_20``: mixed at 20% of document SFT's budget of tokens (the paper's cost claim), in steps
  of 2 rows whose span examples share one copy of the prompt (``data.share_prompt``);
  ``mixed_20_unshared`` the same tokens in 4-row steps without sharing; ``mixed_30`` at 28% of
  them, as 2-row shared steps: under the coding-quality issue's bound of 30% of document SFT's
  tokens once packing (document SFT fills ~94% of its rows) is counted. The report checks each
  one's tokens against the tokens of the document-only checkpoint it is compared with.
* ``mixed_code_first``: mixed with the older code-first answer lines (the format comparison).

Each trained arm is evaluated the same way: the document pass codes the first ``--val`` val
notes and every test note; the inference variants (document pass alone, with span re-coding, or
re-coding plus the segment scan, each with every candidate kept or with the threshold
calibrated on the val notes) are scored on the test notes with the same metrics
(`jaxicd.eval.metrics`, strict unseen-code scores; micro-F1 also per note style of the demo
corpus), every gold evidence span of the test notes is coded alone (span accuracy), and the
hand-written held-out notes are coded with the arm's best calibrated variant.

Every piece is resumable: an arm's training runs as ``python -m jaxicd.main`` in
``<workdir>/<arm>`` (a finished checkpoint is reused) and its evaluation is stored in
``<workdir>/<arm>/result.json`` (reused on rerun). The report is ``<out>/results.md``,
``<out>/results.json`` and ``<out>/results.png``. Logs show counts and metrics, no note text.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from typing import Any, Sequence

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
# Held-out notes written by hand, not by the demo generator (SOAP and clinic notes, problem lists,
# sign-outs, ED and consult notes, heavy abbreviation), codes from the demo code space: never
# trained on, scored with each arm's val-calibrated decision to show how it generalises.
STYLE_NOTES = REPO / "jaxicd" / "data" / "style_notes.jsonl"


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  config: str                    # a file in configs/
  fraction: float = 1.0          # of the training budget (0: untrained)
  select_best: bool = False      # evaluate the checkpoint with the best val micro-F1
  overrides: tuple[tuple[str, Any], ...] = ()
  label: str = ""


# Document SFT's training budget in budgets (--steps): the cheap arms' fractions are of it.
DOC_ONLY_BUDGET = 2.0

ARMS = (  # in the order they run: the comparisons that matter most come first
    Arm("mixed", "mixed.py", label="mixed (Code-Centric Learning)"),
    Arm("doc_only", "doc_only.py", fraction=DOC_ONLY_BUDGET, select_best=True,
        label="document-only SFT"),
    # 20% of the tokens in steps of 2 rows, each row's span examples sharing one prompt copy:
    # the 135M model learns codes by optimizer steps (a plateau first), so the same tokens go
    # further in more, smaller steps with ~2x the span examples per token.
    Arm("mixed_20", "mixed.py", fraction=0.2 * DOC_ONLY_BUDGET,
        overrides=(("data.share_prompt", True), ("data.batch_size", 2)),
        label="mixed at 20% of the tokens (shared prompt)"),
    Arm("mixed_30", "mixed.py", fraction=0.28 * DOC_ONLY_BUDGET,
        overrides=(("data.share_prompt", True), ("data.batch_size", 2)),
        label="mixed at <= 30% of the tokens (shared prompt)"),
    Arm("span_only", "span_only.py", label="span-only"),
    Arm("zero_shot", "mixed.py", fraction=0.0, label="zero-shot (untrained adapters)"),
    Arm("mixed_code_first", "mixed.py", overrides=(("data.answer_format", "code_first"),),
        label="mixed, code-first answers"),
    Arm("mixed_20_unshared", "mixed.py", fraction=0.2 * DOC_ONLY_BUDGET,
        label="mixed at 20% of the tokens (4-row steps, no sharing)"),
)
# The report's row order: from no training to the full recipe.
DISPLAY = ("zero_shot", "doc_only", "span_only", "mixed_20_unshared", "mixed_20", "mixed_30",
           "mixed", "mixed_code_first")
# Arms on a fraction of document SFT's tokens, each held to the gains over it when its
# tokens are within TOKEN_BOUND of the compared document-only checkpoint's.
CHEAP_ARMS = ("mixed_20", "mixed_30", "mixed_20_unshared")
TOKEN_BOUND = 0.30
GAIN_TARGETS = (("macro_f1_gain", 0.05), ("unseen_micro_f1_gain", 0.20))
# Inference variants scored for every arm: (name, candidates, calibrated threshold). Candidates:
# "doc" the document pass, "recode" its evidence re-coded with the span prompt, "scan" those plus
# every clause of the note coded with the span prompt (the segment scan).
VARIANTS = (("doc", "doc", False), ("doc+cal", "doc", True), ("recode", "recode", False),
            ("recode+cal", "recode", True), ("scan", "scan", False), ("scan+cal", "scan", True))
DEFAULT_VARIANT = "recode+cal"  # what eval and predict do with configs/mixed.py


@dataclasses.dataclass(frozen=True)
class Settings:
  steps: int = 384
  val_notes: int = 10
  test_notes: int = 50           # the whole demo test split
  spans: int = 100_000           # every gold evidence span of the test notes
  max_new_tokens: int = 96
  batch_size: int = 16
  quick: bool = False


QUICK = Settings(steps=8, val_notes=2, test_notes=3, spans=12, max_new_tokens=48, quick=True)


def log(message: str) -> None:
  print(f"[experiment {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------- configs


def load_config(arm: Arm, settings: Settings):
  """The run config of an arm (its configs/ file, the experiment's budget and overrides)."""
  path = CONFIGS / arm.config
  spec = importlib.util.spec_from_file_location(f"_experiment_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for key, value in _overrides(arm, settings).items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def _arm(name: str) -> Arm:
  return next(a for a in ARMS if a.name == name)


BUDGET_BATCH = 4  # rows of data.seq_len tokens per step of the budget (configs/mixed.py's)


def arm_steps(arm: Arm, settings: Settings) -> int:
  """Optimizer steps of an arm: its fraction of the budget's tokens in rows of its batch."""
  if arm.fraction <= 0:
    return 0
  batch = dict(arm.overrides).get("data.batch_size", BUDGET_BATCH)
  return max(1, round(arm.fraction * settings.steps * BUDGET_BATCH / batch))


def _overrides(arm: Arm, settings: Settings) -> dict[str, Any]:
  steps = arm_steps(arm, settings)
  # The budget's rows pinned here: configs/mixed.py (the CPU demo) may train otherwise.
  out = {"train.steps": max(steps, 1), "train.log_every": 16 if not settings.quick else 2,
         "data.batch_size": BUDGET_BATCH, "data.share_prompt": False,
         "eval_coding.at_start": False,
         "eval_coding.documents": 0,
         "checkpoint.every": max(1, steps // 4), "checkpoint.keep": 4,
         "eval_coding.max_new_tokens": settings.max_new_tokens,
         "eval_coding.batch_size": settings.batch_size}
  out.update(dict(arm.overrides))
  return out


# ------------------------------------------------------------------------------- training


def train(arm: Arm, settings: Settings, workdir: pathlib.Path) -> None:
  """Trains an arm in ``workdir`` with ``python -m jaxicd.main`` unless its last checkpoint is
  there already (the trainer itself resumes a half-done run)."""
  steps = arm_steps(arm, settings)
  if steps == 0:
    return
  ckpt = workdir / "checkpoints" / str(steps)
  if ckpt.exists():
    log(f"{arm.name}: trained ({steps} steps), reusing {ckpt}")
    return
  cmd = [sys.executable, "-m", "jaxicd.main", f"--config={CONFIGS / arm.config}",
         f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in _overrides(arm, settings).items()]
  log(f"{arm.name}: training {steps} steps -> {workdir} (log: {workdir}.log)")
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with open(f"{workdir}.log", "a") as out:
    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, check=False)
  if proc.returncode:
    raise RuntimeError(f"{arm.name}: training failed (exit {proc.returncode}); see {workdir}.log")


def trained_tokens(workdir: pathlib.Path, step: int) -> int:
  """Tokens the arm trained on up to `step` (the trainer's per-step counts, metrics.jsonl)."""
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  seen: dict[int, float] = {}
  for line in path.read_text().splitlines():
    rec = json.loads(line)
    if "train/tokens" in rec and rec["step"] <= step:
      seen[rec["step"]] = rec["train/tokens"]  # a resumed run logs a step again: keep one
  return int(sum(seen.values()))


def changed_keys(cfg, section: str = "") -> dict[str, Any]:
  """The keys of `cfg` (or of its `section`) whose values differ from `base_config()`'s, flat:
  a key added later with a default that keeps the old behaviour changes nothing here."""
  from jaxicd.train.config import base_config  # pylint: disable=g-import-not-at-top
  default = base_config()
  node, base = (cfg[section], default[section]) if section else (cfg, default)

  def flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in (d.items() if hasattr(d, "items") else ()):
      out.update(flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
    return out

  mine, theirs = flat(node.to_dict()), flat(base.to_dict())
  return {k: v for k, v in sorted(mine.items()) if k not in theirs or theirs[k] != v}


def provenance(arm: Arm, settings: Settings) -> str:
  """A digest of what an arm's result depends on besides the code: its run config (budget and
  overrides included, as `changed_keys`), the experiment's settings and the demo and expansion
  generators. A result recorded in a committed report is reused only under the same digest."""
  from jaxicd.data import demo, expansion  # pylint: disable=g-import-not-at-top
  key = [changed_keys(load_config(arm, settings)), dataclasses.asdict(settings),
         demo.fingerprint(), expansion.fingerprint()]
  return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _recorded(arm: Arm, settings: Settings, out: pathlib.Path) -> dict[str, Any] | None:
  """The arm's result in the report at `out` (e.g. the committed docs/results.json) when it was
  computed with the same `provenance`."""
  path = out / "results.json"
  if not path.exists():
    return None
  try:
    result = json.loads(path.read_text()).get("arms", {}).get(arm.name)
  except ValueError:
    return None
  if result and result.get("provenance") == provenance(arm, settings):
    return result
  return None


# ------------------------------------------------------------------------------- evaluation


def _import_eval():
  # JAX and the model stack load only when an arm is evaluated (keeps --help fast).
  from jaxicd.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxicd.eval import calibration, metrics  # pylint: disable=g-import-not-at-top
  from jaxicd.infer import coder as coder_lib  # pylint: disable=g-import-not-at-top
  from jaxicd.train import coding_eval, trained as trained_lib  # pylint: disable=g-import-not-at-top
  return pipeline, calibration, metrics, coder_lib, coding_eval, trained_lib


class _EvalCache:
  """Finished pieces of an arm's evaluation (JSON files under ``<workdir>/eval_cache``), so that
  an interrupted evaluation resumes where it stopped. A piece's name holds a hash of what it
  depends on (settings, notes, step, decoding config): changed settings never reuse it."""

  def __init__(self, workdir: pathlib.Path, settings: Settings, cfg: Any):
    self.dir = workdir / "eval_cache"
    # Decoding keys as they differ from the defaults (a key added later keeps old pieces valid),
    # less eval_coding.scan (the segment scan is a piece of its own, `_scan_chunk`) and
    # eval_coding.source (the notes a piece codes are in its name's hash).
    decoding = {k: v for k, v in changed_keys(cfg, "eval_coding").items()
                if k not in ("scan", "source")}
    # The generators' fingerprints: demo note ids stay the same when their texts change.
    from jaxicd.data import demo, expansion  # pylint: disable=g-import-not-at-top
    self._key = json.dumps([dataclasses.asdict(settings), decoding, cfg.data.answer_format,
                            demo.fingerprint(), expansion.fingerprint()],
                           sort_keys=True, default=str)

  def get(self, name: str, ids: Sequence[str], compute, encode=lambda x: x,
          decode=lambda x: x):
    digest = hashlib.sha256((self._key + json.dumps(list(ids))).encode()).hexdigest()[:12]
    path = self.dir / f"{name}-{digest}.json"
    if path.exists():
      log(f"reusing {path.name}")
      return decode(json.loads(path.read_text()))
    value = compute()
    self.dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(encode(value)))
    tmp.replace(path)  # a piece is complete or absent
    return value


def _code(coder, docs, cache: _EvalCache, name: str, chunk: int = 10, scan: bool = True):
  """The candidate sets of `docs` (every candidate kept): "doc", "recode" and "scan" (see
  `VARIANTS`; without `scan` the first two) and the document pass's counts; computed (and cached)
  `chunk` notes at a time, so an interrupted evaluation loses at most one chunk."""
  coder_lib = _import_eval()[3]
  preds: dict[str, list] = {"doc": [], "recode": []} | ({"scan": []} if scan else {})
  stats: collections.Counter = collections.Counter()
  for lo in range(0, len(docs), chunk):
    part = docs[lo:lo + chunk]
    part_name = name if len(docs) <= chunk else f"{name}-notes{lo}"
    p, st = _code_chunk(coder, part, cache, part_name)
    preds["doc"] += p["doc"]
    preds["recode"] += p["recode"]
    if scan:
      preds["scan"] += coder_lib.merge_candidates(p["recode"],
                                                  _scan_chunk(coder, part, cache, part_name))
    stats.update(st)
  return preds, dict(stats)


def _code_chunk(coder, docs, cache: _EvalCache, name: str):
  coder_lib = _import_eval()[3]

  def compute():
    coder.threshold, coder.recode = 0.0, False
    first = coder.code_documents(docs)
    stats = dict(coder.stats)
    return {"doc": first, "recode": coder.recode_evidence(docs, first)}, stats

  def encode(value):
    preds, stats = value
    return {"preds": {k: [[dataclasses.asdict(e) for e in doc] for doc in v]
                      for k, v in preds.items()}, "stats": stats}

  def decode(saved):
    return ({k: [[coder_lib.CodedEvidence(**e) for e in doc] for doc in v]
             for k, v in saved["preds"].items()}, saved["stats"])

  return cache.get(name, [d.id for d in docs], compute, encode, decode)


def _scan_chunk(coder, docs, cache: _EvalCache, name: str):
  """The segment scan's clause candidates of `docs` (cached apart from the document pass, so
  arms evaluated before the scan existed keep their pieces)."""
  coder_lib = _import_eval()[3]
  return cache.get(
      f"scan-{name}", [d.id for d in docs], lambda: coder.scan_clauses(docs),
      lambda v: [[dataclasses.asdict(e) for e in doc] for doc in v],
      lambda v: [[coder_lib.CodedEvidence(**e) for e in doc] for doc in v])


def evaluate_arm(arm: Arm, settings: Settings, workdir: pathlib.Path) -> dict[str, Any]:
  """Scores an arm (see the module docstring); returns its result record."""
  pipeline, calibration, metrics, coder_lib, coding_eval, trained_lib = _import_eval()
  cfg = load_config(arm, settings)
  documents = pipeline.load_documents(cfg.data)
  val, test = _eval_notes(documents, settings)
  trained = _training_codes(documents)
  spans = coding_eval.evidence_span_documents(test, settings.spans)
  t0 = time.perf_counter()
  cache = _EvalCache(workdir, settings, cfg)
  restored = trained_lib.TrainedModel(cfg, workdir)
  try:
    steps = restored.steps() if arm_steps(arm, settings) else []
    candidates = steps if arm.select_best else steps[-1:]
    coder = None
    selection = {}
    best = None
    for step in candidates or [None]:
      if step is not None:
        restored.restore(step)
      model = restored.model
      if coder is None:
        coder = coder_lib.build_coder(cfg, model, restored.tokenizer)
      else:
        coder.model = coder_lib.decoding_model(cfg, model)
      # Checkpoints are compared without the segment scan (it codes every clause: the chosen
      # checkpoint's alone is scanned).
      val_pred, _ = _code(coder, val, cache, f"val-step{step or 0}", scan=False)
      thresholds = _calibrate(val, val_pred)
      val_f1 = max(f1 for _, f1 in thresholds.values())
      selection[str(step or 0)] = val_f1
      log(f"{arm.name}: step {step or 0}: val micro-F1 {val_f1:.3f} (doc+cal "
          f"{thresholds['doc'][1]:.3f}, recode+cal {thresholds['recode'][1]:.3f}; calibrated on "
          f"{len(val)} notes)")
      if best is None or val_f1 > best[1]:
        best = (step, val_f1, thresholds, model)
    step, _, thresholds, model = best
    if step is not None and arm.select_best and step != candidates[-1]:
      restored.restore(step)
      coder.model = coder_lib.decoding_model(cfg, restored.model)
    thresholds, variants, variant, style_metrics = _score_checkpoint(
        coder, cache, step or 0, val, test, trained, _note_styles(cfg))
    span_codes = cache.get(f"spans-step{step or 0}", [s.text for s in spans],
                           lambda: coder.code_spans([s.text for s in spans]))
    span_preds = [[coder_lib.CodedEvidence(c, 0, len(s.text), s.text, p)] if c else []
                  for s, (c, p) in zip(spans, span_codes)]
    span_unseen = {s.codes[0] for s in spans if s.codes[0] not in trained}
    span_metrics = metrics.span_accuracy([s.codes[0] for s in spans], span_preds,
                                         unseen_codes=span_unseen)
  finally:
    restored.close()
  result = {
      "arm": arm.name, "label": arm.label or arm.name, "config": f"configs/{arm.config}",
      "overrides": dict(arm.overrides), "step": int(step or 0),
      "tokens": trained_tokens(workdir, int(step or 0)),
      "val_selection": selection, "variants": variants, "spans": span_metrics,
      "val_variant_f1": {f"{k}+cal": f1 for k, (_, f1) in thresholds.items()},
      "chosen_variant": variant, "styles": style_metrics,
      "gold_codes_per_note": sum(len(d.codes) for d in test) / max(len(test), 1),
      "val_notes": len(val), "test_notes": len(test), "test_spans": len(spans),
      "eval_seconds": time.perf_counter() - t0,
      "decode_dtype": cfg.eval_coding.dtype or str(cfg.model.dtype),
      "machine": _cpu_name(),  # reused arms may come from other machines than the report's
      "provenance": provenance(arm, settings),
  }
  return result


def _score_checkpoint(coder, cache: _EvalCache, step: int, val, test, trained: set[str],
                      note_styles: dict[str, str]):
  """The coder's checkpoint scored: thresholds calibrated on `val` per candidate set, every
  variant on `test`, the val-chosen variant, and the other-style notes coded with it."""
  thresholds = _calibrate(val, _code(coder, val, cache, f"val-step{step}")[0])
  variants = _test_variants(coder, test, cache, f"test-step{step}", thresholds, trained,
                            note_styles)
  variant = _best_variant(thresholds)
  styles = _score_styles(coder, cache, step, variant, thresholds[_candidates(variant)][0],
                         trained)
  return thresholds, variants, variant, styles


def _eval_notes(documents, settings: Settings):
  """The val notes that calibrate and the test notes that are scored."""
  return ([d for d in documents if d.split == "val"][:settings.val_notes],
          [d for d in documents if d.split == "test"][:settings.test_notes])


def _calibrate(val, val_pred) -> dict[str, tuple[float, float]]:
  """Per candidate set, the threshold with the best val micro-F1 and that F1."""
  _, calibration, _, coder_lib, _, _ = _import_eval()
  gold = [d.codes for d in val]
  return {k: calibration.choose_threshold(gold, [coder_lib.code_scores(p) for p in ps])
          for k, ps in val_pred.items()}


def _candidates(variant: str) -> str:
  return variant.split("+")[0]


def _best_variant(thresholds: dict[str, tuple[float, float]]) -> str:
  """The arm's calibrated variant with the best val micro-F1: document-only adapters never saw
  the span prompt, so re-coding or the scan may not be their best inference."""
  # Ties keep the default inference (re-coding), then the document pass alone, then the scan.
  return max((f"{k}+cal" for k in ("recode", "doc", "scan") if k in thresholds),
             key=lambda v: thresholds[_candidates(v)][1])


def _test_variants(coder, test, cache: _EvalCache, name: str,
                   thresholds: dict[str, tuple[float, float]], trained: set[str],
                   styles: dict[str, str]) -> dict[str, dict[str, Any]]:
  """Metrics of every `VARIANTS` entry on the test notes, with micro-F1 per note style
  (`styles`: document id -> style; notes without one are left out of that breakdown)."""
  _, _, metrics, coder_lib, _, _ = _import_eval()
  test_pred, stats = _code(coder, test, cache, name)
  unseen = metrics.unseen_in_training(trained, coder.code_space,
                                      (c for d in test for c in d.codes))
  variants = {}
  for variant, candidates, calibrated in VARIANTS:
    threshold = thresholds[candidates][0] if calibrated else 0.0
    kept = coder_lib.apply_threshold(test_pred[candidates], threshold)
    m = metrics.evaluate(test, kept, code_space=coder.code_space, unseen_codes=unseen,
                         output_stats=stats)
    m["threshold"] = threshold
    m["codes_per_note"] = _codes_per_note(kept)
    m["by_style"] = _micro_f1_by(test, kept, styles)
    variants[variant] = m
  return variants


def _micro_f1_by(docs, kept, group: dict[str, str]) -> dict[str, float]:
  """Micro-F1 of the notes of each group (`group`: document id -> group name)."""
  metrics = _import_eval()[2]
  members = collections.defaultdict(list)
  for i, d in enumerate(docs):
    if d.id in group:
      members[group[d.id]].append(i)
  return {g: metrics.evaluate([docs[i] for i in idx], [kept[i] for i in idx])["micro_f1"]
          for g, idx in sorted(members.items())}


def _note_styles(cfg) -> dict[str, str]:
  """Document id -> note style of the demo corpus (empty for other sources)."""
  if cfg.data.source != "demo":
    return {}
  from jaxicd.data import demo  # pylint: disable=g-import-not-at-top
  return demo.demo_corpus(seed=int(cfg.data.demo_seed)).styles


def _codes_per_note(kept: Sequence[Sequence[Any]]) -> float:
  """Distinct codes per coded note."""
  return sum(len({ev.code for ev in p}) for p in kept) / max(len(kept), 1)


def _training_codes(documents) -> set[str]:
  """Codes of the training documents: what "unseen in training" is measured against."""
  return {c for d in documents if d.split == "train" for c in d.codes}


def style_notes():
  """The held-out other-style notes (`STYLE_NOTES`) as `Document`s."""
  from jaxicd.data.sources import jsonl  # pylint: disable=g-import-not-at-top
  return jsonl.read_documents(STYLE_NOTES)


def _score_styles(coder, cache: _EvalCache, step: int, variant: str, threshold: float,
                  trained: set[str]) -> dict[str, Any]:
  """Metrics of `variant` at `threshold` on the other-style notes, overall and per style."""
  _, _, metrics, coder_lib, _, _ = _import_eval()
  docs = style_notes()
  preds, stats = _code(coder, docs, cache, f"styles-step{step}", chunk=len(docs),
                       scan=_candidates(variant) == "scan")
  kept = coder_lib.apply_threshold(preds[_candidates(variant)], threshold)
  unseen = metrics.unseen_in_training(trained, coder.code_space, (c for d in docs for c in d.codes))
  out = metrics.evaluate(docs, kept, code_space=coder.code_space, unseen_codes=unseen,
                         output_stats=stats)
  out["codes_per_note"] = _codes_per_note(kept)
  out["notes"] = len(docs)
  out["by_style"] = _micro_f1_by(docs, kept, {d.id: d.id.split("-")[0] for d in docs})
  log(f"other-style notes ({len(docs)}): micro-F1 {out['micro_f1']:.3f} macro-F1 "
      f"{out['macro_f1']:.3f} evidence span F1 {out['evidence_span_f1']:.3f}")
  return out


def stale(result: dict[str, Any]) -> bool:
  """Whether an arm's record lacks scores the evaluation now computes (the segment scan, test
  notes by style): `rescore` adds them from its checkpoint and cached pieces."""
  return "scan" not in result["variants"] or any(
      "by_style" not in m for m in result["variants"].values())


def rescore(arm: Arm, settings: Settings, workdir: pathlib.Path,
            result: dict[str, Any]) -> dict[str, Any]:
  """Scores an arm evaluated by an older experiment again: its recorded checkpoint
  (document-pass pieces from its cache when there), every variant re-scored, its calibrated
  variant chosen again and the other-style notes scored with that."""
  pipeline, _, _, coder_lib, _, trained_lib = _import_eval()
  cfg = load_config(arm, settings)
  documents = pipeline.load_documents(cfg.data)
  val, test = _eval_notes(documents, settings)
  trained = _training_codes(documents)
  cache = _EvalCache(workdir, settings, cfg)
  step = result["step"]
  with trained_lib.TrainedModel(cfg, workdir) as restored:
    if step:
      restored.restore(step)
    coder = coder_lib.build_coder(cfg, restored.model, restored.tokenizer)
    thresholds, variants, variant, styles = _score_checkpoint(coder, cache, step, val, test,
                                                              trained, _note_styles(cfg))
  return {**result, "variants": variants, "chosen_variant": variant, "styles": styles,
          "val_variant_f1": {f"{k}+cal": f1 for k, (_, f1) in thresholds.items()}}


# ------------------------------------------------------------------------------- report


TARGETS = (  # (metric, arm, variant, minimum) from the coding-quality issue
    ("micro_f1", "mixed", DEFAULT_VARIANT, 0.75),
    ("macro_f1", "mixed", DEFAULT_VARIANT, 0.60),
    ("unseen_micro_f1", "mixed", DEFAULT_VARIANT, 0.60),
    ("evidence_span_f1", "mixed", DEFAULT_VARIANT, 0.60),
    ("valid_code_rate", "mixed", DEFAULT_VARIANT, 1.0),
    ("grounded_evidence_rate", "mixed", DEFAULT_VARIANT, 1.0),
)


def _row(r: dict[str, Any], variant: str) -> list[str]:
  m, s = r["variants"][variant], r["spans"]
  return [r["label"], f"{r['tokens']:,}", f"{m['micro_f1']:.3f} ({m['micro_precision']:.2f} / "
          f"{m['micro_recall']:.2f})", f"{m['macro_f1']:.3f}", f"{m['unseen_micro_f1']:.3f}",
          f"{m['evidence_span_f1']:.3f}", f"{m['codes_per_note']:.1f}",
          f"{s['span_exact']:.3f}", f"{s.get('unseen_span_exact', 0.0):.3f}",
          f"{r['styles']['micro_f1']:.3f}" if "styles" in r else "-"]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def chosen(result: dict[str, Any]) -> str:
  """The arm's inference variant: the calibrated one with the best val micro-F1 (results
  from before that choice was recorded used the default)."""
  return result.get("chosen_variant", DEFAULT_VARIANT)


def comparisons(results: dict[str, dict]) -> dict[str, float]:
  """The paper's claims as differences (the 20% arms and mixed against doc_only)."""
  out = {}
  if "doc_only" in results:
    doc = results["doc_only"]["variants"][chosen(results["doc_only"])]
    for arm in CHEAP_ARMS + ("mixed",):
      if arm in results:
        m = results[arm]["variants"][chosen(results[arm])]
        out[f"{arm}_token_ratio"] = results[arm]["tokens"] / max(results["doc_only"]["tokens"], 1)
        out[f"{arm}_macro_f1_gain"] = m["macro_f1"] - doc["macro_f1"]
        out[f"{arm}_unseen_micro_f1_gain"] = m["unseen_micro_f1"] - doc["unseen_micro_f1"]
  return out


def write_report(results: dict[str, dict], settings: Settings, out: pathlib.Path,
                 wall_seconds: float, command: str) -> None:
  """results.json, results.md and results.png under `out`."""
  out.mkdir(parents=True, exist_ok=True)
  machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
             "date": datetime.date.today().isoformat()}
  cmp = comparisons(results)
  (out / "results.json").write_text(json.dumps(
      {"settings": dataclasses.asdict(settings), "machine": machine, "command": command,
       "wall_seconds": wall_seconds, "arms": results, "comparisons": cmp}, indent=1))
  order = [a for a in DISPLAY if a in results]
  header = ["arm", "train tokens", "note micro-F1 (P / R)", "macro-F1", "unseen micro-F1",
            "evidence span F1", "codes / note", "span exact", "unseen span exact",
            "other styles micro-F1", "inference"]
  main_rows = [_row(results[a], chosen(results[a])) + [chosen(results[a])] for a in order]
  variant_rows = []
  for a in order:
    for name, _, _ in VARIANTS:
      if name not in results[a]["variants"]:
        continue  # evaluated before the variant existed (reported without it)
      m = results[a]["variants"][name]
      variant_rows.append([results[a]["label"], name, f"{m['threshold']:.3f}",
                           f"{m['micro_f1']:.3f}", f"{m['micro_precision']:.3f}",
                           f"{m['micro_recall']:.3f}", f"{m['macro_f1']:.3f}",
                           f"{m['unseen_micro_f1']:.3f}", f"{m['codes_per_note']:.1f}"])
  targets = []
  for metric, arm, variant, minimum in TARGETS:
    if arm in results:
      value = results[arm]["variants"][variant].get(metric, float("nan"))
      targets.append([f"{metric} ({arm})", f">= {minimum:.2f}", f"{value:.3f}",
                      "met" if value >= minimum else f"{minimum - value:.3f} short"])
  gains = [(arm, key, minimum) for arm in CHEAP_ARMS for key, minimum in GAIN_TARGETS]
  gains += [("mixed", key, None) for key, _ in GAIN_TARGETS]  # equal budgets: no target
  for arm, key, minimum in gains:
    if f"{arm}_{key}" in cmp:
      value = cmp[f"{arm}_{key}"]
      label = (f"{key.replace('_', ' ')} of {arm} over doc_only "
               f"({cmp[f'{arm}_token_ratio']:.0%} of its tokens)")
      if minimum is None:
        targets.append([label, "(no target)", f"{value:+.3f}", ""])
      elif cmp[f"{arm}_token_ratio"] > TOKEN_BOUND:  # a later document-only checkpoint won
        targets.append([label, f">= +{minimum:.2f}", f"{value:+.3f}",
                        f"not comparable: over {TOKEN_BOUND:.0%} of doc_only's tokens"])
      else:
        targets.append([label, f">= +{minimum:.2f}", f"{value:+.3f}",
                        "met" if value >= minimum else f"{minimum - value:.3f} short"])
  gold = next(iter(results.values()))["gold_codes_per_note"] if results else 0
  any_r = next(iter(results.values())) if results else {}
  md = [
      "# Results: the headline experiment" + (" (--quick: toy sizes, not results)"
                                               if settings.quick else ""),
      "",
      f"`{command}` on {machine['date']}, {machine['cores']} cores ({machine['cpu']}), "
      f"{wall_seconds / 60:.0f} min for the arms this run computed "
      "(arms finished earlier are reused). What each arm is and how it is evaluated: "
      "`jaxicd/experiment.py`.",
      "",
      f"- Budget: {settings.steps} optimizer steps of 4 x 256 packed tokens per arm "
      f"(doc_only: {arm_steps(_arm('doc_only'), settings)} steps of 4, its best checkpoint on "
      f"val evaluated; mixed_20: {arm_steps(_arm('mixed_20'), settings)} steps of 2 rows, "
      f"mixed_30: {arm_steps(_arm('mixed_30'), settings)} of 2, "
      f"mixed_20_unshared: {arm_steps(_arm('mixed_20_unshared'), settings)} of 4); "
      "SmolLM2-135M-Instruct, LoRA r16 on all projections, bf16, the demo corpus.",
      f"- Test: the first {any_r.get('test_notes', 0)} test notes ({gold:.1f} gold codes per "
      f"note) and their {any_r.get('test_spans', 0)} gold evidence spans; the threshold is "
      f"calibrated on {any_r.get('val_notes', 0)} val notes; unseen-code scores are strict.",
      "- Decoding dtype per arm: " + ", ".join(
          f"{a} {results[a].get('decode_dtype', 'bfloat16')}" for a in order)
      + " (the same greedy decoding; float32 runs faster on CPUs without bf16 units).",
      "- Evaluation minutes and machine per arm: " + ", ".join(
          f"{a} {results[a]['eval_seconds'] / 60:.0f} ({results[a].get('machine', 'not recorded')})"
          for a in order) + ".",
      f"- Default inference (`{DEFAULT_VARIANT}`): evidence-first document pass, each evidence "
      "span re-coded with the span prompt, codes kept at the calibrated threshold; `scan` adds "
      "the segment scan (every clause of the note coded alone with the span prompt). Each arm "
      "is scored with its calibrated variant (`doc+cal`, `recode+cal` or `scan+cal`) that is "
      "best on the val notes (column *inference*); every variant is listed below.",
      "",
      "## Arms",
      "",
      _table(header, main_rows),
      "",
      "![note F1 against training tokens](results.png)",
      "",
      "## Targets",
      "",
      _table(["target", "wanted", "measured", ""], targets),
      "",
      "## Inference variants (same trained adapters, same test notes)",
      "",
      _table(["arm", "variant", "threshold", "micro-F1", "P", "R", "macro-F1",
              "unseen micro-F1", "codes / note"], variant_rows),
      "",
  ]
  by_style = [a for a in order if "by_style" in results[a]["variants"][chosen(results[a])]]
  groups = sorted({g for a in by_style
                   for g in results[a]["variants"][chosen(results[a])]["by_style"]})
  if groups:
    md += ["## Test notes by style", "",
           "Micro-F1 of each arm's inference on the test notes of each style the demo "
           "generator writes (discharge summaries; SOAP progress notes, ED notes, problem lists "
           "and night sign-outs, terse and abbreviated).", "",
           _table(["arm"] + groups,
                  [[results[a]["label"]] + [
                      f"{results[a]['variants'][chosen(results[a])]['by_style'][g]:.3f}"
                      if g in results[a]["variants"][chosen(results[a])]["by_style"] else "-"
                      for g in groups] for a in by_style]), ""]
  styled = [a for a in order if "styles" in results[a]]
  if styled:
    st = results[styled[0]]["styles"]
    md += ["## Notes in other styles", "",
           f"{st['notes']} held-out notes written by hand (`{_shown(STYLE_NOTES)}`: SOAP "
           "and clinic notes, problem lists, sign-outs, ED and consult notes, heavy "
           "abbreviation), not by the demo generator and never trained on; each arm with its "
           "val-calibrated inference.", "",
           _table(["arm", "micro-F1 (P / R)", "macro-F1", "evidence span F1", "codes / note"]
                  + [f"{k} micro-F1" for k in st["by_style"]],
                  [[results[a]["label"],
                    f"{results[a]['styles']['micro_f1']:.3f} "
                    f"({results[a]['styles']['micro_precision']:.2f} / "
                    f"{results[a]['styles']['micro_recall']:.2f})",
                    f"{results[a]['styles']['macro_f1']:.3f}",
                    f"{results[a]['styles']['evidence_span_f1']:.3f}",
                    f"{results[a]['styles']['codes_per_note']:.1f}"]
                   + [f"{v:.3f}" for v in results[a]["styles"]["by_style"].values()]
                   for a in styled]), ""]
  if "doc_only" in results:
    sel = results["doc_only"]["val_selection"]
    md += ["Document-only checkpoint selection (val micro-F1 by step): "
           + ", ".join(f"{k}: {v:.3f}" for k, v in sel.items())
           + f"; step {results['doc_only']['step']} evaluated.", ""]
  (out / "results.md").write_text("\n".join(md))
  _figure(results, out / "results.png")


def _figure(results: dict[str, dict], path: pathlib.Path) -> None:
  # Optional (setup.py extras): only the figure needs it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
  series = {"document-only": ["zero_shot", "doc_only"],
            "mixed (Code-Centric)": ["zero_shot", "mixed_20", "mixed_30", "mixed"]}
  for ax, metric in zip(axes, ("micro_f1", "macro_f1")):
    for label, arms in series.items():
      pts = [(results[a]["tokens"], results[a]["variants"][chosen(results[a])][metric])
             for a in arms if a in results]
      if pts:
        ax.plot([p[0] / 1e3 for p in pts], [p[1] for p in pts], marker="o", label=label)
    for a in ("span_only", "mixed_code_first", "mixed_20_unshared"):
      if a in results:
        ax.scatter([results[a]["tokens"] / 1e3],
                   [results[a]["variants"][chosen(results[a])][metric]], marker="x",
                   label=results[a]["label"])
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel(f"test note {metric.replace('_', '-')}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("SmolLM2-135M on the demo corpus: note-level F1 against training tokens")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _shown(path: pathlib.Path) -> str:
  return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def _cpu_name() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


# ------------------------------------------------------------------------------- main


def run(settings: Settings, workdir: pathlib.Path, out: pathlib.Path,
        arms: Sequence[str] = (), command: str = "", train_only: bool = False
        ) -> dict[str, dict]:
  chosen = [a for a in ARMS if not arms or a.name in arms]
  t0 = time.time()
  results = {}
  for arm in chosen:  # arm by arm, so the report grows while the rest trains
    path = workdir / arm.name / "result.json"
    recorded = None if path.exists() else _recorded(arm, settings, out)
    if recorded is not None:  # e.g. a fresh checkout: the committed report's arm
      log(f"{arm.name}: recorded in {out / 'results.json'} with the same recipe and data, "
          "reusing it")
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(recorded, indent=1))
    if path.exists():
      results[arm.name] = json.loads(path.read_text())
      recorded_with = results[arm.name].get("provenance")
      if recorded_with not in (None, provenance(arm, settings)):
        raise RuntimeError(
            f"{path} was computed with another recipe, settings or demo/expansion generator "
            f"(provenance {recorded_with}, now {provenance(arm, settings)}): remove "
            f"{path.parent} or choose another --workdir")
      log(f"{arm.name}: evaluated earlier, reusing {path}")
      step = results[arm.name]["step"]
      if stale(results[arm.name]) and not train_only:
        if step and not (workdir / arm.name / "checkpoints" / str(step)).exists():
          log(f"{arm.name}: lacks newer scores but its checkpoint is not here: reported as is")
        else:
          log(f"{arm.name}: re-scoring (segment scan, test notes by style, other-style notes)")
          results[arm.name] = rescore(arm, settings, workdir / arm.name, results[arm.name])
          path.write_text(json.dumps(results[arm.name], indent=1))
      continue
    train(arm, settings, workdir / arm.name)
    if train_only:
      continue
    log(f"{arm.name}: evaluating")
    result = evaluate_arm(arm, settings, workdir / arm.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    m = result["variants"][DEFAULT_VARIANT]
    log(f"{arm.name}: micro-F1 {m['micro_f1']:.3f} macro-F1 {m['macro_f1']:.3f} unseen "
        f"{m['unseen_micro_f1']:.3f} span exact {result['spans']['span_exact']:.3f} "
        f"({result['eval_seconds']:.0f}s)")
    results[arm.name] = result
    write_report(_with_earlier(results, workdir, settings, out), settings, out,
                 time.time() - t0, command)
  if not train_only:
    write_report(_with_earlier(results, workdir, settings, out), settings, out,
                 time.time() - t0, command)
  return results


def _with_earlier(results: dict[str, dict], workdir: pathlib.Path, settings: Settings,
                  out: pathlib.Path) -> dict[str, dict]:
  """`results` and every other arm evaluated earlier, in `workdir` or recorded in the report at
  `out` with the same provenance (a run of a few --arms reports the whole experiment so far)."""
  found = {}
  for arm in ARMS:
    path = workdir / arm.name / "result.json"
    if arm.name in results:
      found[arm.name] = results[arm.name]
    elif path.exists():
      found[arm.name] = json.loads(path.read_text())
    elif (recorded := _recorded(arm, settings, out)) is not None:
      found[arm.name] = recorded
  return found


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="toy sizes (minutes), for tests")
  parser.add_argument("--workdir", default="", help="arms' runs (default runs/experiment, "
                      "runs/experiment_quick with --quick)")
  parser.add_argument("--out", default="", help="report folder (default docs/, or the "
                      "workdir with --quick)")
  parser.add_argument("--arms", default="", help="comma-separated subset of: "
                      + ", ".join(a.name for a in ARMS))
  parser.add_argument("--steps", type=int, default=0, help="training budget in steps")
  parser.add_argument("--train-only", action="store_true", help="train the arms, evaluate "
                      "nothing (e.g. train on one machine, evaluate later)")
  args = parser.parse_args(argv)
  settings = QUICK if args.quick else Settings()
  if args.steps:
    settings = dataclasses.replace(settings, steps=args.steps)
  workdir = pathlib.Path(args.workdir or REPO / ("runs/experiment_quick" if args.quick
                                                 else "runs/experiment"))
  out = pathlib.Path(args.out or (workdir if args.quick else REPO / "docs"))
  arms = [a for a in args.arms.split(",") if a]
  unknown = set(arms) - {a.name for a in ARMS}
  if unknown:
    parser.error(f"unknown arms {sorted(unknown)}")
  command = "python -m jaxicd.experiment" + (" --quick" if args.quick else "") + (
      f" --steps={args.steps}" if args.steps else "")
  run(settings, workdir, out, arms, command, train_only=args.train_only)


if __name__ == "__main__":
  main()
