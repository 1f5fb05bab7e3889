"""Prompt and target format, loss masks, and the parser that reads model output back.

One instruction serves spans and documents (a span is a tiny document: that is what lets span
skill transfer to notes). Two answer formats exist (``data.answer_format``):

**evidence_first** (the default): one line per code, the evidence first, copied token for token
from the note, then the code it supports::

     acute on chronic CHF | I50.23
     AKI | N17.9

so the model reads (and writes) the evidence before it commits to a code: the task the span
examples teach, where the whole span is the quote. The answer is built at the token level
(`encode_evidence_example`): the quote is the slice of the prompt's own tokens that covers the
evidence (cut at the first token holding a newline), then the `` |`` token, then
``code_token_ids(code, EVIDENCE_FIRST)`` (the tokens of `` CODE``), lines joined by the ``\n``
token. Decoding can therefore copy quotes from the prompt's note tokens (every quote grounded by
construction) and walk a code trie after the separator. A code without evidence is the line
`` | CODE`` (empty quote); no code at all is the empty answer (only the end-of-turn token).

**code_first** (the format of earlier releases): the code, then its quote:

    I50.23 | acute on chronic systolic heart failure
    N17.9 | AKI
    E11.9

or the single line ``NONE``. Each line starts with the code right after a newline (or at the start
of the answer), and the byte-level pre-tokenizers of our models (SmolLM's, Llama 3's, Qwen2's) all
cut a piece boundary after ``\\n`` and before `` |``. So the tokens of every code inside an answer
are exactly ``tokenizer.encode(code)`` (`code_token_ids`): constrained decoding can walk a trie of
tokenized codes from each line start, then let the model write `` | quote\\n``, ``\\n`` or the
end-of-turn token. ``tests/test_prompts.py`` checks this property.

Quotes are written on one line: whitespace runs inside evidence (newlines of the note) become one
space. The parser therefore matches quotes exactly first, then case- and whitespace-insensitively,
and maps matches back to offsets in the original text.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import re
from typing import Any, Callable, Collection, Sequence

import numpy as np

from jaxicd.data.records import Document, Evidence, Span
from jaxicd.ontology import normalize_code

# Short on purpose: every prompt token is paid for in every training example.
SYSTEM_PROMPT = "You are a clinical coder."
INSTRUCTION = "Assign ICD-10-CM codes. One line per code: CODE | evidence quote, or NONE."
NONE = "NONE"
SEPARATOR = " | "
CODE_FIRST, EVIDENCE_FIRST = "code_first", "evidence_first"
ANSWER_FORMATS = (CODE_FIRST, EVIDENCE_FIRST)
# Checkpoints record it: adapters trained on other prompts are refused on resume. The digest
# follows the prompt strings; bump the number when the encoding of answers changes.
PROMPT_VERSION = "1-" + hashlib.sha256(
    "\0".join((SYSTEM_PROMPT, INSTRUCTION, NONE, SEPARATOR)).encode()).hexdigest()[:8]


def check_answer_format(answer_format: str) -> str:
  if answer_format not in ANSWER_FORMATS:
    raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
  return answer_format


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def one_line(text: str) -> str:
  """Collapses whitespace runs (newlines included) to one space, so a quote fits on one line."""
  return " ".join(text.split())


def _line(code: str, quote: str) -> str:
  return f"{code}{SEPARATOR}{quote}" if quote else code


def _format_lines(lines: list[str]) -> str:
  return "\n".join(lines) if lines else NONE


@dataclasses.dataclass(frozen=True)
class TargetLine:
  """One answer line of a window: a code and its evidence (window-relative half-open character
  offsets; -1/-1 for a code without evidence)."""

  code: str
  begin: int = -1
  end: int = -1


def target_lines(doc: Document, begin: int = 0, end: int | None = None) -> list[TargetLine]:
  """The answer lines for the window ``doc.text[begin:end]`` of a document (any format).

  Window semantics (half-open character offsets into ``doc.text``):
    * A code with evidence is listed iff at least one of its evidence spans lies entirely inside
      the window (``begin <= ev.begin and ev.end <= end``); the quote is the earliest such span.
      Evidence cut by a window edge is not quoted (a clipped quote would teach clipped answers);
      overlapping windows give such evidence a whole appearance in the next window.
    * Codes with evidence are ordered by where that quote begins (reading order; ties by code),
      which is also the order the parser grounds quotes in.
    * Codes of the document without any evidence get a line without quote in every window (we
      cannot tell where they are supported), after the quoted ones, in ``doc.codes`` order.
  """
  n = len(doc.text)
  end = n if end is None else end
  if not 0 <= begin <= end <= n:
    raise ValueError(f"document {doc.id!r}: window [{begin}, {end}) outside text of length {n}")
  first: dict[str, Evidence] = {}
  has_evidence: set[str] = set()
  for ev in doc.evidence:
    has_evidence.add(ev.code)
    if begin <= ev.begin and ev.end <= end and ev.end > ev.begin:
      best = first.get(ev.code)
      if best is None or (ev.begin, ev.end) < (best.begin, best.end):
        first[ev.code] = ev
  quoted = sorted(first.values(), key=lambda ev: (ev.begin, ev.code))
  lines = [TargetLine(ev.code, ev.begin - begin, ev.end - begin) for ev in quoted]
  seen = set(first)
  for code in doc.codes:
    if code not in has_evidence and code not in seen:
      seen.add(code)
      lines.append(TargetLine(code))
  return lines


def document_target(doc: Document, begin: int = 0, end: int | None = None) -> str:
  """The code-first answer text for the window ``doc.text[begin:end]`` (see `target_lines`):
  ``CODE | quote`` lines (a bare ``CODE`` without evidence), or ``NONE``. Quotes are
  ``one_line(doc.text[ev.begin:ev.end])``; they are substrings of the window text up to
  whitespace, so ``parse_output(target, window_text)`` grounds every one of them.
  """
  window = doc.text[begin:end]
  return _format_lines([_line(ln.code, one_line(window[ln.begin:ln.end]) if ln.begin >= 0 else "")
                        for ln in target_lines(doc, begin, end)])


def span_lines(span: Span) -> list[TargetLine]:
  """A span example's answer: its code with the whole span as evidence (none if negative)."""
  return [] if span.code is None else [TargetLine(span.code, 0, len(span.text))]


def span_target(span: Span) -> str:
  """``CODE | span text`` (text on one line), or ``NONE`` for a negative span."""
  if span.code is None:
    return NONE
  return _line(span.code, one_line(span.text))


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def chat_messages(text: str) -> list[dict[str, str]]:
  """System and user messages for `text` (the instruction first, so prompts share a prefix)."""
  return [{"role": "system", "content": SYSTEM_PROMPT},
          {"role": "user", "content": f"{INSTRUCTION}\n\n{text}"}]


def prompt_text(tokenizer: Any, text: str) -> str:
  """The chat-formatted prompt, ending with the assistant header (``<|im_start|>assistant\\n``)."""
  return tokenizer.apply_chat_template(chat_messages(text), add_generation_prompt=True)


def encode_prompt(tokenizer: Any, text: str) -> np.ndarray:
  """Token ids (int32) of the prompt for `text`; generation continues after the last one."""
  return np.asarray(tokenizer.encode(prompt_text(tokenizer, text)), dtype=np.int32)


def shared_prefix_length(token_arrays: Sequence[np.ndarray], limit: int | None = None) -> int:
  """How many leading tokens every array in `token_arrays` shares (at most `limit`)."""
  first = token_arrays[0]
  n = min(len(a) for a in token_arrays)
  n = n if limit is None else min(n, limit)
  for a in token_arrays[1:]:
    diff = np.flatnonzero(a[:n] != first[:n])
    n = int(diff[0]) if diff.size else n
  return n


def encode_example(tokenizer: Any, text: str, target: str) -> dict[str, np.ndarray]:
  """A training example: the prompt, then the answer `target` and the end-of-turn token.

  Returns dict(tokens=int32[n], loss_mask=int32[n]) with loss_mask 1 exactly on the answer tokens
  and the end-of-turn token. Prompt and answer are tokenized separately so the mask boundary is
  exact; this equals tokenizing the whole formatted text because the assistant header ends with a
  newline, after which every supported pre-tokenizer starts a new piece (answers start with a
  code letter or ``NONE``), and the end-of-turn token is special (tested).
  """
  if not target or target != target.strip():
    raise ValueError(f"target must be non-empty without surrounding whitespace, got {target!r}")
  prompt = tokenizer.encode(prompt_text(tokenizer, text))
  answer = tokenizer.encode(target) + [tokenizer.end_of_turn_id]
  tokens = np.asarray(prompt + answer, dtype=np.int32)
  loss_mask = np.zeros(len(tokens), dtype=np.int32)
  loss_mask[len(prompt):] = 1
  return {"tokens": tokens, "loss_mask": loss_mask}


def code_token_ids(tokenizer: Any, code: str, answer_format: str = CODE_FIRST) -> list[int]:
  """Tokens of `code` as an answer writes it (for a constrained-decoding trie over the code
  space): at the start of a line (code-first; include ``NONE``), or after the `` |`` separator
  (evidence-first: the tokens of `` CODE``, as the pre-tokenizer cuts before the space)."""
  return tokenizer.encode(code if answer_format == CODE_FIRST else " " + code)


def single_token(tokenizer: Any, text: str) -> int:
  """The id of `text`, which must be one token (the separator, the newline)."""
  ids = tokenizer.encode(text)
  if len(ids) != 1:
    raise ValueError(f"{text!r} must be one token of this tokenizer, got {ids}")
  return ids[0]


@dataclasses.dataclass(frozen=True)
class EncodedPrompt:
  """A prompt's tokens and where the note sits in them.

  ``tokens[note_lo:note_hi]`` are the tokens that lie inside the note text (the ones an
  evidence-first quote may copy); ``offsets`` are each token's character offsets into the
  prompt string, whose note text starts at ``note_char``.
  """

  tokens: np.ndarray
  offsets: list[tuple[int, int]]
  note_char: int
  note_lo: int
  note_hi: int
  prompt: str


def encode_prompt_with_note(tokenizer: Any, text: str) -> EncodedPrompt:
  """`encode_prompt` plus the token range of the note inside the prompt."""
  prompt = prompt_text(tokenizer, text)
  ids, offsets = tokenizer.encode_with_offsets(prompt)
  head = f"{INSTRUCTION}\n\n"
  note_char = prompt.find(head) + len(head)
  body = text.rstrip()  # some chat templates trim the message
  if note_char < len(head) or not prompt.startswith(body, note_char):
    raise ValueError("the chat template does not render the note verbatim after the "
                     "instruction; evidence-first answers need the note's tokens")
  note_end = note_char + len(body)
  inside = [i for i, (b, e) in enumerate(offsets) if b >= note_char and e <= note_end and e > b]
  lo, hi = (inside[0], inside[-1] + 1) if inside else (len(ids), len(ids))
  return EncodedPrompt(np.asarray(ids, np.int32), list(offsets), note_char, lo, hi, prompt)


def quote_token_range(encoded: EncodedPrompt, begin: int, end: int) -> tuple[int, int]:
  """Token range ``[i, j)`` of the note tokens covering note characters ``[begin, end)``, cut
  at the first token that holds a newline (an answer line holds one line of the note)."""
  cb, ce = encoded.note_char + begin, encoded.note_char + end
  i = encoded.note_lo
  while i < encoded.note_hi and encoded.offsets[i][1] <= cb:
    i += 1
  j = i
  while j < encoded.note_hi and encoded.offsets[j][0] < ce:
    b, e = encoded.offsets[j]
    if "\n" in encoded.prompt[b:e]:
      if encoded.prompt[b:e].strip():  # text before the newline would be lost: stop before
        break
      if j == i:  # a leading newline token: skip it
        i = j = j + 1
        continue
      break
    j += 1
  return i, j


def encode_evidence_example(tokenizer: Any, text: str,
                            lines: Sequence[TargetLine]) -> dict[str, np.ndarray]:
  """An evidence-first training example (see the module docstring): the prompt for `text`, then
  ``quote | CODE`` lines whose quotes are the prompt's own tokens over each line's evidence,
  then the end-of-turn token; loss_mask 1 on the answer and the end-of-turn token."""
  encoded = encode_prompt_with_note(tokenizer, text)
  # One token each with the tokenizers we ship for (constrained decoding needs that); any
  # tokenizer can still train on the format.
  sep = tokenizer.encode(SEPARATOR.rstrip())
  newline = tokenizer.encode("\n")
  answer: list[int] = []
  for k, ln in enumerate(lines):
    if k:
      answer.extend(newline)
    if ln.begin >= 0:
      i, j = quote_token_range(encoded, ln.begin, ln.end)
      answer.extend(int(t) for t in encoded.tokens[i:j])
    answer.extend(sep)
    answer.extend(code_token_ids(tokenizer, ln.code, EVIDENCE_FIRST))
  answer.append(tokenizer.end_of_turn_id)
  tokens = np.concatenate([encoded.tokens, np.asarray(answer, np.int32)])
  loss_mask = np.zeros(len(tokens), dtype=np.int32)
  loss_mask[len(encoded.tokens):] = 1
  return {"tokens": tokens, "loss_mask": loss_mask}


def encode_target(tokenizer: Any, text: str, lines: Sequence[TargetLine],
                  answer_format: str) -> dict[str, np.ndarray]:
  """The training example of a window or span with answer `lines`, in `answer_format`."""
  if check_answer_format(answer_format) == EVIDENCE_FIRST:
    return encode_evidence_example(tokenizer, text, lines)
  target = _format_lines([_line(ln.code, one_line(text[ln.begin:ln.end]) if ln.begin >= 0
                                else "") for ln in lines])
  return encode_example(tokenizer, text, target)


# ---------------------------------------------------------------------------------------------
# Parsing model output
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prediction:
  """A code read from model output, with its quote grounded in the document when possible.

  ``begin``/``end`` are half-open character offsets into the document text given to the parser,
  or -1/-1 when the line had no quote, no document was given, or the quote was not found.
  """

  code: str
  quote: str = ""
  begin: int = -1
  end: int = -1

  @property
  def grounded(self) -> bool:
    return self.begin >= 0


@dataclasses.dataclass
class ParseResult:
  """Output of `parse_output`.

  Attributes:
    predictions: one per accepted line, in output order (the same code may appear with several
      quotes; an exact repeat of a code and quote is rejected as a duplicate).
    rejected: (line, reason) for every non-empty line that yielded no prediction.
    none: the output contained an explicit ``NONE`` line.
    ungrounded: predictions whose non-empty quote was not found in the document (kept, with
      begin = end = -1). Zero when no document was given.
  """

  predictions: list[Prediction] = dataclasses.field(default_factory=list)
  rejected: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  none: bool = False
  ungrounded: int = 0

  @property
  def codes(self) -> list[str]:
    """Distinct predicted codes in first-seen order."""
    return list(dict.fromkeys(p.code for p in self.predictions))


# A list marker before the code: "-", "*", "•", "1.", "2)".
_BULLET = re.compile(r"^(?:[-*•·]|\d{1,3}[.)])\s+")
# A line without "|": a code-shaped first word, then optionally ":" / "-" and a quote.
_BARE = re.compile(r"^(\S+?)[:,]?(?:\s+(?:[-–:]\s+)?(.*))?$")
_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<end_of_turn>")
_QUOTES = ("\"\"", "''", "“”", "‘’", "``")


def _strip_quote_marks(q: str) -> str:
  q = q.strip()
  while len(q) >= 2 and any(q[0] == a and q[-1] == b for a, b in _QUOTES):
    q = q[1:-1].strip()
  return q


class _Locator:
  """Finds quotes in a document: exact first, then ignoring case and whitespace differences.

  Rule for repeated phrases: a quote is grounded at its first occurrence at or after the begin of
  the previous grounded quote (answers list evidence in reading order), else at its first
  occurrence anywhere.
  """

  def __init__(self, text: str):
    self.text = text
    self.cursor = 0
    self._folded: tuple[str, list[int]] | None = None

  def _fold(self) -> tuple[str, list[int]]:
    """Lower-cased text with whitespace runs as one space; index map back to the original."""
    if self._folded is None:
      chars: list[str] = []
      origin: list[int] = []
      in_space = False
      for i, c in enumerate(self.text):
        if c.isspace():
          if not in_space:
            chars.append(" ")
            origin.append(i)
          in_space = True
          continue
        in_space = False
        for lc in c.lower():  # lower() may expand a character; each piece maps back to it
          chars.append(lc)
          origin.append(i)
      self._folded = ("".join(chars), origin)
    return self._folded

  @staticmethod
  def _find(haystack: str, needle: str, start: int) -> int:
    pos = haystack.find(needle, start)
    return pos if pos >= 0 else haystack.find(needle)

  def locate(self, quote: str) -> tuple[int, int]:
    pos = self._find(self.text, quote, self.cursor)
    if pos >= 0:
      self.cursor = pos
      return pos, pos + len(quote)
    folded, origin = self._fold()
    needle = " ".join(quote.split()).lower()
    if not needle:
      return -1, -1
    # Cursor in folded coordinates: the first folded index at/after the original cursor.
    start = bisect.bisect_left(origin, self.cursor)
    pos = self._find(folded, needle, start)
    if pos < 0:
      return -1, -1
    begin, end = origin[pos], origin[pos + len(needle) - 1] + 1
    self.cursor = begin
    return begin, end


def split_line(line: str, answer_format: str = CODE_FIRST) -> tuple[str, str]:
  """``(code part, quote)`` of one answer line (bullets and whitespace already stripped).

  Code-first: the text before the first ``|`` is the code (or, without ``|``, the first
  code-shaped word); evidence-first: the text after the last ``|`` (quotes may hold ``|``), and
  a line without ``|`` is a bare code.
  """
  if answer_format == EVIDENCE_FIRST:
    if "|" in line:
      quote, code_part = line.rsplit("|", 1)
    else:
      quote, code_part = "", line
  elif "|" in line:
    code_part, quote = line.split("|", 1)
  else:
    m = _BARE.match(line)
    code_part, quote = (m.group(1), m.group(2) or "") if m else (line, "")
  return code_part.strip().rstrip(":,."), _strip_quote_marks(quote)


def read_code(code_part: str) -> str:
  """The normalized code of a line's code part; ValueError if it is not code-shaped."""
  code = normalize_code(code_part)
  # normalize_code checks shape loosely; every ICD-10-CM code has a digit second, which also
  # keeps words of a stray prose line ("THE", "PATIENT") from passing as codes.
  if not code[1].isdigit():
    raise ValueError(code)
  return code


@dataclasses.dataclass(frozen=True)
class AnswerLine:
  """One answer line as both the parser and the coder's scorer read it."""

  text: str          # the line without list bullet and surrounding whitespace
  code_part: str     # where the line writes its code (`split_line`)
  quote: str
  code: str | None   # the normalized code; None for NONE, prose or a malformed code part


def read_line(raw: str, answer_format: str = CODE_FIRST) -> AnswerLine:
  """Reads the code (and quote) of one raw answer line: the one reader of answer lines."""
  text = _BULLET.sub("", raw.strip()).strip()
  code_part, quote = split_line(text, answer_format)
  try:
    code = read_code(code_part) if text else None
  except ValueError:
    code = None
  return AnswerLine(text, code_part, quote, code)


def parse_output(output: str, document_text: str | None = None,
                 is_valid_code: Callable[[str], bool] | Collection[str] | None = None,
                 answer_format: str = CODE_FIRST) -> ParseResult:
  """Reads `CODE | quote` lines from model output.

  Tolerates surrounding whitespace, list bullets, any letter case and dotted or undotted codes,
  ``CODE|quote`` without spaces, bare ``CODE`` lines, quote marks around the quote, duplicates and
  blank lines. Codes are normalized with `jaxicd.ontology.normalize_code`.

  Args:
    output: decoded model output; anything from an end-of-turn marker on is ignored.
    document_text: the text the prompt showed; quotes are located in it.
    is_valid_code: a predicate or a collection (e.g. the code space) of accepted normalized codes;
      None accepts every well-formed code.

  Returns:
    ParseResult; every non-empty line is either a prediction, the NONE marker, or rejected with a
    reason ("malformed code", "invalid code", "duplicate").
  """
  if is_valid_code is None:
    valid = None
  elif callable(is_valid_code):
    valid = is_valid_code
  elif isinstance(is_valid_code, (set, frozenset, dict)):
    valid = is_valid_code.__contains__
  else:  # a tuple/list code space: hash it once (pass a set to skip this per call)
    valid = frozenset(is_valid_code).__contains__
  result = ParseResult()
  locator = _Locator(document_text) if document_text is not None else None
  seen: set[tuple[str, str]] = set()
  for marker in _END_MARKERS:  # output decoded with special tokens: the answer ends there
    output = output.split(marker, 1)[0]
  for raw in output.splitlines():
    line = read_line(raw, answer_format)
    if not line.text:
      continue
    if line.text.rstrip(".").upper() == NONE:
      result.none = True
      continue
    code, quote = line.code, line.quote
    if code is None:
      result.rejected.append((raw, f"malformed code {line.code_part!r}"))
      continue
    if valid is not None and not valid(code):
      result.rejected.append((raw, f"invalid code {code}: not in the code space"))
      continue
    key = (code, " ".join(quote.split()).lower())
    if key in seen:
      result.rejected.append((raw, f"duplicate of an earlier line for {code}"))
      continue
    seen.add(key)
    begin = end = -1
    if locator is not None and quote:
      begin, end = locator.locate(quote)
      if begin < 0:
        result.ungrounded += 1
    result.predictions.append(Prediction(code, quote, begin, end))
  if answer_format == EVIDENCE_FIRST and not result.predictions and not result.rejected:
    result.none = True  # the empty answer says "no code"
  return result
