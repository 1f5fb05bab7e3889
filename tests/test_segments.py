"""A note's clauses (the segment scan's candidate spans), against hand-split notes."""

from jaxicd.infer import segments


def _texts(text, **kw):
  return [text[b:e] for b, e in segments.clauses(text, **kw)]


def test_a_soap_note_splits_into_its_clinical_phrases():
  text = ("S: 68M w/ HFrEF (EF 25%), pAF on apixaban. Denies CP.\n"
          "Labs: K 3.2, Mg 1.5, Glu 245.\n"
          "A/P:\n"
          "1. Acute on chronic HFrEF - cont IV lasix\n"
          "(2) E. coli UTI -- day 3; s/p CABG 2015\n"
          "A: 1) Type 2 DM with neuropathy 2) Essential HTN\n")
  # "S", "K 3.2" and "A/P" hold no two letters in a row: skipped.
  assert _texts(text) == [
      "68M w/ HFrEF (EF 25%)", "pAF on apixaban", "Denies CP", "Labs", "Mg 1.5", "Glu 245",
      "Acute on chronic HFrEF", "cont IV lasix", "E. coli UTI", "day 3", "s/p CABG 2015",
      "Type 2 DM with neuropathy", "Essential HTN"]


def test_lists_and_headings():
  text = ("PROBLEM LIST (active)\n* ESRD on HD MWF\n- Gout\n# Stage 4 sacral pressure injury\n"
          "Resolved: C. diff colitis (2021), hyponatremia\n\n\n")
  assert _texts(text) == ["PROBLEM LIST (active)", "ESRD on HD MWF", "Gout",
                          "Stage 4 sacral pressure injury", "Resolved", "C. diff colitis (2021)",
                          "hyponatremia"]


def test_offsets_index_the_note_and_long_clauses_are_cut_at_spaces():
  words = " ".join(f"word{i}" for i in range(60))  # 348 characters, no separator
  text = "Intro line\n" + words + "\n"
  got = segments.clauses(text, max_chars=100)
  assert [text[b:e] for b, e in got][0] == "Intro line"
  pieces = [text[b:e] for b, e in got[1:]]
  # By hand: a piece ends at the last space before 100 characters (so <= 99 long): word0-14
  # (10 x 5 + 5 x 6 characters + 14 spaces = 94; word15 would make 101), then 14 six-character
  # words a piece (97), and the 3 left.
  assert pieces[0] == " ".join(f"word{i}" for i in range(15))
  assert [len(p.split()) for p in pieces] == [15, 14, 14, 14, 3]
  assert " ".join(pieces) == words  # cut at spaces: nothing lost, nothing repeated
  assert all(b < e for b, e in got) and got == sorted(got)


def test_nothing_to_code():
  assert segments.clauses("") == []
  assert segments.clauses("  \n 12/03 \n 120/80, 72.\n") == []
  assert _texts("BP 120/80, HR 72.") == ["BP 120/80", "HR 72"]  # letters: a clause


def test_a_huge_line_without_separators_is_cut_without_recursion():
  text = "x" * 1_000_000  # a careless paste: one "word" of a million characters
  got = segments.clauses(text, max_chars=100)
  assert len(got) == 10_000 and got[0] == (0, 100) and got[-1] == (999_900, 1_000_000)
