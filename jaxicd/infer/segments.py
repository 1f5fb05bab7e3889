"""A note's clauses: the candidate evidence spans of the segment scan.

The segment scan (`jaxicd.infer.coder`, ``scan=True``) codes every clause of a note alone with
the span prompt, the task the span examples teach, so evidence the document pass misses still
reaches a code: notes in styles the training documents never showed (problem lists, SOAP
assessments, sign-outs) are mostly short clauses that each name one condition.

A clause is a stretch of text between separators that end a clinical phrase in notes: line
breaks, sentence ends, semicolons, commas, colons after headings, ` - ` / ` -- `, and list
markers (``1.``, ``-``, ``*``, ``#`` starting a line; ``(2)`` and ``2)`` anywhere). A period ends a
sentence only before whitespace and not after a one-letter word, so ``E. coli``, ``3.2`` and
``s/p`` stay whole. Clauses without two letters in a row (numbers, dates) are skipped; long
clauses are cut at the last space before `max_chars`.
"""

from __future__ import annotations

import re

_SEPARATOR = re.compile(
    r"\n"                                   # line breaks
    r"|[;,](?=\s)"                          # semicolons and commas before a space
    r"|(?<!\s[A-Za-z])(?<=\w)[.!?](?=\s|$)"  # sentence ends (not "E. coli", "3.2")
    r"|:(?=\s)"                             # "A/P:", "Labs:" headings
    r"|\s-{1,2}(?=\s)"                      # "AKI - likely cardiorenal", "AF -- on warfarin"
    r"|(?<![^\n])[ \t]*(?:\d+[.)]|[-*#\u2022])(?=\s)"  # list markers starting a line
    r"|\(\d+\)(?=\s)|(?<=\s)\d{1,2}\)(?=\s)"  # "(2) AHRF", "A: 1) Type 2 DM"
)
_WORDY = re.compile(r"[A-Za-z]{2}")


def clauses(text: str, max_chars: int = 240) -> list[tuple[int, int]]:
  """Half-open character ranges of `text`'s clauses (stripped of surrounding whitespace and
  punctuation), in order."""
  out: list[tuple[int, int]] = []
  pos = 0
  for m in [*_SEPARATOR.finditer(text), None]:
    end = m.start() if m is not None else len(text)
    out += _pieces(text, pos, end, max_chars)
    if m is not None:
      pos = m.end()
  return out


def _pieces(text: str, begin: int, end: int, max_chars: int) -> list[tuple[int, int]]:
  """The stripped range ``[begin, end)`` of `text`, cut at spaces into <= `max_chars` pieces."""
  out = []
  begin, end = _strip(text, begin, end)
  while end - begin > max_chars:
    cut = text.rfind(" ", begin + 1, begin + max_chars)
    cut = cut if cut > begin else begin + max_chars
    out.append(_strip(text, begin, cut))
    begin, end = _strip(text, cut, end)
  out.append((begin, end))
  return [(b, e) for b, e in out if _WORDY.search(text, b, e)]


def _strip(text: str, begin: int, end: int) -> tuple[int, int]:
  """``[begin, end)`` without surrounding spaces, quotes, end punctuation or unpaired brackets."""
  while begin < end and (text[begin].isspace() or text[begin] in "\"'" or
                         text[begin] in "([" and not _closes(text, begin, end)):
    begin += 1
  while end > begin and (text[end - 1].isspace() or text[end - 1] in ".,;:\"'" or
                         text[end - 1] in ")]" and not _opens(text, begin, end)):
    end -= 1
  return begin, end


def _closes(text: str, begin: int, end: int) -> bool:
  """Whether the bracket at `begin` is closed before `end`."""
  return text.find(")" if text[begin] == "(" else "]", begin, end) >= 0


def _opens(text: str, begin: int, end: int) -> bool:
  """Whether the bracket at ``end - 1`` was opened at or after `begin`."""
  return text.find("(" if text[end - 1] == ")" else "[", begin, end) >= 0
