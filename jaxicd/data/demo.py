"""The built-in demo corpus: synthetic discharge summaries with gold codes and evidence.

Generated at run time from ``clinical_terms.CONDITIONS`` and a seed; no data files. Each
document is a discharge summary (chief complaint, HPI, past history, family and social history,
review of systems, examination with vitals, labs, hospital course, discharge diagnoses,
medications) of roughly 500-2,000 SmolLM2 tokens with 3-15 coded conditions. Every mention of a
coded condition is gold evidence (``text[begin:end]`` is the mention); distractors mention
conditions that must NOT be coded: negated findings, family history, ruled-out diagnoses,
medications and vitals.

The phrasing around mentions comes from this module's own sentence pool, disjoint from the span
templates of ``expansion`` (so the demo measures transfer, not memorised templates).

Splits are by document. About a quarter of the codes are "unseen": they occur in val/test
documents and in no training document, so only expansion spans can teach them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import re
from pathlib import Path
from typing import Sequence

from jaxicd import ontology
from jaxicd.data import clinical_terms
from jaxicd.data.clinical_terms import CONDITIONS, Condition
from jaxicd.data.records import Document, Evidence

DEMO_CODES: tuple[str, ...] = tuple(c.code for c in CONDITIONS)
SPLITS = ("train", "val", "test")

# SmolLM2 tokens per whitespace word on these notes (measured: 1.78; numbers, doses and
# abbreviations split finely), used to size documents without loading a tokenizer.
WORDS_TO_TOKENS = 1.75

_BY_CODE = {c.code: c for c in CONDITIONS}

# Codes that a coder would not report together in one stay (on top of sharing a category).
_EXCLUSIVE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("I10", "I11", "I12", "I13", "I16"),
    ("E10", "E11", "E16.2", "R73.9"),
    ("J43", "J44"),
    ("J18", "J15", "J69", "J12", "U07", "J10"),
    ("D64", "D50", "D62", "D63"),
    ("K70", "K74"),
    ("N39", "N10", "N30"),
    ("R53", "M62"),
    ("Z87.891", "F17"),
    ("Z86.73", "I63", "G45", "I69", "I61"),
    ("G30", "F03"),
    ("G93", "R41", "F05"),
    ("R00.0", "I47"),
    ("R00.1", "I44", "I49"),
    ("I21", "I20", "I25.2"),
    ("I26", "I82", "Z86.718"),
    ("F32", "F33"),
    ("F41", "F43"),
    ("A41", "R78"),
    ("R65.20", "R65.21"),
    ("E66", "Z68"),
    ("C50", "Z85.3"),
    ("S72", "W19", "R29.6", "Z91.81"),
    ("R07", "I20", "I21"),
    ("R09", "J96"),
    ("R06", "J96", "J44.1"),
    ("R60", "E87.70"),
    ("L03", "M86"),
    ("A04", "A08", "A09", "R19"),
)

# Codes that call for a partner code (ICD-10-CM "use additional code" / "code first" notes, or
# what the status implies): when a document gets the key, it also gets one code of each group.
_COMPANIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "R65.20": (("A41.9", "A41.51", "A41.01"),),
    "R65.21": (("A41.9", "A41.51", "A41.01"),),
    "I11.0": (("I50.22", "I50.23", "I50.32", "I50.33", "I50.43"),),
    "I13.0": (("I50.22", "I50.23", "I50.32", "I50.33", "I50.43"),
              ("N18.30", "N18.31", "N18.32", "N18.4")),
    "I12.9": (("N18.30", "N18.31", "N18.32", "N18.4"),),
    "E11.22": (("N18.30", "N18.31", "N18.32", "N18.4", "N18.5"),),
    "D63.1": (("N18.31", "N18.32", "N18.4", "N18.5", "N18.6"),),
    "Z99.2": (("N18.6",),),
    "Z79.4": (("E11.9", "E11.65", "E10.9", "E11.42", "E11.22"),),
    "Z79.01": (("I48.91", "I48.0", "I48.20", "I26.99", "I82.409"),),
    "B96.20": (("N39.0", "N10", "N30.00"),),
}

# Very common inpatient comorbidities get drawn more often (and are never held out as unseen).
_COMMON = ("I10", "E78.5", "E11.9", "I48.91", "I25.10", "N18.30", "K21.9", "E03.9", "N17.9",
           "J18.9", "I50.9", "F32.A", "Z87.891", "Z79.01", "D64.9", "E87.1", "E66.9",
           "G47.33", "F41.9", "J44.9", "Z79.4", "E87.6", "N39.0", "A41.9")


def code_space(spec: str | os.PathLike | Sequence[str]) -> tuple[str, ...]:
  """`Ontology.code_space` of ``spec``, where "demo" also names `DEMO_CODES` (the ontology, the
  bottom layer, knows no demo): what ``data.code_space`` and the coder's code space accept."""
  if isinstance(spec, str) and spec.strip().lower() == "demo":
    spec = DEMO_CODES
  return ontology.get_ontology().code_space(spec)


@dataclasses.dataclass(frozen=True)
class Mention:
  """A condition mentioned in a demo document.

  For evidence (``kind == "evidence"``) ``code`` is the gold code; for a distractor it is the
  code the phrase would suggest but must not be assigned (None for vitals). ``begin``/``end``
  are offsets into the document text and ``phrase == text[begin:end]``.
  """

  code: str | None
  begin: int
  end: int
  phrase: str
  kind: str  # evidence | negated | family_history | ruled_out | medication | vitals


DISTRACTOR_KINDS = ("negated", "family_history", "ruled_out", "medication", "vitals")


@dataclasses.dataclass
class DemoCorpus:
  """Documents of all splits, the demo code space and the codes no training document holds."""

  documents: list[Document]
  code_space: tuple[str, ...]
  unseen_codes: frozenset[str]
  mentions: dict[str, tuple[Mention, ...]] = dataclasses.field(default_factory=dict)
  distractors: dict[str, tuple[Mention, ...]] = dataclasses.field(default_factory=dict)
  seed: int = 0

  def split(self, name: str) -> list[Document]:
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
    return [d for d in self.documents if d.split == name]


# ---------------------------------------------------------------------------------------------
# Sentence pools. "{m}" marks a gold mention; "{d}" a distractor condition. None of these may
# contain an expansion template (see clinical_terms.SPAN_TEMPLATES); tests check the output.

_HPI_OPEN = (
    "{age}-year-old {sex} with a background of {pmh} who came to the emergency department "
    "complaining of {cc}.",
    "This is a {age}-year-old {sex} whose medical problems include {pmh}, brought in by family "
    "because of {cc}.",
    "{Pronoun} is a {age}-year-old {sex} with {pmh}, referred from clinic for {cc}.",
)
_CC_GENERIC = ("feeling unwell for several days", "worsening swelling of both legs",
               "abnormal labs drawn by the primary care office", "poor oral intake",
               "a decline in function at home", "progressive malaise")
_HPI_PRINCIPAL = (
    "Evaluation in the emergency department revealed {m}.",
    "Initial workup was consistent with a diagnosis of {m}.",
    "{Pronoun} was found to have {m} and was admitted to the medicine service.",
    "The emergency team diagnosed {m} and requested admission.",
    "Labs and imaging in the emergency department pointed to {m}.",
    "The admitting team's working diagnosis was {m}.",
)
_HPI_FILLER = (
    "Symptoms began approximately {n} days before arrival and gradually worsened.",
    "{Pronoun} had tried rest at home without much relief.",
    "There was no recent travel and no sick contacts at home.",
    "{Pronoun} was last seen by the primary care physician {n} weeks ago for a routine visit.",
    "Family members noted that {pronoun} had been eating less over the past week.",
    "On arrival {pronoun} was alert and able to give a coherent history.",
    "Medication adherence at home was reported as good.",
    "An outside hospital record from last year was reviewed.",
    "{Pronoun} reports sleeping in a recliner for the last few nights.",
    "Collateral history was obtained from the patient's daughter.",
    "{Pronoun} noted reduced exercise tolerance over the preceding month.",
    "Home blood pressure readings were not available.",
    "{Pronoun} called the clinic nurse line before coming in.",
    "Paramedics found {pronoun_obj} sitting upright and speaking in full sentences.",
    "There were no recent medication changes.",
    "Appetite had been reduced for about a week.",
    "Family reported that {pronoun} seemed more tired than usual.",
)
_NEGATED = (
    "{Pronoun} specifically denies any {d}.",
    "There was no {d} on presentation.",
    "The patient reports no {d}.",
    "Review of systems is otherwise unremarkable, including no {d}.",
)
_FAMILY = (
    "Father died of {d} in his seventies.",
    "A sister was treated for {d}.",
    "{Pronoun} reports that a brother has {d}.",
    "Maternal grandmother had {d}.",
)
_RULED_OUT = (
    "Initial concern for {d} was excluded after further workup.",
    "{D} was considered but felt unlikely given the imaging.",
    "Workup for {d} was unrevealing.",
)
_PMH_LINE = ("- {m}", "- {m}, followed as an outpatient")
_SOCIAL = (
    "Lives with {partner} in a single-story home.",
    "Retired {job}.",
    "Drinks alcohol rarely.",
    "No illicit drug use.",
    "Independent in activities of daily living at baseline.",
    "Uses a cane for longer distances.",
)
_EXAM = (
    "General: alert, in no acute distress.",
    "HEENT: normocephalic, atraumatic, moist mucous membranes.",
    "Neck: supple, no jugular venous distension.",
    "Lungs: clear to auscultation bilaterally.",
    "Cardiac: regular rate and rhythm, no murmurs, rubs or gallops.",
    "Abdomen: soft, non-tender, non-distended, normal bowel sounds.",
    "Extremities: warm, no clubbing or cyanosis.",
    "Neuro: alert and oriented to person, place and time; moves all extremities.",
    "Skin: warm and dry, no rashes.",
    "Psych: calm and cooperative.",
)
_LABS = (
    "Sodium {na}, potassium {k}, chloride {cl}, bicarbonate {hco3}, BUN {bun}, creatinine {cr}.",
    "Hemoglobin {hb}, WBC {wbc}, platelets {plt}.",
    "Lactate {lac}, troponin {trop}.",
    "Urinalysis was reviewed.",
)
_COURSE_HEADER = "# {M}: "
_COURSE_PRINCIPAL = (
    "{M} was treated with {treatment}, and {pronoun} improved steadily over the stay.",
    "For {m}, {pronoun} received {treatment} with a good response.",
    "{M} was managed with {treatment}; symptoms resolved by hospital day {n}.",
    "The main issue this admission was {m}, treated with {treatment}.",
    "{M} prompted the admission; {pronoun} was started on {treatment} and improved.",
)
_COURSE_SECONDARY = (
    "{M} remained well controlled and home regimen was continued.",
    "{M} was monitored closely without issues.",
    "Course was complicated by {m}, which responded to {treatment}.",
    "{M} was addressed by the consulting team, who recommended outpatient follow-up.",
    "During the admission {pronoun} was also noted to have {m}.",
    "{M} was stable; no changes were made to the regimen.",
    "Given {m}, the team adjusted the plan accordingly.",
    "{M} was reassessed daily and showed improvement.",
    "The consultants followed {pronoun_obj} for {m}.",
)
_TREATMENTS = ("intravenous fluids", "supportive care", "close monitoring and medication "
               "adjustment", "the appropriate protocol", "targeted therapy per the consultants",
               "an adjusted home regimen", "bedside interventions and daily reassessment")
_COURSE_FILLER = (
    "Physical therapy evaluated {pronoun_obj} and recommended discharge home with services.",
    "Case management assisted with discharge planning.",
    "Daily labs were trended and electrolytes repleted as needed.",
    "{Pronoun} tolerated a regular diet by the end of the stay.",
    "Home medications were reconciled with the pharmacist.",
    "The care plan was discussed with the patient and family, who agreed.",
    "Deep venous thrombosis prophylaxis was given with subcutaneous heparin.",
    "Telemetry was reviewed each morning.",
    "{Pronoun} ambulated in the hallway with nursing on the day before discharge.",
    "Occupational therapy provided education on energy conservation.",
    "Nutrition was consulted and oral supplements were started.",
    "Blood glucose was checked before meals and at bedtime.",
    "A chest radiograph on the second day showed no new findings.",
    "The primary care physician was updated by phone.",
    "Pain was controlled with acetaminophen as needed.",
    "Vaccination status was reviewed and updated.",
    "Social work met with the family to discuss support at home.",
    "Intake and output were recorded each shift.",
    "Speech therapy performed a bedside swallow evaluation, which was normal.",
    "A home health referral was placed before discharge.",
    "Medication teaching was completed with the bedside nurse.",
    "Code status was confirmed on admission.",
)
_DX_LINE = "{i}. {m}"
_DISCHARGE = (
    "Discharge condition: stable.",
    "Disposition: home with home health services.",
    "Follow up with primary care within one week.",
    "Return to the emergency department for new or worsening symptoms.",
    "Activity as tolerated.",
    "Diet: heart-healthy.",
)
_OTHER_MEDS = ("acetaminophen 650 mg PO q6h PRN", "docusate 100 mg PO BID",
               "multivitamin 1 tab PO daily", "ondansetron 4 mg PO q8h PRN")


# ---------------------------------------------------------------------------------------------


def _first_upper(s: str) -> str:
  return s[:1].upper() + s[1:]


def _conflicts(codes: Sequence[str]) -> dict[str, set[str]]:
  """Pairs of codes that must not share a document (same category, exclusive group, or one's
  term contains the other's, which would make evidence ambiguous)."""
  out: dict[str, set[str]] = {c: set() for c in codes}

  def groups(code: str) -> list[int]:
    return [i for i, g in enumerate(_EXCLUSIVE_GROUPS) if any(code.startswith(p) for p in g)]

  term_re = {c: [re.compile(rf"(?<!\w){re.escape(t.casefold())}(?!\w)") for t in _BY_CODE[c].terms]
             for c in codes}
  g = {c: set(groups(c)) for c in codes}
  for i, a in enumerate(codes):
    for b in codes[i + 1:]:
      clash = a[:3] == b[:3] or bool(g[a] & g[b])
      if not clash:
        clash = any(r.search(t.casefold()) for r in term_re[a] for t in _BY_CODE[b].terms) or \
            any(r.search(t.casefold()) for r in term_re[b] for t in _BY_CODE[a].terms)
      if clash:
        out[a].add(b)
        out[b].add(a)
  return out


class _Writer:
  """Appends text while recording the offsets of mentions and distractors."""

  def __init__(self):
    self.parts: list[str] = []
    self.pos = 0
    self.mentions: list[Mention] = []
    self.distractors: list[Mention] = []

  def text(self, s: str) -> None:
    self.parts.append(s)
    self.pos += len(s)

  def span(self, s: str, code: str | None, kind: str) -> None:
    m = Mention(code, self.pos, self.pos + len(s), s, kind)
    (self.mentions if kind == "evidence" else self.distractors).append(m)
    self.text(s)

  def templated(self, template: str, fill: dict[str, str], *, code: str | None = None,
                phrase: str | None = None, kind: str = "evidence") -> None:
    """Writes ``template``; a ``{m}``/``{M}`` slot becomes a mention of ``code``."""
    for piece in re.split(r"(\{[mM]\})", template):
      if piece in ("{m}", "{M}"):
        assert phrase is not None
        self.span(_first_upper(phrase) if piece == "{M}" else phrase, code, kind)
      elif piece:
        self.text(piece.format(**fill))

  def distractor(self, template: str, fill: dict[str, str], code: str, term: str,
                 kind: str) -> None:
    """A whole distractor sentence is recorded, so its term is never read as evidence."""
    s = template.replace("{d}", term).replace("{D}", _first_upper(term)).format(**fill)
    self.span(s, code, kind)

  def words(self) -> int:
    return sum(len(p.split()) for p in self.parts)

  def value(self) -> str:
    return "".join(self.parts)


def _weights(codes: Sequence[str], rng: random.Random) -> dict[str, float]:
  order = list(codes)
  rng.shuffle(order)
  w = {c: 1.0 / (1 + 0.02 * r) for r, c in enumerate(order)}
  for c in _COMMON:
    if c in w:
      w[c] *= 4.0
  return w


def _pick(pool: list[str], weights: dict[str, float], rng: random.Random) -> str:
  return rng.choices(pool, weights=[weights[c] for c in pool], k=1)[0]


def _choose_codes(n: int, allowed: list[str], weights: dict[str, float], must: list[str],
                  conflicts: dict[str, set[str]], rng: random.Random) -> list[str]:
  """Principal (acute) code first, then comorbidities; no two conflicting codes; a code's
  companions (``_COMPANIONS``) join it when allowed and there is room."""
  chosen: list[str] = []
  blocked: set[str] = set()
  allowed_set = set(allowed)

  def add(c: str) -> None:
    chosen.append(c)
    blocked.add(c)
    blocked.update(conflicts[c])
    for group in _COMPANIONS.get(c, ()):
      if len(chosen) >= n or any(x in chosen for x in group):
        continue
      options = [x for x in group if x in allowed_set and x not in blocked]
      if options:
        add(rng.choice(options))

  acute = [c for c in must if _BY_CODE[c].kind == "acute"]
  principal = acute[0] if acute else _pick(
      [c for c in allowed if _BY_CODE[c].kind == "acute"], weights, rng)
  add(principal)
  for c in must:
    if len(chosen) < n and c not in blocked:
      add(c)
  while len(chosen) < n:
    pool = [c for c in allowed if c not in blocked]
    if not pool:
      break
    add(_pick(pool, weights, rng))
  return chosen


def _vitals(rng: random.Random) -> str:
  return (f"Vitals: BP {rng.randint(92, 182)}/{rng.randint(52, 104)}, HR {rng.randint(52, 124)}, "
          f"RR {rng.randint(12, 26)}, Temp {rng.uniform(36.1, 38.9):.1f} C, "
          f"SpO2 {rng.randint(86, 100)}% on room air.")


def _labs(rng: random.Random) -> dict[str, str]:
  return dict(na=str(rng.randint(126, 148)), k=f"{rng.uniform(2.9, 6.1):.1f}",
              cl=str(rng.randint(94, 110)), hco3=str(rng.randint(16, 30)),
              bun=str(rng.randint(8, 64)), cr=f"{rng.uniform(0.6, 4.2):.1f}",
              hb=f"{rng.uniform(7.1, 15.2):.1f}", wbc=f"{rng.uniform(3.1, 19.8):.1f}",
              plt=str(rng.randint(62, 420)), lac=f"{rng.uniform(0.7, 4.8):.1f}",
              trop=f"{rng.uniform(0.0, 0.9):.2f}")


def _document(doc_id: str, split: str, codes: list[str], distractor_pool: list[str],
              conflicts: dict[str, set[str]], target_words: int, rng: random.Random
              ) -> tuple[Document, list[Mention], list[Mention]]:
  female = rng.random() < 0.5
  fill = dict(age=str(rng.randint(34, 92)), sex="woman" if female else "man",
              Pronoun="She" if female else "He", pronoun="she" if female else "he",
              pronoun_obj="her" if female else "him",
              partner=rng.choice(("her husband", "a daughter")) if female else
              rng.choice(("his wife", "a son")),
              job=rng.choice(("teacher", "electrician", "nurse", "bus driver", "accountant")))
  conds = [_BY_CODE[c] for c in codes]
  principal, rest = conds[0], conds[1:]
  background = [c for c in rest if c.kind in ("chronic", "status")]
  active = [c for c in rest if c.kind in ("acute", "symptom")]
  term_of = {c.code: list(c.terms) for c in conds}

  def term(c: Condition) -> str:
    return rng.choice(term_of[c.code])

  # Distractor conditions: not coded here and not clashing with any coded condition.
  blocked = set(codes).union(*(conflicts[c] for c in codes))
  pool = [c for c in distractor_pool if c not in blocked]
  rng.shuffle(pool)

  def take(kinds: tuple[str, ...]) -> str:
    """A distractor of a fitting kind (denied symptoms, familial chronic disease), if any."""
    for i in range(len(pool) - 1, -1, -1):
      if _BY_CODE[pool[i]].kind in kinds:
        return pool.pop(i)
    return pool.pop()

  w = _Writer()
  w.text("DISCHARGE SUMMARY\n\n")
  w.text(f"Patient: {doc_id}\nAge: {fill['age']}    Sex: {'F' if female else 'M'}\n")
  w.text(f"Admission date: 2025-{rng.randint(1, 12):02d}-{rng.randint(1, 26):02d}    "
         f"Length of stay: {rng.randint(2, 9)} days\nService: Internal Medicine\n\n")

  w.text("CHIEF COMPLAINT:\n")
  symptoms = [c for c in active if c.kind == "symptom"]
  cc_cond = symptoms[0] if symptoms else None
  if cc_cond is not None:
    w.span(_first_upper(term(cc_cond)), cc_cond.code, "evidence")
  else:
    w.text(_first_upper(rng.choice(_CC_GENERIC)))
  w.text("\n\nHISTORY OF PRESENT ILLNESS:\n")
  opening = rng.choice(_HPI_OPEN)
  head, tail = opening.split("{pmh}")
  w.text(head.format(**fill))
  shown = background[:3]
  if not shown:
    w.text("no significant prior illnesses")
  for i, c in enumerate(shown):
    if i:
      w.text(" and " if i == len(shown) - 1 else ", ")
    w.span(term(c), c.code, "evidence")
  before_cc, after_cc = tail.split("{cc}")
  w.text(before_cc.format(**fill))
  if cc_cond is not None:
    w.span(term(cc_cond), cc_cond.code, "evidence")
  else:
    w.text(rng.choice(_CC_GENERIC))
  w.text(after_cc.format(**fill) + " ")
  w.templated(rng.choice(_HPI_PRINCIPAL), fill, code=principal.code, phrase=term(principal))
  fillers = rng.sample(_HPI_FILLER, 3)
  for f in fillers:
    w.text(" " + f.format(n=rng.randint(2, 6), **fill))
  for tpl in rng.sample(_NEGATED, rng.randint(1, 2)):
    if pool:
      d = take(("symptom", "acute"))
      w.text(" ")
      w.distractor(tpl, fill, d, rng.choice(_BY_CODE[d].terms), "negated")
  w.text("\n\nPAST MEDICAL HISTORY:\n")
  if background:
    for c in background:
      w.templated(rng.choice(_PMH_LINE), fill, code=c.code, phrase=term(c))
      w.text("\n")
  else:
    w.text("- No chronic conditions on file\n")
  w.text("Past surgical history: " + rng.choice(("appendectomy in childhood", "cholecystectomy",
                                                  "none", "cataract surgery")) + ".\n")
  w.text("\nFAMILY HISTORY:\n")
  for tpl in rng.sample(_FAMILY, rng.randint(1, 2)):
    if pool:
      d = take(("chronic",))
      w.distractor(tpl, fill, d, rng.choice(_BY_CODE[d].terms), "family_history")
      w.text(" ")
  w.text("\n\nSOCIAL HISTORY:\n")
  w.text(" ".join(s.format(**fill) for s in rng.sample(_SOCIAL, 3)) + "\n\n")

  w.text("PHYSICAL EXAMINATION:\n")
  w.span(_vitals(rng), None, "vitals")
  w.text("\n" + "\n".join(rng.sample(_EXAM, rng.randint(5, 8))) + "\n\n")
  w.text("LABORATORY DATA:\n")
  labs = _labs(rng)
  w.text(" ".join(s.format(**labs) for s in _LABS) + "\n\n")

  w.text("HOSPITAL COURSE:\n")
  w.templated(_COURSE_HEADER, fill, code=principal.code, phrase=term(principal))
  w.templated(rng.choice(_COURSE_PRINCIPAL), dict(fill, treatment=rng.choice(_TREATMENTS),
                                                  n=str(rng.randint(2, 5))),
              code=principal.code, phrase=term(principal))
  if pool and rng.random() < 0.7:
    d = take(("acute",))
    w.text(" ")
    w.distractor(rng.choice(_RULED_OUT), fill, d, rng.choice(_BY_CODE[d].terms), "ruled_out")
  w.text("\n")
  for c in active + background:
    if c.kind == "status" and rng.random() < 0.5:
      continue  # status codes need not appear in the course
    w.templated(_COURSE_HEADER, fill, code=c.code, phrase=term(c))
    w.templated(rng.choice(_COURSE_SECONDARY), dict(fill, treatment=rng.choice(_TREATMENTS)),
                code=c.code, phrase=term(c))
    w.text("\n")
  course_fill = list(_COURSE_FILLER)
  rng.shuffle(course_fill)
  tail_words = 90  # diagnoses, medications and discharge sections still to come
  for f in course_fill:
    if w.words() + tail_words + 3 * len(codes) >= target_words:
      break
    w.text(f.format(**fill) + " ")
  w.text("\n\nDISCHARGE DIAGNOSES:\n")
  for i, c in enumerate(conds, 1):
    w.templated(_DX_LINE, dict(i=str(i)), code=c.code, phrase=term(c))
    w.text("\n")

  w.text("\nDISCHARGE MEDICATIONS:\n")
  meds = [m for c in conds for m in c.meds]
  other = [(m, c.code) for c in (_BY_CODE[x] for x in pool) for m in c.meds]
  rng.shuffle(other)
  med_lines: list[tuple[str, str | None]] = [(m, None) for m in meds[:8]]
  med_lines += other[:rng.randint(1, 2)]
  med_lines += [(m, None) for m in rng.sample(_OTHER_MEDS, 2)]
  rng.shuffle(med_lines)
  for i, (m, for_code) in enumerate(med_lines, 1):
    w.text(f"{i}. ")
    w.span(m, for_code, "medication")
    w.text("\n")
  w.text("\nDISCHARGE INSTRUCTIONS:\n" + " ".join(_DISCHARGE) + "\n")

  text = w.value()
  evidence = tuple(sorted((Evidence(m.code, m.begin, m.end) for m in w.mentions),
                          key=lambda e: (e.begin, e.end)))
  doc = Document(id=doc_id, text=text, codes=tuple(codes), evidence=evidence, split=split,
                 source="demo")
  return doc, w.mentions, w.distractors


def fingerprint() -> str:
  """Changes whenever the generator's code or tables change (for caches of the corpus)."""
  digest = hashlib.sha1()
  for path in (__file__, clinical_terms.__file__):
    digest.update(Path(path).read_bytes())
  return digest.hexdigest()[:12]


def demo_corpus(seed: int = 0, *, train: int = 200, val: int = 50, test: int = 50,
                unseen_fraction: float = 0.25, min_codes: int = 3, max_codes: int = 15,
                min_tokens: int = 600, max_tokens: int = 1500) -> DemoCorpus:
  """Builds the demo corpus; the same arguments always give the identical corpus.

  Args:
    seed: drives every choice.
    train, val, test: documents per split.
    unseen_fraction: share of the code space held out of training documents (>= 0.2).
    min_codes, max_codes: coded conditions per document.
    min_tokens, max_tokens: target length range in SmolLM2 tokens, estimated as
      words * WORDS_TO_TOKENS while generating; documents with many conditions can run longer
      (all stay within 500-2,000 real tokens at the defaults, see tests/test_demo.py).
  """
  if not 0.2 <= unseen_fraction < 1:
    raise ValueError(f"unseen_fraction must be in [0.2, 1), got {unseen_fraction}")
  if not 3 <= min_codes <= max_codes <= 15:
    raise ValueError(f"need 3 <= min_codes <= max_codes <= 15, got {min_codes}, {max_codes}")
  if min(train, val, test) < 0 or train + val + test == 0:
    raise ValueError(f"split sizes must be >= 0 and not all 0, got {train}/{val}/{test}")
  rng = random.Random(f"jaxicd-demo/{seed}")
  codes = list(DEMO_CODES)
  conflicts = _conflicts(codes)
  weights = _weights(codes, rng)
  holdable = [c for c in codes if c not in _COMMON]
  unseen_target = sorted(rng.sample(holdable, math.ceil(unseen_fraction * len(codes))))
  held = set(unseen_target)
  seen = [c for c in codes if c not in held]

  documents: list[Document] = []
  mentions: dict[str, tuple[Mention, ...]] = {}
  distractors: dict[str, tuple[Mention, ...]] = {}
  for split, count in (("train", train), ("val", val), ("test", test)):
    allowed = seen if split == "train" else codes
    # Walk the codes that must appear somewhere in this split, so every seen code is trained on
    # and every held-out code is evaluated.
    todo = list(seen if split == "train" else unseen_target)
    rng.shuffle(todo)
    per_doc = math.ceil(len(todo) / count) if count else 0
    for i in range(count):
      n = rng.randint(min_codes, max_codes)
      must = todo[:per_doc]
      todo = todo[per_doc:]
      chosen = _choose_codes(n, allowed, weights, must, conflicts, rng)
      todo += [c for c in must if c not in chosen]  # conflicted: try a later document
      target_tokens = rng.uniform(min_tokens, max_tokens)
      doc, ms, ds = _document(f"demo-{split}-{i:04d}", split, chosen,
                              allowed, conflicts, int(target_tokens / WORDS_TO_TOKENS), rng)
      documents.append(doc)
      mentions[doc.id] = tuple(ms)
      distractors[doc.id] = tuple(ds)
  train_codes = {c for d in documents if d.split == "train" for c in d.codes}
  eval_codes = {c for d in documents if d.split != "train" for c in d.codes}
  return DemoCorpus(documents=documents, code_space=DEMO_CODES,
                    unseen_codes=frozenset(eval_codes - train_codes), mentions=mentions,
                    distractors=distractors, seed=seed)


def demo_stats(corpus: DemoCorpus, tokenizer=None) -> dict:
  """Documents per split, codes, unseen codes, evidence mentions and (with a tokenizer) tokens.

  ``tokenizer`` is anything with ``encode(text) -> list[int]``.
  """
  out: dict = {"documents": {s: len(corpus.split(s)) for s in SPLITS},
               "code_space": len(corpus.code_space)}
  used = {c for d in corpus.documents for c in d.codes}
  out["codes_used"] = len(used)
  out["codes_per_split"] = {s: len({c for d in corpus.split(s) for c in d.codes}) for s in SPLITS}
  out["unseen_codes"] = len(corpus.unseen_codes)
  out["unseen_fraction"] = round(len(corpus.unseen_codes) / len(corpus.code_space), 4)
  out["codes_per_document"] = _summary([len(d.codes) for d in corpus.documents])
  out["evidence_mentions"] = sum(len(d.evidence) for d in corpus.documents)
  kinds: dict[str, int] = {}
  for ds in corpus.distractors.values():
    for m in ds:
      kinds[m.kind] = kinds.get(m.kind, 0) + 1
  out["distractors"] = kinds
  out["characters_per_document"] = _summary([len(d.text) for d in corpus.documents])
  if tokenizer is not None:
    out["tokens_per_document"] = _summary([len(tokenizer.encode(d.text))
                                           for d in corpus.documents])
  else:
    out["tokens_per_document_estimate"] = _summary(
        [round(len(d.text.split()) * WORDS_TO_TOKENS) for d in corpus.documents])
  return out


def _summary(values: list[int]) -> dict:
  if not values:
    return {"mean": 0, "p95": 0, "min": 0, "max": 0}
  s = sorted(values)
  return {"mean": round(sum(s) / len(s), 1), "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
          "min": s[0], "max": s[-1]}


def main(argv: Sequence[str] | None = None) -> None:
  """``python -m jaxicd.data.demo [--seed=N]``: prints the corpus statistics as JSON."""
  parser = argparse.ArgumentParser(description="Statistics of the built-in demo corpus.")
  parser.add_argument("--seed", type=int, default=0)
  for split, n in (("train", 200), ("val", 50), ("test", 50)):
    parser.add_argument(f"--{split}", type=int, default=n)
  args = parser.parse_args(argv)
  tokenizer = None
  try:
    # Optional here (the statistics fall back to words): the tokenizers library loads on use.
    from jaxicd.model.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
    tokenizer = load_tokenizer("smollm2")
  except Exception:  # pylint: disable=broad-except
    pass  # stats then carry a words-based token estimate instead
  corpus = demo_corpus(args.seed, train=args.train, val=args.val, test=args.test)
  print(json.dumps(demo_stats(corpus, tokenizer), indent=1))


if __name__ == "__main__":
  main()
