"""The answer grammar of constrained decoding: a token trie of the code space, evidence-first
quotes copied from the note, and each code at most once per answer.

Code-constrained decoding (`CodeConstraint`) enforces the answer grammar of
`jaxicd.data.prompts`: every line starts with a code of the configured code space (or ``NONE``
as the only line), spelled with exactly the tokens ``prompts.code_token_ids`` gives; after a
complete code the model may write the separator token (`` |``, then a free quote up to a
newline), a newline (next code) or a stop token. The code set is a token trie stored sparsely
as CSR arrays (per state a sorted slice of (token, next state) edges): a dense
``[states, vocab]`` table for the 74,719 billable codes would need 103,530 x 49,152 entries
(5e9), and padding every state to the maximum fan-out (48) wastes most of the memory because few
states fan out widely (the CSR arrays take 1.5 MB). Inside jit the edges of each row's state are
read as a fixed window of ``max_fanout`` entries from the flat edge arrays and scattered into a
``[batch, vocab]`` mask.

Unique codes (``build_constraint(..., unique_codes=True)``, the default): each code appears at
most once per answer (a fine-tuned model otherwise tends to repeat one code line until the token
budget runs out). Each row carries ``left[row, state]``, the number of its codes not yet emitted
at or below a trie state (int32 ``[B, states]``, initialised from the static count per state). A
code is emitted when its terminal state is left by a separator, newline or stop token; that
decrements ``left`` along its path to the root (``max_depth`` parent hops). Then:

* an edge into a state with ``left == 0`` is masked, so a row never enters a subtree whose codes
  are all used (it could not finish a line there);
* a code state's own code is unused iff ``left[state]`` exceeds the sum over its children (a code
  that prefixes longer codes, like ``A1`` under ``A12``, blocks only its own line end, not the
  path through it);
* once the last code is spent (``left[ROOT] == 0``) no line break is allowed, so a row never
  reaches a line start with nothing to write; it continues the quote or stops.

So every reachable state keeps an allowed token, the mask is never empty.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxicd.data import prompts

log = logging.getLogger(__name__)

FREE = 0   # trie state 0: inside a quote, any token except those that break the line format
ROOT = 1   # trie state 1: the start of an answer line (code-first), the code after " |" (else)
# Evidence-first grammars only (states without trie edges, numbered before the trie's):
LINE = 2   # the start of an answer line: start copying a quote, " |" (no quote) or stop
QUOTE = 3  # inside a quote: copy the next note token, or " |"
# Values of CodeConstraint.terminal: what a trie state completes.
_NOT_TERMINAL, _CODE, _NONE = 0, 1, 2


# --------------------------------------------------------------------------------------------
# The code trie and the answer grammar
# --------------------------------------------------------------------------------------------


class ConstraintArrays(NamedTuple):
  """The device arrays of a `CodeConstraint` (a pytree; a jit argument)."""

  edge_start: jax.Array   # int32 [S + 1]: edges of state s are [edge_start[s], edge_start[s+1])
  edge_token: jax.Array   # int32 [E + max_fanout]: sorted per state; padded so windows fit
  edge_next: jax.Array    # int32 [E + max_fanout]
  terminal: jax.Array     # int8 [S]: 0 inner state, 1 a code ends here, 2 NONE ends here
  none_only: jax.Array    # bool [S]: only NONE lies below (forbidden after the first line)
  codes_below: jax.Array  # int32 [S]: codes ending at or below each state (NONE not counted)
  parent: jax.Array       # int32 [S + 1]: parent state; the root's parent is S (a sink)
  free_mask: jax.Array    # bool [V]: tokens allowed inside a quote
  line_break: jax.Array   # bool [V]: tokens that end a quote line (text ends with one "\n")
  separator: jax.Array    # int32 []: the " |" token after a code
  newline: jax.Array      # int32 []: the "\n" token after a bare code
  copyable: jax.Array     # bool [V]: tokens an evidence-first quote may copy from the note


@dataclasses.dataclass
class CodeConstraint:
  """The answer grammar over a code space, built by `build_constraint`.

  Attributes:
    codes: the code space (without NONE).
    arrays: numpy arrays (see `ConstraintArrays`); `device_arrays()` puts them on device.
    max_fanout: the widest state (the window read per row and step).
    max_depth: tokens of the longest code (the parent hops that mark a code used).
    num_states, num_edges: trie size (state 0 is the free-text state, 1 the line root).
    build_seconds, nbytes: cost of building it (reported by bench/decode.py).
    unique_codes: each code at most once per answer (see the module docstring);
      ``dataclasses.replace(c, unique_codes=False)`` turns it off without rebuilding the trie.
    answer_format: the grammar's answer format (`jaxicd.data.prompts`).
  """

  codes: tuple[str, ...]
  arrays: ConstraintArrays
  max_fanout: int
  max_depth: int
  num_states: int
  num_edges: int
  build_seconds: float
  nbytes: int
  unique_codes: bool = True
  answer_format: str = "code_first"
  _device: ConstraintArrays | None = dataclasses.field(default=None, repr=False)

  def device_arrays(self, vocab_size: int) -> ConstraintArrays:
    """Arrays on device, token masks padded with False up to the model's `vocab_size`."""
    if self._device is None or self._device.free_mask.shape[0] != vocab_size:
      a = self.arrays
      v = a.free_mask.shape[0]
      if vocab_size < v:
        raise ValueError(f"the model's vocab_size {vocab_size} is smaller than the tokenizer's "
                         f"{v}")
      pad = lambda m: np.concatenate([m, np.zeros(vocab_size - v, bool)])
      self._device = jax.tree.map(jnp.asarray, a._replace(
          free_mask=pad(a.free_mask), line_break=pad(a.line_break), copyable=pad(a.copyable)))
    return self._device

  @property
  def evidence_first(self) -> bool:
    return self.answer_format == "evidence_first"

  def sequences(self) -> set[tuple[int, ...]]:
    """Every token sequence the trie accepts as a complete line head (for tests/debugging)."""
    a = self.arrays
    out: set[tuple[int, ...]] = set()
    stack: list[tuple[int, tuple[int, ...]]] = [(ROOT, ())]
    while stack:
      s, path = stack.pop()
      if a.terminal[s] != _NOT_TERMINAL:
        out.add(path)
      for e in range(a.edge_start[s], a.edge_start[s + 1]):
        stack.append((int(a.edge_next[e]), path + (int(a.edge_token[e]),)))
    return out


def _token_texts(tokenizer: Any) -> tuple[list[str], np.ndarray]:
  """Decoded text of every token id, and which ids are special (vanish when skipped)."""
  ids = [[i] for i in range(tokenizer.vocab_size)]
  backend = tokenizer.backend
  texts = backend.decode_batch(ids, skip_special_tokens=False)
  plain = backend.decode_batch(ids, skip_special_tokens=True)
  special = np.array([bool(t) and not p for t, p in zip(texts, plain)])
  return texts, special


def build_constraint(tokenizer: Any, codes: Iterable[str], *, allow_none: bool = True,
                     unique_codes: bool = True, answer_format: str = "code_first"
                     ) -> CodeConstraint:
  """Builds the answer grammar for `codes` (e.g. ``ontology.code_space(spec)``).

  Args:
    tokenizer: a `jaxicd.model.tokenizer.Tokenizer` (or any object with ``encode``, ``decode``,
      ``vocab_size``, ``backend.decode_batch`` and ``end_of_turn_id``).
    codes: the code space; each code is tokenized with `prompts.code_token_ids`.
    allow_none: whether ``NONE`` (alone, on the first line) may be answered (code-first; an
      evidence-first answer says "no code" by stopping at once).
    unique_codes: forbid writing a code a second time in one answer.
    answer_format: ``code_first`` or ``evidence_first`` (`jaxicd.data.prompts`).

  Raises:
    ValueError: an empty code space, or a separator / newline that is not one token.
  """

  t0 = time.perf_counter()
  evidence_first = prompts.check_answer_format(answer_format) == prompts.EVIDENCE_FIRST
  codes = tuple(dict.fromkeys(codes))
  if not codes:
    raise ValueError("build_constraint: the code space is empty")
  sequences = [prompts.code_token_ids(tokenizer, c, answer_format) for c in codes]
  for code, seq in zip(codes, sequences):
    if not seq:
      raise ValueError(f"build_constraint: code {code!r} tokenizes to nothing")
  none_seq = (prompts.code_token_ids(tokenizer, prompts.NONE)
              if allow_none and not evidence_first else None)

  # Trie as dict-of-dicts, then flattened to CSR. State 0 = FREE, 1 = ROOT (and, evidence-first,
  # 2 = LINE, 3 = QUOTE: no edges, their tokens come from the prompt).
  head = 4 if evidence_first else 2
  children: list[dict[int, int]] = [{} for _ in range(head)]
  terminal: list[int] = [_NOT_TERMINAL] * head
  has_code_below: list[bool] = [False, True] + [False] * (head - 2)
  parent: list[int] = [FREE, -1] + [FREE] * (head - 2)  # the root's parent becomes the sink

  def insert(seq: Sequence[int], kind: int) -> None:
    s = ROOT
    for tok in seq:
      nxt = children[s].get(tok)
      if nxt is None:
        nxt = len(children)
        children[s][tok] = nxt
        children.append({})
        terminal.append(_NOT_TERMINAL)
        has_code_below.append(False)
        parent.append(s)
      s = nxt
      if kind == _CODE:
        has_code_below[s] = True
    terminal[s] = max(terminal[s], kind)  # a code shadows NONE if both spell the same tokens

  for seq in sequences:
    insert(seq, _CODE)
  if none_seq is not None:
    insert(none_seq, _NONE)

  num_states = len(children)
  # Codes at or below each state: children always have higher ids, so one reverse pass sums.
  codes_below = np.array([int(t == _CODE) for t in terminal], np.int64)
  for s in range(num_states - 1, ROOT, -1):
    codes_below[parent[s]] += codes_below[s]
  parent_arr = np.asarray(parent + [num_states], np.int32)
  parent_arr[ROOT] = num_states
  max_depth = max(len(seq) for seq in sequences)
  counts = np.array([len(c) for c in children], np.int64)
  edge_start = np.zeros(num_states + 1, np.int64)
  np.cumsum(counts, out=edge_start[1:])
  num_edges = int(edge_start[-1])
  max_fanout = int(counts.max())
  edge_token = np.zeros(num_edges + max_fanout, np.int32)
  edge_next = np.zeros(num_edges + max_fanout, np.int32)
  for s, c in enumerate(children):
    if c:
      items = sorted(c.items())
      b = edge_start[s]
      edge_token[b:b + len(items)] = [t for t, _ in items]
      edge_next[b:b + len(items)] = [n for _, n in items]

  texts, special = _token_texts(tokenizer)
  n_newlines = np.array([t.count("\n") for t in texts])
  line_break = (~special) & (n_newlines == 1) & np.array([t.endswith("\n") for t in texts])
  stops = [i for i in (tokenizer.end_of_turn_id, getattr(tokenizer, "eos_id", None))
           if i is not None]
  free_mask = (~special) & ((n_newlines == 0) | line_break)
  free_mask[stops] = True
  sep = tokenizer.encode(prompts.SEPARATOR.rstrip())
  newline = tokenizer.encode("\n")
  if len(sep) != 1 or len(newline) != 1:
    raise ValueError(f"build_constraint: {prompts.SEPARATOR.rstrip()!r} -> {sep} and '\\n' -> "
                     f"{newline} must each be one token for constrained decoding")
  copyable = (~special) & (n_newlines == 0)
  copyable[sep[0]] = False  # " |" always ends the quote
  arrays = ConstraintArrays(
      edge_start=edge_start.astype(np.int32), edge_token=edge_token, edge_next=edge_next,
      terminal=np.asarray(terminal, np.int8), none_only=~np.asarray(has_code_below),
      codes_below=codes_below.astype(np.int32), parent=parent_arr, free_mask=free_mask,
      line_break=line_break,
      separator=np.int32(sep[0]), newline=np.int32(newline[0]), copyable=copyable)
  arrays.none_only[:head] = False
  nbytes = sum(np.asarray(x).nbytes for x in arrays)
  seconds = time.perf_counter() - t0
  log.info("code trie: %d codes, %d states, %d edges, max fan-out %d, %.1f MB, %.2f s",
           len(codes), num_states, num_edges, max_fanout, nbytes / 1e6, seconds)
  return CodeConstraint(codes, arrays, max_fanout, max_depth, num_states, num_edges, seconds,
                        nbytes, unique_codes=unique_codes, answer_format=answer_format)


def initial_left(ca: ConstraintArrays, batch: int) -> jax.Array:
  """``left`` of rows that have emitted no code yet: int32 [B, S]."""
  return jnp.broadcast_to(ca.codes_below[None, :], (batch, ca.codes_below.shape[0]))


def allowed_tokens(ca: ConstraintArrays, max_fanout: int, state: jax.Array, first: jax.Array,
                    stop_ids: jax.Array, vocab: int, left: jax.Array | None = None,
                    copy: jax.Array | None = None):
  """Mask bool [B, V] of tokens allowed next, and each row's trie edges (for the transition).

  With `left` (int32 [B, S], see the module docstring) codes already emitted are excluded.
  With `copy` (evidence-first: `CopyState`) the answer is ``quote | CODE`` lines.
  """
  B = state.shape[0]
  start = ca.edge_start[state]
  count = ca.edge_start[state + 1] - start
  window = jnp.arange(max_fanout, dtype=jnp.int32)
  idx = start[:, None] + window[None, :]
  toks, nxt = ca.edge_token[idx], ca.edge_next[idx]
  edge = window[None, :] < count[:, None]
  ok = edge & ~(ca.none_only[nxt] & ~first[:, None])
  term = ca.terminal[state]
  code_end, any_end = term == _CODE, term != _NOT_TERMINAL
  newline_ok, line_break_ok = code_end, jnp.ones((B,), bool)
  if left is not None:
    child_left = jnp.take_along_axis(left, nxt, axis=1)
    # NONE-only states count no codes (and are reachable only on the first line, before any
    # code is used), so they keep their own rule.
    ok &= ca.none_only[nxt] | (child_left > 0)
    state_left = jnp.take_along_axis(left, state[:, None], axis=1)[:, 0]
    own_unused = state_left > jnp.sum(jnp.where(edge, child_left, 0), axis=1)
    code_end &= own_unused
    any_end = code_end | (term == _NONE)
    # No line break that would reach a line start with every code spent.
    root_left = left[:, ROOT]
    newline_ok = code_end & (root_left > 1)
    line_break_ok = root_left > 0
  rows = jnp.arange(B)[:, None]
  mask = jnp.zeros((B, vocab), bool).at[rows, jnp.where(ok, toks, vocab)].set(True, mode="drop")
  if copy is None:
    mask = mask.at[:, ca.separator].set(mask[:, ca.separator] | code_end)
  mask = mask.at[:, ca.newline].set(mask[:, ca.newline] | newline_ok)
  mask = mask.at[:, stop_ids].set(mask[:, stop_ids] | any_end[:, None])
  if copy is None:
    free = ca.free_mask[None, :] & ~(ca.line_break[None, :] & ~line_break_ok[:, None])
    mask = jnp.where((state == FREE)[:, None], free, mask)
  else:
    in_quote = (state == LINE) | (state == QUOTE)
    quote = copy.next_tokens(state == LINE, ca.copyable, vocab) & line_break_ok[:, None]
    quote = quote.at[:, ca.separator].set(line_break_ok)
    quote = quote.at[:, stop_ids].set((state == LINE)[:, None])  # an empty answer: no code
    mask = jnp.where(in_quote[:, None], quote, mask)
  return mask, toks, nxt, ok


class CopyState(NamedTuple):
  """Where an evidence-first quote can continue: a copy of the prompt's note tokens.

  ``ends[b, j]``: the quote written so far equals ``prompt[b, j - k + 1 : j + 1]`` (k its
  length) with every copied position inside the note, ``[lo, hi)``.
  """

  prompt: jax.Array   # int32 [B, P]
  lo: jax.Array       # int32 [B]
  hi: jax.Array       # int32 [B]
  ends: jax.Array     # bool [B, P]

  def _starts(self) -> jax.Array:
    pos = jnp.arange(self.prompt.shape[1])[None, :]
    return (pos >= self.lo[:, None]) & (pos < self.hi[:, None])

  def _continues(self) -> jax.Array:
    # Position j continues a quote that ends at j - 1 and stays inside the note.
    shifted = jnp.pad(self.ends[:, :-1], ((0, 0), (1, 0)))
    return shifted & self._starts()

  def next_tokens(self, at_line_start: jax.Array, copyable: jax.Array, vocab: int) -> jax.Array:
    """bool [B, V]: the tokens that start (at a line start) or continue the quote."""
    where = jnp.where(at_line_start[:, None], self._starts(), self._continues())
    where &= copyable[self.prompt]
    rows = jnp.arange(self.prompt.shape[0])[:, None]
    return jnp.zeros((self.prompt.shape[0], vocab), bool).at[
        rows, jnp.where(where, self.prompt, vocab)].set(True, mode="drop")

  def advance(self, at_line_start: jax.Array, copied: jax.Array, tok: jax.Array) -> CopyState:
    """After emitting `tok`: rows that copied it keep the positions that match it."""
    where = jnp.where(at_line_start[:, None], self._starts(), self._continues())
    ends = where & (self.prompt == tok[:, None])
    return self._replace(ends=jnp.where(copied[:, None], ends, self.ends))


def advance(ca: ConstraintArrays, state, first, tok, toks, nxt, ok, evidence_first=False):
  """Grammar state after emitting `tok` (one per row)."""
  match = ok & (toks == tok[:, None])
  in_trie = match.any(axis=1)
  child = jnp.sum(jnp.where(match, nxt, 0), axis=1)
  breaks = ca.line_break[tok]
  if evidence_first:
    in_quote = (state == LINE) | (state == QUOTE)
    quote_next = jnp.where(tok == ca.separator, ROOT, QUOTE)
    trie_next = jnp.where(in_trie, child, jnp.where(tok == ca.newline, LINE, state))
    new_state = jnp.where(in_quote, quote_next, trie_next)
    return new_state.astype(jnp.int32), first & ~(tok == ca.newline)
  trie_next = jnp.where(in_trie, child,
                        jnp.where(tok == ca.separator, FREE, jnp.where(breaks, ROOT, state)))
  new_state = jnp.where(state == FREE, jnp.where(breaks, ROOT, FREE), trie_next)
  return new_state.astype(jnp.int32), first & ~breaks


def use_codes(ca: ConstraintArrays, max_depth: int, left, state, tok, toks, nxt, ok, active):
  """`left` after emitting `tok`: a code is used when its state is left by a non-trie token."""
  in_trie = (ok & (toks == tok[:, None])).any(axis=1)
  used = active & (ca.terminal[state] == _CODE) & ~in_trie
  sink = ca.codes_below.shape[0]
  node = jnp.where(used, state, sink)
  path = [node]
  for _ in range(max_depth):  # the code's state and its ancestors up to the root
    node = ca.parent[node]
    path.append(node)
  path = jnp.stack(path, axis=1)
  rows = jnp.arange(state.shape[0])[:, None]
  return left.at[rows, path].add(-1, mode="drop")
