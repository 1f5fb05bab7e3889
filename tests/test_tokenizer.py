"""jaxicd's tokenizer against transformers' tokenizer for the same GGUF / tokenizer.json."""

from __future__ import annotations

import json
import pathlib
import pickle

import gguf
import jinja2
import numpy as np
import pytest

from conftest import require_reference
from jaxicd.model import embedded
from jaxicd.model import tokenizer as tokenizer_lib
from jaxicd.model.tokenizer import TokenizerError, load_tokenizer, read_gguf_metadata

# Clinical text, codes, digits, unicode, whitespace runs, newlines and ChatML markers.
STRINGS = [
    "Hello world",
    "Patient is a 67 y/o M with h/o HTN, HLD, T2DM, CKD stage 3b.",
    "Dx: acute on chronic systolic CHF (I50.23), EF 25%.",
    "I50.23",
    "I50.23 | acute on chronic systolic heart failure",
    "E11.9\nN17.9\nI10",
    "i5023 e119 Z79.4 S72.001A T81.4XXA O09.523",
    "BP 142/88, HR 104, RR 22, SpO2 91% on 2L NC, T 38.4 C",
    "Cr 2.1 (baseline 1.0), K+ 5.6, Na+ 131, BNP 1,250 pg/mL",
    "Metoprolol succinate 25 mg PO daily; lisinopril 10mg qd",
    "s/p CABG x3 (2019), PCI w/ DES to LAD 03/14/2021",
    "NKDA. Pt denies CP, SOB, N/V/D.",
    "No evidence of PE. r/o MI -> trop neg x2.",
    "Family hx: mother w/ breast ca; father w/ CAD.",
    "AKI on CKD, likely prerenal 2/2 poor PO intake",
    "COPD exacerbation, on 2-3L O2 via NC",
    "UTI (E. coli, >100,000 CFU/mL), tx w/ ceftriaxone 1 g IV q24h",
    "a-fib w/ RVR; CHA2DS2-VASc = 4",
    "HbA1c 9.2%  ",
    "   leading spaces",
    "trailing spaces   ",
    "double  space   triple    quad",
    "tabs\there\t\tand\t\t\tthere",
    "line1\nline2\n\nline4\n\n\n",
    "\n\nstarts with newlines",
    "windows\r\nline endings\r\n",
    "mixed \t \n \r\n whitespace",
    " ",
    "\n",
    "",
    "12345678901234567890",
    "3.14159 2.71828 1e-5 -40 +12",
    "2026-11-27T20:53:03Z",
    "phone: (555) 123-4567 MRN#000123",
    "naïve café résumé Ångström",
    "Ödem, Übelkeit, Schmerzen in der Brust",
    "insuficiencia cardíaca congestiva",
    "日本語のテキスト",
    "Пациент жалуется на боль",
    "μg/kg/min, ≥ 65, ≤ 3, ± 2, → improved, °C",
    "emoji 🤒🫀💊 test",
    "don't can't won't I'M he's we'll they'd",
    "'quoted' \"double\" `backtick`",
    "<|im_start|>user\nCode this note.<|im_end|>\n<|im_start|>assistant\n",
    "text with <|im_end|> inside",
    "<|endoftext|>",
    "fake <|im_start tag and |> pieces",
    "a|b || c | d",
    "- bullet one\n* bullet two\n1. numbered",
    "#### Markdown heading\n**bold** _it_",
    "ALLCAPS SHOUTING WORDS",
    "camelCaseWords and snake_case_words",
    "x" * 300,
    "ab " * 50,
    "中文 mixed with English and 123",
    "\u00a0non-breaking\u00a0space\u2003em-space\u200bzero-width",
]


@pytest.fixture(scope="module")
def gguf_path() -> pathlib.Path:
  return embedded.smollm2_gguf_path()


@pytest.fixture(scope="module")
def ours():
  return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def reference(gguf_path):
  transformers = require_reference("transformers")
  require_reference("torch")  # transformers' gguf_file path needs it
  return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def test_ids_match_transformers(ours, reference):
  assert len(STRINGS) >= 50
  mismatches = [(s, ours.encode(s), reference.encode(s, add_special_tokens=False))
                for s in STRINGS]
  mismatches = [m for m in mismatches if m[1] != m[2]]
  assert not mismatches, mismatches[:3]


def test_batch_and_offsets_agree_with_encode(ours):
  assert ours.encode_batch(STRINGS) == [ours.encode(s) for s in STRINGS]
  text = "Pt with CHF.\nAKI on CKD."
  ids, offsets = ours.encode_with_offsets(text)
  assert ids == ours.encode(text)
  # Every character is covered, in order; ByteLevel trims a leading space from a token's offsets.
  assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
  assert all(b <= e for b, e in offsets)
  assert all(e0 <= b1 for (_, e0), (b1, _) in zip(offsets, offsets[1:]))


def test_decode_round_trip(ours, reference):
  for s in STRINGS:
    ids = ours.encode(s)
    assert ours.decode(ids) == s
    assert ours.decode(np.asarray(ids, np.int32)) == s
  ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
  assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
      ids, skip_special_tokens=True) == "user\nhi"


def test_non_ascii_numerals_are_isolated_like_llama_cpp(ours):
  # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's tokenizer.json) first cuts every \p{N}
  # character into its own piece. transformers' GGUF loader skips that step, so on numerals
  # outside 0-9 the two differ; we follow llama.cpp (hand-derived splits below).
  assert ours.encode(" x³") == ours.encode(" x") + ours.encode("³")
  assert ours.encode("a ½ b") == ours.encode("a") + ours.encode(" ") + ours.encode("½") + \
      ours.encode(" b")
  assert ours.encode(" 2023") == ours.encode(" ") + [ours.encode(d)[0] for d in "2023"]


def test_special_ids_match_transformers(ours, reference):
  assert ours.vocab_size == len(reference) == 49152
  assert ours.eos_id == reference.eos_token_id == reference.convert_tokens_to_ids("<|im_end|>")
  assert ours.end_of_turn_id == reference.convert_tokens_to_ids("<|im_end|>")
  assert ours.pad_id == reference.pad_token_id
  assert ours.bos_id == reference.bos_token_id
  assert ours.decode([ours.end_of_turn_id]) == "<|im_end|>"


CONVERSATIONS = [
    [{"role": "user", "content": "Code this note: CHF, AKI."}],
    [{"role": "system", "content": "You are a clinical coder."},
     {"role": "user", "content": "Pt with HTN.\n\nDx: I10"}],
    [{"role": "system", "content": "You are a clinical coder."},
     {"role": "user", "content": "AKI on CKD"},
     {"role": "assistant", "content": "N17.9 | AKI\nN18.9 | CKD"},
     {"role": "user", "content": "and   this?  "}],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(ours, reference, conversation, add_generation_prompt):
  got = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
  want = reference.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                       tokenize=False)
  assert got == want
  assert ours.encode(got) == reference.encode(want, add_special_tokens=False)


def test_template_helpers_behave_like_hf(ours):
  tok = ours.with_chat_template((
      "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first, got ' + "
      "messages[0]['role']) }}{% endif %}{{ bos_token }}{{ messages | tojson }}"))
  assert tok.apply_chat_template([{"role": "user", "content": "é<x>"}]) == \
      '<|im_start|>[{"role": "user", "content": "é<x>"}]'
  with pytest.raises(jinja2.TemplateError, match="user first, got system"):
    tok.apply_chat_template([{"role": "system", "content": "x"}])
  # The sandbox refuses attribute access to Python internals.
  evil = ours.with_chat_template("{{ messages.__class__.__mro__ }}")
  with pytest.raises(jinja2.exceptions.SecurityError):
    evil.apply_chat_template([{"role": "user", "content": "x"}])
  assert ours.chat_template != tok.chat_template  # the override did not leak


def test_pickle_round_trip(ours):
  ours.apply_chat_template(CONVERSATIONS[0])  # compiles the template, which must not be pickled
  clone = pickle.loads(pickle.dumps(ours))
  assert clone.encode(STRINGS[1]) == ours.encode(STRINGS[1])
  assert clone.apply_chat_template(CONVERSATIONS[1]) == ours.apply_chat_template(CONVERSATIONS[1])


def test_hf_directory_matches_gguf(ours, reference, tmp_path):
  reference.save_pretrained(tmp_path)
  from_dir = load_tokenizer(tmp_path)
  for s in STRINGS:
    assert from_dir.encode(s) == ours.encode(s)
  assert (from_dir.eos_id, from_dir.pad_id, from_dir.end_of_turn_id) == \
      (ours.eos_id, ours.pad_id, ours.end_of_turn_id)
  for conv in CONVERSATIONS:
    assert from_dir.apply_chat_template(conv, add_generation_prompt=True) == \
        ours.apply_chat_template(conv, add_generation_prompt=True)
  assert load_tokenizer(tmp_path / "tokenizer.json").encode(STRINGS[2]) == ours.encode(STRINGS[2])
  # Older layouts keep the template in tokenizer_config.json, as a string or as named templates.
  (tmp_path / "chat_template.jinja").unlink()
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  for template in ["{{ 'plain' }}", [{"name": "tool_use", "template": "x"},
                                     {"name": "default", "template": "{{ 'named' }}"}]]:
    config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    rendered = load_tokenizer(tmp_path).apply_chat_template(CONVERSATIONS[0])
    assert rendered == ("plain" if isinstance(template, str) else "named")


# --- GGUF files written here: other pre-tokenizers, the metadata reader, bad input ---------------


def _write_tokenizer_gguf(path: pathlib.Path, meta: dict, pre: str) -> pathlib.Path:
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(meta["tokenizer.ggml.tokens"])
  writer.add_token_types([int(t) for t in meta["tokenizer.ggml.token_type"]])
  writer.add_token_merges(meta["tokenizer.ggml.merges"])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_chat_template(meta["tokenizer.chat_template"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


@pytest.fixture(scope="module")
def smollm_meta(gguf_path):
  return read_gguf_metadata(gguf_path)


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_other_pre_tokenizers_match_transformers(smollm_meta, tmp_path, pre):
  # SmolLM2's vocabulary under the Llama 3 / Qwen2 split rules, against transformers' own GGUF
  # tokenizer builder fed the same metadata.
  convert = require_reference(
      "transformers.integrations.gguf.gguf_tokenizer_mapping").convert_gguf_tokenizer
  ours = load_tokenizer(_write_tokenizer_gguf(tmp_path / f"{pre}.gguf", smollm_meta, pre))
  reference, _ = convert("llama", {
      "tokenizer_type": "gpt2", "pre_tokenizer_type": pre,
      "tokens": smollm_meta["tokenizer.ggml.tokens"],
      "merges": smollm_meta["tokenizer.ggml.merges"],
      "token_type": [int(t) for t in smollm_meta["tokenizer.ggml.token_type"]]})
  extra = ["m² x³ ½ 2023 12345", "a.\nb!!\n\nc", "x:\r\n\r\ny", "It's 100%!!!\n"]
  for s in STRINGS + extra:
    assert ours.encode(s) == reference.encode(s, add_special_tokens=False).ids, s
    assert ours.decode(ours.encode(s)) == s
  # The split rules themselves (hand-derived): Llama 3 keeps up to three digits per piece and
  # glues newlines to punctuation; Qwen2 isolates digits.
  pieces = [p for p, _ in ours.backend.pre_tokenizer.pre_tokenize_str("12345 x.\n")]
  assert pieces == (["123", "45", "Ġx", ".Ċ"] if pre == "llama-bpe"
                    else ["1", "2", "3", "4", "5", "Ġx", ".Ċ"])


def test_metadata_reader_matches_gguf_reader(tmp_path):
  path = tmp_path / "kv.gguf"
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_string("t.str", "héllo <|im_end|>")
  writer.add_uint32("t.u32", 4_000_000_000)
  writer.add_int32("t.i32", -7)
  writer.add_float32("t.f32", 0.25)
  writer.add_bool("t.bool", True)
  writer.add_uint64("t.u64", 2**40)
  writer.add_array("t.strs", ["a", "", "Ġb c", "日本"])
  writer.add_array("t.ints", [1, -2, 3])
  writer.add_array("t.floats", [0.5, 1.5])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  ours = read_gguf_metadata(path)
  theirs = gguf.GGUFReader(str(path)).fields
  for key, field in theirs.items():
    if not key.startswith("t."):
      continue
    value = field.contents()
    got = ours[key]
    if isinstance(got, np.ndarray):
      np.testing.assert_array_equal(got, value)
    else:
      assert got == value, key
  assert ours["general.architecture"] == "llama"


def test_bad_sources_name_the_file(tmp_path, smollm_meta):
  with pytest.raises(FileNotFoundError, match="no_such.gguf"):
    load_tokenizer(tmp_path / "no_such.gguf")
  junk = tmp_path / "junk.gguf"
  junk.write_bytes(b"not a gguf at all, just text" * 4)
  with pytest.raises(TokenizerError, match="junk.gguf.*not a GGUF"):
    load_tokenizer(junk)
  empty = tmp_path / "empty.gguf"
  empty.write_bytes(b"")
  with pytest.raises(TokenizerError, match="empty.gguf"):
    load_tokenizer(empty)
  good = _write_tokenizer_gguf(tmp_path / "good.gguf", smollm_meta, "smollm")
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(good.read_bytes()[:200_000])
  with pytest.raises(TokenizerError, match="cut.gguf: corrupt GGUF metadata"):
    load_tokenizer(cut)
  odd = _write_tokenizer_gguf(tmp_path / "odd.gguf", smollm_meta, "no-such-pre")
  with pytest.raises(TokenizerError, match="odd.gguf.*'no-such-pre' is not supported"):
    load_tokenizer(odd)
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  with pytest.raises(TokenizerError, match="hf: no tokenizer.json"):
    load_tokenizer(hf_dir)
  (hf_dir / "tokenizer.json").write_text("{broken")
  with pytest.raises(TokenizerError, match="tokenizer.json"):
    load_tokenizer(hf_dir)
  overridden = load_tokenizer(good, chat_template="{{ messages[0]['content'] }}!")
  assert overridden.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
  no_template = tokenizer_lib.Tokenizer(overridden.backend, vocab_size=1, source="x")
  with pytest.raises(TokenizerError, match="no chat template"):
    no_template.apply_chat_template([{"role": "user", "content": "x"}])
