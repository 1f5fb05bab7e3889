"""Generation: cached decode vs a naive full-forward loop, stopping, and constrained decoding."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxicd.data import prompts
from jaxicd.infer import generate as gen
from jaxicd.infer import grammar
from jaxicd.model import llama
from jaxicd.model.config import preset


@pytest.fixture(scope="module")
def tiny():
  return llama.create(preset("tiny"), seed=3)


def _prompts(vocab: int, lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]


@nnx.jit
def _full_forward(model, tokens):
  return model(tokens)


def _naive_greedy(model, prompt, max_new, stop_ids=(), width=32):
  """Reference: re-run the full forward (no cache) on the growing sequence, take the argmax.

  The sequence is right-padded to a fixed `width` so that one compilation serves every step;
  causal attention keeps the padding out of the real positions.
  """
  seq = list(prompt)
  out, logps = [], []
  for _ in range(max_new):
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(seq)] = seq
    logits = np.asarray(_full_forward(model, jnp.asarray(padded)))[0, len(seq) - 1]
    tok = int(np.argmax(logits))
    logps.append(float(jax.nn.log_softmax(logits)[tok]))
    out.append(tok)
    seq.append(tok)
    if tok in stop_ids:
      break
  return out, logps


def test_greedy_matches_naive_loop_for_ragged_batch(tiny):
  ps = _prompts(tiny.cfg.vocab_size, [5, 13, 2])
  g = gen.generate(tiny, ps, max_new_tokens=8, stop_ids=[], bucket=16)
  assert g.tokens.shape == (3, 8)
  for i, p in enumerate(ps):
    ref, ref_lp = _naive_greedy(tiny, p, 8)
    assert g.tokens[i].tolist() == ref, i
    np.testing.assert_allclose(g.logprobs[i], ref_lp, atol=1e-4)
  assert g.lengths.tolist() == [8, 8, 8] and not g.stopped.any()


def test_shared_prompt_prefix_matches_naive_loop(tiny):
  # Rows that start with the same 21 tokens: the prefix is prefilled once, its cache shared.
  shared = _prompts(tiny.cfg.vocab_size, [21], seed=5)[0]
  tails = _prompts(tiny.cfg.vocab_size, [1, 6, 3], seed=6)
  ps = [np.concatenate([shared, t]) for t in tails]
  assert gen.common_prefix(ps) == 21
  g = gen.generate(tiny, ps, max_new_tokens=6, stop_ids=[], bucket=16)
  for i, p in enumerate(ps):
    ref, ref_lp = _naive_greedy(tiny, p, 6)
    assert g.tokens[i].tolist() == ref, i
    np.testing.assert_allclose(g.logprobs[i], ref_lp, atol=1e-4)


def test_common_prefix_hand_cases():
  a, b = np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 9])
  assert gen.common_prefix([a, b], min_shared=1) == 3
  assert gen.common_prefix([a, b], min_shared=4) == 0       # too short to be worth a prefill
  assert gen.common_prefix([a], min_shared=1) == 0          # one prompt: nothing to share
  assert gen.common_prefix([a, a], min_shared=1) == 4       # each row keeps its last token
  assert gen.common_prefix([a, a], [(2, 5), (3, 5)], min_shared=1) == 2  # not into a note
  assert gen.common_prefix([a, np.array([7, 2])], min_shared=1) == 0


def test_stops_per_row_at_stop_token(tiny):
  ps = _prompts(tiny.cfg.vocab_size, [4, 9, 6], seed=1)
  full = [_naive_greedy(tiny, p, 8)[0] for p in ps]
  stop = full[0][2]  # the third token of row 0 becomes the stop token
  g = gen.generate(tiny, ps, max_new_tokens=8, stop_ids=[stop], pad_id=0, bucket=16)
  for i, seq in enumerate(full):
    n = seq.index(stop) + 1 if stop in seq else 8
    assert g.lengths[i] == n
    assert g.tokens[i, :n].tolist() == seq[:n]
    assert (g.tokens[i, n:] == 0).all()
    assert g.stopped[i] == (stop in seq)
    assert g.row(i) == seq[:n - 1] if stop in seq else seq
  assert g.lengths[0] <= 3


def test_chunked_batches_and_one_compilation_for_new_params(tiny):
  ps = _prompts(tiny.cfg.vocab_size, [3, 7, 5], seed=2)
  whole = gen.generate(tiny, ps, max_new_tokens=8, stop_ids=[], bucket=16)
  chunked = gen.generate(tiny, ps, max_new_tokens=8, stop_ids=[], bucket=16, batch_size=2)
  np.testing.assert_array_equal(whole.tokens, chunked.tokens)
  # Other parameter values of the same structure (e.g. restored from a checkpoint) reuse the
  # compiled function.
  other = llama.create(preset("tiny"), seed=4)
  gen.generate(other, ps, max_new_tokens=8, stop_ids=[], bucket=16, batch_size=2)
  before = (gen._prefill_jit._cache_size(), gen._decode_jit._cache_size())
  moved = gen.generate(tiny, ps, max_new_tokens=8, stop_ids=[], bucket=16, batch_size=2)
  gen.generate(other, ps, max_new_tokens=8, stop_ids=[], bucket=16, batch_size=2)
  assert (gen._prefill_jit._cache_size(), gen._decode_jit._cache_size()) == before
  np.testing.assert_array_equal(moved.tokens, whole.tokens)


def test_slot_count_hand_cases():
  # bucket x (1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, ...): the first that holds n.
  assert [gen.slot_count(n, 64) for n in (1, 64, 65, 80, 81, 129, 193, 257, 288, 321)] == [
      64, 64, 80, 80, 96, 160, 224, 320, 320, 384]
  assert [gen.slot_count(n, 16) for n in (9, 17, 21, 25, 73, 89, 153)] == [
      16, 20, 24, 28, 80, 96, 160]


def test_prompt_widths_in_one_slot_step_share_the_decode_loop(tiny):
  # Widths 128 and 144 (+ 8 new tokens: 136 and 152) both get 160 slots (16 x 10): a second
  # prefill compilation, no second decode loop; outputs still match the naive loop.
  short = _prompts(tiny.cfg.vocab_size, [110, 120], seed=6)
  long = _prompts(tiny.cfg.vocab_size, [130, 140], seed=7)
  gen.generate(tiny, short, max_new_tokens=8, stop_ids=[], bucket=16, share_prefix=False)
  decode_before = gen._decode_jit._cache_size()
  prefill_before = gen._prefill_jit._cache_size()
  g = gen.generate(tiny, long, max_new_tokens=8, stop_ids=[], bucket=16, share_prefix=False)
  assert gen._decode_jit._cache_size() == decode_before
  assert gen._prefill_jit._cache_size() == prefill_before + 1
  for i, p in enumerate(long):
    assert g.tokens[i].tolist() == _naive_greedy(tiny, p, 8, width=160)[0]


def test_low_temperature_sampling_is_greedy(tiny):
  ps = _prompts(tiny.cfg.vocab_size, [6, 3, 9], seed=5)
  greedy = gen.generate(tiny, ps, max_new_tokens=8, stop_ids=[], bucket=16)
  cold = gen.generate(tiny, ps, max_new_tokens=8, stop_ids=[], bucket=16, temperature=1e-4,
                      key=jax.random.key(1))
  np.testing.assert_array_equal(greedy.tokens, cold.tokens)
  with pytest.raises(ValueError, match="PRNG key"):
    gen.generate(tiny, ps, max_new_tokens=4, stop_ids=[], temperature=1.0)


# ---------------------------------------------------------------------------- constrained


class CharTokenizer:
  """A hand-made tokenizer: one token per character, plus ' |', 'XX' and two specials."""

  SPECIAL = ["<pad>", "<eot>"]
  MULTI = [" |", "XX", ".\n"]

  def __init__(self):
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    self.vocab = self.SPECIAL + self.MULTI + chars
    self.ids = {t: i for i, t in enumerate(self.vocab)}
    self.vocab_size = len(self.vocab)
    self.end_of_turn_id = self.eos_id = 1
    self.backend = self

  def encode(self, text: str) -> list[int]:
    out, i = [], 0
    while i < len(text):
      for t in self.MULTI:
        if text.startswith(t, i):
          out.append(self.ids[t])
          i += len(t)
          break
      else:
        out.append(self.ids[text[i]])
        i += 1
    return out

  def decode_batch(self, ids, skip_special_tokens=False):
    return ["".join(self.vocab[i] for i in seq
                    if not (skip_special_tokens and self.vocab[i] in self.SPECIAL))
            for seq in ids]


def _walk(constraint, tok, tokens, *, unique=False, allowed_after=False):
  """Feeds `tokens` through the grammar; returns the index of the first rejected token or -1.

  With `unique`, codes already emitted are excluded (the `left` bookkeeping of the decode loop);
  with `allowed_after`, returns the set of token texts allowed after all of `tokens` instead.
  """
  ca = constraint.device_arrays(tok.vocab_size)
  state, first = jnp.array([grammar.ROOT], jnp.int32), jnp.array([True])
  left = grammar.initial_left(ca, 1) if unique else None
  stops = jnp.array([tok.end_of_turn_id], jnp.int32)
  for i, t in enumerate(tokens):
    mask, toks, nxt, ok = grammar.allowed_tokens(ca, constraint.max_fanout, state, first, stops,
                                              tok.vocab_size, left)
    if not bool(mask[0, t]):
      assert not allowed_after, f"token {i} rejected"
      return i
    t = jnp.array([t], jnp.int32)
    if unique:
      left = grammar.use_codes(ca, constraint.max_depth, left, state, t, toks, nxt, ok,
                            jnp.array([True]))
    state, first = grammar.advance(ca, state, first, t, toks, nxt, ok)
  if allowed_after:
    mask = grammar.allowed_tokens(ca, constraint.max_fanout, state, first, stops, tok.vocab_size,
                               left)[0]
    return {tok.vocab[i] for i in np.flatnonzero(np.asarray(mask[0]))}
  return -1


def test_trie_accepts_exactly_the_code_set_hand_cases():
  tok = CharTokenizer()
  codes = ["A1", "A12", "N1", "S02.0XXA"]
  c = grammar.build_constraint(tok, codes)
  expected = {tuple(tok.encode(x)) for x in codes + ["NONE"]}
  assert c.sequences() == expected
  assert grammar.build_constraint(tok, codes, allow_none=False).sequences() == expected - {
      tuple(tok.encode("NONE"))}
  eot = [tok.end_of_turn_id]

  def accepts(text: str) -> bool:
    return _walk(c, tok, tok.encode(text) + eot) == -1

  assert accepts("A1")
  assert accepts("A12 | chest pain.\nN1\nS02.0XXA | fx")
  assert accepts("A1\nA12")                      # a code that prefixes another
  assert accepts("NONE")
  assert not accepts("A13")                      # not a code
  assert not accepts("A")                        # incomplete code before end of turn
  assert not accepts("A12 | x\nNONE")            # NONE only as the first line
  assert not accepts("NONE | x")                 # NONE takes no quote
  assert not accepts("A12 | x\n\nA1")            # no blank lines
  assert not accepts("A12 | x\n")                # no end of turn at a line start
  spelled_apart = tok.encode("S02.0") + [tok.ids["X"], tok.ids["X"], tok.ids["A"]] + eot
  assert _walk(c, tok, spelled_apart) == 5       # only the code's own tokenization
  assert not accepts("a12")
  assert accepts("A12 | ends with dot.\nA1")     # '.\n' ends a quote line too


@pytest.fixture(scope="module")
def smol_tok():
  from jaxicd.model.tokenizer import load_tokenizer
  return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def demo_constraint(smol_tok):
  from jaxicd.data.demo import code_space
  return grammar.build_constraint(smol_tok, code_space("demo"))


def test_trie_over_demo_space_matches_code_tokens(smol_tok, demo_constraint):
  from jaxicd.data.demo import DEMO_CODES
  assert sorted(demo_constraint.codes) == sorted(DEMO_CODES) and len(DEMO_CODES) == 260
  # A code-first line starts with the code's own tokenization: the tokenizer's, on the code alone.
  expected = {tuple(smol_tok.encode(x)) for x in DEMO_CODES + ("NONE",)}
  assert demo_constraint.sequences() == expected
  # SmolLM2 writes every digit as its own token (hand-checked pieces); the longest demo codes
  # have 8 characters, one token each.
  pieces = lambda x: [smol_tok.decode([t]) for t in smol_tok.encode(x)]
  assert pieces("I50.23") == ["I", "5", "0", ".", "2", "3"]
  assert pieces("S72.001A") == ["S", "7", "2", ".", "0", "0", "1", "A"]
  assert pieces("NONE") == ["N", "ONE"]
  assert max(len(x) for x in DEMO_CODES) == 8 and demo_constraint.max_depth == 8


def test_constrained_sampling_emits_only_valid_codes(smol_tok, demo_constraint):
  # A narrow random model with SmolLM2's vocabulary: sampling at temperature 1 wanders through
  # the grammar; every line must still start with a code of the space.
  cfg = preset("tiny").replace(vocab_size=smol_tok.vocab_size, hidden_size=32,
                               intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                               head_dim=16)
  model = llama.create(cfg, seed=0)
  ps = [prompts.encode_prompt(smol_tok, t) for t in
        ("Patient with hypertension.", "No complaints.", "CHF exacerbation, AKI.", "x")]
  g = gen.generate(model, ps, max_new_tokens=40, stop_ids=[smol_tok.end_of_turn_id],
                   pad_id=smol_tok.pad_id, constraint=demo_constraint, temperature=1.0,
                   key=jax.random.key(0), batch_size=4)
  space = set(demo_constraint.codes)
  line = re.compile(r"^([A-Z0-9.]+)( \|[^\n]*)?$")
  n_codes, code_lines = 0, []
  for i in range(len(ps)):
    text = smol_tok.decode(g.row(i))
    lines = text.split("\n")
    if g.lengths[i] == 40:  # cut mid-line: the last line may be a code prefix
      lines = lines[:-1]
    for ln in lines:
      m = line.match(ln)
      assert m, (i, ln)
      assert m.group(1) in space or (m.group(1) == "NONE" and len(lines) == 1), ln
      n_codes += 1
    code_lines.append([line.match(ln).group(1) for ln in lines])
  assert n_codes >= 4
  assert code_lines and all(len(c) == len(set(c)) for c in code_lines)  # unique by default


def test_trie_scales_to_all_billable_codes(smol_tok):
  from jaxicd.ontology import get_ontology
  codes = get_ontology().code_space("all")
  c = grammar.build_constraint(smol_tok, codes)
  expected = {tuple(smol_tok.encode(x)) for x in codes + ("NONE",)}
  assert len(codes) == 74719 and c.sequences() == expected
  assert c.nbytes < 20e6  # sparse: a few MB, not states x vocab
  eot = [smol_tok.end_of_turn_id]
  ok = smol_tok.encode("S02.0XXA | skull fracture\nI50.23") + eot
  assert _walk(c, smol_tok, ok) == -1
  assert _walk(c, smol_tok, smol_tok.encode("I50.2") + eot) == 5   # a category, not billable
  assert _walk(c, smol_tok, smol_tok.encode("I50.29") + eot) == 5  # no such code
  # Unique codes over the full space: the used code's line is refused, its siblings are not.
  assert int(c.arrays.codes_below[grammar.ROOT]) == 74719
  assert c.max_depth == max(len(smol_tok.encode(x)) for x in codes)
  again = smol_tok.encode("I50.23\nI50.23") + eot
  assert _walk(c, smol_tok, again) == -1
  assert _walk(c, smol_tok, again, unique=True) == len(smol_tok.encode("I50.23\nI50.2"))
  assert _walk(c, smol_tok, smol_tok.encode("I50.23\nI50.22") + eot, unique=True) == -1


# ---------------------------------------------------------------------------- unique codes


def test_unique_codes_block_only_the_exact_code_used():
  # A1 prefixes A12 and A13; A12 and A13 share the path A-1. Allowed sets by hand.
  tok = CharTokenizer()
  c = grammar.build_constraint(tok, ["A1", "A12", "A13", "B2"])
  assert c.unique_codes and c.max_depth == 3
  assert c.arrays.codes_below[grammar.ROOT] == 4
  after = lambda text: _walk(c, tok, tok.encode(text), unique=True, allowed_after=True)
  ends = {" |", "\n", "<eot>"}
  assert after("A1") == ends | {"2", "3"}        # nothing used yet
  assert after("A1\nA") == {"1"}                 # A1 used: the path to A12/A13 stays open
  assert after("A1\nA1") == {"2", "3"}           # ... but A1 cannot end a line again
  assert after("A12 | x\nA1") == ends | {"3"}    # A12 used: A1 and A13 still allowed
  assert after("A12\nA13\nA1") == ends          # both longer codes used: only A1 itself
  assert after("A12\nA13\n") == {"A", "B"}       # A1 is left under A
  assert after("A12\nA13\nA1 | y\n") == {"B"}   # every code under A used: A is closed
  assert after("B2\nA1\nA12\nA13") == {" |", "<eot>"}  # the last code: no newline
  last_quote = after("B2\nA1\nA12\nA13 | q")
  assert "<eot>" in last_quote and not {"\n", ".\n"} & last_quote  # no line with nothing left
  # Without the rule a code may repeat; with it the repeat is refused at its line end.
  rep = tok.encode("A1\nA1\nB2") + [tok.end_of_turn_id]
  assert _walk(c, tok, rep) == -1
  assert _walk(c, tok, rep, unique=True) == 5


class _Bigram(nnx.Module):
  """A model whose next-token logits depend only on the last token (row `t` of a table), so
  greedy decoding can be worked out by hand."""

  def __init__(self, table: np.ndarray, cfg):
    self.cfg = cfg
    self.deterministic = True
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))

  def hidden_states(self, tokens, *, positions=None, segment_ids=None, cache=None):
    return jnp.zeros(tokens.shape + (1,)), cache

  def __call__(self, tokens, *, positions=None, segment_ids=None, cache=None):
    logits = self.table[...][tokens]
    return logits if cache is None else (logits, cache)

  def decoder(self):
    return lambda tokens, cache: (self.table[...][tokens], cache)


def test_unique_codes_greedy_stops_repeating_a_code():
  tok = CharTokenizer()
  c = grammar.build_constraint(tok, ["A1", "A12", "B2"])
  # Preferences after each token, best first: the model loves "A1\n" forever.
  prefs = {"#": "A", "$": "B", "A": "1", "B": "2", "1": ["\n", "2"], "2": ["\n", "<eot>"],
           "\n": ["A", "B"]}
  table = np.zeros((tok.vocab_size, tok.vocab_size), np.float32)
  for prev, nexts in prefs.items():
    for rank, t in enumerate([nexts] if isinstance(nexts, str) else nexts):
      table[tok.ids[prev], tok.ids[t]] = 10.0 - rank
  cfg = preset("tiny").replace(vocab_size=tok.vocab_size, num_layers=1, num_kv_heads=1,
                               head_dim=4)
  model = _Bigram(table, cfg)
  ps = [tok.encode("note #"), tok.encode("note $")]

  def run(constraint):
    g = gen.generate(model, ps, max_new_tokens=16, stop_ids=[tok.end_of_turn_id],
                     constraint=constraint, bucket=8)
    return ["".join(tok.vocab[t] for t in g.row(i)) for i in range(2)], g.stopped.tolist()

  repeats = ["A1\nA1\nA1\nA1\nA1\nA", "B2\nA1\nA1\nA1\nA1\nA"]  # 16 tokens each
  assert run(None) == (repeats, [False, False])
  assert run(dataclasses.replace(c, unique_codes=False)) == (repeats, [False, False])
  # Row 0: A1; A1 again is refused at its line end, so A12 (the model's second choice after
  # "1"); A is closed, so B2, the last code: no newline, the model's next choice is a stop.
  # Row 1 spends the same codes in another order: per-row state.
  assert run(c) == (["A1\nA12\nB2", "B2\nA1\nA12"], [True, True])


def test_unique_codes_allowed_set_is_never_empty():
  # Random walks of many rows over a trie with prefixes, shared paths and NONE, biased to end
  # lines often so that rows spend every code; the mask must never be empty and no row may
  # complete a code twice.
  tok = CharTokenizer()
  codes = ["A1", "A12", "A13", "A2", "B1", "N1"]
  c = grammar.build_constraint(tok, codes)
  ca = c.device_arrays(tok.vocab_size)
  B, steps = 48, 160
  stops = jnp.array([tok.end_of_turn_id], jnp.int32)
  structural = np.zeros(tok.vocab_size, bool)
  structural[[tok.ids[t] for t in (" |", "\n", ".\n")]] = True

  @jax.jit
  def step(state, first, left, done, u):
    mask, toks, nxt, ok = grammar.allowed_tokens(ca, c.max_fanout, state, first, stops,
                                              tok.vocab_size, left)
    # Prefer structural tokens (line ends), then anything allowed; the stop token rarely.
    w = jnp.where(mask, 1.0 + 200.0 * structural, 0.0)
    w = w.at[:, tok.end_of_turn_id].multiply(0.02)
    tok_ = jax.random.categorical(u, jnp.log(w), axis=-1).astype(jnp.int32)
    active = ~done
    new_left = grammar.use_codes(ca, c.max_depth, left, state, tok_, toks, nxt, ok, active)
    new_state, new_first = grammar.advance(ca, state, first, tok_, toks, nxt, ok)
    return (mask.any(axis=1), tok_, jnp.where(done, state, new_state), new_first, new_left,
            done | (tok_ == tok.end_of_turn_id))

  state = jnp.full((B,), grammar.ROOT, jnp.int32)
  first, done = jnp.ones((B,), bool), jnp.zeros((B,), bool)
  left = grammar.initial_left(ca, B)
  out = [[] for _ in range(B)]
  key = jax.random.key(0)
  for _ in range(steps):
    key, u = jax.random.split(key)
    nonempty, t, state, first, left, new_done = step(state, first, left, done, u)
    assert bool(jnp.all(nonempty | done))
    for r in np.flatnonzero(~np.asarray(done)):
      out[r].append(int(t[r]))
    done = new_done
  line = re.compile(r"^(A1|A12|A13|A2|B1|N1|NONE)( \|[^\n]*)?$")
  exhausted = 0
  for r, ids in enumerate(out):
    text = "".join(tok.vocab[i] for i in ids if i != tok.end_of_turn_id)
    lines = text.split("\n")
    if not done[r] and " |" not in lines[-1]:
      lines = lines[:-1]  # cut inside a code
    heads = [line.match(ln).group(1) for ln in lines]  # AttributeError: a malformed line
    assert len(heads) == len(set(heads)), (r, heads)
    exhausted += set(heads) == set(codes)
  assert exhausted >= B // 2  # the walks really reached the state with nothing left


# --- evidence-first decoding: quotes copied from the note, then a code --------------------------


def _evidence_first_allowed(tok, prompt, lo, hi, emitted, codes, stop):
  """Reference grammar, written from the format's definition (host side, no trie): the set of
  tokens allowed after `emitted` in an evidence-first answer with unique codes."""
  sep, newline = tok.encode(" |")[0], tok.encode("\n")[0]
  seqs = {c: tuple(tok.encode(" " + c)) for c in codes}  # " CODE" after the " |" token

  def copyable(t):
    text = tok.decode([t])
    return t != sep and "\n" not in text and tok.decode([t], skip_special_tokens=True) == text

  used, quote, code, in_code = set(), [], [], False
  for t in emitted:
    if in_code and t == newline:
      used.add(next(c for c, s in seqs.items() if s == tuple(code)))
      quote, code, in_code = [], [], False
    elif in_code:
      code.append(t)
    elif t == sep:
      in_code = True
    else:
      quote.append(t)
  unused = {c: s for c, s in seqs.items() if c not in used}
  if in_code:
    allowed = {s[len(code)] for s in unused.values()
               if s[:len(code)] == tuple(code) and len(s) > len(code)}
    if tuple(code) in unused.values():
      allowed.add(stop)
      if len(unused) > 1:
        allowed.add(newline)
    return allowed
  k = len(quote)
  allowed = {sep}
  for j in range(lo, hi - k):
    if list(prompt[j:j + k]) == quote and copyable(int(prompt[j + k])):
      allowed.add(int(prompt[j + k]))
  if k == 0:
    allowed.add(stop)
  return allowed


@pytest.fixture(scope="module")
def narrow_smol_model(smol_tok):
  cfg = preset("tiny").replace(vocab_size=smol_tok.vocab_size, hidden_size=32,
                               intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                               head_dim=16)
  return llama.create(cfg, seed=0)


def test_evidence_first_greedy_matches_a_reference_grammar_loop(smol_tok, narrow_smol_model):
  codes = ["A1", "A12", "B2", "I10"]
  c = grammar.build_constraint(smol_tok, codes, answer_format=prompts.EVIDENCE_FIRST)
  stop = smol_tok.end_of_turn_id
  model = narrow_smol_model
  texts = ("Hypertension, on lisinopril. A1 and B2 noted.", "No complaints today.")
  encs = [prompts.encode_prompt_with_note(smol_tok, text) for text in texts]
  # One call for both notes: their shared system prompt is prefilled once.
  assert gen.common_prefix([e.tokens for e in encs]) > 8
  g = gen.generate(model, [e.tokens for e in encs], max_new_tokens=24, stop_ids=[stop],
                   constraint=c, note_ranges=[(e.note_lo, e.note_hi) for e in encs], bucket=16)
  for row, enc in enumerate(encs):
    # Reference: full forward each step, argmax over the reference grammar's tokens.
    seq, out = list(enc.tokens), []
    for _ in range(24):
      padded = np.zeros((1, 96), np.int32)
      padded[0, :len(seq)] = seq
      logits = np.asarray(_full_forward(model, jnp.asarray(padded)))[0, len(seq) - 1]
      allowed = sorted(_evidence_first_allowed(smol_tok, enc.tokens, enc.note_lo, enc.note_hi,
                                               out, codes, stop))
      t = allowed[int(np.argmax(logits[allowed]))]
      out.append(t)
      seq.append(t)
      if t == stop:
        break
    assert g.row(row, strip_stop=False) == out


def test_evidence_first_sampling_stays_in_the_grammar(smol_tok, narrow_smol_model):
  from jaxicd.data.demo import code_space
  codes = code_space("demo")
  c = grammar.build_constraint(smol_tok, codes, answer_format=prompts.EVIDENCE_FIRST)
  assert c.sequences() == {tuple(smol_tok.encode(" " + x))
                           for x in codes}  # no NONE line: an empty answer says it
  assert [smol_tok.decode([t]) for t in smol_tok.encode(" I50.23")] == [
      " I", "5", "0", ".", "2", "3"]  # the space joins the letter, as after " |" in an answer
  stop = smol_tok.end_of_turn_id
  texts = ("Patient with hypertension | on lisinopril.\nCHF exacerbation, AKI.",
           "No complaints.", "Afib on apixaban; T2DM; CKD stage 3.")
  encs = [prompts.encode_prompt_with_note(smol_tok, t) for t in texts]
  g = gen.generate(narrow_smol_model, [e.tokens for e in encs], max_new_tokens=48,
                   stop_ids=[stop], constraint=c, temperature=1.0, key=jax.random.key(1),
                   note_ranges=[(e.note_lo, e.note_hi) for e in encs], batch_size=3)
  lines = 0
  for i, e in enumerate(encs):
    out = g.row(i, strip_stop=False)
    for k in range(len(out)):
      assert out[k] in _evidence_first_allowed(smol_tok, e.tokens, e.note_lo, e.note_hi,
                                               out[:k], codes, stop), (i, k)
    lines += smol_tok.decode(out).count(" |")
  assert lines >= 2  # the sampler wrote lines (not only empty answers)


def test_code_only_decodes_one_code_after_the_prompt(smol_tok, narrow_smol_model):
  codes = ["A1", "A12", "B2", "I10"]
  for fmt in prompts.ANSWER_FORMATS:
    c = grammar.build_constraint(smol_tok, codes, answer_format=fmt)
    g = gen.generate(narrow_smol_model, [prompts.encode_prompt(smol_tok, "HTN")],
                     max_new_tokens=c.max_depth + 1, stop_ids=[smol_tok.end_of_turn_id],
                     constraint=c, code_only=True, temperature=1.0, key=jax.random.key(2))
    out = g.row(0, strip_stop=False)
    space = "" if fmt == prompts.CODE_FIRST else " "  # evidence-first: " CODE" after " |"
    heads = {tuple(smol_tok.encode(space + x)) for x in codes}
    if fmt == prompts.CODE_FIRST:
      heads.add(tuple(smol_tok.encode("NONE")))
    assert any(tuple(out[:len(h)]) == h for h in heads), smol_tok.decode(out)
  with pytest.raises(ValueError, match="note_ranges"):
    gen.generate(narrow_smol_model, [[1, 2]], max_new_tokens=2, stop_ids=[0],
                 constraint=grammar.build_constraint(smol_tok, codes,
                                                 answer_format=prompts.EVIDENCE_FIRST))
