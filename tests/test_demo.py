"""The built-in demo corpus: determinism, gold evidence offsets, unseen codes, distractors and
the separation of its phrasing from the expansion templates."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import require_reference
from jaxicd.data import clinical_terms
from jaxicd.data.demo import (DEMO_CODES, STYLES, DemoCorpus, code_space, demo_corpus,
                              demo_stats)
from jaxicd.data.expansion import expand
from jaxicd.model.embedded import smollm2_gguf_path
from jaxicd.model.tokenizer import load_tokenizer
from jaxicd.ontology import get_ontology


@pytest.fixture(scope="module")
def corpus() -> DemoCorpus:
  return demo_corpus(seed=0)


def _spans(corpus: DemoCorpus, doc_id: str) -> list[tuple[int, int]]:
  return [(m.begin, m.end) for m in corpus.mentions[doc_id] + corpus.distractors[doc_id]]


def test_deterministic_from_seed():
  a = demo_corpus(seed=5, train=12, val=4, test=4)
  b = demo_corpus(seed=5, train=12, val=4, test=4)
  assert a.documents == b.documents and a.unseen_codes == b.unseen_codes
  assert a.mentions == b.mentions and a.distractors == b.distractors
  c = demo_corpus(seed=6, train=12, val=4, test=4)
  assert [d.text for d in a.documents] != [d.text for d in c.documents]


def test_deterministic_across_processes():
  """Nothing depends on str hash randomisation: two interpreters agree."""
  script = ("import hashlib; from jaxicd.data.demo import demo_corpus, DEMO_CODES; "
            "from jaxicd.data.expansion import expand; "
            "c = demo_corpus(seed=3, train=10, val=3, test=3); "
            "e = expand(DEMO_CODES[:40], seed=3); "
            "state = (c.documents, sorted(c.unseen_codes), e.spans); "
            "print(hashlib.sha256(repr(state).encode()).hexdigest())")
  digests = set()
  for hash_seed in ("1", "2"):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                         capture_output=True, text=True)
    digests.add(out.stdout.strip())
  assert len(digests) == 1


def test_sizes_and_splits(corpus):
  assert [len(corpus.split(s)) for s in ("train", "val", "test")] == [200, 50, 50]
  assert len({d.id for d in corpus.documents}) == 300
  assert corpus.code_space == DEMO_CODES
  small = demo_corpus(seed=0, train=7, val=3, test=2)
  assert [len(small.split(s)) for s in ("train", "val", "test")] == [7, 3, 2]
  with pytest.raises(ValueError, match="unseen_fraction"):
    demo_corpus(unseen_fraction=0.1)
  with pytest.raises(ValueError, match="split"):
    corpus.split("dev")


def test_demo_codes_are_real_billable_codes():
  onto = get_ontology()
  assert 100 <= len(DEMO_CODES) <= 300 and len(set(DEMO_CODES)) == len(DEMO_CODES)
  assert all(onto.is_billable(c) for c in DEMO_CODES)
  assert code_space("demo") == DEMO_CODES


def test_gold_evidence_offsets(corpus):
  for doc in corpus.documents:
    doc.validate(doc.id)
    assert 3 <= len(doc.codes) <= 15 and len(set(doc.codes)) == len(doc.codes)
    assert set(doc.codes) <= set(DEMO_CODES)
    mentions = corpus.mentions[doc.id]
    assert len(mentions) == len(doc.evidence)
    for m in mentions:
      assert m.kind == "evidence" and m.code in doc.codes
      assert doc.text[m.begin:m.end] == m.phrase
      # The mention is one of the terms written for its code (capitalised at a line start).
      terms = {t.casefold() for t in clinical_terms.CODE_TERMS[m.code]}
      assert m.phrase.casefold() in terms, (doc.id, m)
    for ev in doc.evidence:
      assert doc.quote(ev).casefold() in {t.casefold() for t in clinical_terms.CODE_TERMS[ev.code]}
    assert {ev.code for ev in doc.evidence} == set(doc.codes)  # every code has evidence


def test_unseen_codes(corpus):
  train_codes = {c for d in corpus.split("train") for c in d.codes}
  test_codes = {c for d in corpus.split("test") for c in d.codes}
  val_codes = {c for d in corpus.split("val") for c in d.codes}
  assert len(corpus.unseen_codes) >= 0.2 * len(DEMO_CODES)
  assert not corpus.unseen_codes & train_codes
  assert corpus.unseen_codes == (test_codes | val_codes) - train_codes
  assert len(corpus.unseen_codes & test_codes) >= 0.2 * len(DEMO_CODES)  # measurable on test
  # Every other code of the space is trained on.
  assert train_codes == set(DEMO_CODES) - corpus.unseen_codes


def test_distractors_are_not_evidence(corpus):
  kinds = set()
  for doc in corpus.documents:
    evidence = [(e.begin, e.end) for e in doc.evidence]
    for d in corpus.distractors[doc.id]:
      kinds.add(d.kind)
      assert doc.text[d.begin:d.end] == d.phrase
      assert d.code is None or d.code not in doc.codes, (doc.id, d)
      assert all(d.end <= b or e <= d.begin for b, e in evidence), (doc.id, d)
  assert kinds == {"negated", "family_history", "ruled_out", "medication", "vitals"}


def test_no_unannotated_condition_terms(corpus):
  """Outside gold mentions and distractors, no document names a demo condition."""
  terms = sorted({t for c in clinical_terms.CONDITIONS for t in c.terms}, key=len, reverse=True)
  pattern = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, terms)) + r")(?!\w)", re.I)
  for doc in corpus.documents:
    spans = _spans(corpus, doc.id)
    for m in pattern.finditer(doc.text):
      assert any(b <= m.start() and m.end() <= e for b, e in spans), (doc.id, m.group(0))


def test_phrasing_disjoint_from_expansion_templates(corpus):
  exp = expand(DEMO_CODES, seed=0)
  framed = {s.text.casefold() for s in exp.spans if s.origin in ("paraphrase", "negative")}
  assert len(framed) > 1000
  for doc in corpus.documents:
    low = doc.text.casefold()
    hits = [t for t in framed if t in low]
    assert not hits, (doc.id, hits[:3])


def test_lengths_with_smollm2_tokenizer(corpus):
  """Discharge summaries are 500-2,000 SmolLM2 tokens, the short styles 50-600; jaxicd's
  tokenizer counts each exactly as transformers' does for the same GGUF, and demo_stats reports
  those counts."""
  tok = load_tokenizer("smollm2")  # the embedded model: make installs it, no skip
  require_reference("torch")  # transformers' gguf_file path needs it
  reference = require_reference("transformers").AutoTokenizer.from_pretrained(
      str(smollm2_gguf_path().parent), gguf_file=smollm2_gguf_path().name)
  lengths = [len(reference.encode(d.text, add_special_tokens=False)) for d in corpus.documents]
  assert [len(tok.encode(d.text)) for d in corpus.documents] == lengths
  assert len(lengths) == 300
  long = [n for d, n in zip(corpus.documents, lengths) if corpus.styles[d.id] == "discharge"]
  short = [n for d, n in zip(corpus.documents, lengths) if corpus.styles[d.id] != "discharge"]
  assert long and min(long) >= 500 and max(long) <= 2000
  assert short and min(short) >= 50 and max(short) <= 600
  ranked = sorted(lengths)
  assert demo_stats(corpus, tok)["tokens_per_document"] == {
      "mean": round(sum(lengths) / 300, 1), "p95": ranked[285],  # int(0.95 * 300) = 285
      "min": ranked[0], "max": ranked[-1]}


def test_demo_stats(corpus):
  stats = demo_stats(corpus)
  assert stats["documents"] == {"train": 200, "val": 50, "test": 50}
  assert stats["code_space"] == len(DEMO_CODES)
  assert stats["unseen_codes"] == len(corpus.unseen_codes)
  assert stats["evidence_mentions"] == sum(len(d.evidence) for d in corpus.documents)
  assert stats["codes_per_document"]["min"] >= 3 and stats["codes_per_document"]["max"] <= 15
  est = stats["tokens_per_document_estimate"]
  assert 40 <= est["min"] <= est["mean"] <= est["max"] <= 2000  # words x 1.75: an estimate
  assert stats["styles"] == {s: sum(1 for v in corpus.styles.values() if v == s) for s in STYLES}
  assert sum(stats["styles"].values()) == 300


def test_styles(corpus):
  """Every style occurs in every split; each note opens with its style's heading; terse styles
  write the shortest term (the abbreviation) far more often than discharge summaries do."""
  headings = {"discharge": ("DISCHARGE SUMMARY",), "progress": ("PROGRESS NOTE",),
              "ed": ("ED PROVIDER NOTE",), "signout": ("NIGHT SIGN-OUT",),
              "problems": ("ACTIVE PROBLEMS", "PROBLEM LIST", "Hospital problem list",
                           "Problems addressed this visit")}
  assert set(corpus.styles) == {d.id for d in corpus.documents}
  for split in ("train", "val", "test"):
    assert {corpus.styles[d.id] for d in corpus.split(split)} == set(STYLES)
  shortest = {"discharge": [], "signout": []}
  for doc in corpus.documents:
    style = corpus.styles[doc.id]
    assert doc.text.startswith(headings[style]), (doc.id, style)
    if style in shortest:
      for m in corpus.mentions[doc.id]:
        terms = clinical_terms.CODE_TERMS[m.code]
        if len({len(t) for t in terms}) == len(terms) > 1:  # one unambiguous shortest term
          shortest[style].append(m.phrase.casefold() == min(terms, key=len).casefold())
  rate = {k: sum(v) / len(v) for k, v in shortest.items()}
  assert rate["signout"] > 0.8 and rate["discharge"] < 0.6, rate
