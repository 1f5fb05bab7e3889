"""Tokenizers for jaxicd models, built from a GGUF file's metadata or an HF `tokenizer.json`.

`load_tokenizer(source)` accepts "smollm2" (the embedded default), a `.gguf` path, or a directory
holding `tokenizer.json` (+ `tokenizer_config.json`). The result is a `Tokenizer`: a thin wrapper
around a Rust `tokenizers.Tokenizer` plus the special ids and the Jinja chat template.

A GGUF carries no `tokenizer.json`, only llama.cpp metadata: the token strings, the BPE merges,
token types, special ids, a pre-tokenizer *name* (`tokenizer.ggml.pre`) and the chat template. We
rebuild the byte-level BPE pipeline from those, with the pre-tokenizer llama.cpp uses for that name
(so ids match llama.cpp and the model's original `tokenizer.json`).
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import mmap
import os
import pathlib
import struct
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jaxicd.model import embedded

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
  """A tokenizer source is missing, corrupt or unsupported. The message names the file."""


# ---------------------------------------------------------------------------------------------
# GGUF metadata reader. gguf.GGUFReader parses every tensor header and wraps each string of the
# 49k-token vocabulary in a numpy view (~4 s for SmolLM2); we only need the key/value section.
# ---------------------------------------------------------------------------------------------

_GGUF_MAGIC = b"GGUF"
# GGUF value type codes -> struct format (little-endian is prefixed at use).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                   11: "q", 12: "d"}
_NUMPY_TYPES = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "u1", 10: "u8",
                11: "i8", 12: "f8"}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
  """Reads all key/value metadata of a GGUF file (no tensors).

  Strings come back as `str`, string arrays as `list[str]`, numeric arrays as numpy arrays.

  Raises:
    FileNotFoundError: `path` does not exist.
    TokenizerError: not a GGUF file, an unsupported version, or truncated/corrupt metadata.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {path}")
  with open(path, "rb") as f:
    try:
      buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError as e:  # empty file
      raise TokenizerError(f"{path}: not a GGUF file (empty)") from e
  try:
    return _parse_gguf_metadata(buf, path)
  finally:
    buf.close()


def _parse_gguf_metadata(buf: mmap.mmap, path: pathlib.Path) -> dict[str, Any]:
  if len(buf) < 24 or buf[:4] != _GGUF_MAGIC:
    raise TokenizerError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
  order = "<"
  (version,) = struct.unpack_from("<I", buf, 4)
  if version > 0xFFFF:  # a big-endian file reads as a huge little-endian version
    order = ">"
    (version,) = struct.unpack_from(">I", buf, 4)
  if version not in (2, 3):
    raise TokenizerError(f"{path}: unsupported GGUF version {version} (jaxicd reads 2 and 3)")
  _, n_kv = struct.unpack_from(order + "QQ", buf, 8)
  offset = 24
  key = "<header>"
  size = len(buf)

  def read_string(off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from(order + "Q", buf, off)
    off += 8
    if off + n > size:
      raise struct.error(f"string of {n} bytes runs past the end of the file")
    return bytes(buf[off:off + n]).decode("utf-8", errors="surrogateescape"), off + n

  def read_value(vtype: int, off: int) -> tuple[Any, int]:
    if vtype == _STRING:
      return read_string(off)
    if vtype in _SCALAR_FORMATS:
      fmt = order + _SCALAR_FORMATS[vtype]
      (v,) = struct.unpack_from(fmt, buf, off)
      return v, off + struct.calcsize(fmt)
    if vtype == _ARRAY:
      item_type, count = struct.unpack_from(order + "IQ", buf, off)
      off += 12
      if item_type in _NUMPY_TYPES:
        dtype = np.dtype(_NUMPY_TYPES[item_type]).newbyteorder(order)
        nbytes = dtype.itemsize * count
        if off + nbytes > size:
          raise struct.error(f"array of {count} items runs past the end of the file")
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=off).copy()
        return (arr.astype(bool) if item_type == 7 else arr), off + nbytes
      items = []
      for _ in range(count):
        v, off = read_value(item_type, off)
        items.append(v)
      return items, off
    raise struct.error(f"unknown value type {vtype}")

  meta: dict[str, Any] = {}
  try:
    for _ in range(n_kv):
      key, offset = read_string(offset)
      (vtype,) = struct.unpack_from(order + "I", buf, offset)
      meta[key], offset = read_value(vtype, offset + 4)
  except (struct.error, OverflowError, MemoryError) as e:
    raise TokenizerError(
        f"{path}: corrupt GGUF metadata at byte {offset} (key {key!r}): {e}") from e
  return meta


# ---------------------------------------------------------------------------------------------
# Pre-tokenizers by llama.cpp name (`tokenizer.ggml.pre`). Regexes are those of the models'
# original tokenizer.json files, which llama.cpp reproduces.
# ---------------------------------------------------------------------------------------------

# Llama 3 (tiktoken-style): up to three digits per piece, newlines glued to trailing punctuation.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2: like Llama 3 but every digit on its own.
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# name -> (kind, ignore_merges). kind "gpt2": the GPT-2 regex (ByteLevel's own); "digits+gpt2":
# each digit isolated first, then GPT-2 (SmolLM, StarCoder); "llama3"/"qwen2": the regexes above.
# llama.cpp sets ignore_merges for the Llama 3 family: a piece that is itself a token is kept whole.
_PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    **{n: ("gpt2", False) for n in ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")},
    **{n: ("digits+gpt2", False) for n in ("smollm", "starcoder", "refact", "command-r",
                                           "codeshell", "exaone")},
    **{n: ("llama3", True) for n in ("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1",
                                     "pixtral", "midm-2.0", "lfm2")},
    **{n: ("llama3", False) for n in ("smaug-bpe", "dbrx")},
    **{n: ("qwen2", False) for n in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
}

SUPPORTED_GGUF_PRE_TOKENIZERS = tuple(sorted(_PRE_TOKENIZERS))


def _pre_tokenizer(kind: str) -> pre_tokenizers.PreTokenizer:
  if kind == "gpt2":
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if kind == "digits+gpt2":
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  regex = {"llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}[kind]
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (the alphabet of byte-level vocabs)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  mapping, extra = {}, 0
  for b in range(256):
    if b in printable:
      mapping[b] = chr(b)
    else:
      mapping[b] = chr(256 + extra)
      extra += 1
  return mapping


# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4


def _tokenizer_from_gguf(path: pathlib.Path) -> Tokenizer:
  meta = read_gguf_metadata(path)

  def need(key: str) -> Any:
    if key not in meta:
      raise TokenizerError(f"{path}: GGUF metadata has no {key!r}; cannot build a tokenizer")
    return meta[key]

  model_type = need("tokenizer.ggml.model")
  if model_type != "gpt2":
    raise TokenizerError(
        f"{path}: tokenizer.ggml.model={model_type!r} is not supported; jaxicd builds byte-level "
        "BPE ('gpt2') tokenizers from GGUF. Use an HF directory with tokenizer.json instead.")
  tokens: list[str] = need("tokenizer.ggml.tokens")
  merges: list[str] = need("tokenizer.ggml.merges")
  types = meta.get("tokenizer.ggml.token_type")
  if types is None:
    types = np.ones(len(tokens), np.int32)
  if len(types) != len(tokens):
    raise TokenizerError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for "
                         f"{len(tokens)} tokens")
  pre_name = meta.get("tokenizer.ggml.pre")
  if pre_name is None:
    log.warning("%s: no tokenizer.ggml.pre; using the GPT-2 pre-tokenizer as llama.cpp does", path)
    pre_name = "default"
  if pre_name not in _PRE_TOKENIZERS:
    raise TokenizerError(
        f"{path}: tokenizer.ggml.pre={pre_name!r} is not supported; supported: "
        f"{', '.join(SUPPORTED_GGUF_PRE_TOKENIZERS)}")
  kind, ignore_merges = _PRE_TOKENIZERS[pre_name]

  alphabet = _byte_alphabet()
  spelled = set(alphabet.values())
  vocab: dict[str, int] = {}
  added: list[tokenizers.AddedToken] = []
  for i, (tok, ttype) in enumerate(zip(tokens, types)):
    if ttype in (_CONTROL, _USER_DEFINED):
      # Matched whole in raw text, so the vocab keeps the raw spelling.
      added.append(tokenizers.AddedToken(tok, special=ttype == _CONTROL, normalized=False))
    elif not set(tok) <= spelled:
      # A normal token outside the byte alphabet: respell its UTF-8 bytes in the alphabet.
      tok = "".join(alphabet[b] for b in tok.encode("utf-8", errors="surrogateescape"))
    vocab.setdefault(tok, i)  # duplicates keep the first id (llama.cpp's lookup does too)

  try:
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bpe = models.BPE(vocab=vocab, merges=pairs, unk_token=None, fuse_unk=False,
                     byte_fallback=False, ignore_merges=ignore_merges)
  except Exception as e:  # tokenizers raises plain Exceptions on inconsistent merges
    raise TokenizerError(f"{path}: the GGUF vocabulary/merges do not form a BPE model: {e}") from e
  backend = tokenizers.Tokenizer(bpe)
  backend.pre_tokenizer = _pre_tokenizer(kind)
  backend.decoder = decoders.ByteLevel()
  if added:
    backend.add_special_tokens([t for t in added if t.special])
    backend.add_tokens([t for t in added if not t.special])

  def token_of(key: str) -> str | None:
    i = meta.get(key)
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

  return Tokenizer(
      backend,
      vocab_size=len(tokens),
      bos_token=token_of("tokenizer.ggml.bos_token_id"),
      eos_token=token_of("tokenizer.ggml.eos_token_id"),
      pad_token=token_of("tokenizer.ggml.padding_token_id"),
      unk_token=token_of("tokenizer.ggml.unknown_token_id"),
      eot_token=token_of("tokenizer.ggml.eot_token_id"),
      chat_template=meta.get("tokenizer.chat_template"),
      add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
      source=str(path))


# ---------------------------------------------------------------------------------------------
# HF directories
# ---------------------------------------------------------------------------------------------


def _token_content(value: Any) -> str | None:
  """tokenizer_config.json spells special tokens as a string or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _read_json(path: pathlib.Path) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{path}: not valid JSON: {e}") from e


def _tokenizer_from_hf_dir(directory: pathlib.Path) -> Tokenizer:
  tok_file = directory / "tokenizer.json"
  if not tok_file.is_file():
    raise TokenizerError(
        f"{directory}: no tokenizer.json (jaxicd reads the fast-tokenizer file; convert slow "
        "vocab/merges files with transformers' save_pretrained first)")
  try:
    backend = tokenizers.Tokenizer.from_file(str(tok_file))
  except Exception as e:  # the Rust loader raises a plain Exception
    raise TokenizerError(f"{tok_file}: cannot be read as a tokenizers file: {e}") from e
  config_file = directory / "tokenizer_config.json"
  config = _read_json(config_file) if config_file.is_file() else {}

  template = config.get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  jinja_file = directory / "chat_template.jinja"  # transformers >= 4.43 may save it separately
  if template is None and jinja_file.is_file():
    template = jinja_file.read_text(encoding="utf-8")

  eos = _token_content(config.get("eos_token"))
  if eos is None and (directory / "config.json").is_file():
    eos_id = _read_json(directory / "config.json").get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    eos = backend.id_to_token(eos_id) if isinstance(eos_id, int) else None
  return Tokenizer(
      backend,
      vocab_size=backend.get_vocab_size(with_added_tokens=True),
      bos_token=_token_content(config.get("bos_token")),
      eos_token=eos,
      pad_token=_token_content(config.get("pad_token")),
      unk_token=_token_content(config.get("unk_token")),
      eot_token=None,
      chat_template=template,
      add_bos=bool(config.get("add_bos_token", False)),
      source=str(directory))


# ---------------------------------------------------------------------------------------------
# Chat templates (HF convention: Jinja in an immutable sandbox)
# ---------------------------------------------------------------------------------------------


def _compile_chat_template(template: str):
  import jinja2  # pylint: disable=g-import-not-at-top
  import jinja2.ext  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(template)


# ---------------------------------------------------------------------------------------------
# The Tokenizer
# ---------------------------------------------------------------------------------------------

# Tried in order when the source names no end-of-turn token: ChatML, Llama 3, Gemma.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>")


class Tokenizer:
  """Byte-level BPE tokenizer with the ids and chat template a chat model needs.

  Attributes:
    backend: the `tokenizers.Tokenizer` doing the work.
    vocab_size: number of token ids (the GGUF vocabulary; for HF, including added tokens). Model
      embedding tables may be larger (padding rows).
    bos_id, eos_id, pad_id, unk_id: special ids (None where the source has none). `pad_id` falls
      back to `eos_id`; padding positions are masked anyway.
    end_of_turn_id: the token that closes an assistant turn (`<|im_end|>` for ChatML).
    add_bos: whether the source asks for BOS before raw text (chat templates write it themselves).
    chat_template: the Jinja template string, or None.
    source: where it was loaded from (for messages).
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, vocab_size: int,
               bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None, unk_token: str | None = None,
               eot_token: str | None = None, chat_template: str | None = None,
               add_bos: bool = False, source: str = ""):
    self.backend = backend
    self.vocab_size = int(vocab_size)
    self.source = source
    self.chat_template = chat_template
    self.add_bos = add_bos
    self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
    self.bos_id = self._id_or_none(bos_token)
    self.eos_id = self._id_or_none(eos_token)
    self.unk_id = self._id_or_none(unk_token)
    self.pad_token = pad_token if self._id_or_none(pad_token) is not None else eos_token
    self.pad_id = self._id_or_none(self.pad_token)
    eot_id = self._id_or_none(eot_token)
    for name in _END_OF_TURN_TOKENS:
      if eot_id is None:
        eot_id = self._id_or_none(name)
    self.end_of_turn_id = eot_id if eot_id is not None else self.eos_id
    self._template = None  # compiled lazily; not pickled

  def _id_or_none(self, token: str | None) -> int | None:
    return None if token is None else self.backend.token_to_id(token)

  # Pickling (grain worker processes): the Rust tokenizer pickles; the compiled template does not.
  def __getstate__(self):
    state = dict(self.__dict__)
    state["_template"] = None
    return state

  def __repr__(self) -> str:
    return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, end_of_turn_id={self.end_of_turn_id})")

  def with_chat_template(self, chat_template: str) -> Tokenizer:
    """A copy that renders conversations with `chat_template` (shares the backend)."""
    clone = copy.copy(self)
    clone.chat_template = chat_template
    clone._template = None  # pylint: disable=protected-access
    return clone

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; adds no BOS/EOS. Special-token strings in the text map to their ids."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and half-open character offsets into `text` per token (for windowing long notes)."""
    enc = self.backend.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`. Special tokens are kept by default so decode(encode(s)) == s."""
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.backend.id_to_token(int(token_id))

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                          add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """Renders `messages` ([{"role", "content"}, ...]) with the chat template, as HF does.

    Extra keyword arguments (e.g. `tools`, `documents`) are passed to the template.

    Raises:
      TokenizerError: the tokenizer has no chat template.
      jinja2.TemplateError: the template rejects the conversation (its `raise_exception`).
    """
    if self.chat_template is None:
      raise TokenizerError(f"{self.source}: the tokenizer has no chat template; pass "
                           "chat_template= to load_tokenizer")
    if self._template is None:
      self._template = _compile_chat_template(self.chat_template)
    variables = dict(bos_token=self.bos_token, eos_token=self.eos_token,
                     unk_token=self.unk_token, pad_token=self.pad_token)
    variables = {k: v for k, v in variables.items() if v is not None}
    variables.update(kwargs)
    return self._template.render(messages=[dict(m) for m in messages],
                                 add_generation_prompt=add_generation_prompt, **variables)


def load_tokenizer(source: str | os.PathLike = "smollm2", *,
                   chat_template: str | None = None) -> Tokenizer:
  """Loads a tokenizer.

  Args:
    source: "smollm2" (the embedded SmolLM2-135M-Instruct GGUF), a `.gguf` file, or a directory
      with `tokenizer.json` (and usually `tokenizer_config.json` for special tokens and the chat
      template) or that `tokenizer.json` itself.
    chat_template: overrides the source's chat template (e.g. for a base model without one).

  Raises:
    FileNotFoundError: the source does not exist.
    TokenizerError: the source is corrupt or describes an unsupported tokenizer.
  """
  if isinstance(source, str) and source.lower() in embedded.EMBEDDED_NAMES:
    path = embedded.smollm2_gguf_path()
  else:
    path = pathlib.Path(source).expanduser()
  if path.is_dir():
    tok = _tokenizer_from_hf_dir(path)
  elif path.is_file() and path.name == "tokenizer.json":
    tok = _tokenizer_from_hf_dir(path.parent)
  elif path.is_file():
    tok = _tokenizer_from_gguf(path)
  else:
    raise FileNotFoundError(
        f"tokenizer source not found: {source!r} (expected 'smollm2', a .gguf file, or a "
        "directory with tokenizer.json)")
  return tok if chat_template is None else tok.with_chat_template(chat_template)
