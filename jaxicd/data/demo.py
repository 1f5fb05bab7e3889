"""The built-in demo corpus: synthetic clinical notes with gold codes and evidence.

Generated at run time from ``clinical_terms.CONDITIONS`` and a seed; no data files. Each
document has 3-15 coded conditions and one of several styles (``STYLES``): 40% are discharge
summaries (chief complaint, HPI, past history, family and social history, review of systems,
examination with vitals, labs, hospital course, discharge diagnoses, medications) of roughly
500-2,000 SmolLM2 tokens; the rest are the short notes clinicians also write, terse and
abbreviated (HFrEF, pAF, T2DM): SOAP progress notes, ED notes, problem lists and night
sign-outs of ~60-600 tokens. Every mention of a
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
  styles: dict[str, str] = dataclasses.field(default_factory=dict)  # document id -> STYLES key
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


class _Note:
  """A document being written: its patient, coded conditions, distractor pool and writer."""

  def __init__(self, codes: list[str], distractor_pool: list[str],
               conflicts: dict[str, set[str]], rng: random.Random, abbreviate: float = 0.0):
    self.rng, self.abbreviate = rng, abbreviate
    female = rng.random() < 0.5
    self.female = female
    self.fill = dict(
        age=str(rng.randint(34, 92)), sex="woman" if female else "man",
        Pronoun="She" if female else "He", pronoun="she" if female else "he",
        pronoun_obj="her" if female else "him", sx="F" if female else "M",
        partner=rng.choice(("her husband", "a daughter")) if female else
        rng.choice(("his wife", "a son")),
        job=rng.choice(("teacher", "electrician", "nurse", "bus driver", "accountant")))
    self.fill["Age"] = self.fill["age"]
    self.conds = [_BY_CODE[c] for c in codes]
    self.principal, rest = self.conds[0], self.conds[1:]
    self.background = [c for c in rest if c.kind in ("chronic", "status")]
    self.active = [c for c in rest if c.kind in ("acute", "symptom")]
    # Distractor conditions: not coded here and not clashing with any coded condition.
    blocked = set(codes).union(*(conflicts[c] for c in codes))
    self.pool = [c for c in distractor_pool if c not in blocked]
    rng.shuffle(self.pool)
    self.w = _Writer()

  def term(self, c: Condition) -> str:
    """One of the terms written for `c`; terse notes prefer the shortest (the abbreviation)."""
    if self.abbreviate and self.rng.random() < self.abbreviate:
      return min(c.terms, key=len)
    return self.rng.choice(c.terms)

  def take(self, kinds: tuple[str, ...]) -> str:
    """A distractor of the first kind in `kinds` the pool holds (denied symptoms before denied
    diagnoses, familial chronic disease), else any."""
    for kind in kinds:
      for i in range(len(self.pool) - 1, -1, -1):
        if _BY_CODE[self.pool[i]].kind == kind:
          return self.pool.pop(i)
    return self.pool.pop()

  def distract(self, templates: Sequence[str], kinds: tuple[str, ...], kind: str,
               prefix: str = "") -> None:
    """Writes one distractor sentence of `kind` (nothing when the pool is empty)."""
    if self.pool:
      d = self.take(kinds)
      self.w.text(prefix)
      # Terms chosen as for evidence: an abbreviation must not tell evidence from distractor.
      self.w.distractor(self.rng.choice(templates), self.fill, d, self.term(_BY_CODE[d]), kind)

  def write(self, template: str, fill: dict[str, str] | None = None,
            m: Condition | None = None, bg: Sequence[Condition] = ()) -> None:
    """Writes `template`: ``{m}``/``{M}`` mention `m`, ``{bg}`` lists the conditions `bg`."""
    fill = dict(self.fill, **(fill or {}))
    for piece in re.split(r"(\{[mM]\}|\{bg\})", template):
      if piece in ("{m}", "{M}"):
        phrase = self.term(m)
        self.w.span(_first_upper(phrase) if piece == "{M}" else phrase, m.code, "evidence")
      elif piece == "{bg}":
        self.listing(bg)
      elif piece:
        self.w.text(piece.format(**fill))

  def listing(self, conds: Sequence[Condition], sep: str = ", ") -> None:
    for i, c in enumerate(conds):
      if i:
        self.w.text(sep)
      self.w.span(self.term(c), c.code, "evidence")

  def medications(self, header: str) -> None:
    """The coded conditions' drugs, a distractor's drug or two and two unrelated ones."""
    rng, w = self.rng, self.w
    w.text(header)
    meds = [m for c in self.conds for m in c.meds]
    other = [(m, c.code) for c in (_BY_CODE[x] for x in self.pool) for m in c.meds]
    rng.shuffle(other)
    med_lines: list[tuple[str, str | None]] = [(m, None) for m in meds[:8]]
    med_lines += other[:rng.randint(1, 2)]
    med_lines += [(m, None) for m in rng.sample(_OTHER_MEDS, 2)]
    rng.shuffle(med_lines)
    for i, (m, for_code) in enumerate(med_lines, 1):
      w.text(f"{i}. ")
      w.span(m, for_code, "medication")
      w.text("\n")


def _discharge(n: _Note, doc_id: str, target_words: int) -> None:
  """The long note: a discharge summary with every section."""
  rng, w, fill, conds = n.rng, n.w, n.fill, n.conds
  principal, background, active, pool = n.principal, n.background, n.active, n.pool
  female = n.female
  term, take = n.term, n.take
  codes = [c.code for c in conds]
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

  n.medications("\nDISCHARGE MEDICATIONS:\n")
  w.text("\nDISCHARGE INSTRUCTIONS:\n" + " ".join(_DISCHARGE) + "\n")


# ----------------------------------------------------------------------------- other styles
# Short notes as clinicians also write them: terse, abbreviated, list-shaped. Their phrasing is
# this module's own too (disjoint from the expansion templates, checked on the output).

_SOAP_SUBJ = (
    "Seen at the bedside this morning. Overnight {pronoun} reports {m}.",
    "Pt says {pronoun} still has some {m} today.",
    "Ongoing {m} per nursing, otherwise slept ok.",
    "C/o {m} since yesterday evening.",
)
_SOAP_SUBJ_NONE = ("No acute events overnight.", "Feels a little better today.",
                   "Slept well, eating breakfast.", "No new complaints this AM.")
_SOAP_NEG = ("Denies any {d} overnight.", "No {d} per RN.", "Without {d} today.")
_SOAP_EXAM = ("Gen: sitting up in chair, NAD", "CV: RRR", "Resp: CTAB, unlabored",
              "Abd: soft, NT/ND", "Ext: trace edema bilat", "Neuro: A&Ox3, nonfocal",
              "Skin: no rash", "HEENT: MMM")
_SOAP_ONE_LINER = ("{age}{sx} with {bg} here for {m}.",
                   "{age}{sx} w/ {bg}, hospital day {day} for {m}.",
                   "{Age}-yo {sx} with {bg} admitted for {m}.")
_SOAP_PLAN_ACUTE = ("{M}: cont current mgmt, reassess in AM", "{M} - improving, wean as tolerated",
                    "{M}: plan per primary team, f/u labs",
                    "{M}: trend labs daily, consult following")
_SOAP_PLAN_CHRONIC = ("{M}. Continue home meds, monitor", "{M} - stable, no changes today",
                      "{M}: at baseline, outpatient f/u")
_PROBLEM_HEADER = ("ACTIVE PROBLEMS", "PROBLEM LIST", "Hospital problem list",
                   "Problems addressed this visit")
# One bullet style per list; what follows a problem fits its kind (no "since 2009" after NSTEMI).
_PROBLEM_BULLET = ("{i}. ", "{i}) ", "- ", "* ")
_PROBLEM_CHRONIC = ("", " - chronic, managed by PCP", " (since {year})", ", ongoing")
_PROBLEM_ACUTE = ("", ", this admission", " - active", ", improving")
_PROBLEM_FAMILY = ("Fam hx: {d} (mother).", "FHx significant for {d} in a sibling.",
                   "Family: father had {d}.")
_PROBLEM_EXCLUDED = ("Excluded this visit: {d}.", "{D} - workup neg, not a diagnosis.")
_ED_HPI = ("{Age}yo {sx} w/ {bg} BIBA for {m}.", "{Age} y/o {sx}, PMHx {bg}, walks in with {m}.",
           "{Age}yo {sx} with {bg} sent from clinic for {m}.")
_ED_ROS = ("ROS neg for {d}.", "ROS: no {d}.", "No {d} per pt.")
_ED_MDM = ("Ddx includes {d}; w/u neg.", "{D} excluded by CT.", "Considered {d}, unlikely.")
_ED_DISPO = ("Dispo: admit to medicine.", "Admit, hospitalist aware.", "Dispo: obs unit.")
_SIGNOUT_LINE = ("{bed}: {age}{sx} {bg} adm for {m}.", "{bed} - {age}{sx} w/ {bg}, here w/ {m}.",
                 "{bed}: {age}{sx} ({bg}) admitted w/ {m}.")
_SIGNOUT_TODO = ("- f/u AM labs", "- call if SBP < 90", "- recheck lytes at 2200",
                 "- may need repeat imaging", "- family meeting tomorrow", "- PT eval pending")
_SIGNOUT_WATCH = ("watch for {m}", "overnight issue: {m}", "call if {m} worsens")
_SIGNOUT_NOT = ("{d} excluded yesterday.", "no {d}.", "{D} considered, w/u neg.")


def _progress(n: _Note) -> None:
  """A daily progress note in SOAP form with a problem-based assessment and plan."""
  rng, w = n.rng, n.w
  day = str(rng.randint(2, 8))
  w.text(f"PROGRESS NOTE - hospital day {day}\n\nS: ")
  symptoms = [c for c in n.active if c.kind == "symptom"]
  if symptoms:
    n.write(rng.choice(_SOAP_SUBJ), m=symptoms[0])
  else:
    w.text(rng.choice(_SOAP_SUBJ_NONE))
  n.distract(_SOAP_NEG, ("symptom", "acute"), "negated", prefix=" ")
  w.text("\n\nO: ")
  w.span(_vitals(rng), None, "vitals")
  w.text("\n" + "\n".join(rng.sample(_SOAP_EXAM, rng.randint(3, 6))) + "\n")
  labs = _labs(rng)
  w.text(f"Labs: Na {labs['na']}, K {labs['k']}, Cr {labs['cr']}, Hgb {labs['hb']}, "
         f"WBC {labs['wbc']}\n\nA/P:\n")
  shown = n.background[:rng.randint(1, 3)]
  if shown:
    n.write(rng.choice(_SOAP_ONE_LINER), dict(day=day), m=n.principal, bg=shown)
  else:
    n.write("{Age}{sx} admitted for {m}.", m=n.principal)
  w.text("\n")
  for c in [n.principal] + n.active + n.background:
    if c in shown and rng.random() < 0.5:
      continue  # the one-liner named it
    w.text("# ")
    chronic = c.kind in ("chronic", "status")
    n.write(rng.choice(_SOAP_PLAN_CHRONIC if chronic else _SOAP_PLAN_ACUTE), m=c)
    w.text("\n")


def _problems(n: _Note) -> None:
  """A problem list: one coded condition a line, then what was excluded and family history."""
  rng, w = n.rng, n.w
  # One line break before the list: transformers' GGUF tokenizer (the tests' reference) drops
  # SmolLM2's digit split, so it parts a blank line before a digit differently.
  w.text(rng.choice(_PROBLEM_HEADER) + f" ({n.fill['age']}{n.fill['sx']})\n")
  bullet = rng.choice(_PROBLEM_BULLET)
  for i, c in enumerate([n.principal] + n.active + n.background, 1):
    after = _PROBLEM_CHRONIC if c.kind in ("chronic", "status") else _PROBLEM_ACUTE
    n.write(bullet + "{M}" + rng.choice(after), dict(i=str(i), year=str(rng.randint(2005, 2024))),
            m=c)
    w.text("\n")
  w.text("\n")
  if rng.random() < 0.6:
    n.distract(_PROBLEM_EXCLUDED, ("acute", "symptom"), "ruled_out", prefix="")
    w.text("\n")
  n.distract(_PROBLEM_FAMILY, ("chronic",), "family_history")
  n.medications("\n\nMeds:\n")


def _ed(n: _Note) -> None:
  """An emergency department note: short history, review of systems, decision making,
  numbered impression."""
  rng, w = n.rng, n.w
  symptoms = [c for c in n.active if c.kind == "symptom"]
  w.text("ED PROVIDER NOTE\n\nCC: ")
  if symptoms:
    w.span(_first_upper(n.term(symptoms[0])), symptoms[0].code, "evidence")
  else:
    w.text(_first_upper(rng.choice(_CC_GENERIC)))
  w.text("\n\nHPI: ")
  shown = n.background[:3]
  lead = symptoms[0] if symptoms else n.principal
  if shown:
    n.write(rng.choice(_ED_HPI), m=lead, bg=shown)
  else:
    n.write("{Age}yo {sx}, no PMHx, here for {m}.", m=lead)
  n.distract(_ED_ROS, ("symptom", "acute"), "negated", prefix=" ")
  w.text("\n\nExam: ")
  w.span(_vitals(rng), None, "vitals")
  w.text(" " + "; ".join(rng.sample(_SOAP_EXAM, 3)) + ".\n\nMDM: Workup here notable for ")
  n.write("{m}.", m=n.principal)
  n.distract(_ED_MDM, ("acute",), "ruled_out", prefix=" ")
  w.text("\n\nImpression:\n")
  for i, c in enumerate([n.principal] + n.active + n.background, 1):
    n.write(f"{i}. " + "{M}", m=c)
    w.text("\n")
  w.text("\n" + rng.choice(_ED_DISPO) + "\n")


def _signout(n: _Note) -> None:
  """A terse hand-off entry: one-liner, active issues, what to watch for and to do."""
  rng, w = n.rng, n.w
  w.text("NIGHT SIGN-OUT\n\n")
  shown = n.background[:3]
  bed = f"Bed {rng.randint(2, 40)}"
  if shown:
    n.write(rng.choice(_SIGNOUT_LINE), dict(bed=bed), m=n.principal, bg=shown)
  else:
    n.write("{bed}: {age}{sx}, adm for {m}.", dict(bed=bed), m=n.principal)
  rest = n.active + n.background[3:]
  if rest:
    w.text("\nAlso: ")
    n.listing(rest, sep="; ")
  symptoms = [c for c in n.active if c.kind == "symptom"]
  if symptoms:
    w.text("\n")
    n.write(rng.choice(_SIGNOUT_WATCH), m=symptoms[0])
  w.text("\n")
  n.distract(_SIGNOUT_NOT, ("acute", "symptom"), "ruled_out")
  w.text("\n" + "\n".join(rng.sample(_SIGNOUT_TODO, rng.randint(2, 4))) + "\n")


# Note styles and the share of documents in each (every split alike), with how often a terse
# style writes a condition's shortest term (HFrEF, pAF, T2DM) instead of any of its terms.
STYLES: dict[str, tuple[float, float]] = {
    "discharge": (0.4, 0.0), "progress": (0.2, 0.5), "ed": (0.15, 0.5),
    "problems": (0.1, 0.3), "signout": (0.15, 0.8)}


def _document(doc_id: str, split: str, codes: list[str], distractor_pool: list[str],
              conflicts: dict[str, set[str]], target_words: int, rng: random.Random
              ) -> tuple[Document, list[Mention], list[Mention], str]:
  style = rng.choices(list(STYLES), weights=[share for share, _ in STYLES.values()], k=1)[0]
  n = _Note(codes, distractor_pool, conflicts, rng, abbreviate=STYLES[style][1])
  if style == "discharge":
    _discharge(n, doc_id, target_words)
  else:
    {"progress": _progress, "ed": _ed, "problems": _problems, "signout": _signout}[style](n)
  w = n.w
  text = w.value()
  evidence = tuple(sorted((Evidence(m.code, m.begin, m.end) for m in w.mentions),
                          key=lambda e: (e.begin, e.end)))
  doc = Document(id=doc_id, text=text, codes=tuple(codes), evidence=evidence, split=split,
                 source="demo")
  return doc, w.mentions, w.distractors, style


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
    min_tokens, max_tokens: target length range of discharge summaries in SmolLM2 tokens,
      estimated as words * WORDS_TO_TOKENS while generating; those with many conditions can run
      longer (all stay within 500-2,000 real tokens at the defaults, see tests/test_demo.py).
      The short styles are as long as their conditions make them.
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
  styles: dict[str, str] = {}
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
      doc_id = f"demo-{split}-{i:04d}"
      doc, ms, ds, styles[doc_id] = _document(doc_id, split, chosen, allowed, conflicts,
                                              int(target_tokens / WORDS_TO_TOKENS), rng)
      documents.append(doc)
      mentions[doc.id] = tuple(ms)
      distractors[doc.id] = tuple(ds)
  train_codes = {c for d in documents if d.split == "train" for c in d.codes}
  eval_codes = {c for d in documents if d.split != "train" for c in d.codes}
  return DemoCorpus(documents=documents, code_space=DEMO_CODES,
                    unseen_codes=frozenset(eval_codes - train_codes), mentions=mentions,
                    distractors=distractors, styles=styles, seed=seed)


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
  out["styles"] = {s: sum(1 for v in corpus.styles.values() if v == s) for s in STYLES}
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
