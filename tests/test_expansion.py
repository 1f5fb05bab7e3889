"""Code-centric span expansion: coverage, origins, deduplication, negatives, determinism and the
span-generator plug-in."""

from __future__ import annotations

import random

import pytest

from jaxicd.data import clinical_terms
from jaxicd.data.demo import DEMO_CODES
from jaxicd.data.expansion import (Expansion, StaticSpanGenerator, abbreviate,
                                   description_variants, expand, register_span_generator,
                                   registered_span_generators, unregister_span_generator)
from jaxicd.data.records import SPAN_ORIGINS, Span
from jaxicd.ontology import get_ontology


@pytest.fixture(scope="module")
def onto():
  return get_ontology()


@pytest.fixture(scope="module")
def demo_expansion() -> Expansion:
  return expand(DEMO_CODES, seed=0)


@pytest.fixture(scope="module")
def sample_codes(onto) -> list[str]:
  return random.Random(1234).sample(onto.billable_codes(), 500)


def _key(text: str) -> str:
  return " ".join(text.casefold().split())


def _check_well_formed(exp: Expansion, codes, max_per_code: int) -> None:
  keys = [_key(s.text) for s in exp.spans]
  assert len(keys) == len(set(keys)), "duplicate span texts"
  wanted = set(codes)
  per_code: dict[str, int] = {}
  for s in exp.spans:
    s.validate("expansion")
    assert s.origin in SPAN_ORIGINS
    if s.origin == "negative":
      assert s.code is None
    else:
      assert s.code in wanted
      per_code[s.code] = per_code.get(s.code, 0) + 1
  assert max(per_code.values()) <= max_per_code
  assert set(per_code) == wanted  # coverage 100%: every code has at least one span
  r = exp.report
  assert r["codes_requested"] == len(wanted) == r["codes_covered"] and r["coverage"] == 1.0
  assert sum(r["by_origin"].values()) == r["spans"] == len(exp.spans)
  for origin, n in r["by_origin"].items():
    assert n == sum(1 for s in exp.spans if s.origin == origin)


def test_demo_space_coverage_and_origins(demo_expansion):
  _check_well_formed(demo_expansion, DEMO_CODES, 8)
  by_origin = demo_expansion.report["by_origin"]
  for origin in ("description", "inclusion", "index", "paraphrase", "negative"):
    assert by_origin[origin] > 0, origin
  assert by_origin["negative"] == len(DEMO_CODES)  # one per code by default


def test_random_billable_sample_coverage(sample_codes):
  exp = expand(sample_codes, seed=3, max_per_code=6)
  _check_well_formed(exp, sample_codes, 6)


def test_each_code_gets_its_description_and_curated_terms(demo_expansion, onto):
  texts: dict[str, set[str]] = {}
  for s in demo_expansion.spans:
    if s.code:
      texts.setdefault(s.code, set()).add(s.text)
  for code in DEMO_CODES:
    assert onto.description(code) in texts[code], code
  # Abbreviations from the curated table reach their codes.
  for code, abbr in [("I50.9", "CHF"), ("N17.9", "AKI"), ("I10", "HTN"), ("E11.9", "T2DM"),
                     ("J44.9", "COPD"), ("N39.0", "UTI"), ("I48.91", "afib")]:
    full = expand([code], max_per_code=40, negatives=False)
    assert abbr in {s.text for s in full.spans}, (code, abbr)


def test_description_variants_and_abbreviations():
  assert description_variants("Essential (primary) hypertension") == [
      "essential hypertension", "essential primary hypertension"]
  assert "pneumonia" in description_variants("Pneumonia, unspecified organism")
  assert description_variants("Epilepsy, unspecified, not intractable, without status "
                              "epilepticus")[0] == (
      "epilepsy, not intractable, without status epilepticus")
  assert description_variants("COPD NOS") == ["COPD", "COPD"]  # acronyms keep their case
  assert abbreviate("Type 2 diabetes mellitus with diabetic chronic kidney disease") == (
      "T2DM w/ diabetic CKD")
  assert abbreviate("Non-ST elevation (NSTEMI) myocardial infarction") == "NSTEMI"
  assert abbreviate("Fracture of neck of right femur") == "fx of neck of R femur"


def test_seventh_character_spans(onto):
  exp = expand(["S72.001A"], max_per_code=40, negatives=False)
  index = [s.text for s in exp.spans if s.origin == "index"]
  assert ("initial encounter for closed fracture: fracture of unspecified part of neck of "
          "right femur") in index
  exp_b = expand(["S72.001B"], max_per_code=40, negatives=False)
  assert (onto.description("S72.001") + ", initial encounter for open fracture NOS") in {
      s.text for s in exp_b.spans}


def test_negatives_frame_a_term_and_carry_no_code(demo_expansion):
  negs = [s for s in demo_expansion.spans if s.origin == "negative"]
  prefixes = [t.split("{t}")[0] for t in clinical_terms.NEGATIVE_SPAN_TEMPLATES]
  suffixes = [t.split("{t}")[1] for t in clinical_terms.NEGATIVE_SPAN_TEMPLATES]
  for s in negs:
    assert s.code is None
    assert any(s.text.startswith(p) and s.text.endswith(x) and len(s.text) > len(p) + len(x)
               for p, x in zip(prefixes, suffixes)), s.text


def test_history_templates_only_for_chronic_conditions(demo_expansion):
  acute = {c.code for c in clinical_terms.CONDITIONS if c.kind != "chronic"}
  chronic_prefixes = ("h/o ", "known ", "hx of ")
  for s in demo_expansion.spans:
    if s.code in acute and s.origin == "paraphrase":
      assert not s.text.startswith(chronic_prefixes), s


def test_deterministic_and_order_independent(sample_codes):
  codes = sample_codes[:100]
  a = expand(codes, seed=7)
  b = expand(codes, seed=7)
  assert a.spans == b.spans
  c = expand(list(reversed(codes)), seed=7)
  assert sorted(a.spans, key=repr) == sorted(c.spans, key=repr)
  d = expand(codes, seed=8)
  assert a.spans != d.spans
  assert {s.text for s in a.spans if s.origin == "description"} == {
      s.text for s in d.spans if s.origin == "description"}


def test_max_per_code_cap(sample_codes):
  exp = expand(sample_codes[:50], max_per_code=2, negatives=False)
  counts: dict[str, int] = {}
  for s in exp.spans:
    counts[s.code] = counts.get(s.code, 0) + 1
  assert set(counts.values()) <= {1, 2} and len(counts) == 50
  with pytest.raises(ValueError, match="max_per_code"):
    expand(["I10"], max_per_code=0)


def test_ambiguous_terms_are_dropped():
  # "Polyneuropathy, unspecified" (G62.9) cleans to "polyneuropathy", which is also a cleaned
  # inclusion term of A69.22 (Lyme disease): alone G62.9 keeps it, together neither does.
  alone = expand(["G62.9"], max_per_code=40, negatives=False)
  assert "polyneuropathy" in {_key(s.text) for s in alone.spans}
  both = expand(["G62.9", "A69.22"], max_per_code=40, negatives=False)
  owners: dict[str, set] = {}
  for s in both.spans:
    owners.setdefault(_key(s.text), set()).add(s.code)
  assert "polyneuropathy" not in owners
  assert all(len(v) == 1 for v in owners.values())
  assert both.report["ambiguous_terms_dropped"] >= 2


def test_invalid_codes_are_named():
  with pytest.raises(ValueError, match=r"codes\[1\].*I50\.99"):
    expand(["I10", "I50.99"])
  with pytest.raises(ValueError, match=r"codes\[0\].*malformed"):
    expand(["bogus!"])


def test_span_generator_plugin():
  gen = StaticSpanGenerator("llm-test", {"I10": ["BP runs high, on two agents"],
                                         "E11.9": [Span("sugars poorly managed", "E11.9",
                                                        "synthesized")]})
  register_span_generator(gen)
  try:
    assert gen in registered_span_generators()
    with pytest.raises(ValueError, match="already registered"):
      register_span_generator(gen)
    exp = expand(["I10", "E11.9"], max_per_code=8)
    synth = {(s.text, s.code) for s in exp.spans if s.origin == "synthesized"}
    assert synth == {("BP runs high, on two agents", "I10"),
                     ("sugars poorly managed", "E11.9")}
    assert exp.report["generators"] == ["llm-test"]
    assert exp.report["by_origin"]["synthesized"] == 2
    # An explicit empty list ignores the registry.
    assert not any(s.origin == "synthesized" for s in expand(["I10"], generators=()).spans)
  finally:
    unregister_span_generator("llm-test")
  assert gen not in registered_span_generators()

  wrong = StaticSpanGenerator("wrong", {"I10": [Span("sugar high", "E11.9", "synthesized")]})
  with pytest.raises(ValueError, match="returned a span for E11.9"):
    expand(["I10"], generators=[wrong])
  with pytest.raises(TypeError):
    register_span_generator(object())
