"""Batched, jitted text generation with a KV cache, and code-constrained decoding.

`generate(model, prompts, ...)` runs two jitted functions per batch: a prefill of all prompts
(right-padded to a length bucket, ``segment_ids`` 1 on real tokens) that fills a decode cache,
then a ``jax.lax.while_loop`` of one-token steps whose carry is a small `_LoopState` (token
buffer, cache, step, done flags, per-row answer-grammar state). Rows stop at a stop token
(end-of-turn / eos) or after ``max_new_tokens``; the loop ends when every row is done.

The model enters the jitted functions as ``nnx.split(model)``: the graphdef is static and the
state is an argument, so one compiled function serves any parameters of the same structure (a
LoRA checkpoint restored from Orbax, merged weights, ...). The prefill compiles once per
(graphdef, batch, prompt-length bucket, cache slots): prompt lengths are rounded up to a
multiple of ``bucket``. The decode loop, whose unrolled layers take most of the compilation
time, compiles once per (graphdef, batch, cache slots, max_new_tokens, grammar, sampling): the
slots come in geometric steps (`slot_count`), so prompts of nearby lengths share it.

The answer grammar (the code trie, evidence-first quote copying, unique codes) is
`jaxicd.infer.grammar`; its per-row state rides in the loop carry.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxicd.data import prompts as prompts_lib
from jaxicd.infer import grammar
from jaxicd.model import llama as llama_lib

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The jitted prefill + decode loop
# --------------------------------------------------------------------------------------------


class _LoopState(NamedTuple):
  step: jax.Array         # int32 []: tokens emitted so far (all rows)
  last: jax.Array         # int32 [B]: the token fed next
  cache: llama_lib.DecodeCache
  tokens: jax.Array       # int32 [B, max_new]
  logprobs: jax.Array     # float32 [B, max_new]: log p(token) under the unconstrained model
  lengths: jax.Array      # int32 [B]: tokens generated (the stop token included)
  done: jax.Array         # bool [B]
  grammar: jax.Array      # int32 [B]: grammar state (`jaxicd.infer.grammar`: FREE, ROOT, ...)
  first_line: jax.Array   # bool [B]
  left: jax.Array         # int32 [B, S] unused codes per trie state ([B, 0] when not unique)
  copy_ends: jax.Array    # bool [B, P]: `grammar.CopyState.ends` (evidence-first, else [B, 0])
  key: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "slots"))
def _prefill_jit(graphdef, params, prompt_tokens, prompt_lengths, prefix_tokens, prefix_length,
                 *, slots: int):
  # The decode cache (`slots` per row) holding each row's prompt but its last token, which the
  # decode loop feeds first. prefix_tokens: int32 [1, W] (W may be 0), the first
  # `prefix_length` of them shared by every row: their keys and values are computed once and
  # copied to each row's cache; the rows' own tokens (`prompt_tokens`) continue after them.
  model = nnx.merge(graphdef, params)
  model.deterministic = True  # no LoRA dropout while decoding
  B, P = prompt_tokens.shape
  W = prefix_tokens.shape[1]
  cache = llama_lib.init_cache(model.cfg, 1 if W else B, slots)
  if W:
    shared = (jnp.arange(W)[None, :] < prefix_length).astype(jnp.int32)
    _, cache = model.hidden_states(prefix_tokens, segment_ids=shared, cache=cache)
    tile = lambda a: jnp.broadcast_to(a, a.shape[:1] + (B,) + a.shape[2:])
    cache = llama_lib.KVCache(tile(cache.k), tile(cache.v),
                              jnp.broadcast_to(cache.lengths, (B,)))
  # The last token is left to the first decode step: the prefill needs no [B, P, vocab] output
  # projection (for SmolLM2 at 8 x 256 tokens, 116 GFLOP and 400 MB that only it needs).
  segment_ids = (jnp.arange(P)[None, :] < prompt_lengths[:, None] - 1).astype(jnp.int32)
  _, cache = model.hidden_states(prompt_tokens, segment_ids=segment_ids, cache=cache)
  return llama_lib.decode_cache(cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sample",
                                             "max_fanout", "unique_depth", "evidence_first"))
def _decode_jit(graphdef, params, cache, last, done, constraint, stop_ids, pad_id, temperature,
                key, start_state, copy_tokens, note_lo, note_hi, *, max_new_tokens: int,
                sample: bool, max_fanout: int, unique_depth: int, evidence_first: bool):
  # last: int32 [B], each row's last prompt token; done: bool [B], rows that generate nothing.
  # unique_depth: the constraint's max_depth with unique codes on, 0 when off.
  # start_state: int32 [B] grammar state of each row's first token; copy_tokens: int32 [B, C]
  # the rows' prompt tokens (evidence-first; C = the cache's slots, so that prompt widths do not
  # make new shapes) and note_lo/note_hi: int32 [B] the note's tokens among them, which
  # evidence-first quotes copy.
  model = nnx.merge(graphdef, params)
  model.deterministic = True
  B = last.shape[0]
  vocab = model.cfg.vocab_size
  decode_step = model.decoder()  # each layer's weights sliced out once, not once per step
  copy0 = grammar.CopyState(copy_tokens, note_lo, note_hi,
                            jnp.zeros((B, copy_tokens.shape[1] if evidence_first else 0), bool))

  def emit(s: _LoopState, logits: jax.Array) -> _LoopState:
    key, sub = jax.random.split(s.key)
    copy = copy0._replace(ends=s.copy_ends) if evidence_first else None
    if constraint is not None:
      mask, toks, nxt, ok = grammar.allowed_tokens(
          constraint, max_fanout, s.grammar, s.first_line, stop_ids, vocab,
          s.left if unique_depth else None, copy)
      masked = jnp.where(mask, logits, -jnp.inf)
    else:
      masked = logits
    if sample:
      tok = jax.random.categorical(sub, masked / temperature, axis=-1).astype(jnp.int32)
    else:
      tok = jnp.argmax(masked, axis=-1).astype(jnp.int32)
    tok = jnp.where(s.done, pad_id, tok)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=1)[:, 0]
    state, first, left, copy_ends = s.grammar, s.first_line, s.left, s.copy_ends
    active = ~s.done
    if constraint is not None:
      state, first = grammar.advance(constraint, state, first, tok, toks, nxt, ok,
                                     evidence_first)
      if unique_depth:
        left = grammar.use_codes(constraint, unique_depth, left, s.grammar, tok, toks, nxt, ok,
                                 active)
      if evidence_first:
        in_quote = (s.grammar == grammar.LINE) | (s.grammar == grammar.QUOTE)
        copied = active & in_quote & (state == grammar.QUOTE)
        copy_ends = copy.advance(s.grammar == grammar.LINE, copied, tok).ends
    return s._replace(
        step=s.step + 1, last=tok, key=key,
        tokens=s.tokens.at[:, s.step].set(tok),
        logprobs=s.logprobs.at[:, s.step].set(jnp.where(active, logp, 0.0)),
        lengths=s.lengths + active.astype(jnp.int32),
        done=s.done | jnp.isin(tok, stop_ids),
        grammar=state, first_line=first, left=left, copy_ends=copy_ends)

  state = _LoopState(
      step=jnp.int32(0), last=last, cache=cache,
      tokens=jnp.full((B, max_new_tokens), pad_id, jnp.int32),
      logprobs=jnp.zeros((B, max_new_tokens), jnp.float32),
      lengths=jnp.zeros((B,), jnp.int32), done=done,
      grammar=start_state, first_line=jnp.ones((B,), bool), key=key,
      left=(grammar.initial_left(constraint, B) if unique_depth else jnp.zeros((B, 0), jnp.int32)),
      copy_ends=copy0.ends)

  def cond(s: _LoopState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: _LoopState):
    logits, cache = decode_step(s.last, s.cache)
    return emit(s._replace(cache=cache), logits)

  state = jax.lax.while_loop(cond, body, state)
  return state.tokens, state.lengths, state.logprobs


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Generation:
  """Output of `generate`, one row per prompt.

  Attributes:
    tokens: int32 [N, max_new_tokens]; entries past ``lengths[i]`` are ``pad_id``.
    lengths: int32 [N]: generated tokens per row, the stop token included when one was emitted.
    logprobs: float32 [N, max_new_tokens]: log-probability of each emitted token under the
      model's unconstrained distribution (0 past the length).
    stopped: bool [N]: the row ended with a stop token (False: cut at max_new_tokens).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  logprobs: np.ndarray
  stopped: np.ndarray

  def row(self, i: int, *, strip_stop: bool = True) -> list[int]:
    n = int(self.lengths[i]) - int(strip_stop and self.stopped[i])
    return self.tokens[i, :n].tolist()


def bucket_length(n: int, bucket: int) -> int:
  """`n` rounded up to a multiple of `bucket` (at least one bucket)."""
  return max(bucket, -(-n // bucket) * bucket)


def slot_count(n: int, bucket: int) -> int:
  """Decode-cache slots for `n` tokens: the first of ``bucket`` x (1, 1.25, 1.5, 1.75, 2, 2.5,
  3, 3.5, 4, 5, ...) that holds them. Calls of nearby prompt lengths then share one compiled
  decode loop (its compilation, layers unrolled, costs several times the prefill's), and padding,
  which every step reads, stays under a fifth of the slots."""
  octave = bucket
  while True:
    for quarter in (4, 5, 6, 7):
      size = -(-octave * quarter // 4)
      if n <= size:
        return size
    octave *= 2


def common_prefix(prompts: Sequence[np.ndarray],
                  note_ranges: Sequence[tuple[int, int]] | None = None,
                  min_shared: int = 8) -> int:
  """How many leading tokens all `prompts` share and can prefill once: each prompt keeps at
  least one token of its own, quotes copy only tokens after the shared part (it stops at the
  earliest note start), and a call of one prompt, or a prefix under `min_shared`, shares none."""
  if len(prompts) < 2:
    return 0
  limit = min(len(p) for p in prompts) - 1
  if note_ranges is not None:
    limit = min(limit, min(int(r[0]) for r in note_ranges))
  n = prompts_lib.shared_prefix_length(prompts, limit)
  return n if n >= min_shared else 0


def generate(model: nnx.Module, prompts: Sequence[Sequence[int] | np.ndarray], *,
             max_new_tokens: int, stop_ids: Sequence[int], pad_id: int = 0,
             constraint: grammar.CodeConstraint | None = None, temperature: float = 0.0,
             key: jax.Array | None = None, bucket: int = 64,
             batch_size: int | None = None,
             note_ranges: Sequence[tuple[int, int]] | None = None,
             code_only: bool = False, share_prefix: bool = True) -> Generation:
  """Generates continuations of `prompts` (token id lists of any lengths).

  Args:
    model: a `jaxicd.model.llama.Llama` (any parameters: base, LoRA, merged).
    prompts: token ids per prompt (e.g. `prompts.encode_prompt`); each must be non-empty.
    max_new_tokens: generation budget per row (the stop token counts).
    stop_ids: tokens that end a row (e.g. ``[tokenizer.end_of_turn_id, tokenizer.eos_id]``).
    pad_id: filler of `Generation.tokens` past each row's end.
    constraint: a `grammar.CodeConstraint` for code-constrained answers (each code at most once per
      answer when its ``unique_codes`` is set), or None (free text).
    temperature: 0 = greedy; > 0 samples from softmax(logits / temperature) (needs `key`).
    key: PRNG key for sampling.
    bucket: prompts are right-padded to a multiple of this (one compilation per bucket).
    batch_size: rows per compiled call; the prompts are processed in chunks of this size, the
      last one padded with inactive rows. Default: all prompts in one call.
    note_ranges: per prompt, the ``[lo, hi)`` token range of the note (an evidence-first
      `constraint` copies quotes from it; required then, unless `code_only`).
    code_only: with a `constraint`, start at the code trie's root: the prompt already ends
      with the line's head (code-first: the assistant header; evidence-first: ``quote |``), and
      the answer is a code (re-coding evidence spans).
    share_prefix: the tokens every prompt of a compiled call starts with (e.g. the system and
      instruction prompt of span prompts, most of their length) are prefilled once and their
      cache shared by the rows. The same computation, so the same outputs up to float rounding.
  """
  if max_new_tokens <= 0:
    raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if temperature > 0 and key is None:
    raise ValueError("sampling with temperature > 0 needs a PRNG key")
  lengths = [len(p) for p in prompts]
  if any(n == 0 for n in lengths):
    raise ValueError(f"prompt {lengths.index(0)} is empty")
  if not prompts:
    z = np.zeros((0, max_new_tokens))
    return Generation(z.astype(np.int32), np.zeros(0, np.int32), z.astype(np.float32),
                      np.zeros(0, bool))
  graphdef, params = nnx.split(model)
  vocab = model.cfg.vocab_size
  arrays = constraint.device_arrays(vocab) if constraint is not None else None
  fanout = constraint.max_fanout if constraint is not None else 0
  unique_depth = constraint.max_depth if constraint is not None and constraint.unique_codes else 0
  evidence_first = constraint is not None and constraint.evidence_first
  if evidence_first and not code_only and note_ranges is None:
    raise ValueError("an evidence-first constraint copies quotes from the note: pass "
                     "note_ranges (the note's token range in each prompt)")
  if note_ranges is not None and len(note_ranges) != len(prompts):
    raise ValueError(f"{len(note_ranges)} note_ranges for {len(prompts)} prompts")
  start = grammar.ROOT if code_only or not evidence_first else grammar.LINE
  stops = jnp.asarray(sorted(set(int(i) for i in stop_ids)), jnp.int32)
  key = jax.random.key(0) if key is None else key
  rows = batch_size or len(prompts)
  out_tokens, out_lengths, out_logprobs = [], [], []
  for lo in range(0, len(prompts), rows):
    chunk = [np.asarray(p, np.int32) for p in prompts[lo:lo + rows]]
    ranges = note_ranges[lo:lo + rows] if note_ranges is not None else None
    shared = common_prefix(chunk, ranges) if share_prefix else 0
    prefix = np.full((1, bucket_length(shared, bucket) if shared else 0), pad_id, np.int32)
    prefix[0, :shared] = chunk[0][:shared]
    width = bucket_length(max(len(p) for p in chunk) - shared, bucket)
    tokens = np.full((rows, width), pad_id, np.int32)
    n = np.zeros(rows, np.int32)
    lo_hi = np.zeros((2, rows), np.int32)
    for i, p in enumerate(chunk):
      tokens[i, :len(p) - shared] = p[shared:]
      n[i] = len(p) - shared
      if ranges is not None:
        lo_hi[:, i] = np.asarray(ranges[i]) - shared
    slots = slot_count(prefix.shape[1] + width + max_new_tokens, bucket)
    cache = _prefill_jit(graphdef, params, jnp.asarray(tokens), jnp.asarray(n),
                         jnp.asarray(prefix), jnp.int32(shared), slots=slots)
    last = tokens[np.arange(rows), np.maximum(n - 1, 0)]
    copy_tokens = np.zeros((rows, slots if evidence_first else 0), np.int32)
    if evidence_first:
      copy_tokens[:, :width] = tokens
    key, sub = jax.random.split(key)
    t, ln, lp = _decode_jit(graphdef, params, cache, jnp.asarray(last), jnp.asarray(n <= 0),
                            arrays, stops, jnp.int32(pad_id), jnp.float32(max(temperature, 1e-6)),
                            sub, jnp.full((rows,), start, jnp.int32), jnp.asarray(copy_tokens),
                            jnp.asarray(lo_hi[0]), jnp.asarray(lo_hi[1]),
                            max_new_tokens=max_new_tokens, sample=temperature > 0,
                            max_fanout=fanout, unique_depth=unique_depth,
                            evidence_first=evidence_first)
    k = len(chunk)
    out_tokens.append(np.asarray(t)[:k])
    out_lengths.append(np.asarray(ln)[:k])
    out_logprobs.append(np.asarray(lp)[:k])
  tokens = np.concatenate(out_tokens)
  lengths_out = np.concatenate(out_lengths)
  last = tokens[np.arange(len(tokens)), np.maximum(lengths_out - 1, 0)]
  stopped = (lengths_out > 0) & np.isin(last, np.asarray(stops))
  return Generation(tokens, lengths_out, np.concatenate(out_logprobs), stopped)
