"""Predict mode: code notes read from files with the adapters of a workdir's latest checkpoint.

  python -m jaxicd.main --config=configs/predict.py --workdir=runs/mixed --config.input=note.txt

Input (``config.input``): a ``.txt`` note (UTF-8; the file name without ``.txt`` is its id), a
``.jsonl`` file of notes (one JSON object per line: ``text`` required, ``id`` optional, default
``<file name>:<line>``, unique) or a folder of ``.txt`` notes; other suffixes are refused. Gold
fields of a JSONL line (``codes``, or the codes of ``evidence``) are optional and never checked:
predict does not need them, and when present they only mark true/false positives and missed
codes in the report. A note longer than ``config.max_note_chars`` is refused (0 = no limit).

The run config must describe the model the checkpoint was trained on (source and LoRA shapes are
checked on restore); windows, code space and decoding follow ``config.data`` and
``config.eval_coding``. A workdir without a checkpoint is refused (a mistyped ``--workdir`` would
code with the untrained model) unless ``config.allow_untrained=True``.

Output: ``config.output`` (default ``<workdir>/predictions.jsonl``), one JSON object per
predicted code and evidence span, notes in input order, each ordered by score::

  {"document": "n1", "code": "I50.23", "description": "Acute on chronic systolic ...",
   "begin": 812, "end": 851, "quote": "acute on chronic systolic heart failure", "score": 0.91}

``begin``/``end`` are character offsets into the note (-1 when the model's quote was not found
in it; ``quote`` is then the model's). Next to it, ``report.html`` (``config.report``; see
`jaxicd.eval.report`) shows every note with its evidence highlighted. An output path that is an
input file or lies inside an input folder is refused before anything runs.

Crash safety and resume: each note's lines are appended to ``<output>.partial`` (flushed and
synced) as soon as the note is coded; the output and the report are written only at the end
(temporary file + rename), and the ``.partial`` file is removed then. A run that stops early
leaves no output that looks complete; the same command again resumes from ``.partial``, coding
only the notes not in it (a note whose text changed is coded again). ``.partial`` records the
checkpoint step and the coding settings: resuming with other ones is refused.

Progress lines give notes, windows, notes/min, windows/min and an ETA; the log never shows note
text (the files hold it: quotes, the report).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from jaxicd.data.records import Document
from jaxicd.data.sources import common, jsonl
from jaxicd.errors import ConfigError, InputError
from jaxicd.eval import report as report_lib
from jaxicd.infer import coder as coder_lib
from jaxicd.infer.coder import CodedEvidence
from jaxicd.ontology import get_ontology, normalize_code
from jaxicd.progress import format_eta

TEXT_SOURCE = "text"
ACCEPTED = ".txt note, .jsonl file of notes, or a folder of .txt notes"
PROGRESS_EVERY_S = 10.0  # at most one progress line per this many seconds (plus the last one)
_PARTIAL_FORMAT = "jaxicd-predict-partial-1"


@dataclasses.dataclass
class Notes:
  """The notes of ``config.input``: documents, where each comes from, and known gold codes."""

  docs: list[Document]
  where: list[str]                                   # file or file:line of each note
  files: list[pathlib.Path]                          # the input files read
  gold: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # id -> codes
  ignored: int = 0                                   # files of an input folder that are not .txt


def _text_note(path: pathlib.Path) -> Document:
  text, bad_line = common.decode_utf8(path.read_bytes())  # drops a byte-order mark
  if text is None:
    raise InputError(f"{path}:{bad_line}: not UTF-8 text")
  if not text.strip():
    raise InputError(f"{path}: empty note")
  return Document(id=path.stem, text=text, codes=(), split="test", source=TEXT_SOURCE)


def _gold_codes(obj: dict) -> tuple[str, ...] | None:
  """A JSONL line's gold codes as given (normalised where they parse), or None if it has none."""
  raw = obj.get("codes")
  if raw is None and isinstance(obj.get("evidence"), list) and obj["evidence"]:
    raw = [ev.get("code") for ev in obj["evidence"] if isinstance(ev, dict)]
  if not isinstance(raw, list):
    return None
  codes = []
  for c in raw:
    if isinstance(c, str) and c.strip():
      try:
        codes.append(normalize_code(c))
      except ValueError:
        codes.append(c.strip())
  return common.dedupe(codes)


def _jsonl_notes(path: pathlib.Path, notes: Notes) -> None:
  """The JSONL reader's line and document checks on ``id`` and ``text`` only: gold fields and
  ``split`` are no input of predict, so they are never refused."""

  class Issues(common.Issues):
    def error(self, reason: str, where: str, detail: str = "") -> None:
      # Predict codes every note or none: no advice to skip records.
      raise InputError(f"{where}: {reason}" + (f" ({detail})" if detail else ""))

  issues, seen = Issues(), {d.id for d in notes.docs}
  for where, obj in jsonl._lines(path, issues):  # pylint: disable=protected-access
    core = {k: obj[k] for k in ("id", "text") if k in obj}
    doc = jsonl._document(where, core, path, issues, seen)  # pylint: disable=protected-access
    notes.docs.append(dataclasses.replace(doc, split="test"))
    notes.where.append(where)
    gold = _gold_codes(obj)
    if gold is not None:
      notes.gold[doc.id] = gold


def read_input(path: str | pathlib.Path, *, max_chars: int = 0) -> Notes:
  """Reads ``config.input`` (see the module docstring); InputError names the file and line."""
  if not str(path):
    raise InputError(f"config.input is empty: give a {ACCEPTED}")
  path = pathlib.Path(path)
  notes = Notes([], [], [])
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
    notes.ignored = sum(1 for p in path.iterdir() if p.is_file()) - len(files)
    if not files:
      raise FileNotFoundError(f"{path}: no .txt notes in this folder (config.input takes a "
                              f"{ACCEPTED})")
    notes.files = files
    for f in files:
      doc = _text_note(f)
      if doc.id in {d.id for d in notes.docs}:
        raise InputError(f"{f}: note id {doc.id!r} is also the name of another file")
      notes.docs.append(doc)
      notes.where.append(str(f))
  elif not path.is_file():
    raise FileNotFoundError(f"{path}: no such file or folder (config.input)")
  elif path.suffix.lower() == ".jsonl":
    notes.files = [path]
    _jsonl_notes(path, notes)  # an empty file is refused by the reader
  elif path.suffix.lower() == ".txt":
    notes.files = [path]
    notes.docs.append(_text_note(path))
    notes.where.append(str(path))
  else:
    raise InputError(f"{path}: cannot read {path.suffix or 'a file without suffix'} files; "
                     f"config.input takes a {ACCEPTED}")
  if max_chars > 0:
    for doc, where in zip(notes.docs, notes.where):
      if len(doc.text) > max_chars:
        raise InputError(
            f"{where}: note {doc.id!r} has {len(doc.text)} characters, more than "
            f"config.max_note_chars={max_chars}; split the note, or raise the limit "
            "(0 = no limit)")
  return notes


def read_notes(path: str | pathlib.Path, *, max_chars: int = 0) -> list[Document]:
  """The notes of ``config.input``: a .txt note, a .jsonl of notes or a folder of .txt notes."""
  return read_input(path, max_chars=max_chars).docs


def prediction_rows(doc: Document, evidence: Sequence[CodedEvidence],
                    describe: Callable[[str], str]) -> list[dict[str, Any]]:
  """The output lines of one note (see the module docstring)."""
  return [dict(document=doc.id, code=ev.code, description=describe(ev.code), begin=ev.begin,
               end=ev.end, quote=ev.quote, score=round(float(ev.score), 6)) for ev in evidence]


def describer() -> Callable[[str], str]:
  """code -> its ICD-10-CM description ("" for codes the ontology lacks)."""
  ontology = get_ontology()

  def describe(code: str) -> str:
    try:
      return ontology.description(code)
    except KeyError:  # a user code space may hold codes the ontology lacks
      return ""
  return describe


# --- checks before anything runs ------------------------------------------------------------


@dataclasses.dataclass
class Plan:
  """What a predict run reads and writes, checked before the model loads."""

  notes: Notes
  output: pathlib.Path
  report: pathlib.Path | None

  @property
  def partial(self) -> pathlib.Path:
    return self.output.with_name(self.output.name + ".partial")


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
  if a.resolve() == b.resolve():
    return True
  try:  # hard links, bind mounts
    return a.exists() and os.path.samefile(a, b)
  except OSError:
    return False


def _check_outputs(cfg_input: pathlib.Path, notes: Notes, outputs: Sequence[pathlib.Path]) -> None:
  for out in outputs:
    for f in notes.files:
      if _same_file(out, f):
        raise InputError(f"{out} is the input note file {f}: writing it would overwrite the "
                         "notes; set config.output (and config.report) to another path")
    if cfg_input.is_dir() and out.resolve().is_relative_to(cfg_input.resolve()):
      raise InputError(f"{out} is inside the input folder {cfg_input}: set config.output (and "
                       "config.report) to a path outside it")
    if out.is_dir():
      raise InputError(f"{out} is a folder: config.output and config.report name files")


def has_checkpoint(directory: str | os.PathLike) -> bool:
  """True when ``directory`` holds a finished Orbax checkpoint (a folder named by its step)."""
  path = epath.Path(directory)
  # Unfinished saves are temporaries named <step>.orbax-checkpoint-tmp-...
  return path.is_dir() and any(p.name.isdigit() and p.is_dir() for p in path.iterdir())


def preflight(cfg: Any, workdir: str | os.PathLike, checkpoints: str) -> Plan:
  """Reads and checks the input, output paths and the checkpoint folder ``checkpoints``:
  refuses before any side effect."""
  max_chars = int(cfg.max_note_chars)
  notes = read_input(cfg.input, max_chars=max_chars)
  output = pathlib.Path(cfg.output or pathlib.Path(workdir) / "predictions.jsonl")
  report = str(cfg.report)
  report_path = (None if report == "none" else
                 pathlib.Path(report) if report else output.with_name("report.html"))
  plan = Plan(notes, output, report_path)
  if report_path is not None and _same_file(report_path, output):
    raise ConfigError(f"config.report and config.output are the same file {output}")
  outputs = [output, plan.partial, *([report_path] if report_path else [])]
  _check_outputs(pathlib.Path(cfg.input), notes, outputs)
  if not bool(cfg.allow_untrained) and not has_checkpoint(checkpoints):
    where = "" if pathlib.Path(workdir).exists() else f" (--workdir={workdir} does not exist)"
    raise InputError(
        f"no checkpoint in {checkpoints}{where}: predict would code with the untrained adapters. "
        "Check --workdir, or pass --config.allow_untrained=True to code with the base model "
        "on purpose")
  return plan


# --- output: .partial journal, final files ----------------------------------------------------


def _text_hash(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def _write_atomic(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to a temporary file beside ``path``, then renames it into place."""
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class Partial:
  """``<output>.partial``: a header line (format, settings), then one line per coded note
  ``{"document", "sha", "rows"}``, appended, flushed and synced as each note is done."""

  def __init__(self, path: pathlib.Path, settings: dict[str, Any], *, write: bool = True):
    self.path, self.settings, self.write = path, settings, write
    self.done: dict[str, tuple[str, list[dict]]] = {}  # id -> (text hash, rows)
    self._file = None

  def load(self) -> None:
    """Reads a half-done run's notes; a torn last line (the run died writing it) is dropped."""
    if not self.path.exists():
      return
    data = self.path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]  # every line is written with its newline
    for n, raw in enumerate(complete.split(b"\n")[:-1], start=1):
      try:
        obj = json.loads(raw)
      except (ValueError, RecursionError):
        obj = None
      if n == 1:
        self._check_header(obj)
      elif (isinstance(obj, dict) and isinstance(obj.get("document"), str)
            and isinstance(obj.get("sha"), str) and isinstance(obj.get("rows"), list)):
        self.done[obj["document"]] = (obj["sha"], obj["rows"])
      else:
        raise InputError(f"{self.path}:{n}: unreadable line in a half-done run's file; "
                         "delete the file to start over")
    if self.write and len(complete) < len(data):
      with open(self.path, "r+b") as f:
        f.truncate(len(complete))

  def _check_header(self, header: Any) -> None:
    if not isinstance(header, dict) or header.get("format") != _PARTIAL_FORMAT:
      raise InputError(f"{self.path}: not a jaxicd predict partial file; move it away or set "
                       "another config.output")
    before = header.get("settings", {})
    diff = [f"{k} {before.get(k)!r} -> {v!r}" for k, v in self.settings.items()
            if before.get(k) != v]
    if diff:
      raise InputError(
          f"{self.path} holds a half-done run with other settings ({'; '.join(diff)}): "
          "rerun with the same settings to resume it, or delete the file to start over")

  def add(self, doc: Document, rows: list[dict]) -> None:
    self.done[doc.id] = (_text_hash(doc.text), rows)
    if not self.write:
      return
    if self._file is None:
      fresh = not self.path.exists() or self.path.stat().st_size == 0
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
      if fresh:
        self._append(dict(format=_PARTIAL_FORMAT, settings=self.settings))
    self._append(dict(document=doc.id, sha=_text_hash(doc.text), rows=rows))

  def _append(self, obj: dict) -> None:
    self._file.write(json.dumps(obj, ensure_ascii=False) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def rows_for(self, doc: Document) -> list[dict] | None:
    """The note's lines if it was coded with its current text."""
    entry = self.done.get(doc.id)
    return entry[1] if entry is not None and entry[0] == _text_hash(doc.text) else None

  def close(self, *, remove: bool = False) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if remove and self.write:
      self.path.unlink(missing_ok=True)


# --- the run ----------------------------------------------------------------------------------


class _Progress:
  """Progress lines: notes, windows, rates and an ETA from the characters left to code."""

  def __init__(self, print_fn: Callable[[str], None], total_notes: int, total_chars: int,
               resumed: int, chars_per_window: float):
    self.print, self.total_notes, self.total_chars = print_fn, total_notes, total_chars
    self.notes, self.chars, self.windows = resumed, 0, 0
    self.resumed, self.chunk_windows = resumed, 0
    self.chars_per_window = chars_per_window  # replaced by the measured value once known
    self.t0 = self.last = time.perf_counter()

  def batch(self, windows: int) -> None:
    self.chunk_windows += windows
    self._maybe_print()

  def notes_done(self, docs: Sequence[Document], windows: int) -> None:
    self.notes += len(docs)
    self.chars += sum(len(d.text) for d in docs)
    self.windows += windows
    self.chunk_windows = 0
    self.chars_per_window = self.chars / max(self.windows, 1)
    self._maybe_print(force=self.notes == self.total_notes or self.notes == self.resumed + 1)

  def _maybe_print(self, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self.last < PROGRESS_EVERY_S:
      return
    self.last = now
    minutes = max(now - self.t0, 1e-9) / 60
    windows = self.windows + self.chunk_windows
    left = (self.total_chars - self.chars) / self.chars_per_window - self.chunk_windows
    rate = windows / minutes
    eta = format_eta(max(left, 0) / rate * 60 if rate > 0 else float("nan"))
    self.print(f"predict: {self.notes}/{self.total_notes} notes, {windows} windows coded, "
               f"{(self.notes - self.resumed) / minutes:.1f} notes/min, {rate:.1f} windows/min, "
               f"ETA {eta}")


def _chunks(docs: Sequence[Document], batch_size: int, chars_per_window: float):
  """Consecutive notes with about ``batch_size`` windows together: full generation batches, and
  results written every few notes."""
  chunk, windows = [], 0.0
  for doc in docs:
    chunk.append(doc)
    windows += max(1.0, len(doc.text) / chars_per_window)
    if windows >= batch_size:
      yield chunk
      chunk, windows = [], 0.0
  if chunk:
    yield chunk


def _settings(cfg: Any, step: int | None, checkpoints: str) -> dict[str, Any]:
  """What the codes of a note depend on: a resumed run must match."""
  ec, data = cfg.eval_coding, cfg.data
  return dict(step=step or 0, checkpoints=checkpoints, model=str(cfg.model.source),
              code_space=str(data.code_space), seq_len=int(data.seq_len),
              window_overlap=int(data.window_overlap), max_new_tokens=int(ec.max_new_tokens),
              constrained=bool(ec.constrained), unique_codes=bool(ec.unique_codes))


def _pending_mask(pending: list[bool]) -> list[bool]:
  """The chief's list of notes to code, for every process (each must make the same calls)."""
  if jax.process_count() == 1:
    return pending
  return [bool(x) for x in multihost_utils.broadcast_one_to_all(np.asarray(pending, np.bool_))]


def code_notes(cfg: Any, workdir: str | os.PathLike, plan: Plan, model: Any, tokenizer: Any, *,
               step: int | None, checkpoints: str, is_chief: bool = True,
               print_fn: Callable[[str], None] = print) -> dict[str, Any]:
  """Codes the notes of ``plan`` with ``model`` (the adapters of checkpoint ``step`` in the
  folder ``checkpoints``), resuming a half-done run's ``.partial`` file; writes the JSONL and
  the report (process 0 only) and returns the run's summary."""
  docs = plan.notes.docs
  partial = Partial(plan.partial, _settings(cfg, step, checkpoints), write=is_chief)
  try:
    partial.load()
    pending = _pending_mask([partial.rows_for(doc) is None for doc in docs])
    todo = [doc for doc, p in zip(docs, pending) if p]
    resumed = len(docs) - len(todo)
    if resumed:
      print_fn(f"predict: resuming {plan.partial}: {resumed} of {len(docs)} notes already coded")
    coder = coder_lib.build_coder(cfg, model, tokenizer, workdir)
    print_fn(f"predict: decision threshold {coder.threshold:.3f} ({coder.threshold_origin})")
    describe = describer()
    # A first guess of note characters per window (~3 characters a token); then measured.
    guess = 3.0 * max(coder.seq_len - coder.max_new_tokens - 64, 64)
    progress = _Progress(print_fn, len(docs), sum(len(d.text) for d in todo), resumed, guess)
    generate = coder._generate  # pylint: disable=protected-access

    def counted(batch, *args, **kwargs):  # progress lines inside a long note's windows too
      out = generate(batch, *args, **kwargs)
      progress.batch(len(batch))
      return out
    coder._generate = counted  # pylint: disable=protected-access
    t0 = time.time()
    for chunk in _chunks(todo, coder.batch_size, progress.chars_per_window):
      predictions = coder.code_documents(chunk)
      for doc, evidence in zip(chunk, predictions):
        partial.add(doc, prediction_rows(doc, evidence, describe))
      progress.notes_done(chunk, coder.stats["windows"])

    # (Another process may not see the chief's .partial file: it writes nothing.)
    rows = [row for doc in docs for row in partial.rows_for(doc) or []]
    if is_chief:
      plan.output.parent.mkdir(parents=True, exist_ok=True)
      _write_atomic(plan.output, "".join(json.dumps(row, ensure_ascii=False) + "\n"
                                         for row in rows))
      if plan.report is not None:
        plan.report.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(plan.report, report_lib.render(
            docs, rows, gold=plan.notes.gold, describe=describe,
            title=f"jaxicd predictions: {pathlib.Path(str(cfg.input)).name}",
            subtitle=f"checkpoint step {step or 0} of {checkpoints}; "
                     f"{len(docs)} notes; output {plan.output.name}"))
    partial.close(remove=True)
    codes = sum(len({r["code"] for r in partial.rows_for(doc) or []}) for doc in docs)
    grounded = sum(1 for row in rows if row["begin"] >= 0)
    report = f" and {plan.report}" if plan.report is not None else ""
    print_fn(f"predict (checkpoint step {step or 0}): {len(docs)} notes ({resumed} "
             f"resumed), {codes} codes, {len(rows)} evidence lines ({grounded} found in the "
             f"note) in {time.time() - t0:.0f}s -> {plan.output}{report}")
    return dict(step=step or 0, documents=len(docs), codes=codes, evidence=len(rows),
                grounded=grounded, resumed=resumed, output=str(plan.output),
                report=str(plan.report) if plan.report is not None else "")
  finally:
    partial.close()
