"""The run configuration schema (ml_collections) shared by every file in ``configs/``.

``configs/*.py`` start from ``base_config()`` and change what their recipe needs; any key can be
overridden on the command line (``--config.train.steps=100``).
"""

from __future__ import annotations

import ml_collections

from jaxicd.model.config import LORA_TARGETS


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = "train"              # train | eval | predict | export
  config.seed = 0
  # Extra XLA flags for the CPU backend, added to $XLA_FLAGS by jaxicd.main before JAX starts
  # (e.g. "--xla_cpu_use_onednn=true"; with jax 0.12 it made SmolLM2's bf16 CPU training slower).
  config.cpu_xla_flags = ""
  # mode=predict: the notes to code (a .txt note, a .jsonl of documents or a directory of .txt
  # notes) and the JSONL written ("" = <workdir>/predictions.jsonl); see jaxicd.infer.predict.
  config.input = ""
  config.output = ""
  config.report = ""                 # HTML report: "" = report.html beside the output; "none"
  config.allow_untrained = False     # predict without a checkpoint (base model, untrained adapters)
  config.max_note_chars = 200_000    # predict refuses longer notes (0 = no limit)

  # Base model: "smollm2" (embedded), a preset name (random init), a .gguf file or an HF dir.
  config.model = ml_collections.ConfigDict(dict(
      source="smollm2",
      tokenizer="",                  # "" = the source's own tokenizer
      dtype="float32",               # compute dtype: float32 | bfloat16
      param_dtype="float32",         # storage dtype of the frozen base weights
      remat="none",                  # none | full | dots
  ))
  config.lora = ml_collections.ConfigDict(dict(
      rank=16, alpha=32.0, dropout=0.0, targets=LORA_TARGETS))

  # Field names follow jaxicd.data.pipeline (make_train_iterator / make_eval_iterator).
  config.data = ml_collections.ConfigDict(dict(
      source="demo", manual_dir="", demo_seed=0, code_space="demo",
      spans_per_code=8, negatives=True, annotated_spans=True,
      span_weight=0.8, doc_weight=0.2, mixture_unit="examples",
      seq_len=1024, window_overlap=128,
      # Span examples share one copy of their prompt prefix per packed row (the same loss and
      # gradients, ~3x fewer tokens per span example; jaxicd.data.pipeline).
      share_prompt=False,
      # Answer lines: "evidence_first" (quote copied from the note, then its code) or
      # "code_first" (code, then quote); see jaxicd.data.prompts. Training and inference agree.
      answer_format="evidence_first",
      batch_size=8,                  # global batch (rows); each process reads its share
      shuffle_seed=0, on_error="raise", data_dir="", num_threads=2))

  config.train = ml_collections.ConfigDict(dict(
      steps=100, lr=2e-4, warmup_steps=10, final_lr_fraction=0.1, weight_decay=0.0,
      b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0,
      grad_accum=1,                  # microbatches per optimizer step (same global batch each)
      log_every=10, eval_every=0, eval_batches=4,
      eval_at_start=False))          # val loss before the first step of a fresh run

  # Coding metrics (micro/macro/unseen-code F1, evidence F1) on the first `documents` notes of
  # `split`, decoded with the current adapters at every evaluation; 0 turns it off.
  config.eval_coding = ml_collections.ConfigDict(dict(
      documents=0, split="val", max_new_tokens=96, batch_size=8, constrained=True,
      unique_codes=True,             # constrained: each code at most once per answer
      spans=0,                       # also code N gold evidence spans of the split one by one
      # Re-code each evidence span the document pass found with the span prompt; its code and
      # probability replace the document pass's (jaxicd.infer.coder).
      recode=True, recode_batch_size=32,
      # "" decodes with the trained model as it is; a dtype decodes with a copy in that dtype
      # with the adapters folded into the base (a CPU without bf16 units: "float32").
      dtype="",
      # Keep codes scored >= threshold; negative: the workdir's calibration.json (none: keep all).
      threshold=-1.0,
      calibrate=False,               # choose the threshold on these notes (on split val only)
      at_start=False))               # also code before training (zero-shot)

  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Multi-host: jax.distributed.initialize() (TPU pods discover the rest themselves).
  config.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=-1, process_id=-1))
  # directory: "" = <workdir>/checkpoints; multi-host runs need shared storage (gs://...).
  config.checkpoint = ml_collections.ConfigDict(dict(every=100, keep=3, async_save=True,
                                                     directory=""))
  return config
