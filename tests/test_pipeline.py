"""Tests of the grain pipeline: packing, mixture, sharding, checkpointing.

A byte-level ChatML tokenizer built here keeps token counts exact and the tests fast; the
prompt format is the real ``jaxicd.data.prompts``.
"""

from __future__ import annotations

import collections
import json
import random
import re

import numpy as np
import pytest

from jaxicd.data import pipeline, prompts, windows
from jaxicd.data.records import Document, Evidence, Span
from jaxicd.train.config import base_config

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; ChatML special tokens are single ids after them."""

  vocab_size = 256 + len(SPECIALS)
  eos_id = 256 + SPECIALS.index("<|im_end|>")
  end_of_turn_id = 256 + SPECIALS.index("<|im_end|>")
  pad_id = 256 + SPECIALS.index("<|endoftext|>")
  _split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

  def encode(self, text: str) -> list[int]:
    ids = []
    for part in self._split.split(text):
      if part in SPECIALS:
        ids.append(256 + SPECIALS.index(part))
      else:
        ids.extend(part.encode("utf-8"))
    return ids

  def decode(self, ids) -> str:
    out, buf = [], bytearray()
    for i in ids:
      i = int(i)
      if i < 256:
        buf.append(i)
      else:
        out.append(buf.decode("utf-8", "replace"))
        buf = bytearray()
        out.append(SPECIALS[i - 256])
    out.append(buf.decode("utf-8", "replace"))
    return "".join(out)

  def apply_chat_template(self, messages, add_generation_prompt=False) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


CONDITIONS = [
    ("I10", "essential hypertension"), ("I50.9", "heart failure"),
    ("E11.9", "type 2 diabetes mellitus"), ("N17.9", "acute kidney failure"),
    ("J44.9", "chronic obstructive pulmonary disease"), ("N39.0", "urinary tract infection"),
    ("I48.91", "atrial fibrillation"), ("E78.5", "hyperlipidemia"),
]
FILLER = ("Vital signs were stable overnight. The patient ambulated in the hallway. "
          "Labs were reviewed with the team. Family at bedside. Diet was advanced. ")


def make_documents(n: int, seed: int = 0, split: str = "train") -> list[Document]:
  """Synthetic notes of 300-1,500 characters with 1-4 evidenced codes each."""
  rng = random.Random(seed)
  docs = []
  for i in range(n):
    text, evidence, codes = "", [], []
    for code, phrase in rng.sample(CONDITIONS, rng.randint(1, 4)):
      text += FILLER[:rng.randint(40, 300)] + " History notable for "
      evidence.append(Evidence(code, len(text), len(text) + len(phrase)))
      codes.append(code)
      text += phrase + ". "
    text += FILLER * rng.randint(0, 3)
    doc = Document(f"{split}-{i}", text, tuple(codes), tuple(evidence), split, "test")
    doc.validate()
    docs.append(doc)
  return docs


def make_spans(n: int) -> list[Span]:
  spans = []
  for i in range(n):
    code, phrase = CONDITIONS[i % len(CONDITIONS)]
    if i % 10 == 9:
      spans.append(Span(f"no evidence of {phrase} ({i})", None, "negative"))
    else:
      spans.append(Span(f"{phrase} variant {i}", code, "paraphrase"))
  return spans


def varied_spans(n: int, seed: int = 0) -> list[Span]:
  """Spans of 18-144 characters: examples of 150-430 tokens, so that first-fit packing
  reaches back to earlier rows (with equal lengths every packer fills rows in turn)."""
  rng = random.Random(seed)
  out = []
  for i in range(n):
    code, phrase = CONDITIONS[i % len(CONDITIONS)]
    text = f"{phrase} ({i}) " + FILLER[:rng.choice([0, 10, 30, 60, 100])]
    out.append(Span(text.strip(), None if i % 7 == 6 else code, "paraphrase"))
  return out


def data_cfg(**overrides):
  """``config.data`` as these tests set it: code-first answers (the examples spelled out
  below), 512-token rows of 4, no worker threads."""
  cfg = base_config().data
  cfg.update(source="test", span_weight=0.8, doc_weight=0.2, seq_len=512, window_overlap=16,
             batch_size=4, shuffle_seed=0, num_threads=0, answer_format="code_first")
  cfg.update(overrides)
  return cfg


def changed(cfg, **fields):
  """A copy of a data config with ``fields`` changed."""
  out = cfg.copy_and_resolve_references()
  out.update(fields)
  return out


@pytest.fixture(scope="module")
def tok():
  return ByteTokenizer()


@pytest.fixture(scope="module")
def docs():
  return make_documents(40) + make_documents(6, seed=1, split="val")


@pytest.fixture(scope="module")
def spans():
  return make_spans(300)


def segments(batch):
  """(row, segment id, slice) of every packed example, from segment_ids alone."""
  out = []
  for r, seg in enumerate(batch["segment_ids"]):
    for s in np.unique(seg[seg > 0]):
      idx = np.nonzero(seg == s)[0]
      out.append((r, int(s), slice(int(idx[0]), int(idx[-1]) + 1), idx))
  return out


# --- expectations written out here, not by the code under test ----------------------------------


def chat_example(tok, text: str, answer: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(tokens, loss mask) of a training example spelled out by hand: the ChatML prompt (system
  line, then the instruction and the note as the user turn), the answer and <|im_end|>; the loss
  lies on the answer and <|im_end|> only."""
  prompt = (f"<|im_start|>system\n{prompts.SYSTEM_PROMPT}<|im_end|>\n"
            f"<|im_start|>user\n{prompts.INSTRUCTION}\n\n{text}<|im_end|>\n"
            "<|im_start|>assistant\n")
  head, answer_ids = tok.encode(prompt), tok.encode(answer + "<|im_end|>")
  return tuple(head + answer_ids), (0,) * len(head) + (1,) * len(answer_ids)


def span_example(tok, span: Span):
  """A span's example: ``CODE | span text``, or ``NONE`` for a negative span."""
  return chat_example(tok, span.text, f"{span.code} | {span.text}" if span.code else "NONE")


def window_example(tok, doc: Document, begin: int, end: int):
  """The example of the window ``doc.text[begin:end]`` of a `make_documents` note (every code
  has one evidence span): a ``CODE | quote`` line per evidence lying whole in the window, in
  reading order, or ``NONE``."""
  inside = sorted((e for e in doc.evidence if begin <= e.begin and e.end <= end),
                  key=lambda e: e.begin)
  lines = [f"{e.code} | {doc.text[e.begin:e.end]}" for e in inside]
  return chat_example(tok, doc.text[begin:end], "\n".join(lines) or "NONE")


def shifted(example) -> dict[str, np.ndarray]:
  tokens, mask = (np.asarray(x, np.int32) for x in example)
  return {"inputs": tokens[:-1], "targets": tokens[1:],
          "loss_weights": mask[1:].astype(np.float32)}


def first_fit_pack(examples, seq_len: int, bins: int) -> list[list[dict[str, np.ndarray]]]:
  """A naive first-fit packer (the algorithm grain documents for FirstFitPackIterDataset):
  each shifted example, in stream order, goes to the first of ``bins`` rows with room for it;
  when none has room, the round's rows are emitted and a new round starts with that example.
  The last round keeps only its non-empty rows. Returns the rounds' rows, laid out."""
  rounds, rows = [], [[] for _ in range(bins)]
  for ex in examples:
    n = len(ex["inputs"])
    row = next((r for r in rows if sum(len(e["inputs"]) for e in r) + n <= seq_len), None)
    if row is None:
      rounds.append(rows)
      rows = [[] for _ in range(bins)]
      row = rows[0]
    row.append(ex)
  rounds.append([r for r in rows if r])

  def layout(row):
    out = {k: np.zeros(seq_len, np.float32 if k == "loss_weights" else np.int32)
           for k in pipeline.BATCH_KEYS}
    at = 0
    for i, ex in enumerate(row, start=1):
      n = len(ex["inputs"])
      for k in ("inputs", "targets", "loss_weights"):
        out[k][at:at + n] = ex[k]
      out["segment_ids"][at:at + n] = i
      out["positions"][at:at + n] = np.arange(n)
      at += n
    return out

  return [[layout(r) for r in rnd] for rnd in rounds]


def rows_of(batches) -> list[dict[str, np.ndarray]]:
  return [{k: b[k][r] for k in pipeline.BATCH_KEYS} for b in batches
          for r in range(len(b["inputs"]))]


def row_key(row) -> bytes:
  return b"".join(np.ascontiguousarray(row[k]).tobytes() for k in sorted(pipeline.BATCH_KEYS))


def test_packed_batches_keep_examples_apart(tok, docs, spans):
  cfg = data_cfg()
  it = pipeline.make_train_iterator(cfg, tok, documents=docs, spans=spans, prefetch=0)
  # Every example the pipeline may emit, spelled out from the records (only the windows'
  # character bounds come from the window planner).
  expected = dict(span_example(tok, s) for s in spans)
  for d in docs:
    for w in windows.document_windows(d, tok, seq_len=512, window_overlap=16):
      tokens, mask = window_example(tok, d, w.begin, w.end)
      expected[tokens] = mask
  n_segments = 0
  for _ in range(12):
    b = next(it)
    assert set(b) == set(pipeline.BATCH_KEYS)
    for k in pipeline.BATCH_KEYS:
      assert b[k].shape == (4, 512), k
    assert b["inputs"].dtype == np.int32 and b["targets"].dtype == np.int32
    assert b["loss_weights"].dtype == np.float32
    assert b["segment_ids"].dtype == np.int32 and b["positions"].dtype == np.int32
    pad = b["segment_ids"] == 0
    assert not b["loss_weights"][pad].any() and not b["inputs"][pad].any()
    for r, s, sl, idx in segments(b):
      n_segments += 1
      # Contiguous, positions restart at 0 and count up: no attention across segments
      # once the model masks by segment id and causality.
      assert len(idx) == sl.stop - sl.start
      np.testing.assert_array_equal(b["positions"][r, sl], np.arange(len(idx)))
      inputs, targets = b["inputs"][r, sl], b["targets"][r, sl]
      np.testing.assert_array_equal(targets[:-1], inputs[1:])  # shifted within the segment
      tokens = tuple(np.append(inputs, targets[-1]))
      assert tokens in expected, tok.decode(tokens)[:200]
      np.testing.assert_array_equal(b["loss_weights"][r, sl], np.asarray(expected[tokens][1:]))
      # Loss lies exactly on the assistant answer: decoding it gives the target + <|im_end|>.
      answer = tok.decode(targets[b["loss_weights"][r, sl] > 0])
      assert answer.endswith("<|im_end|>")
      assert "<|im_start|>" not in answer and "user" not in answer
    for r in range(4):  # segment ids are distinct runs 1..k, padding only at the end
      seg = b["segment_ids"][r]
      ids = seg[seg > 0]
      assert np.all(np.diff(ids) >= 0) and ids[0] == 1 and len(np.unique(ids)) == ids[-1]
      assert not seg[len(ids):].any()  # padding only after the last example
  assert n_segments > 48
  assert it.stats.truncated == 0


def test_train_packing_is_first_fit_over_the_example_stream(tok):
  """Spans only, so the stream is one shuffled source. One packing bin lays the stream out row
  after row: its order is read off, checked to be an epoch of every span once, and packed here
  with 8 bins by a naive first-fit packer; the pipeline's 8-bin rows must be exactly those rows,
  each round's rows in some order (rows are shuffled within a round)."""
  seq_len, spans = 512, varied_spans(200)
  cfg = data_cfg(span_weight=1.0, doc_weight=0.0, batch_size=4)
  by_tokens = {span_example(tok, s)[0]: (i, span_example(tok, s)) for i, s in enumerate(spans)}
  one_bin = pipeline.make_train_iterator(changed(cfg, pack_bins=1), tok, spans=spans,
                                         documents=[], prefetch=0)
  stream, fill = [], []
  for b in [next(one_bin) for _ in range(45)]:
    for r in range(4):
      row = [(s, sl) for rr, s, sl, _ in segments(b) if rr == r]
      fill.append(sum(sl.stop - sl.start for _, sl in row))
      for _, sl in row:
        tokens = tuple(np.append(b["inputs"][r, sl], b["targets"][r, sl][-1]).tolist())
        i, example = by_tokens[tokens]  # KeyError: not a span's example
        np.testing.assert_array_equal(b["loss_weights"][r, sl], np.asarray(example[1][1:]))
        stream.append((i, example))
  # An epoch is every span once (the next epoch is shuffled anew: no repeat within it either).
  assert sorted(i for i, _ in stream[:len(spans)]) == list(range(len(spans)))
  second = [i for i, _ in stream[len(spans):]]
  assert second and len(set(second)) == len(second)
  # One bin: a row is closed only when the next example does not fit in what is left.
  lengths = [len(ex[0]) - 1 for _, ex in stream]
  k = 0
  for used in fill[:-1]:
    n_row = 0
    while n_row < used:
      n_row += lengths[k]
      k += 1
    assert n_row == used and used + lengths[k] > seq_len
  # Eight bins: two batches of 4 rows per round.
  eight = pipeline.make_train_iterator(changed(cfg, pack_bins=8), tok, spans=spans, documents=[],
                                       prefetch=0)
  reference = first_fit_pack([shifted(ex) for _, ex in stream], seq_len, 8)[:-1]
  rounds = 6
  assert len(reference) > rounds and all(len(rnd) == 8 for rnd in reference[:rounds])
  for rnd in reference[:rounds]:
    got = rows_of([next(eight), next(eight)])
    assert sorted(map(row_key, got)) == sorted(map(row_key, rnd))


def test_eval_packing_is_first_fit_in_order(tok, docs):
  """The eval iterator packs val windows, then spans, in order, into batch_size bins: exactly
  the naive first-fit packer's rows, the last batch padded with empty rows."""
  seq_len, extra = 512, varied_spans(40, seed=1)
  cfg = data_cfg(batch_size=3)
  got = list(pipeline.make_eval_iterator(cfg, tok, documents=docs, spans=extra))
  examples = []
  for d in (d for d in docs if d.split == "val"):
    for w in windows.document_windows(d, tok, seq_len=seq_len, window_overlap=16):
      examples.append(shifted(window_example(tok, d, w.begin, w.end)))
  examples += [shifted(span_example(tok, s)) for s in extra]
  rounds = first_fit_pack(examples, seq_len, 3)
  assert len(got) == len(rounds)
  assert any(len(set(r["segment_ids"][r["segment_ids"] > 0])) > 1 for r in rows_of(got))
  for batch, rnd in zip(got, rounds):
    empty = {k: np.zeros_like(v) for k, v in rnd[0].items()}
    rnd = rnd + [empty] * (3 - len(rnd))
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(batch[k], np.stack([r[k] for r in rnd]), err_msg=k)
      assert batch[k].dtype == rnd[0][k].dtype, k


def test_mixture_proportions_over_many_batches(tok, docs, spans):
  cfg = data_cfg(span_weight=0.7, doc_weight=0.3, batch_size=8)
  it = pipeline.make_train_iterator(cfg, tok, documents=docs, spans=spans, with_sources=True,
                                    prefetch=0)
  counts = collections.Counter()
  tokens = collections.Counter()
  for _ in range(40):
    b = next(it)
    batch_counts = collections.Counter()
    for r, s, sl, idx in segments(b):
      src = set(b["sources"][r, sl].tolist())
      assert len(src) == 1
      batch_counts[src.pop()] += 1
    for sid in (1, 2):
      tokens[sid] += int((b["sources"] == sid).sum())
    reported = pipeline.count_sources(b)
    assert reported["spans"]["examples"] == batch_counts[1]
    assert reported["documents"]["examples"] == batch_counts[2]
    assert reported["documents"]["tokens"] == int((b["sources"] == 2).sum())
    counts.update(batch_counts)
  frac = counts[1] / (counts[1] + counts[2])
  assert abs(frac - 0.7) < 0.03, (frac, counts)
  # Token fractions: documents are much longer, so weighting tokens changes the mix.
  it = pipeline.make_train_iterator(changed(cfg, mixture_unit="tokens"), tok, documents=docs,
                                    spans=spans, with_sources=True, prefetch=0)
  tok_counts = collections.Counter()
  for _ in range(40):
    b = next(it)
    for sid in (1, 2):
      tok_counts[sid] += int((b["sources"] == sid).sum())
  tok_frac = tok_counts[1] / (tok_counts[1] + tok_counts[2])
  assert abs(tok_frac - 0.7) < 0.08, (tok_frac, tok_counts)
  # Weighting examples, the longer documents take more than 30% of the tokens.
  by_examples = tokens[1] / (tokens[1] + tokens[2])
  assert by_examples < 0.65 and abs(tok_frac - 0.7) < abs(by_examples - 0.7)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_restored_iterator_yields_identical_next_batch(tok, docs, spans, tmp_path, share_prompt):
  import grain  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # Reader threads and the prefetch thread, as in training.
  cfg = data_cfg(num_threads=2, share_prompt=share_prompt)
  it = pipeline.make_train_iterator(cfg, tok, documents=docs, spans=spans)
  for _ in range(7):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what the grain checkpoint handler writes
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    mngr.save(7, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  expected = [next(it) for _ in range(3)]

  fresh = pipeline.make_train_iterator(cfg, tok, documents=docs, spans=spans)
  fresh.set_state(state)
  restored = pipeline.make_train_iterator(cfg, tok, documents=docs, spans=spans)
  with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as mngr:
    mngr.restore(7, args=ocp.args.Composite(
        data_iter=grain.checkpoint.CheckpointRestore(restored)))
  for other in (fresh, restored):
    for want in expected:
      got = next(other)
      for k in pipeline.BATCH_KEYS:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_process_shards_are_disjoint(tok, docs, spans):
  cfg = data_cfg(batch_size=4, span_weight=1.0, doc_weight=0.0)
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(cfg, tok, documents=docs, spans=spans, process_index=p,
                                      process_count=2, prefetch=0)
    texts = set()
    for _ in range(6):
      b = next(it)
      assert b["inputs"].shape == (2, 512)
      for r, s, sl, idx in segments(b):
        texts.add(tok.decode(b["inputs"][r, sl]))
    seen.append(texts)
  assert seen[0] and seen[1] and not seen[0] & seen[1]
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_iterator(data_cfg(batch_size=3), tok, documents=docs, spans=spans,
                                 process_count=2)


def test_eval_iterator_is_finite_and_deterministic(tok, docs):
  cfg = data_cfg(batch_size=2)
  runs = [list(pipeline.make_eval_iterator(cfg, tok, documents=docs)) for _ in range(2)]
  assert len(runs[0]) == len(runs[1]) > 0
  for a, b in zip(*runs):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(a[k], b[k])
      assert a[k].shape == (2, 512)
  n_windows = sum(len(windows.document_windows(d, tok, seq_len=512, window_overlap=16))
                  for d in docs if d.split == "val")
  assert sum(len(segments(b)) for b in runs[0]) == n_windows
  # A fixed number of batches (same on every process): cut, or padded with empty batches.
  n = len(runs[0])
  cut = list(pipeline.make_eval_iterator(cfg, tok, documents=docs, num_batches=n - 1))
  assert len(cut) == n - 1
  padded = list(pipeline.make_eval_iterator(cfg, tok, documents=docs, num_batches=n + 2))
  assert len(padded) == n + 2
  for k in pipeline.BATCH_KEYS:
    np.testing.assert_array_equal(padded[n - 1][k], runs[0][n - 1][k])
    assert not padded[-1][k].any() and padded[-1][k].dtype == runs[0][0][k].dtype


def test_missing_source_with_weight_is_an_error(tok, docs):
  with pytest.raises(ValueError, match="span_weight"):
    pipeline.make_train_iterator(data_cfg(), tok, documents=docs, spans=[])


def test_demo_corpus_end_to_end():
  """The real demo corpus, expansion spans and SmolLM2 tokenizer through the contract."""
  from jaxicd.model.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  tok = load_tokenizer("smollm2")
  cfg = data_cfg(source="demo", demo_seed=0, code_space="demo", spans_per_code=4, negatives=True,
                 annotated_spans=True, span_weight=0.8, doc_weight=0.2, seq_len=1024,
                 window_overlap=64, batch_size=4, shuffle_seed=0, num_threads=2)
  docs = pipeline.load_documents(cfg)
  train = [d for d in docs if d.split == "train"]
  spans = pipeline.load_spans(cfg, train)
  origins = collections.Counter(s.origin for s in spans)
  assert origins["annotated"] > 0 and origins["negative"] > 0
  # Annotated spans are exactly the gold quotes of training documents.
  gold = {(d.quote(e).strip(), e.code) for d in train for e in d.evidence}
  assert {(s.text, s.code) for s in spans if s.origin == "annotated"} == gold
  it = pipeline.make_train_iterator(cfg, tok, documents=docs, spans=spans, with_sources=True)
  seen = collections.Counter()
  for _ in range(6):
    b = next(it)
    assert b["inputs"].shape == (4, 1024)
    for name, c in pipeline.count_sources(b).items():
      seen[name] += c["examples"]
    for r, s, sl, idx in segments(b):
      np.testing.assert_array_equal(b["positions"][r, sl], np.arange(len(idx)))
      np.testing.assert_array_equal(b["targets"][r, sl][:-1], b["inputs"][r, sl][1:])
      assert b["targets"][r, sl][-1] == tok.end_of_turn_id and b["loss_weights"][r, sl][-1] == 1
  assert seen["spans"] > seen["documents"] > 0
  assert it.stats.truncated == 0 and it.stats.split_evidence == 0


# --- shared-prompt packing ------------------------------------------------------------------


def hand_prefix(tok) -> list[int]:
  """The prompt every span example starts with, spelled out: system turn, then the user turn up
  to the span text."""
  return tok.encode(f"<|im_start|>system\n{prompts.SYSTEM_PROMPT}<|im_end|>\n"
                    f"<|im_start|>user\n{prompts.INSTRUCTION}\n\n")


def test_shared_prompt_rows_hold_each_span_after_one_prefix(tok, docs, spans):
  it = pipeline.make_train_iterator(data_cfg(share_prompt=True), tok, documents=docs,
                                    spans=spans, prefetch=0)
  prefix = np.asarray(hand_prefix(tok))
  n = len(prefix)
  spans_expected = dict(span_example(tok, s) for s in spans)
  docs_expected = {}
  for d in docs:
    for w in windows.document_windows(d, tok, seq_len=512, window_overlap=16):
      tokens, mask = window_example(tok, d, w.begin, w.end)
      docs_expected[tokens] = mask
  span_rows = doc_rows = n_spans = 0
  for _ in range(12):
    b = next(it)
    assert set(b) == set(pipeline.BATCH_KEYS) and b["segment_ids"].shape == (4, 512)
    for r in range(4):
      seg, pos = b["segment_ids"][r], b["positions"][r]
      inputs, targets, weights = b["inputs"][r], b["targets"][r], b["loss_weights"][r]
      assert not weights[seg == 0].any()
      if not (seg < 0).any():  # a document row, laid out as without sharing
        doc_rows += 1
        for s in np.unique(seg[seg > 0]):
          idx = np.nonzero(seg == s)[0]
          np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
          assert tuple(np.append(inputs[idx], targets[idx][-1])) in docs_expected
        continue
      span_rows += 1
      np.testing.assert_array_equal(inputs[:n], prefix)  # the prefix once, first
      assert (seg[:n] == 1).all() and not weights[:n].any()
      np.testing.assert_array_equal(pos[:n], np.arange(n))
      assert not (seg[n:] == 1).any() and (seg[n:] <= 0).all()
      for s in np.unique(seg[seg < 0]):
        idx = np.nonzero(seg == s)[0]
        assert idx[-1] - idx[0] + 1 == len(idx)  # contiguous
        np.testing.assert_array_equal(pos[idx], n + np.arange(len(idx)))  # after the prefix
        whole = tuple(np.concatenate([prefix, inputs[idx], targets[idx][-1:]]))
        assert whole in spans_expected, tok.decode(whole)[:200]
        # The weights of the unshared example's tokens after the prefix, unchanged.
        np.testing.assert_array_equal(weights[idx], spans_expected[whole][n + 1:])
        np.testing.assert_array_equal(targets[idx][:-1], inputs[idx][1:])
        n_spans += 1
  assert span_rows and doc_rows and n_spans > 100
  assert it.stats.unshared_spans == 0
  # The prompt once per row instead of once per example: a row holds far more examples than
  # whole examples could fill it with (here ~4.5 vs at most ~2.5).
  mean_unshared = np.mean([len(t) - 1 for t in spans_expected])
  assert n_spans / span_rows > 1.5 * 512 / mean_unshared
