"""Ontology: normalisation, hierarchy and code spaces, checked against simple_icd_10_cm and
against ICD-10-CM facts."""

from __future__ import annotations

import pytest

from jaxicd.ontology import Chapter, Ontology, get_ontology, normalize_code


@pytest.fixture(scope="module")
def onto() -> Ontology:
  return get_ontology()


@pytest.mark.parametrize("raw,expected", [
    ("i5023", "I50.23"), (" I50.23 ", "I50.23"), ("i50.23", "I50.23"), ("I10", "I10"),
    ("i10", "I10"), ("s72001a", "S72.001A"), ("S72.001A", "S72.001A"), ("E119", "E11.9"),
    ("QA00101", "QA0.0101"), ("t360x1a", "T36.0X1A"),
])
def test_normalize_code(raw, expected):
  assert normalize_code(raw) == expected


@pytest.mark.parametrize("raw", ["", "I5", "150.23", "I50.23456", "I50..2", "I50-23", "I 50",
                                 "ABCD.E.F", None, 5023])
def test_normalize_code_rejects_malformed(raw):
  with pytest.raises(ValueError, match="ICD-10-CM code"):
    normalize_code(raw)


def test_hierarchy_facts(onto):
  assert onto.parent("I50.23") == "I50.2"
  assert onto.ancestors("I50.23") == ("I50.2", "I50")
  assert onto.ancestors("I50.23", include_blocks=True) == ("I50.2", "I50", "I30-I5A", "9")
  assert onto.parent("I50") is None  # a category's parent is a block, not a code
  assert onto.block("I50.23") == "I30-I5A"
  assert onto.chapter("i5023") == Chapter(9, "Diseases of the circulatory system", "I00-I99")
  assert onto.chapter("E11.9").number == 4
  assert onto.chapter("E11.9").title == "Endocrine, nutritional and metabolic diseases"
  assert onto.chapter("S72.001A").code_range == "S00-T88"
  assert onto.description("I50.23") == "Acute on chronic systolic (congestive) heart failure"
  assert onto.description("I10") == "Essential (primary) hypertension"
  assert "Chronic obstructive lung disease NOS" in onto.inclusion_terms("J44.9")
  assert "I50.23" in onto.children("I50.2")


def test_billable_vs_category(onto):
  assert onto.is_billable("I50.23") and onto.is_billable("i5023")
  assert not onto.is_billable("I50.2") and not onto.is_billable("I50")
  assert onto.is_valid("I50") and onto.is_valid("I50.2")
  assert not onto.is_valid("I50.99") and not onto.is_valid("XYZ") and not onto.is_valid("")
  # Categories without subdivisions are billable, including those sharing a block's name.
  assert onto.is_billable("I10") and onto.is_billable("B20") and onto.is_billable("Z66")
  assert not onto.is_valid("A00-A09") and not onto.is_valid("9")  # blocks/chapters aren't codes
  with pytest.raises(KeyError, match="I50.99"):
    onto.description("I50.99")


def test_seventh_characters(onto):
  sc = onto.seventh_character("S72.001A")
  assert (sc.char, sc.meaning) == ("A", "initial encounter for closed fracture")
  assert onto.parent("S72.001A") == "S72.001"
  assert onto.description("S72.001A") == (
      "Fracture of unspecified part of neck of right femur, initial encounter for closed "
      "fracture")
  assert onto.seventh_character("S72.001B").alternatives == (
      "initial encounter for open fracture NOS",)
  # Placeholder X pads short codes to six characters before the seventh.
  assert onto.is_billable("T36.0X1A") and onto.seventh_character("T36.0X1A").meaning == (
      "initial encounter")
  assert onto.seventh_character("I50.23") is None
  assert not onto.is_billable("S72.001")  # needs its seventh character


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_parity_with_simple_icd_10_cm(onto):
  """Every code, parent chain, description, inclusion term and leaf matches the package."""
  import simple_icd_10_cm as cm
  lib_codes = [c for c in cm.get_all_codes() if not (cm.is_chapter(c) or
                                                      (cm.is_block(c) and "-" in c))]
  lib_codes = [c for c in lib_codes if not c.isdigit()]
  assert set(lib_codes) == set(onto.all_codes())
  lib_billable = {c for c in lib_codes if cm.is_leaf(c)}
  assert lib_billable == set(onto.billable_codes())
  for code in lib_codes:
    assert onto.ancestors(code, include_blocks=True) == tuple(cm.get_ancestors(code)), code
    assert list(onto.inclusion_terms(code)) == cm.get_inclusion_term(code), code
    expected = cm.get_description(code)
    sc = onto.seventh_character(code)
    if sc is not None and sc.alternatives:  # the package joins a character's extra wordings
      stem = onto.description(code)[:-len(sc.meaning)]
      assert expected == stem + sc.meaning + "".join(
          "/" + a for a in _raw_alternatives(cm, code, sc.char)), code
    else:
      assert onto.description(code) == expected, code


def _raw_alternatives(cm, code: str, char: str) -> list[str]:
  raw = cm.get_seven_chr_def(cm.get_parent(code), search_in_ancestors=True)[char]
  return raw.split("/")[1:]


def test_billable_count(onto):
  # ICD-10-CM April 2026 (FY2026) as shipped by simple-icd-10-cm 1.5.
  assert len(onto.billable_codes()) == 74_719
  assert len(set(onto.billable_codes())) == 74_719
  assert onto.billable_codes()[0] == "A00.0"


def test_code_space_all_and_demo(onto):
  from jaxicd.data.demo import DEMO_CODES, code_space
  assert onto.code_space("all") == onto.billable_codes()
  assert onto.code_space("ALL") == onto.billable_codes()
  assert code_space("all") == onto.billable_codes()
  demo = code_space("demo")
  assert demo == DEMO_CODES and 100 <= len(demo) <= 300 and code_space("Demo") == DEMO_CODES
  with pytest.raises(FileNotFoundError, match="'demo' is jaxicd.data.demo.code_space's"):
    onto.code_space("demo")  # the ontology, the bottom layer, knows no demo
  assert all(onto.is_billable(c) for c in demo)
  assert onto.code_space(["i10", "E119", "I10"]) == ("I10", "E11.9")


def test_code_space_file(onto, tmp_path):
  good = tmp_path / "codes.txt"
  good.write_text("# my codes\nI10\n\ni5023   # trailing comment\nE11.9\nI10\n")
  assert onto.code_space(str(good)) == ("I10", "I50.23", "E11.9")
  assert onto.code_space(good) == ("I10", "I50.23", "E11.9")

  unknown = tmp_path / "unknown.txt"
  unknown.write_text("I10\nE11.9\nI50.99\n")
  with pytest.raises(ValueError, match=r"unknown\.txt:3: I50\.99 is not an ICD-10-CM code"):
    onto.code_space(str(unknown))
  malformed = tmp_path / "malformed.txt"
  malformed.write_text("I10\nnot-a-code\n")
  with pytest.raises(ValueError, match=r"malformed\.txt:2: malformed ICD-10-CM code"):
    onto.code_space(str(malformed))
  category = tmp_path / "category.txt"
  category.write_text("I50\n")
  with pytest.raises(ValueError, match=r"category\.txt:1: I50 is a category, not a billable"):
    onto.code_space(str(category))
  empty = tmp_path / "empty.txt"
  empty.write_text("# nothing\n\n")
  with pytest.raises(ValueError, match="holds no codes"):
    onto.code_space(str(empty))
  with pytest.raises(FileNotFoundError, match="no such file"):
    onto.code_space(str(tmp_path / "missing.txt"))


def test_get_ontology_is_cached():
  assert get_ontology() is get_ontology()
