"""Prompt format, loss masks, windowed targets and the output parser (hand-computed cases)."""

from __future__ import annotations

import numpy as np
import pytest
import tokenizers

from jaxicd.data import prompts
from jaxicd.data.records import Document, Evidence, Span
from jaxicd.model import tokenizer as tokenizer_lib

TEXT = ("Chief complaint: shortness of breath.\n"
        "History: hypertension, well controlled. CHF diagnosed 2019.\n"
        "Hospital course: CHF exacerbation treated with IV furosemide.\n"
        "AKI   on\nCKD stage 3, improving.\n"
        "Discharge dx: HTN.\n")


def _ev(code: str, quote: str) -> Evidence:
  begin = TEXT.index(quote)
  return Evidence(code, begin, begin + len(quote))


DOC = Document(
    id="d1", text=TEXT, codes=("I50.23", "I10", "N17.9", "E78.5"),
    evidence=(_ev("I50.23", "CHF exacerbation"), _ev("I10", "HTN"), _ev("I10", "hypertension"),
              _ev("N17.9", "AKI   on\nCKD stage 3")))


@pytest.fixture(scope="module")
def tok():
  return tokenizer_lib.load_tokenizer("smollm2")


def _with_pre_tokenizer(tok, kind: str):
  """SmolLM2's vocabulary under another model family's split rules (in memory)."""
  backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
  backend.pre_tokenizer = tokenizer_lib._pre_tokenizer(kind)  # pylint: disable=protected-access
  return tokenizer_lib.Tokenizer(backend, vocab_size=tok.vocab_size, eos_token="<|im_end|>",
                                 chat_template=tok.chat_template, source=kind)


@pytest.fixture(scope="module", params=["smollm", "llama3", "qwen2"])
def any_tok(request, tok):
  return tok if request.param == "smollm" else _with_pre_tokenizer(tok, request.param)


# --- targets ----------------------------------------------------------------------------------


def test_document_target_whole_document():
  assert prompts.document_target(DOC) == (
      "I10 | hypertension\n"          # earliest I10 evidence; lines in reading order
      "I50.23 | CHF exacerbation\n"
      "N17.9 | AKI on CKD stage 3\n"  # whitespace run and newline collapsed
      "E78.5")                        # no evidence: bare code, last


def test_document_target_windows():
  course = TEXT.index("Hospital course")
  assert prompts.document_target(DOC, course) == (
      "I50.23 | CHF exacerbation\nN17.9 | AKI on CKD stage 3\nI10 | HTN\nE78.5")
  # Evidence cut by the window edge is not quoted; codes without evidence appear in every window.
  cut = TEXT.index("CKD stage")
  assert prompts.document_target(DOC, 0, cut) == (
      "I10 | hypertension\nI50.23 | CHF exacerbation\nE78.5")
  assert prompts.document_target(DOC, 0, TEXT.index("History")) == "E78.5"
  only_evidence = Document(id="d2", text=TEXT, codes=("I10",), evidence=(_ev("I10", "HTN"),))
  assert prompts.document_target(only_evidence, 0, course) == "NONE"
  # Half-open: evidence ending exactly at the window end is inside, one character less is not.
  htn = _ev("I10", "HTN")
  assert prompts.document_target(only_evidence, htn.begin, htn.end) == "I10 | HTN"
  assert prompts.document_target(only_evidence, htn.begin, htn.end - 1) == "NONE"
  with pytest.raises(ValueError, match="d2.*outside"):
    prompts.document_target(only_evidence, 5, len(TEXT) + 1)


def test_window_targets_ground_back_to_gold_offsets():
  for begin, end in [(0, len(TEXT)), (TEXT.index("Hospital"), len(TEXT)), (20, 190)]:
    window = TEXT[begin:end]
    result = prompts.parse_output(prompts.document_target(DOC, begin, end), window)
    assert result.ungrounded == 0 and not result.rejected
    for p in result.predictions:
      if p.quote:
        assert Evidence(p.code, p.begin + begin, p.end + begin) in DOC.evidence


def test_span_target():
  assert prompts.span_target(Span("acute on chronic\nsystolic CHF", "I50.23", "paraphrase")) == \
      "I50.23 | acute on chronic systolic CHF"
  assert prompts.span_target(Span("no chest pain", None, "negative")) == "NONE"


# --- encoding and loss masks ------------------------------------------------------------------

TARGETS = [
    "NONE",
    "I10 | hypertension",
    prompts.document_target(DOC),
    "S72.001A | closed fracture of right femoral neck.\nT81.4XXA | wound infection!\nE11.9",
    "F32.A | depression, unspecified\nZ79.4 | on insulin\nI50.23",
]


@pytest.mark.parametrize("target", TARGETS)
def test_loss_mask_covers_exactly_answer_and_end_of_turn(any_tok, target):
  text = "Pt w/ AKI on CKD.\n\nHTN, well controlled."
  ex = prompts.encode_example(any_tok, text, target)
  tokens, mask = ex["tokens"], ex["loss_mask"]
  assert tokens.dtype == np.int32 and mask.dtype == np.int32 and tokens.shape == mask.shape
  n_answer = int(mask.sum())
  assert mask[-n_answer:].all() and not mask[:-n_answer].any()  # one block, at the end
  assert any_tok.decode(tokens[mask == 1]) == target + "<|im_end|>"
  assert tokens[-1] == any_tok.end_of_turn_id
  # The prompt part is exactly the inference prompt, ending with the assistant header.
  prompt = prompts.encode_prompt(any_tok, text)
  np.testing.assert_array_equal(tokens[mask == 0], prompt)
  assert any_tok.decode(prompt).endswith("<|im_start|>assistant\n")
  # Tokenizing prompt and answer apart equals tokenizing the whole conversation as rendered.
  full = any_tok.apply_chat_template(
      prompts.chat_messages(text) + [{"role": "assistant", "content": target}])
  assert full.startswith(any_tok.decode(tokens))
  assert any_tok.encode(full)[:len(tokens)] == tokens.tolist()


def test_encode_example_rejects_padded_or_empty_targets(tok):
  for bad in ["", " I10", "I10\n"]:
    with pytest.raises(ValueError, match="target"):
      prompts.encode_example(tok, "x", bad)


@pytest.mark.parametrize("target", TARGETS)
def test_codes_start_lines_with_their_standalone_tokens(any_tok, target):
  # Constrained decoding walks a trie of `code_token_ids` from each line start.
  ids, _ = any_tok.encode_with_offsets(target)
  starts = [0] + [i + 1 for i, c in enumerate(target) if c == "\n"]
  for start in starts:
    code = target[start:].split("\n", 1)[0].split(" | ", 1)[0]
    code_ids = prompts.code_token_ids(any_tok, code)
    k = next(k for k in range(len(ids) + 1) if any_tok.decode(ids[:k]) == target[:start])
    assert ids[k:k + len(code_ids)] == code_ids, (target, code)
    assert any_tok.decode(ids[:k + len(code_ids)]) == target[:start + len(code)]


# --- parser -----------------------------------------------------------------------------------

OUTPUT = """
  - i5023 | chf exacerbation
I10|hypertension
2) N17.9: AKI on CKD stage 3
Z99.89 | not in this note
* E78.5
FOO | nonsense
The patient has CHF.
I50.23 | CHF Exacerbation
J18.9 | pneumonia
NONE
"""


def test_parse_output_hand_computed():
  valid = {"I50.23", "I10", "N17.9", "Z99.89", "E78.5"}
  result = prompts.parse_output(OUTPUT, TEXT, is_valid_code=valid)
  chf = TEXT.index("CHF exacerbation")
  htn = TEXT.index("hypertension")
  aki = TEXT.index("AKI")
  assert result.predictions == [
      prompts.Prediction("I50.23", "chf exacerbation", chf, chf + 16),  # case-insensitive
      prompts.Prediction("I10", "hypertension", htn, htn + 12),
      # whitespace-insensitive, mapped back onto "AKI   on\nCKD stage 3" in the original
      prompts.Prediction("N17.9", "AKI on CKD stage 3", aki, aki + 20),
      prompts.Prediction("Z99.89", "not in this note", -1, -1),           # ungrounded, kept
      prompts.Prediction("E78.5", "", -1, -1),                            # bare code
  ]
  assert TEXT[aki:aki + 20] == "AKI   on\nCKD stage 3"
  assert result.ungrounded == 1
  assert result.none
  assert result.codes == ["I50.23", "I10", "N17.9", "Z99.89", "E78.5"]
  reasons = {line.strip(): reason for line, reason in result.rejected}
  assert set(reasons) == {"FOO | nonsense", "The patient has CHF.", "I50.23 | CHF Exacerbation",
                          "J18.9 | pneumonia"}
  assert "malformed" in reasons["FOO | nonsense"]
  assert "malformed" in reasons["The patient has CHF."]
  assert "duplicate" in reasons["I50.23 | CHF Exacerbation"]
  assert "invalid code J18.9" in reasons["J18.9 | pneumonia"]


def test_parse_output_predicate_and_no_document():
  result = prompts.parse_output("e11.9 | \"T2DM\"\ni10.\nNone.", None,
                                is_valid_code=lambda c: c.startswith("E"))
  assert result.predictions == [prompts.Prediction("E11.9", "T2DM", -1, -1)]
  assert result.ungrounded == 0 and result.none
  assert [reason for _, reason in result.rejected] == ["invalid code I10: not in the code space"]
  assert prompts.parse_output("NONE", "text").predictions == []
  cut = prompts.parse_output("I10 | HTN<|im_end|>\nI50.9 | CHF", "HTN", is_valid_code=("I10",))
  assert cut.predictions == [prompts.Prediction("I10", "HTN", 0, 3)] and not cut.rejected
  assert prompts.parse_output("", "text").rejected == []


def test_parse_output_repeated_phrase_rule():
  # A quote is grounded at its first occurrence at/after the previous grounded quote's begin,
  # else at its first occurrence anywhere.
  doc = "CHF in mother. Pt has HTN. CHF now worse."
  assert doc.index("CHF now") == 27
  after = prompts.parse_output("I10 | HTN\nI50.9 | CHF", doc).predictions
  assert [(p.begin, p.end) for p in after] == [(22, 25), (27, 30)]
  alone = prompts.parse_output("I50.9 | CHF", doc).predictions
  assert [(p.begin, p.end) for p in alone] == [(0, 3)]
  back = prompts.parse_output("I10 | HTN\nI50.9 | CHF in mother", doc).predictions
  assert [(p.begin, p.end) for p in back] == [(22, 25), (0, 13)]
  # Two codes citing the same words both ground there.
  same = prompts.parse_output("E11.22 | diabetic CKD\nN18.9 | diabetic CKD",
                              "Has diabetic CKD.").predictions
  assert [(p.begin, p.end) for p in same] == [(4, 16), (4, 16)]


def test_parse_output_maps_folded_unicode_back():
  doc = "Dx: İleus,\n\tresolved"
  assert "İ".lower() == "i\u0307"  # lower-casing expands this character to two
  [p] = prompts.parse_output("K56.7 | i\u0307leus, resolved", doc).predictions
  assert (p.begin, p.end) == (4, 20) and doc[p.begin:p.end] == "İleus,\n\tresolved"


# --- evidence-first answers ---------------------------------------------------------------------


def test_evidence_first_document_answer_by_hand(tok):
  ex = prompts.encode_evidence_example(tok, TEXT, prompts.target_lines(DOC))
  answer = ex["tokens"][ex["loss_mask"] == 1]
  # Reading order; each quote is the note's own tokens (leading space included), the multi-line
  # evidence is cut at its newline, and the code without evidence has an empty quote.
  assert tok.decode(answer) == (" hypertension | I10\n CHF exacerbation | I50.23\n"
                                "AKI   on | N17.9\n | E78.5<|im_end|>")
  prompt = ex["tokens"][ex["loss_mask"] == 0]
  np.testing.assert_array_equal(prompt, prompts.encode_prompt(tok, TEXT))
  # The quote tokens are a contiguous copy of the prompt's tokens.
  first_line = list(answer[:list(answer).index(tok.encode(" |")[0])])
  p = list(prompt)
  assert any(p[i:i + len(first_line)] == first_line for i in range(len(p)))


def test_evidence_first_spans_and_windows(tok):
  ex = prompts.encode_target(tok, "Hypertension", prompts.span_lines(Span("Hypertension", "I10",
                                                                          "x")),
                             prompts.EVIDENCE_FIRST)
  assert tok.decode(ex["tokens"][ex["loss_mask"] == 1]) == "Hypertension | I10<|im_end|>"
  negative = prompts.encode_target(tok, "no chest pain", prompts.span_lines(
      Span("no chest pain", None, "negative")), prompts.EVIDENCE_FIRST)
  assert tok.decode(negative["tokens"][negative["loss_mask"] == 1]) == "<|im_end|>"
  # A window: offsets are window-relative; evidence cut by the window edge is not quoted.
  course = TEXT.index("Hospital course")
  lines = prompts.target_lines(DOC, course)
  assert [(ln.code, TEXT[course + ln.begin:course + ln.end] if ln.begin >= 0 else None)
          for ln in lines] == [("I50.23", "CHF exacerbation"), ("N17.9", "AKI   on\nCKD stage 3"),
                               ("I10", "HTN"), ("E78.5", None)]
  # Code-first text of the same lines is the document target.
  cf = prompts.encode_target(tok, TEXT[course:], lines, prompts.CODE_FIRST)
  assert tok.decode(cf["tokens"][cf["loss_mask"] == 1]) == (
      prompts.document_target(DOC, course) + "<|im_end|>")
  with pytest.raises(ValueError, match="answer_format"):
    prompts.encode_target(tok, "x", [], "quote_last")


def test_evidence_first_quotes_ground_at_the_gold_evidence_on_the_demo_corpus(tok):
  from jaxicd.data import windows
  from jaxicd.data.demo import demo_corpus
  checked = 0
  for doc in demo_corpus(seed=0).split("train")[:6]:
    for w in windows.document_windows(doc, tok, seq_len=256, window_overlap=32,
                                      answer_format=prompts.EVIDENCE_FIRST):
      answer = tok.decode(w.tokens[w.loss_mask == 1]).removesuffix("<|im_end|>")
      window = doc.text[w.begin:w.end]
      parsed = prompts.parse_output(answer, window, answer_format=prompts.EVIDENCE_FIRST)
      expected = prompts.target_lines(doc, w.begin, w.end)
      assert [p.code for p in parsed.predictions] == [ln.code for ln in expected]
      for p, ln in zip(parsed.predictions, expected):
        if ln.begin >= 0 and "\n" not in window[ln.begin:ln.end]:
          assert p.quote == window[ln.begin:ln.end]
          assert (p.begin, p.end) == (ln.begin, ln.end)
          checked += 1
      assert parsed.none == (not expected)
  assert checked > 20


def test_code_token_ids_after_the_separator(any_tok):
  # Evidence-first codes follow " |": their tokens are those of " CODE" inside any line.
  for code in ("I50.23", "E11.9", "Z79.01", "A41.01"):
    line = any_tok.encode(f"chest pain | {code}")
    ids = prompts.code_token_ids(any_tok, code, prompts.EVIDENCE_FIRST)
    assert line[-len(ids):] == ids
    assert ids == any_tok.encode(" " + code)


def test_split_line_and_read_code():
  assert prompts.split_line("I10 | HTN") == ("I10", "HTN")
  assert prompts.split_line("E11.9: diabetes") == ("E11.9", "diabetes")
  assert prompts.split_line("HTN | I10", prompts.EVIDENCE_FIRST) == ("I10", "HTN")
  # The code is after the last bar; a quote may hold one.
  assert prompts.split_line("a | b | I10.", prompts.EVIDENCE_FIRST) == ("I10", "a | b")
  assert prompts.split_line(" | E78.5", prompts.EVIDENCE_FIRST) == ("E78.5", "")
  assert prompts.split_line("E78.5", prompts.EVIDENCE_FIRST) == ("E78.5", "")
  assert prompts.read_code("i5023") == "I50.23"
  for bad in ("NONE", "THE", "1", ""):
    with pytest.raises(ValueError):
      prompts.read_code(bad)
  assert prompts.read_line("  - i10 | 'HTN' ") == prompts.AnswerLine("i10 | 'HTN'", "i10", "HTN",
                                                                     "I10")
  assert prompts.read_line("2) HTN | I10", prompts.EVIDENCE_FIRST) == prompts.AnswerLine(
      "HTN | I10", "I10", "HTN", "I10")
  assert prompts.read_line("NONE") == prompts.AnswerLine("NONE", "NONE", "", None)
  assert prompts.read_line("   ") == prompts.AnswerLine("", "", "", None)


def test_parse_evidence_first_output():
  text = "Pt with HTN and CHF. No DM."
  out = " HTN | I10\n CHF | i50.9\nNo DM | E11.9\nHTN | I10\n | E78.5\nnot a code | XYZ"
  r = prompts.parse_output(out, text, is_valid_code={"I10", "I50.9", "E78.5"},
                           answer_format=prompts.EVIDENCE_FIRST)
  assert [(p.code, p.quote, p.begin, p.end) for p in r.predictions] == [
      ("I10", "HTN", 8, 11), ("I50.9", "CHF", 16, 19), ("E78.5", "", -1, -1)]
  assert [reason.split()[0] for _, reason in r.rejected] == ["invalid", "duplicate", "malformed"]
  assert not r.none
  empty = prompts.parse_output("", text, answer_format=prompts.EVIDENCE_FIRST)
  assert empty.none and empty.predictions == []
