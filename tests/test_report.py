"""The HTML evidence report: markup, escaping and overlapping spans, checked in headless Chromium.

The browser test loads the page in Debian's ``chromium`` (``.ci/run`` installs it), runs a small
script that reads every highlight's code and offsets and the note text back out of the DOM,
clicks a code, and dumps the DOM (``--dump-dom``); then it takes a PNG screenshot. Without
Chromium the browser tests skip, except under ``make test`` or CI (``$CI``), where they fail.
Set ``JAXICD_REPORT_SCREENSHOT=docs/report.png`` to keep the screenshot (the README's).
"""

from __future__ import annotations

import html.parser
import json
import os
import pathlib
import re
import shutil
import struct
import subprocess

import pytest

from conftest import missing_requirement
from jaxicd.data.records import Document
from jaxicd.eval import report

# CRLF line ends, a character outside the BMP (2 UTF-16 units in JS, 1 in Python), markup.
TRICKY = ("Pt \U0001F600 seen.\r\nHx: <script>document.title='pwned'</script> & "
          "acute on chronic diastolic heart failure; essential hypertension.\r\n"
          "Plan: continue\x00 lisinopril.")


def _row(doc: Document, code: str, quote: str | None, score: float, nth: int = 0,
         description: str = "") -> dict:
  if quote is None:
    return dict(document=doc.id, code=code, description=description, begin=-1, end=-1,
                quote="model's own words", score=score)
  begin = -1
  for _ in range(nth + 1):
    begin = doc.text.index(quote, begin + 1)
  return dict(document=doc.id, code=code, description=description, begin=begin,
              end=begin + len(quote), quote=quote, score=score)


def _tricky_run():
  a = Document("note <a>", TRICKY, ())
  b = Document("n2", "Type 2 diabetes mellitus. Diabetes controlled.", ())
  c = Document("n3", "Nothing to code.", ())
  rows = [
      _row(a, "I50.33", "acute on chronic diastolic heart failure", 0.9,
           description="Acute on chronic diastolic (congestive) heart failure"),
      _row(a, "I50.9", "heart failure", 0.7, description="Heart failure, unspecified"),  # inside
      _row(a, "I50.30", "diastolic heart failure", 0.6),               # nested, same end
      _row(a, "I10", "essential hypertension", 0.8),
      _row(a, "I11.0", "failure; essential", 0.3),                     # crosses two spans
      _row(a, "Z79.899", "essential hypertension", 0.2),               # same span, 2nd code
      _row(a, "T46.4X5A", None, 0.1),                                  # ungrounded
      _row(a, "X", "<script>", 0.05),                                  # highlight over markup
      _row(b, "E11.9", "Type 2 diabetes mellitus", 0.95),
      _row(b, "E11.9", "Diabetes", 0.95),
      _row(b, "E11.65", "diabetes", 0.4),
  ]
  gold = {"note <a>": ["I50.33", "I10", "E87.1"], "n2": ["E11.9"]}
  return [a, b, c], rows, gold


# --- without a browser --------------------------------------------------------------------------


class _Collector(html.parser.HTMLParser):
  """The text of each ``div.text`` and its marks (start offsets, attributes), as a parser reads
  the page (what `report` promises, before the browser check below)."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.texts, self.marks, self._depth, self._open = [], [], 0, []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "div" and attrs.get("class") == "text":
      self.texts.append("")
      self._depth = 1
    elif self._depth and tag == "mark":
      self.marks.append(dict(attrs, at=len(self.texts[-1]), note=len(self.texts) - 1))
      self._open.append(self.marks[-1])
    elif self._depth and tag == "div":
      self._depth += 1

  def handle_endtag(self, tag):
    if self._depth and tag == "div":
      self._depth -= 1
    elif self._depth and tag == "mark":
      mark = self._open.pop()
      mark["text"] = self.texts[-1][mark["at"]:]

  def handle_data(self, data):
    if self._depth:
      self.texts[-1] += data


def test_escape_keeps_every_character_one_for_one():
  assert report.escape("<b>&\"'") == "&lt;b&gt;&amp;&quot;&#x27;"
  assert report.escape("a\r\nb\x00c\ud800") == "a&#13;\nb&#xFFFD;c&#xFFFD;"


def test_layout_nests_contained_spans_and_splits_crossing_ones():
  # pylint: disable=protected-access
  S = report._Span
  outer, inner, cross = S("o", "A", 0, 10, ""), S("i", "B", 2, 5, ""), S("x", "C", 8, 14, "")
  tree = report._layout("0123456789abcdef", [outer, inner, cross])

  def show(nodes):
    return "".join(n if isinstance(n, str) else
                   f"[{n.span.key}{n.part}:{show(n.children)}]" for n in nodes)
  assert show(tree) == "[o0:01[i0:234]567[x0:89]][x1:abcd]ef"


def test_render_marks_offsets_escapes_and_gold():
  docs, rows, gold = _tricky_run()
  page = report.render(docs, rows, gold=gold, describe={"E87.1": "Hypo-osmolality"}.get)
  parsed = _Collector()
  parsed.feed(page)
  texts = [t.replace("\ufffd", "\x00") for t in parsed.texts]  # NUL is written as U+FFFD
  assert texts == [d.text for d in docs]  # CR LF kept
  firsts = [m for m in parsed.marks if m["data-part"] == "0"]
  grounded = [r for r in rows if r["begin"] >= 0]
  assert sorted((docs[m["note"]].id, m["data-code"], int(m["data-begin"]), int(m["data-end"]))
                for m in firsts) == sorted(
                    (r["document"], r["code"], r["begin"], r["end"]) for r in grounded)
  for m in firsts:
    assert m["at"] == int(m["data-begin"])
  assert "<script>document.title" not in page
  assert "&lt;script&gt;</mark>document.title=&#x27;pwned&#x27;&lt;/script&gt;" in page
  assert page.count("<script>") == 1  # the report's own
  assert 'class="code-row tp" data-code="I50.33"' in page
  assert 'class="code-row fp" data-code="I50.9"' in page
  assert '<li class="fn" data-code="E87.1"><b>E87.1</b> Hypo-osmolality</li>' in page
  assert '<li class="fp" data-code="T46.4X5A">' in page  # ungrounded, listed apart
  assert "no evidence found in the note" in page  # n3
  assert re.search(r'<a href="#note-0">note &lt;a&gt;</a>', page)  # the index
  assert not re.search(r'(src|href)="(?!#)', page)  # nothing to fetch
  with pytest.raises(ValueError, match="document 'nope' is not among the notes"):
    report.render(docs, [dict(rows[0], document="nope")])
  with pytest.raises(ValueError, match=r"offsets \[5, 500\) outside the note"):
    report.render(docs, [dict(rows[0], begin=5, end=500)])


def test_one_note_has_no_index():
  doc = Document("n", "HTN.", ())
  page = report.render([doc], [_row(doc, "I10", "HTN", 0.5)])
  assert 'id="index"' not in page and "<h4>Missed" not in page


# --- in Chromium ----------------------------------------------------------------------------------


def _chromium() -> str:
  for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser", "google-chrome",
               "google-chrome-stable"):
    path = shutil.which(name) if name else None
    if path:
      return path
  missing_requirement("headless Chromium not found (apt-get install chromium; .ci/run installs "
                      "it; $CHROMIUM names another binary)", "JAXICD_REQUIRE_CHROMIUM")


def _run_chromium(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
  cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--disable-dev-shm-usage", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         *args]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


# Reads what the browser made of the page: note text and highlights (offsets in code points, as
# Python counts them), then clicks a code link twice.
_PROBE = """
<script>
(function(){
  var cp = function(s){ return Array.from(s).length; };
  var out = {title: document.title, scripts: document.scripts.length, notes: []};
  document.querySelectorAll('section.note').forEach(function(sec){
    var text = sec.querySelector('div.text'), marks = [];
    text.querySelectorAll('mark.ev').forEach(function(m){
      var r = document.createRange();
      r.setStart(text, 0);
      r.setEnd(m, 0);
      var box = m.getBoundingClientRect();
      marks.push({ev: m.dataset.ev, id: m.id, code: m.dataset.code, begin: +m.dataset.begin,
                  end: +m.dataset.end, part: +m.dataset.part, at: cp(r.toString()),
                  text: m.textContent, visible: box.width > 0 && box.height > 0,
                  colour: getComputedStyle(m).borderBottomColor});
    });
    out.notes.push({document: sec.dataset.document, text: text.textContent, marks: marks});
  });
  var link = document.querySelector('a.code[data-code="E11.9"]');
  link.click();
  var first = location.hash;
  var focused = Array.from(document.querySelectorAll('mark.focus')).map(function(m){
    return m.dataset.code; });
  link.click();
  out.click = {first: first, second: location.hash, focused: focused,
               row: document.querySelector('tr.focus').dataset.code};
  var pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


def test_report_in_chromium_highlights_the_jsonl_offsets(tmp_path):
  docs, rows, gold = _tricky_run()
  (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  page = report.render(docs, rows, gold=gold)
  path = tmp_path / "report.html"
  path.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
  dom = _run_chromium(tmp_path, "--dump-dom", path.as_uri()).stdout
  probe = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
  assert probe, dom[-2000:]
  out = json.loads(html.unescape(probe.group(1)))

  assert out["title"] == "jaxicd evidence report" and out["scripts"] == 2  # note's <script>: text
  jsonl = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
  by_doc = {d.id: d for d in docs}
  seen = []
  colours: dict[str, set[str]] = {}
  for note in out["notes"]:
    doc = by_doc[note["document"]]
    assert note["text"] == doc.text.replace("\x00", "\ufffd")
    pieces: dict[str, list[dict]] = {}
    for m in note["marks"]:
      pieces.setdefault(m["ev"], []).append(m)
      assert m["visible"], m
      colours.setdefault(m["code"], set()).add(m["colour"])
    for parts in pieces.values():
      first = parts[0]
      assert [p["part"] for p in parts] == list(range(len(parts)))
      assert first["id"] == f"ev-{first['ev']}" and first["at"] == first["begin"]
      at = first["at"]
      for p in parts:  # the pieces of a split span tile it, in order
        assert p["at"] == at
        at += len(p["text"])
      assert at == first["end"]
      assert "".join(p["text"] for p in parts) == doc.text[first["begin"]:first["end"]]
      seen.append((doc.id, first["code"], first["begin"], first["end"]))
  assert sorted(seen) == sorted((r["document"], r["code"], r["begin"], r["end"])
                                for r in jsonl if r["begin"] >= 0)
  assert any(len(p) > 1 for note in out["notes"] for p in [
      [m for m in note["marks"] if m["code"] == "I11.0"]])  # the crossing span was split
  assert all(len(c) == 1 for c in colours.values())  # one colour per code
  assert len(set.union(*colours.values())) == len(colours)  # and a different one each
  # Clicking E11.9 focuses both its mentions and its row, and jumps to one, then the next.
  click = out["click"]
  assert click["focused"] == ["E11.9", "E11.9"] and click["row"] == "E11.9"
  assert click["first"] != click["second"]
  assert {click["first"], click["second"]} == {
      f"#{m['id']}" for n in out["notes"] for m in n["marks"]
      if m["code"] == "E11.9" and m["part"] == 0}


def _demo_page() -> str:
  """Two demo notes with lines made from their gold evidence, and some errors of each kind."""
  from jaxicd.data.demo import demo_corpus
  from jaxicd.ontology import get_ontology
  describe = get_ontology().description
  docs = demo_corpus(seed=0).split("val")[:2]
  rows = []
  for d, doc in enumerate(docs):
    drop = doc.codes[1]  # one missed code per note
    for k, code in enumerate(doc.codes):
      if code == drop:
        continue
      score = round(0.95 - 0.06 * k, 3)
      for ev in doc.evidence:
        if ev.code == code:
          rows.append(dict(document=doc.id, code=code, description=describe(code),
                           begin=ev.begin, end=ev.end, quote=doc.quote(ev), score=score))
    rows.append(_row(doc, "I10" if d == 0 else "E78.5", None, 0.21,
                     description=describe("I10" if d == 0 else "E78.5")))
  return report.render(docs, rows, gold={doc.id: doc.codes for doc in docs}, describe=describe,
                       title="jaxicd predictions: demo val notes",
                       subtitle="lines from the demo notes' gold evidence, one code dropped "
                                "and one added per note")


def test_report_screenshot(tmp_path):
  path = tmp_path / "report.html"
  path.write_text(_demo_page(), encoding="utf-8")
  png = pathlib.Path(os.environ.get("JAXICD_REPORT_SCREENSHOT", "") or tmp_path / "report.png")
  _run_chromium(tmp_path, "--window-size=1400,1000", f"--screenshot={png.absolute()}",
                path.as_uri())
  data = png.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  width, height = struct.unpack(">II", data[16:24])
  assert (width, height) == (1400, 1000) and len(data) > 20_000  # not a blank page
