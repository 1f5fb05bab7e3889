"""ICD-10-CM ontology: code normalisation, descriptions, hierarchy and named code spaces.

The data is the CMS release shipped inside the ``simple-icd-10-cm`` package (its tabular XML
and its list of confirmed codes). Importing ``simple_icd_10_cm`` builds its whole tree in about
3-4 s, too slow for a CLI that only needs a lookup, so this module reads the same two files with
a lean single pass (~0.5 s) that follows the package's rules exactly: same nodes, parents,
descriptions, inclusion terms and seventh-character extensions. ``tests/test_ontology.py``
checks that parity against ``simple_icd_10_cm`` itself over every code.

Codes are dotted upper-case (``I50.23``). Billable codes are the leaves of the tree (what the
package calls leaves that are categories or subcategories); the April 2026 release has 74,719.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Sequence

# A letter and two digits or letters (the 2026 release added QA0), then up to four more
# characters after an optional dot: I10, I50.23, i5023, S72.001A, QA0.0101.
_CODE_RE = re.compile(r"^([A-Z][0-9A-Z][0-9A-Z])\.?([0-9A-Z]{0,4})$")

_CHAPTER = "chapter"
_SECTION = "section"
_CATEGORY = "category"
_SUBCATEGORY = "subcategory"
_EXTENDED = "extended subcategory"  # a code built by adding a seventh character


def normalize_code(s: str) -> str:
  """Returns the dotted upper-case form of an ICD-10-CM code string.

  Accepts dotted or undotted input in any case with surrounding whitespace ("i5023",
  " I50.23 ", "i50.23" -> "I50.23"). Only the shape is checked; use ``Ontology.is_valid`` to
  check that the code exists.

  Raises:
    ValueError: ``s`` is not shaped like an ICD-10-CM code.
  """
  if not isinstance(s, str):
    raise ValueError(f"ICD-10-CM code must be a string, got {type(s).__name__}: {s!r}")
  m = _CODE_RE.match(s.strip().upper())
  if not m:
    raise ValueError(f"malformed ICD-10-CM code {s!r}: expected a letter, two letters or "
                     "digits and up to four more after an optional dot, e.g. I50.23 or I5023")
  head, tail = m.groups()
  return f"{head}.{tail}" if tail else head


@dataclasses.dataclass(frozen=True)
class Chapter:
  """An ICD-10-CM chapter, e.g. Chapter(9, 'Diseases of the circulatory system', 'I00-I99')."""

  number: int
  title: str
  code_range: str


@dataclasses.dataclass(frozen=True)
class SeventhCharacter:
  """The seventh character of an extended code and its meaning (from the parent's notes)."""

  char: str
  meaning: str
  alternatives: tuple[str, ...] = ()  # extra wordings listed under the same character


class _Node:
  __slots__ = ("name", "description", "kind", "parent", "children", "inclusion_terms",
               "seven_chr_def", "seven_chr_alt")

  def __init__(self, name: str, description: str, kind: str, parent: _Node | None):
    self.name = name
    self.description = description
    self.kind = kind
    self.parent = parent
    self.children: list[_Node] = []
    self.inclusion_terms: tuple[str, ...] = ()
    self.seven_chr_def: dict[str, str] = {}
    self.seven_chr_alt: dict[str, tuple[str, ...]] = {}


def _data_files() -> tuple[Path, Path]:
  """Finds the package's code list and tabular XML without importing the package."""
  spec = importlib.util.find_spec("simple_icd_10_cm")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("simple-icd-10-cm is not installed; pip install 'simple-icd-10-cm>=1.5'")
  data = Path(list(spec.submodule_search_locations)[0]) / "data"
  code_lists = sorted(data.glob("code-list-*.txt"))
  tabulars = sorted(data.glob("icd10c-tabular-*.xml"))
  if len(code_lists) != 1 or len(tabulars) != 1:
    raise FileNotFoundError(f"expected one code list and one tabular XML in {data}, found "
                            f"{[p.name for p in code_lists + tabulars]}")
  return code_lists[0], tabulars[0]


class Ontology:
  """Lookups over one ICD-10-CM release. Use ``get_ontology()`` for the cached instance."""

  def __init__(self, code_list_path: str | os.PathLike | None = None,
               tabular_path: str | os.PathLike | None = None):
    if (code_list_path is None) != (tabular_path is None):
      raise ValueError("give both code_list_path and tabular_path, or neither")
    if code_list_path is None:
      code_list_path, tabular_path = _data_files()
    self.release = Path(tabular_path).name
    with open(code_list_path, encoding="utf-8") as f:
      confirmed = {line.split(" ")[0].replace(".", "") for line in f.read().split("\n")}
    root = ET.parse(tabular_path).getroot()
    self._nodes: dict[str, _Node] = {}
    self._chapters: list[_Node] = []
    for child in root:
      if child.tag == "chapter":
        self._chapters.append(self._read(child, None, None, confirmed))
    self._billable = tuple(
        n.name for n in self._walk() if not n.children and n.kind in
        (_CATEGORY, _SUBCATEGORY, _EXTENDED) and self._nodes.get(n.name) is n)
    self._billable_set = frozenset(self._billable)

  # -- reading -------------------------------------------------------------------------------

  def _read(self, elem: ET.Element, parent: _Node | None, seven_ancestor: _Node | None,
            confirmed: set[str]) -> _Node:
    if elem.tag == _CHAPTER:
      kind = _CHAPTER
    elif elem.tag == _SECTION:
      kind = _SECTION
    else:
      kind = None  # decided from the name once read
    node = _Node(elem.attrib.get("id", ""), "", kind or "", parent)
    includes: list[str] = []
    child_elems: list[ET.Element] = []
    for sub in elem:
      tag = sub.tag
      if tag in ("section", "diag"):
        child_elems.append(sub)
      elif tag == "name":
        node.name = sub.text or ""
      elif tag == "desc":
        node.description = sub.text or ""
      elif tag == "inclusionTerm":
        includes.extend(n.text for n in sub if n.text)
      elif tag == "sevenChrDef":
        last = None
        for ext in sub:
          if ext.tag == "extension":
            last = ext.attrib["char"]
            node.seven_chr_def[last] = ext.text or ""
          elif ext.tag == "note" and last is not None and ext.text:
            node.seven_chr_alt[last] = node.seven_chr_alt.get(last, ()) + (ext.text.strip(),)
    if not kind:
      node.kind = _CATEGORY if len(node.name) == 3 else _SUBCATEGORY
    node.inclusion_terms = tuple(includes)
    if kind in (_CHAPTER, _SECTION):
      self._nodes.setdefault(node.name, node)  # a category that shares a section's name wins
    else:
      self._nodes[node.name] = node
    next_seven = node if node.seven_chr_def else seven_ancestor
    for sub in child_elems:
      node.children.append(self._read(sub, node, next_seven, confirmed))
    if not node.children and node.kind in (_CATEGORY, _SUBCATEGORY):
      defs = node if node.seven_chr_def else seven_ancestor
      if defs is not None:
        self._extend(node, defs, confirmed)
    return node

  def _extend(self, node: _Node, defs: _Node, confirmed: set[str]) -> None:
    """Adds the seventh-character codes of a leaf (placeholder X pads to six characters)."""
    stem = node.name + ("." if len(node.name) == 3 else "")
    stem = stem.ljust(7, "X")
    for char, meaning in defs.seven_chr_def.items():
      if stem[:3] + stem[4:] + char not in confirmed:
        continue  # the release excludes this combination
      ext = _Node(stem + char, f"{node.description}, {meaning}", _EXTENDED, node)
      node.children.append(ext)
      self._nodes[ext.name] = ext

  def _walk(self) -> Iterable[_Node]:
    stack = list(reversed(self._chapters))
    while stack:
      n = stack.pop()
      yield n
      stack.extend(reversed(n.children))

  # -- lookups -------------------------------------------------------------------------------

  def _node(self, code: str) -> _Node:
    node = self._nodes.get(code)
    if node is None:
      try:
        node = self._nodes.get(normalize_code(code))
      except ValueError:
        node = None
    if node is None or node.kind in (_CHAPTER, _SECTION):
      raise KeyError(f"unknown ICD-10-CM code {code!r} (release {self.release})")
    return node

  def _lookup(self, code: str) -> _Node | None:
    try:
      return self._node(code)
    except KeyError:
      return None

  def is_valid(self, code: str) -> bool:
    """True for any code of the release (category, subcategory or billable code)."""
    return self._lookup(code) is not None

  def is_billable(self, code: str) -> bool:
    """True for a leaf code, the only kind that may be reported on a claim."""
    if code in self._billable_set:
      return True
    node = self._lookup(code)
    return node is not None and node.name in self._billable_set

  def description(self, code: str) -> str:
    return self._node(code).description

  def inclusion_terms(self, code: str) -> tuple[str, ...]:
    """The code's own inclusion terms (synonyms listed under it in the tabular list)."""
    return self._node(code).inclusion_terms

  def parent(self, code: str) -> str | None:
    """The parent code, or None for a category (whose parent is a block of categories)."""
    p = self._node(code).parent
    return p.name if p is not None and p.kind not in (_CHAPTER, _SECTION) else None

  def ancestors(self, code: str, *, include_blocks: bool = False) -> tuple[str, ...]:
    """Ancestor codes, nearest first; with ``include_blocks`` also the block and chapter."""
    out = []
    p = self._node(code).parent
    while p is not None:
      if include_blocks or p.kind not in (_CHAPTER, _SECTION):
        out.append(p.name)
      p = p.parent
    return tuple(out)

  def children(self, code: str) -> tuple[str, ...]:
    return tuple(c.name for c in self._node(code).children)

  def block(self, code: str) -> str:
    """The range of categories the code sits in, e.g. 'I30-I5A'."""
    p = self._node(code).parent
    while p is not None and p.kind != _SECTION:
      p = p.parent
    return p.name if p is not None else ""

  def chapter(self, code: str) -> Chapter:
    p = self._node(code)
    while p.parent is not None:
      p = p.parent
    m = re.match(r"^(.*?)\s*\(([A-Z0-9]{3}-[A-Z0-9]{3})\)\s*$", p.description)
    title, rng = (m.group(1), m.group(2)) if m else (p.description, "")
    return Chapter(int(p.name), title, rng)

  def seventh_character(self, code: str) -> SeventhCharacter | None:
    """For an extended code (S72.001A), its seventh character and meaning; else None."""
    node = self._node(code)
    if node.kind != _EXTENDED:
      return None
    char = node.name[-1]
    p = node.parent
    while p is not None and char not in p.seven_chr_def:
      p = p.parent
    if p is None:  # cannot happen for codes built by _extend
      raise KeyError(f"{code}: no seventh-character definition among its ancestors")
    return SeventhCharacter(char, p.seven_chr_def[char], p.seven_chr_alt.get(char, ()))

  def billable_codes(self) -> tuple[str, ...]:
    """All billable codes in tabular order."""
    return self._billable

  def all_codes(self) -> tuple[str, ...]:
    """Every code (categories, subcategories, billable codes), tabular order, no blocks."""
    return tuple(n.name for n in self._walk()
                 if n.kind not in (_CHAPTER, _SECTION) and self._nodes.get(n.name) is n)

  # -- code spaces ---------------------------------------------------------------------------

  def code_space(self, spec: str | os.PathLike | Sequence[str]) -> tuple[str, ...]:
    """Resolves a named code space to billable codes.

    ``spec`` is "all" (every billable code), a path to a text file with one code per line
    (blank lines and ``#`` comments allowed), or a sequence of codes. Duplicates are removed,
    first occurrence kept. ("demo" is `jaxicd.data.demo.code_space`'s: the ontology is the
    bottom layer.)

    Raises:
      ValueError: naming ``file:line`` for a malformed, unknown or non-billable code.
      FileNotFoundError: the path does not exist.
    """
    if isinstance(spec, str) and spec.strip().lower() == "all":
      return self._billable
    if isinstance(spec, (str, os.PathLike)):
      path = Path(spec)
      if not path.is_file():
        raise FileNotFoundError(f"code space {str(spec)!r}: expected 'all' or a file with one "
                                "ICD-10-CM code per line; no such file ('demo' is "
                                "jaxicd.data.demo.code_space's)")
      with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
      items = ((ln.split("#", 1)[0].strip(), f"{path}:{i}") for i, ln in enumerate(lines, 1))
      codes = self._check_codes((c, w) for c, w in items if c)
      if not codes:
        raise ValueError(f"{path}: code space file holds no codes")
      return codes
    return self._check_codes((c, f"codes[{i}]") for i, c in enumerate(spec))

  def _check_codes(self, items: Iterable[tuple[str, str]]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for raw, where in items:
      try:
        code = normalize_code(raw)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
      if not self.is_valid(code):
        raise ValueError(f"{where}: {code} is not an ICD-10-CM code in release {self.release}")
      if not self.is_billable(code):
        examples = ", ".join(self._billable_descendants(code)[:3])
        raise ValueError(f"{where}: {code} is a category, not a billable code; use one of its "
                         f"billable descendants (e.g. {examples})")
      out.setdefault(code, None)
    return tuple(out)

  def _billable_descendants(self, code: str) -> list[str]:
    out, stack = [], [self._node(code)]
    while stack:
      n = stack.pop()
      if n.name in self._billable_set:
        out.append(n.name)
      stack.extend(reversed(n.children))
    return out


@functools.lru_cache(maxsize=1)
def get_ontology() -> Ontology:
  """The ontology of the installed release, read once per process."""
  return Ontology()
