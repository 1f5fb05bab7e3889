"""The document coder: windows, parsing, offsets back into the note, merging and scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxicd.data import prompts
from jaxicd.data.records import Document
from jaxicd.eval import metrics
from jaxicd.infer import coder as coder_lib
from jaxicd.infer.generate import Generation

FILLER = "Vitals stable overnight. Labs reviewed with the team. "


@pytest.fixture(scope="module")
def tok():
  from jaxicd.model.tokenizer import load_tokenizer
  return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def random_model(tok):
  """A narrow random model with SmolLM2's vocabulary (the real decode loop, in seconds)."""
  from jaxicd.model import llama
  from jaxicd.model.config import preset
  cfg = preset("tiny").replace(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                               num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16)
  return llama.create(cfg, seed=0)


@pytest.fixture(scope="module")
def doc():
  text = (FILLER * 3 + "History of hypertension. " + FILLER * 6
          + "Type 2 diabetes mellitus without complications. " + FILLER * 6
          + "Hypertension is controlled. " + FILLER * 2)
  return Document("doc-1", text, ("I10", "E11.9"), split="val")


def _window_text(tok, prompt_ids) -> str:
  prompt = tok.decode(prompt_ids)
  body = prompt.split(prompts.INSTRUCTION + "\n\n", 1)[1]
  return body.split("<|im_end|>", 1)[0]


class ScriptedModel:
  """Answers each window from what its text contains; code tokens get probability `p` (which
  grows with the window's position), quote tokens 0.01."""

  def __init__(self, tok, max_new):
    self.tok, self.max_new, self.calls = tok, max_new, []

  def answer(self, window: str) -> list[tuple[str, str]]:
    lines = []
    if "hypertension" in window.lower():
      # The quote repeats the window's spelling, so each mention grounds where it is.
      i = window.lower().index("hypertension")
      lines.append(("I10", window[i:i + len("hypertension")]))
    if "diabetes" in window:
      lines.append(("E11.9", "type 2 DIABETES  mellitus"))  # case/space differences
      lines.append(("Q99.99", "not a billable code"))
      lines.append(("E11.9", "type 2 diabetes mellitus"))    # duplicate line
      lines.append(("J45.909", "wheezing at night"))         # quote not in the note
    return lines

  def __call__(self, batch):
    self.calls.append(len(batch))
    tokens = np.zeros((len(batch), self.max_new), np.int32)
    logprobs = np.zeros((len(batch), self.max_new), np.float32)
    lengths = np.zeros(len(batch), np.int32)
    self.p = getattr(self, "p", {})
    for r, ids in enumerate(batch):
      window = _window_text(self.tok, ids)
      p = 0.5 + 0.4 * (window.count("Labs") / 20)
      self.p[window] = p
      ids_out, lp = [], []
      lines = self.answer(window) or [(prompts.NONE, "")]
      for j, (code, quote) in enumerate(lines):
        code_ids = self.tok.encode(code)
        rest = self.tok.encode(f" | {quote}" if quote else "")
        if j + 1 < len(lines):
          rest += self.tok.encode("\n")
        ids_out += code_ids + rest
        lp += [math.log(p)] * len(code_ids) + [math.log(0.01)] * len(rest)
      ids_out.append(self.tok.end_of_turn_id)
      lp.append(0.0)
      n = len(ids_out)
      assert n <= self.max_new
      tokens[r, :n], logprobs[r, :n], lengths[r] = ids_out, lp, n
    return Generation(tokens, lengths, logprobs, np.ones(len(batch), bool))


def test_code_documents_grounds_merges_and_scores(tok, doc):
  fake = ScriptedModel(tok, max_new=96)
  coder = coder_lib.Coder(None, tok, code_space=("I10", "E11.9", "J45.909"), seq_len=256,
                          window_overlap=32, max_new_tokens=96, batch_size=2,
                          generate_fn=fake)
  [out] = coder.code_documents([doc])
  assert coder.stats["windows"] >= 3 and all(n <= 2 for n in fake.calls)
  by_code: dict[str, list[coder_lib.CodedEvidence]] = {}
  for ev in out:
    by_code.setdefault(ev.code, []).append(ev)
  assert set(by_code) == {"I10", "E11.9", "J45.909"}  # Q99.99: not in the code space

  # I10: both mentions, each once although overlapping windows may see one twice.
  lower = doc.text.lower()
  first = lower.index("hypertension")
  second = lower.index("hypertension", first + 1)
  assert sorted((e.begin, e.end) for e in by_code["I10"]) == [
      (first, first + 12), (second, second + 12)]
  assert {e.quote for e in by_code["I10"]} == {"hypertension", "Hypertension"}
  # E11.9: grounded despite case and whitespace differences; the duplicate line adds nothing.
  [diab] = by_code["E11.9"]
  b = doc.text.index("Type 2 diabetes mellitus")
  assert (diab.begin, diab.end, diab.quote) == (b, b + 24, "Type 2 diabetes mellitus")
  # J45.909: the quote is nowhere in the note -> kept ungrounded, with the model's quote.
  [asthma] = by_code["J45.909"]
  assert (asthma.begin, asthma.end, asthma.quote) == (-1, -1, "wheezing at night")

  # Score = max over windows of exp(mean log-prob of the code's tokens) = that window's p.
  windows_with = lambda pred: [p for w, p in fake.p.items() if pred(w)]
  assert by_code["I10"][0].score == pytest.approx(
      max(windows_with(lambda w: "hypertension" in w.lower())), rel=1e-5)
  assert diab.score == pytest.approx(max(windows_with(lambda w: "diabetes" in w)), rel=1e-5)
  assert [e.score for e in out] == sorted((e.score for e in out), reverse=True)

  # Counters feed the output-quality metrics.
  n_diab = len(windows_with(lambda w: "diabetes" in w))
  assert coder.stats["rejected_invalid"] == n_diab
  assert coder.stats["rejected_duplicate"] == n_diab
  rates = metrics.output_rates(coder.stats)
  assert 0 < rates["valid_code_rate"] < 1 and 0 < rates["grounded_evidence_rate"] < 1
  m = metrics.evaluate([doc], [out], code_space=coder.code_space)
  assert m["micro_precision"] == pytest.approx(2 / 3) and m["micro_recall"] == 1.0


def test_none_answers_give_no_codes(tok):
  fake = ScriptedModel(tok, max_new=16)
  coder = coder_lib.Coder(None, tok, code_space=("I10",), seq_len=128, window_overlap=0,
                          max_new_tokens=16, batch_size=4, generate_fn=fake)
  out = coder.code_documents([Document("a", "Nothing to code here.", ()),
                              Document("b", "Known hypertension.", ("I10",))])
  assert out[0] == []
  assert [(e.code, e.quote) for e in out[1]] == [("I10", "hypertension")]
  assert coder.stats["none_answers"] == 1


def test_line_scores_use_code_tokens_only():
  pieces = ["I", "1", "0", " |", " chest", "\n", "E", "11", " | x\nN", "ONE"]
  lps = [math.log(0.5)] * 3 + [math.log(0.1)] * 3 + [math.log(0.8)] * 2 + [0.0, 0.0]
  lines = coder_lib.line_scores(pieces, lps)
  assert [(ln.code, round(ln.score, 6)) for ln in lines] == [
      ("I10", 0.5), ("E11", 0.8), (None, 1.0)]  # "NONE" is not a code


def test_line_scores_read_a_bulleted_line_as_the_parser_does():
  # "- " and "2. " are list markers, not code tokens: the code I10 / E11.9 scores alone.
  pieces = ["-", " I", "10", " |", " x", "\n", "2", ".", " E", "11", ".9"]
  lps = [math.log(0.1)] + [math.log(0.5)] * 2 + [math.log(0.1)] * 3 + [math.log(0.1)] * 2 \
      + [math.log(0.25)] * 3
  lines = coder_lib.line_scores(pieces, lps)
  assert [(ln.code, round(ln.score, 6)) for ln in lines] == [("I10", 0.5), ("E11.9", 0.25)]
  assert [p.code for p in prompts.parse_output("".join(pieces)).predictions] == ["I10", "E11.9"]


def test_coder_with_a_tiny_random_model_end_to_end(tok, random_model):
  # Integration: the real generate loop with constrained decoding; a random model, so only the
  # guarantees are checked: codes from the space, grounded offsets that match their quotes.
  model = random_model
  space = ("I10", "E11.9", "N17.9", "I50.23")
  coder = coder_lib.Coder(model, tok, code_space=space, seq_len=192, window_overlap=16,
                          max_new_tokens=24, batch_size=2, temperature=1.0)
  docs = [Document("x", "Hypertension. " * 80, ("I10",)), Document("y", "AKI noted.", ("N17.9",))]
  out = coder.code_documents(docs)
  assert len(out) == 2 and coder.stats["windows"] >= 3
  assert coder.stats["predicted_lines"] >= coder.stats["windows"] - coder.stats["none_answers"] - \
      coder.stats["truncated_generations"]
  assert coder.stats.get("rejected_invalid", 0) == coder.stats.get("rejected_malformed", 0) == 0
  for d, evs in zip(docs, out):
    for e in evs:
      assert e.code in space and 0.0 < e.score <= 1.0
      if e.grounded:
        assert d.text[e.begin:e.end] == e.quote


def test_line_scores_evidence_first_use_the_code_after_the_bar():
  pieces = [" chest", " pain", " |", " I", "1", "0", "\n", "AK", "I", " |", " N", "1", "7",
            ".", "9", "\n", " |", " E", "7", "8"]
  lps = ([math.log(0.01)] * 3 + [math.log(0.5)] * 3 + [0.0] + [math.log(0.01)] * 3
         + [math.log(0.25)] * 5 + [0.0, math.log(0.01), math.log(0.9), math.log(0.9),
                                   math.log(0.9)])
  lines = coder_lib.line_scores(pieces, lps, prompts.EVIDENCE_FIRST)
  assert [(ln.code, round(ln.score, 6)) for ln in lines] == [
      ("I10", 0.5), ("N17.9", 0.25), ("E78", 0.9)]


class SpanModel:
  """Re-codes a span prompt (code-first, code only): a fixed code and probability per text."""

  def __init__(self, tok, table):
    self.tok, self.table, self.texts = tok, table, []

  def __call__(self, batch, note_ranges=None, code_only=False):
    assert code_only and note_ranges is None
    width = 8
    tokens = np.zeros((len(batch), width), np.int32)
    logprobs = np.zeros((len(batch), width), np.float32)
    lengths = np.zeros(len(batch), np.int32)
    for r, ids in enumerate(batch):
      text = _window_text(self.tok, ids)
      self.texts.append(text)
      code, p = self.table.get(text.lower(), (prompts.NONE, 0.5))
      out = self.tok.encode(code) + [self.tok.end_of_turn_id]
      tokens[r, :len(out)], lengths[r] = out, len(out)
      logprobs[r, :len(out) - 1] = math.log(p)
    return Generation(tokens, lengths, logprobs, np.ones(len(batch), bool))


def test_recoding_replaces_codes_and_scores_then_the_threshold_decides(tok, doc):
  docs_model = ScriptedModel(tok, max_new=96)
  spans = SpanModel(tok, {"hypertension": ("I10", 0.9),
                          "type 2 diabetes mellitus": ("E11.8", 0.7)})

  def fake(batch, note_ranges=None, code_only=False):
    return spans(batch, note_ranges, code_only) if code_only else docs_model(batch)

  kwargs = dict(code_space=("I10", "E11.9", "E11.8", "J45.909"), seq_len=256, window_overlap=32,
                max_new_tokens=96, batch_size=2, generate_fn=fake, recode=True)
  [out] = coder_lib.Coder(None, tok, **kwargs).code_documents([doc])
  got = sorted((e.code, e.begin, round(e.score, 5)) for e in out)
  lower = doc.text.lower()
  first = lower.index("hypertension")
  second = lower.index("hypertension", first + 1)
  diab = doc.text.index("Type 2 diabetes mellitus")
  # Each grounded span re-coded once: both I10 mentions at the span prompt's 0.9; the diabetes
  # span's code replaced by the span prompt's E11.8 at 0.7; the ungrounded J45.909 line kept
  # with its document-pass score.
  j45 = [e for e in out if e.code == "J45.909"][0]
  assert got == sorted([("I10", first, 0.9), ("I10", second, 0.9), ("E11.8", diab, 0.7),
                        ("J45.909", -1, round(j45.score, 5))])
  assert sorted(spans.texts) == sorted(["hypertension", "Hypertension",
                                        "Type 2 diabetes mellitus"])
  coder = coder_lib.Coder(None, tok, **kwargs, threshold=0.8)
  [kept] = coder.code_documents([doc])
  assert {e.code for e in kept} == {"I10"} | ({"J45.909"} if j45.score >= 0.8 else set())
  assert coder.stats["below_threshold"] == 3 - len({e.code for e in kept})


def test_a_line_cut_by_max_new_tokens_is_counted_apart(tok):
  cut = tok.encode("I10 | hypertension\nE11.9 | type 2 diab")

  def fake(batch, **_):
    tokens = np.zeros((len(batch), len(cut)), np.int32)
    tokens[:] = cut
    return Generation(tokens, np.full(len(batch), len(cut), np.int32),
                      np.zeros(tokens.shape, np.float32), np.zeros(len(batch), bool))

  coder = coder_lib.Coder(None, tok, code_space=("I10", "E11.9"), seq_len=128, window_overlap=0,
                          max_new_tokens=len(cut), generate_fn=fake)
  [out] = coder.code_documents([Document("a", "Known hypertension, type 2 diabetes.", ())])
  assert [e.code for e in out] == ["I10"]
  assert coder.stats["truncated_lines"] == 1 and coder.stats["truncated_generations"] == 1
  assert coder.stats["predicted_lines"] == 1 and coder.stats["none_answers"] == 0
  # Cut inside its first line, an evidence-first answer is not "no code" (an empty answer).
  cut = tok.encode(" hypertension | I")
  coder = coder_lib.Coder(None, tok, code_space=("I10", "E11.9"), seq_len=128, window_overlap=0,
                          max_new_tokens=len(cut), generate_fn=fake,
                          answer_format=prompts.EVIDENCE_FIRST)
  [out] = coder.code_documents([Document("a", "Known hypertension, type 2 diabetes.", ())])
  assert out == [] and coder.stats["truncated_lines"] == 1 and coder.stats["none_answers"] == 0


def test_evidence_first_coder_with_a_tiny_random_model_grounds_every_quote(tok, random_model):
  # Integration: the real decode loop; evidence-first quotes are copied from the note, so every
  # quoted line is grounded, at offsets whose text is the quote.
  model = random_model
  space = ("I10", "E11.9", "N17.9", "I50.23")
  coder = coder_lib.Coder(model, tok, code_space=space, seq_len=192, window_overlap=16,
                          max_new_tokens=24, batch_size=2, temperature=1.0,
                          answer_format=prompts.EVIDENCE_FIRST, recode=True)
  docs = [Document("x", "Hypertension and AKI. " * 40, ("I10",)),
          Document("y", "AKI noted.", ("N17.9",))]
  out = coder.code_documents(docs)
  assert coder.stats["quoted_lines"] > 0
  assert coder.stats["grounded_lines"] == coder.stats["quoted_lines"]
  assert coder.stats["recoded_spans"] > 0
  for d, evs in zip(docs, out):
    for e in evs:
      assert e.code in space and 0.0 < e.score <= 1.0
      if e.grounded:
        assert d.text[e.begin:e.end] == e.quote and e.quote.strip()


def test_the_segment_scan_codes_clauses_the_document_pass_missed(tok):
  # The document pass answers nothing; the span prompt knows two clauses. Hand-computed: the
  # note's clauses are "Problem list", "CHF", "Denies chest pain", "Gout" (and again "CHF" in
  # the second note, coded once).
  docs = [Document("a", "Problem list:\n- CHF\n- Denies chest pain\n- Gout\n", ()),
          Document("b", "Seen today. CHF, stable.", ())]
  spans = SpanModel(tok, {"chf": ("I50.9", 0.9), "gout": ("M10.9", 0.6)})

  def fake(batch, note_ranges=None, code_only=False):
    if code_only:
      return spans(batch, note_ranges, code_only)
    tokens = np.full((len(batch), 1), tok.end_of_turn_id, np.int32)  # empty answers
    return Generation(tokens, np.ones(len(batch), np.int32), np.zeros((len(batch), 1)),
                      np.ones(len(batch), bool))

  kwargs = dict(code_space=("I50.9", "M10.9", "R07.9"), seq_len=128, window_overlap=0,
                max_new_tokens=16, generate_fn=fake)
  assert coder_lib.Coder(None, tok, **kwargs).code_documents(docs) == [[], []]
  coder = coder_lib.Coder(None, tok, **kwargs, scan=True)
  a, b = coder.code_documents(docs)
  chf, gout = docs[0].text.index("CHF"), docs[0].text.index("Gout")
  assert [(e.code, e.begin, e.end, e.quote) for e in a] == [
      ("I50.9", chf, chf + 3, "CHF"), ("M10.9", gout, gout + 4, "Gout")]
  assert [round(e.score, 5) for e in a] == [0.9, 0.6]
  assert [(e.code, e.quote) for e in b] == [("I50.9", "CHF")]
  assert sorted(spans.texts) == ["CHF", "Denies chest pain", "Gout", "Problem list", "Seen today",
                                 "stable"]
  assert coder.stats["scanned_clauses"] == 6
  # With a threshold the scan's low-probability codes go like any other.
  coder = coder_lib.Coder(None, tok, **kwargs, scan=True, threshold=0.7)
  assert [[e.code for e in evs] for evs in coder.code_documents(docs)] == [["I50.9"], ["I50.9"]]


def test_merged_candidates_keep_the_first_entry_and_the_best_score():
  ev = coder_lib.CodedEvidence
  doc_pass = [[ev("I10", 0, 3, "HTN", 0.4), ev("E11.9", 10, 14, "T2DM", 0.7)]]
  scan = [[ev("I10", 0, 3, "HTN (scan)", 0.9), ev("I10", 20, 23, "htn", 0.5)]]
  [out] = coder_lib.merge_candidates(doc_pass, scan)
  assert [(e.code, e.begin, e.quote, e.score) for e in out] == [
      ("I10", 0, "HTN", 0.9), ("I10", 20, "htn", 0.9), ("E11.9", 10, "T2DM", 0.7)]
