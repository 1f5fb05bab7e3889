"""Code-centric span expansion: short evidence spans for every code of a code space.

For each code, spans come from (origin in ``records.SPAN_ORIGINS``):
  * description: the official description, and cleaned variants (no parentheticals, no
    "unspecified"/"NOS" qualifiers, sentence case);
  * inclusion: the code's inclusion terms;
  * index: the curated synonym table (``clinical_terms.CODE_TERMS``), abbreviated variants of the
    description (CHF, AKI, T2DM, ...), and for seventh-character codes the parent description
    with the seventh character's meaning;
  * paraphrase: those terms framed by clinical phrasing templates ("h/o ...", "presents with");
  * synthesized: spans from registered ``SpanGenerator``s (e.g. an LLM run through the inference
    loop, see ``register_span_generator``);
  * negative: negated, family-history and ruled-out framings, with code None.

A term that two requested codes would both produce is dropped from both (it would teach
contradictory targets), unless it is a code's own official description. Everything is
deterministic given ``seed``: each code draws from its own generator seeded by (seed, code), so a
code's spans do not depend on which other codes are expanded, except through that ambiguity rule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
import time
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

from jaxicd.data import clinical_terms
from jaxicd.data.records import Span
from jaxicd.ontology import Ontology, get_ontology, normalize_code

# Round-robin order in which origins fill a code's quota of ``max_per_code`` spans.
_FILL_ORDER = ("description", "inclusion", "index", "synthesized", "paraphrase")

# Chapters whose codes are events or encounters, never "known"/"history of" conditions:
# pregnancy, perinatal, injury, external causes, factors influencing health status.
_EVENT_CHAPTERS = frozenset({15, 16, 19, 20, 21, 22})
_ACUTE_WORDS = re.compile(r"\b(acute|initial encounter|subsequent encounter|sequela)\b", re.I)


@runtime_checkable
class SpanGenerator(Protocol):
  """A source of extra spans for a code, e.g. an LLM prompted through the inference loop.

  ``generate`` returns texts (wrapped as origin "synthesized") or ``Span``s; a Span must carry
  the requested code (or None, with origin "negative"). It must be deterministic given ``seed``.
  """

  name: str

  def generate(self, code: str, ontology: Ontology, *, seed: int) -> Iterable[str | Span]:
    ...


@dataclasses.dataclass
class StaticSpanGenerator:
  """Serves spans produced ahead of time (e.g. by ``jaxicd.infer`` over a code space)."""

  name: str
  spans_by_code: dict[str, Sequence[str]]

  def generate(self, code: str, ontology: Ontology, *, seed: int) -> Iterable[str]:
    del ontology, seed
    return self.spans_by_code.get(code, ())


_GENERATORS: dict[str, SpanGenerator] = {}


def register_span_generator(generator: SpanGenerator, *, replace: bool = False) -> None:
  """Makes ``expand`` consult ``generator`` (by default: when ``generators`` is not given)."""
  if not isinstance(generator, SpanGenerator):
    raise TypeError(f"{generator!r} does not implement SpanGenerator (name, generate)")
  if generator.name in _GENERATORS and not replace:
    raise ValueError(f"a span generator named {generator.name!r} is already registered")
  _GENERATORS[generator.name] = generator


def unregister_span_generator(name: str) -> None:
  _GENERATORS.pop(name, None)


def registered_span_generators() -> tuple[SpanGenerator, ...]:
  return tuple(_GENERATORS.values())


@dataclasses.dataclass
class Expansion:
  """The spans of a code space and a report (coverage, counts by origin, timing)."""

  spans: list[Span]
  report: dict


def fingerprint() -> str:
  """Changes whenever this generator's code or tables change: key caches of ``expand`` output
  (e.g. TFDS builds) with it so edits never serve stale spans."""
  digest = hashlib.sha1()
  for path in (__file__, clinical_terms.__file__):
    digest.update(Path(path).read_bytes())
  return digest.hexdigest()[:12]


def _key(text: str) -> str:
  return " ".join(text.casefold().split())


def _sentence_case(text: str) -> str:
  """Lower-cases the first letter unless the first word is an acronym (COPD, HIV, T2DM)."""
  if len(text) > 1 and (text[1].isupper() or text[1].isdigit()):
    return text
  return text[:1].lower() + text[1:]


_PARENS = re.compile(r"\s*[\(\[][^\)\]]*[\)\]]")
_UNSPEC_SEGMENT = re.compile(
    r",\s*(unspecified|not elsewhere classified|not otherwise specified)(?=,|$)", re.I)
_UNSPEC_TAIL = re.compile(r",\s*unspecified (organism|site|type|cause)$", re.I)


def description_variants(desc: str) -> list[str]:
  """Cleaned forms of an official description, as a clinician would write the term."""
  out = []
  for v in (_PARENS.sub("", desc), re.sub(r"[\(\)\[\]]", "", desc)):
    v = _UNSPEC_TAIL.sub("", v)
    v = _UNSPEC_SEGMENT.sub("", v)
    v = re.sub(r"^unspecified\s+", "", v, flags=re.I)
    v = re.sub(r"\s+NOS$", "", v)
    v = " ".join(v.replace(" ,", ",").split()).strip(" ,")
    if v:
      out.append(_sentence_case(v))
  return out


_ABBREVIATIONS = tuple((re.compile(p, re.I), short) for p, short in clinical_terms.ABBREVIATIONS)
# One alternation scans each text once; the first matching alternative (longest phrases are
# listed first) wins at each position.
_ABBREVIATION_SCAN = re.compile(
    r"(?<!\w)(?:" + "|".join(f"(?:{p})" for p, _ in clinical_terms.ABBREVIATIONS) + r")(?!\w)",
    re.I)


# Most table entries are plain phrases: look those up directly, try the regexes otherwise.
_LITERAL_ABBREVIATIONS = {p: short for p, short in clinical_terms.ABBREVIATIONS
                          if re.fullmatch(r"[a-z0-9 \-]+", p)}


def _abbreviation_for(m: re.Match) -> str:
  short = _LITERAL_ABBREVIATIONS.get(m.group(0).lower())
  if short is not None:
    return short
  for pattern, short in _ABBREVIATIONS:
    if pattern.fullmatch(m.group(0)):
      return short
  return m.group(0)


def abbreviate(text: str) -> str:
  """Applies the abbreviation table (CHF, AKI, T2DM, fx, w/o, ...) to a term, in one pass."""
  return _ABBREVIATION_SCAN.sub(_abbreviation_for, text)


def _is_chronic(code: str, ontology: Ontology) -> bool:
  """Whether "h/o"/"known" framings fit: the code is not an event, encounter or acute state."""
  cond = _CONDITIONS.get(code)
  if cond is not None:
    return cond.kind == "chronic"
  if ontology.chapter(code).number in _EVENT_CHAPTERS:
    return False
  return not _ACUTE_WORDS.search(ontology.description(code))


_CONDITIONS = {c.code: c for c in clinical_terms.CONDITIONS}
_CROSS_REFERENCE = re.compile(r"classifiable to|classified to|\b[A-Z][0-9][0-9A-Z](\.[0-9A-Z]*)?-")


def _terms(code: str, ontology: Ontology) -> list[tuple[str, str, bool]]:
  """(origin, text, official) candidates of a code, before ambiguity filtering."""
  desc = ontology.description(code)
  variants = description_variants(desc)
  out = [("description", desc, True)]
  out += [("description", v, False) for v in variants]
  for term in ontology.inclusion_terms(code):
    if _CROSS_REFERENCE.search(term):
      continue  # "Conditions classifiable to C50.-" is a coding note, not a clinical phrase
    out.append(("inclusion", term, False))
    out += [("inclusion", v, False) for v in description_variants(term)]
  out += [("index", t, False) for t in clinical_terms.CODE_TERMS.get(code, ())]
  for v in variants[:1]:
    short = abbreviate(v)
    if short != v:
      out.append(("index", _sentence_case(short), False))
  seventh = ontology.seventh_character(code)
  parent = ontology.parent(code)
  if seventh is not None and parent is not None:
    # The parent of a seventh-character code may be a placeholder-free stem (S72.001).
    parent_desc = ontology.description(parent)
    out.append(("index", f"{seventh.meaning}: {_sentence_case(parent_desc)}", False))
    for alt in seventh.alternatives:
      out.append(("index", f"{parent_desc}, {alt}", False))
  return out


def expand(codes: Iterable[str], ontology: Ontology | None = None, *, seed: int = 0,
           max_per_code: int = 8, negatives: bool = True, negatives_per_code: int = 1,
           generators: Sequence[SpanGenerator] | None = None) -> Expansion:
  """Generates short evidence spans for ``codes``.

  Args:
    codes: ICD-10-CM codes (any form ``normalize_code`` accepts); duplicates are ignored.
    ontology: defaults to ``get_ontology()``.
    seed: seeds every random choice (per code, so results do not depend on code order).
    max_per_code: cap on positive spans per code, filled round-robin across origins.
    negatives: also emit negative spans (code None), ``negatives_per_code`` per code.
    generators: extra span sources; None means the registered ones
      (``register_span_generator``); pass ``()`` for none.

  Returns:
    ``Expansion(spans, report)``; the report holds codes_requested, codes_covered, coverage,
    uncovered (first 20), spans, by_origin, ambiguous_terms_dropped, duplicates_dropped,
    shared_descriptions, generators and seconds.

  Raises:
    ValueError: a code is malformed or not in the ontology (the message names it).
  """
  t0 = time.perf_counter()
  onto = ontology or get_ontology()
  if max_per_code < 1:
    raise ValueError(f"max_per_code must be >= 1, got {max_per_code}")
  gens = registered_span_generators() if generators is None else tuple(generators)
  wanted: dict[str, None] = {}
  for i, raw in enumerate(codes):
    try:
      code = normalize_code(raw)
    except ValueError as e:
      raise ValueError(f"expand: codes[{i}]: {e}") from None
    if not onto.is_valid(code):
      raise ValueError(f"expand: codes[{i}]: {code} is not an ICD-10-CM code "
                       f"(release {onto.release})")
    wanted.setdefault(code, None)

  # Pass 1: candidate terms, and which codes claim each term.
  terms_by_code = {code: _terms(code, onto) for code in wanted}
  owners: dict[str, set[str]] = {}
  official: dict[str, set[str]] = {}
  for code, terms in terms_by_code.items():
    for _, text, is_official in terms:
      owners.setdefault(_key(text), set()).add(code)
      if is_official:
        official.setdefault(_key(text), set()).add(code)

  spans: list[Span] = []
  used: dict[str, str | None] = {}  # span key -> code (None for negatives)
  by_origin = {o: 0 for o in ("description", "inclusion", "index", "paraphrase",
                              "synthesized", "negative")}
  ambiguous = duplicates = 0
  uncovered: list[str] = []
  covered = 0
  for code, terms in terms_by_code.items():
    rng = random.Random(f"{seed}/{code}")
    buckets: dict[str, list[tuple[str, str | None]]] = {o: [] for o in _FILL_ORDER}
    clean_terms: list[str] = []  # unambiguous short terms, for templates and negatives
    seen_here: set[str] = set()
    for origin, text, is_official in terms:
      k = _key(text)
      if k in seen_here:
        continue
      seen_here.add(k)
      claimed_by_other = len(owners[k]) > 1 or (k in official and code not in official[k])
      if claimed_by_other and not (is_official and code in official.get(k, ())):
        ambiguous += 1
        continue
      buckets[origin].append((text, code))
      clean_terms.append(_sentence_case(text) if origin != "index" else text)
    index = buckets["index"]
    curated = [b for b in index if b[0] in clinical_terms.CODE_TERMS.get(code, ())]
    rng.shuffle(curated)
    buckets["index"] = curated + [b for b in index if b not in curated]
    for gen in gens:
      for item in gen.generate(code, onto, seed=seed):
        span = item if isinstance(item, Span) else Span(str(item), code, "synthesized")
        span.validate(f"span generator {gen.name!r} for {code}")
        if span.code not in (code, None):
          raise ValueError(f"span generator {gen.name!r} returned a span for {span.code} when "
                           f"asked for {code}")
        buckets["synthesized" if span.code else "paraphrase"].append((span.text, span.code))
    short_terms = [t for t in clean_terms if len(t) <= 80] or clean_terms
    chronic = _is_chronic(code, onto)
    templates = [t for t in clinical_terms.SPAN_TEMPLATES
                 if chronic or t not in clinical_terms.CHRONIC_ONLY_TEMPLATES]
    if short_terms:
      order = rng.sample(templates, len(templates))
      for i in range(min(len(order), max_per_code)):
        buckets["paraphrase"].append((order[i].format(t=rng.choice(short_terms)), code))

    taken = 0
    cursors = {o: 0 for o in _FILL_ORDER}
    while taken < max_per_code and any(cursors[o] < len(buckets[o]) for o in _FILL_ORDER):
      for origin in _FILL_ORDER:
        if taken >= max_per_code:
          break
        while cursors[origin] < len(buckets[origin]):
          text, span_code = buckets[origin][cursors[origin]]
          cursors[origin] += 1
          k = _key(text)
          if k in used:
            duplicates += used[k] != code
            continue
          used[k] = span_code
          spans.append(Span(text, span_code, origin))
          by_origin[origin] += 1
          taken += 1
          break
    if taken:
      covered += 1
    elif len(uncovered) < 20:
      uncovered.append(code)

    if negatives and short_terms:
      term = min(short_terms, key=len)
      for tpl in rng.sample(clinical_terms.NEGATIVE_SPAN_TEMPLATES,
                            min(negatives_per_code, len(clinical_terms.NEGATIVE_SPAN_TEMPLATES))):
        text = tpl.format(t=_sentence_case(term))
        k = _key(text)
        if k in used:
          duplicates += 1
          continue
        used[k] = None
        spans.append(Span(text, None, "negative"))
        by_origin["negative"] += 1

  n = len(wanted)
  report = {
      "codes_requested": n,
      "codes_covered": covered,
      "coverage": covered / n if n else 1.0,
      "uncovered": uncovered,
      "spans": len(spans),
      "positive_spans_per_code": (len(spans) - by_origin["negative"]) / n if n else 0.0,
      "by_origin": by_origin,
      "ambiguous_terms_dropped": ambiguous,
      "duplicates_dropped": duplicates,
      "shared_descriptions": sum(1 for v in official.values() if len(v) > 1),
      "generators": [g.name for g in gens],
      "seed": seed,
      "max_per_code": max_per_code,
      "seconds": round(time.perf_counter() - t0, 3),
  }
  return Expansion(spans, report)
