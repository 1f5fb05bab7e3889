"""HTML evidence report: the notes of a run with every predicted evidence span highlighted.

``render(docs, rows)`` returns one self-contained HTML page (inline CSS and JS, no network: a
Content-Security-Policy forbids any external load) for the prediction lines of
`jaxicd.infer.predict` (``{"document", "code", "description", "begin", "end", "quote",
"score"}``). Predict mode writes it as ``report.html`` next to ``predictions.jsonl``.

Per note: the text with each grounded evidence span highlighted at its character offsets, one
colour per code (the same colour for a code throughout the page), and a side table (code,
description, score, mentions = grounded spans) where clicking a code scrolls to its evidence
(again: the next mention). Codes without evidence in the note (``begin = end = -1``) are listed
apart with the model's quote; where the note's gold codes are known (``gold``), predicted codes
are marked true/false positives and gold codes that were not predicted are listed as missed.
More than one note: an index of the notes (counts per note) comes first.

Markup contract (the browser test queries it): each note is a ``section.note`` whose
``div.text`` holds exactly the note's text; each evidence span is one or more
``mark.ev`` elements carrying ``data-code``, ``data-begin``, ``data-end`` (the JSONL's offsets),
``data-ev`` (one key per span) and ``data-part`` (0 for the first piece, which also has
``id="ev-<key>"``). Overlapping spans nest; where two spans cross, the inner one is split into
pieces (``data-part`` 1, 2, ...) whose texts, in order, make up the span.

The note text is HTML-escaped (a note holding ``<script>`` shows it as text); characters the
HTML parser would drop or change (CR, NUL, lone surrogates) are written as character
references, so that offsets into ``div.text`` equal offsets into the note.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

from jaxicd.data.records import Document

# Any external fetch (scripts, styles, images, fonts) is refused by the browser.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                          "'": "&#x27;",
                          "\r": "&#13;",      # the parser turns a literal CR (LF) into LF
                          "\0": "&#xFFFD;"})  # and drops a literal NUL
_SURROGATE = re.compile("[\ud800-\udfff]")


def escape(text: str) -> str:
  """HTML-escapes ``text`` for element content and quoted attributes, one character each."""
  return _SURROGATE.sub("&#xFFFD;", text.translate(_ESCAPES))


# Twelve hues far apart in order; later codes step by the golden angle, a shade darker each round.
_HUES = (2, 212, 125, 32, 275, 178, 322, 55, 240, 95, 195, 345)


def _colour(index: int) -> tuple[str, str]:
  """(solid, light) colours of the code ranked ``index``."""
  if index < len(_HUES):
    hue, light = _HUES[index], 40
  else:
    hue, light = round(index * 137.508) % 360, 40 - 8 * (index // len(_HUES) % 3)
  return f"hsl({hue} 72% {light}%)", f"hsl({hue} 85% 55% / 0.2)"


@dataclasses.dataclass(frozen=True)
class _Span:
  key: str
  code: str
  begin: int
  end: int
  title: str


@dataclasses.dataclass
class _Piece:
  span: _Span
  part: int
  children: list  # str | _Piece

  @property
  def height(self) -> int:
    return 1 + max((c.height for c in self.children if isinstance(c, _Piece)), default=0)


def _layout(text: str, spans: Sequence[_Span]) -> list:
  """The text as a tree of strings and nested pieces (see the module docstring).

  Walks the span boundaries left to right with a stack of open spans: a span that ends closes
  the pieces opened after it, and those that go on are reopened as new pieces. Spans opening at
  the same point are nested longest outside, so properly nested spans are never split.
  """
  root: list = []
  stack: list[tuple[_Span, _Piece]] = []
  parts: collections.Counter[str] = collections.Counter()
  starts: dict[int, list[_Span]] = collections.defaultdict(list)
  for s in spans:
    starts[s.begin].append(s)
  points = sorted({0, len(text)} | {s.begin for s in spans} | {s.end for s in spans})
  for i, p in enumerate(points):
    ending = [k for k, (s, _) in enumerate(stack) if s.end == p]
    going_on = []
    if ending:
      going_on = [s for s, _ in stack[ending[0]:] if s.end != p]
      del stack[ending[0]:]
    for s in sorted(going_on + starts[p], key=lambda s: -s.end):  # stable: ties keep order
      piece = _Piece(s, parts[s.key], [])
      parts[s.key] += 1
      (stack[-1][1].children if stack else root).append(piece)
      stack.append((s, piece))
    if i + 1 < len(points) and points[i + 1] > p:
      (stack[-1][1].children if stack else root).append(text[p:points[i + 1]])
  return root


def _html_of(nodes: list, classes: Mapping[str, str]) -> str:
  out = []
  for node in nodes:
    if isinstance(node, str):
      out.append(escape(node))
      continue
    s = node.span
    attrs = (f'class="ev {classes[s.code]}" data-ev="{s.key}" data-code="{escape(s.code)}" '
             f'data-begin="{s.begin}" data-end="{s.end}" data-part="{node.part}" '
             f'title="{escape(s.title)}"')
    if node.part == 0:
      attrs += f' id="ev-{s.key}"'
    if node.height > 1:  # an outer span's underline goes below those of the spans inside it
      attrs += f' style="padding-bottom:{3 * (node.height - 1)}px"'
    out.append(f"<mark {attrs}>{_html_of(node.children, classes)}</mark>")
  return "".join(out)


@dataclasses.dataclass
class _Code:
  code: str
  description: str
  score: float
  mentions: list[str] = dataclasses.field(default_factory=list)  # span keys, text order
  quote: str = ""  # the model's quote, for a code without grounded evidence


@dataclasses.dataclass
class _Note:
  index: int
  doc: Document
  codes: list[_Code]
  spans: list[_Span]
  gold: frozenset[str] | None

  @property
  def grounded(self) -> list[_Code]:
    return [c for c in self.codes if c.mentions]

  @property
  def ungrounded(self) -> list[_Code]:
    return [c for c in self.codes if not c.mentions]

  @property
  def missed(self) -> list[str]:
    predicted = {c.code for c in self.codes}
    return sorted(self.gold - predicted) if self.gold is not None else []

  def status(self, code: str) -> str:
    if self.gold is None:
      return ""
    return "tp" if code in self.gold else "fp"


def _notes(docs: Sequence[Document], rows: Iterable[Mapping[str, Any]],
           gold: Mapping[str, Iterable[str]] | None) -> list[_Note]:
  by_id = {doc.id: i for i, doc in enumerate(docs)}
  codes: list[dict[str, _Code]] = [{} for _ in docs]
  spans: list[list[_Span]] = [[] for _ in docs]
  for n, row in enumerate(rows, start=1):
    doc_id = str(row.get("document"))
    if doc_id not in by_id:
      raise ValueError(f"prediction line {n}: document {doc_id!r} is not among the notes")
    i = by_id[doc_id]
    text, code = docs[i].text, str(row["code"])
    begin, end = int(row["begin"]), int(row["end"])
    score = float(row.get("score", 0.0))
    entry = codes[i].setdefault(code, _Code(code, str(row.get("description") or ""), score))
    entry.score = max(entry.score, score)
    if begin == end == -1:
      entry.quote = entry.quote or str(row.get("quote") or "")
      continue
    if not 0 <= begin < end <= len(text):
      raise ValueError(f"prediction line {n}: document {doc_id!r}, {code}: offsets "
                       f"[{begin}, {end}) outside the note of {len(text)} characters")
    title = f"{code} {entry.description} [{begin}, {end})".replace("  ", " ")
    spans[i].append(_Span(f"{i}-{len(spans[i])}", code, begin, end, title))
  notes = []
  for i, doc in enumerate(docs):
    spans[i].sort(key=lambda s: (s.begin, -s.end, s.code))
    for s in spans[i]:
      codes[i][s.code].mentions.append(s.key)
    known = None if gold is None or doc.id not in gold else frozenset(gold[doc.id])
    ordered = sorted(codes[i].values(), key=lambda c: (-c.score, c.code))
    notes.append(_Note(i, doc, ordered, spans[i], known))
  return notes


def _code_classes(notes: Sequence[_Note]) -> tuple[dict[str, str], str]:
  """Code -> CSS class ``k<n>`` in order of first appearance, and the rules giving the colours."""
  classes: dict[str, str] = {}
  for note in notes:
    for c in note.codes:
      classes.setdefault(c.code, f"k{len(classes)}")
  rules = []
  for code, cls in classes.items():
    solid, light = _colour(int(cls[1:]))
    rules.append(f".{cls}{{--c:{solid};--b:{light}}}")
  return classes, "\n".join(rules)


_STATUS = {"tp": "✓ TP", "fp": "✗ FP", "fn": "missed"}


def _side(note: _Note, classes: Mapping[str, str],
          describe: Callable[[str], str] | None) -> str:
  out = ['<table class="codes"><thead><tr><th></th><th>code</th><th>description</th>'
         '<th title="the model\'s confidence in the code">score</th>'
         '<th title="evidence spans in the note">mentions</th>'
         + ("<th>gold</th>" if note.gold is not None else "") + "</tr></thead><tbody>"]
  for c in note.grounded:
    status = note.status(c.code)
    out.append(
        f'<tr class="code-row {status}" data-code="{escape(c.code)}">'
        f'<td><span class="swatch {classes[c.code]}"></span></td>'
        f'<td><a class="code" href="#ev-{c.mentions[0]}" data-code="{escape(c.code)}">'
        f"{escape(c.code)}</a></td><td>{escape(c.description)}</td>"
        f'<td class="num">{c.score:.3f}</td><td class="num">{len(c.mentions)}</td>'
        + (f'<td class="status">{_STATUS[status]}</td>' if status else "") + "</tr>")
  if not note.grounded:
    out.append('<tr><td></td><td colspan="5" class="none">no evidence found in the note</td></tr>')
  out.append("</tbody></table>")
  if note.ungrounded:
    out.append('<h4>Without evidence in the note</h4><ul class="ungrounded">')
    for c in note.ungrounded:
      status = note.status(c.code)
      quote = f' <q>{escape(c.quote)}</q>' if c.quote else ""
      out.append(f'<li class="{status}" data-code="{escape(c.code)}"><b>{escape(c.code)}</b> '
                 f'{escape(c.description)} <span class="num">{c.score:.3f}</span>{quote}'
                 + (f' <span class="status">{_STATUS[status]}</span>' if status else "")
                 + "</li>")
    out.append("</ul>")
  if note.missed:
    out.append('<h4>Missed (gold, not predicted)</h4><ul class="missed">')
    for code in note.missed:
      description = describe(code) if describe else ""
      out.append(f'<li class="fn" data-code="{escape(code)}"><b>{escape(code)}</b> '
                 f"{escape(description)}</li>")
    out.append("</ul>")
  return "".join(out)


def _counts(note: _Note) -> dict[str, int]:
  out = dict(chars=len(note.doc.text), codes=len(note.codes), spans=len(note.spans),
             ungrounded=len(note.ungrounded))
  if note.gold is not None:
    out.update(tp=sum(c.code in note.gold for c in note.codes),
               fp=sum(c.code not in note.gold for c in note.codes), fn=len(note.missed))
  return out


def _index(notes: Sequence[_Note]) -> str:
  with_gold = any(n.gold is not None for n in notes)
  heads = ["note", "characters", "codes", "evidence spans", "without evidence"]
  heads += ["TP", "FP", "missed"] if with_gold else []
  out = ['<section id="index"><h2>Notes</h2><table class="index"><thead><tr>'
         + "".join(f"<th>{h}</th>" for h in heads) + "</tr></thead><tbody>"]
  total: collections.Counter[str] = collections.Counter()
  for note in notes:
    counts = _counts(note)
    total.update(counts)
    cells = [f'<a href="#note-{note.index}">{escape(note.doc.id)}</a>']
    cells += [str(counts[k]) for k in ("chars", "codes", "spans", "ungrounded")]
    if with_gold:
      cells += [str(counts[k]) if k in counts else "" for k in ("tp", "fp", "fn")]
    out.append(f'<tr data-note="{note.index}">' + "".join(f"<td>{c}</td>" for c in cells)
               + "</tr>")
  cells = [f"{len(notes)} notes"] + [str(total[k]) for k in ("chars", "codes", "spans",
                                                              "ungrounded")]
  if with_gold:
    cells += [str(total[k]) for k in ("tp", "fp", "fn")]
  out.append("</tbody><tfoot><tr>" + "".join(f"<td>{c}</td>" for c in cells)
             + "</tr></tfoot></table></section>")
  return "".join(out)


_STYLE = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1c2329;
  background:#f4f5f2}
header{padding:14px 24px;background:#1f3340;color:#fff}
header h1{margin:0;font-size:19px;font-weight:600}
header p{margin:4px 0 0;color:#c9d6de;font-size:13px}
h2{font-size:16px;margin:0 0 8px}
h4{margin:14px 0 4px;font-size:13px;color:#46525c}
#index{padding:16px 24px}
table{border-collapse:collapse;background:#fff}
th,td{padding:4px 8px;border-bottom:1px solid #e3e5e1;text-align:left;vertical-align:top}
th{font-size:12px;color:#5a6670;font-weight:600}
table.index td:not(:first-child),.num{text-align:right;font-variant-numeric:tabular-nums}
tfoot td{font-weight:600}
.note{display:grid;grid-template-columns:minmax(0,1fr) minmax(320px,440px);gap:20px;
  padding:16px 24px;border-top:1px solid #d5d8d2}
.note h2 a{font-size:12px;font-weight:400;margin-left:8px;color:#5a6670}
.text{white-space:pre-wrap;overflow-wrap:anywhere;font:13px/2.1 ui-monospace,"DejaVu Sans Mono",
  Menlo,Consolas,monospace;background:#fff;padding:14px 16px;border:1px solid #d5d8d2;
  border-radius:6px}
.side{position:sticky;top:8px;align-self:start;max-height:calc(100vh - 16px);overflow:auto}
.side table{width:100%;font-size:13px}
mark.ev{color:inherit;background:var(--b);border-bottom:3px solid var(--c);padding:1px 0 0;
  border-radius:2px;cursor:pointer}
mark.ev.focus{outline:2px solid var(--c);outline-offset:1px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;background:var(--c)}
a.code{font-weight:600;color:#14527a;text-decoration:none;font-family:ui-monospace,monospace}
tr.focus td{background:#fff6cf}
.status{white-space:nowrap;font-size:12px}
.tp .status{color:#1d7a35}.fp .status{color:#b3261e}
ul{margin:0;padding-left:18px;font-size:13px}
li{margin:2px 0}
li.fn b{color:#b3261e}
q{color:#5a6670;font-style:italic}
.none{color:#7a848c;font-style:italic}
"""

# Clicking a code focuses its evidence and scrolls to the next mention; clicking a highlight
# focuses its code's row. Without JS the code links still jump to the first mention.
_SCRIPT = """
(function(){
  var turn = {};
  function clear(note){
    note.querySelectorAll('.focus').forEach(function(e){e.classList.remove('focus');});
  }
  function focus(note, code, scroll){
    clear(note);
    var firsts = [];
    note.querySelectorAll('mark.ev').forEach(function(m){
      if (m.dataset.code !== code) return;
      m.classList.add('focus');
      if (m.dataset.part === '0') firsts.push(m);
    });
    note.querySelectorAll('tr.code-row').forEach(function(r){
      if (r.dataset.code !== code) return;
      r.classList.add('focus');
      if (!scroll) r.scrollIntoView({block: 'nearest'});
    });
    if (scroll && firsts.length) {
      var k = note.id + ' ' + code;
      var i = turn[k] = ((turn[k] === undefined ? -1 : turn[k]) + 1) % firsts.length;
      firsts[i].scrollIntoView({block:'center'});
      history.replaceState(null, '', '#' + firsts[i].id);
    }
  }
  document.addEventListener('click', function(e){
    var note = e.target.closest('section.note');
    if (!note) return;
    var a = e.target.closest('a.code');
    if (a) { e.preventDefault(); focus(note, a.dataset.code, true); return; }
    var m = e.target.closest('mark.ev');
    if (m) focus(note, m.dataset.code, false);
  });
})();
"""


def render(docs: Sequence[Document], rows: Iterable[Mapping[str, Any]], *,
           gold: Mapping[str, Iterable[str]] | None = None, title: str = "jaxicd evidence report",
           subtitle: str = "", describe: Callable[[str], str] | None = None) -> str:
  """The report page for ``docs`` and their prediction lines ``rows`` (see the module docstring).

  ``gold``: note id -> gold codes, for the notes whose gold is known (others get no TP/FP marks).
  ``describe``: code -> description, for missed codes (predicted ones carry theirs).
  Raises ValueError for a line of an unknown note or with offsets outside its note.
  """
  notes = _notes(docs, rows, gold)
  classes, colour_rules = _code_classes(notes)
  body = []
  if len(notes) > 1:
    body.append(_index(notes))
  for note in notes:
    counts = _counts(note)
    summary = (f"{counts['chars']} characters, {counts['codes']} codes, "
               f"{counts['spans']} evidence spans")
    if note.gold is not None:
      summary += f"; {counts['tp']} TP, {counts['fp']} FP, {counts['fn']} missed"
    back = ' <a href="#index">index</a>' if len(notes) > 1 else ""
    body.append(
        f'<section class="note" id="note-{note.index}" data-document="{escape(note.doc.id)}">'
        f'<div><h2>{escape(note.doc.id)}{back}</h2><p class="summary">{summary}</p>'
        f'<div class="text">{_html_of(_layout(note.doc.text, note.spans), classes)}</div></div>'
        f'<aside class="side">{_side(note, classes, describe)}</aside></section>')
  head_line = f"<p>{escape(subtitle)}</p>" if subtitle else ""
  return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
          f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
          '<meta name="viewport" content="width=device-width, initial-scale=1">'
          f"<title>{escape(title)}</title><style>{_STYLE}{colour_rules}</style></head>"
          f"<body><header><h1>{escape(title)}</h1>{head_line}</header>\n"
          + "\n".join(body) + f"\n<script>{_SCRIPT}</script></body></html>\n")
