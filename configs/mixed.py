"""Code-Centric Learning on the embedded SmolLM2-135M and the built-in demo corpus (CPU default).

Many short span->code examples (code-system expansion + annotated evidence) interleaved with
fewer document->codes windows. Sized to finish on a 2-core CPU (with bf16 matrix units) in under
10 minutes, load, compile and coding included:

  python -m jaxicd.main --config=configs/mixed.py --workdir=runs/mixed
"""

from jaxicd.train.config import base_config


def get_config():
  config = base_config()
  config.model.source = "smollm2"
  # bf16 compute (adapters and their optimizer stay f32): faster than f32 where the hardware
  # has bf16 units (TPU, GPU, recent x86); on an AVX2 CPU without them the two train at about
  # the same speed (95 vs 91 tokens/s, 2-core EPYC). The frozen base is stored in bf16 too: it
  # is cast to bf16 for every matmul anyway.
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.model.remat = "dots"        # keep only the projections' outputs for the backward pass
  config.lora.update(rank=16, alpha=32.0, dropout=0.0)
  config.data.update(
      source="demo", code_space="demo", spans_per_code=4, negatives=True, annotated_spans=True,
      # Fractions of *tokens*: a document window is ~10x a span, so an example-level 0.8/0.2
      # would spend most compute on documents.
      # Span examples carry the code supervision (~1 code per 66 tokens vs ~4 per 256-token
      # window): most of a short budget goes to them.
      span_weight=0.85, doc_weight=0.15, mixture_unit="tokens",
      # Steps of 2 rows whose span examples share one copy of the prompt (~2x the span
      # examples per token): the 135M model learns codes by optimizer steps, not tokens.
      seq_len=256, window_overlap=32, batch_size=2, share_prompt=True)
  # Codes are learnt late: the adapters first learn the answer format and to copy the quote, then
  # sit on a plateau where the code ignores the input (the prior's first letter), and only then
  # read it. 288 steps of 2 rows (~144k tokens, each demo code seen ~15 times) get past it: span
  # exact ~0.86 on val spans (96 steps of 4 rows: ~0.1).
  config.train.update(steps=288, lr=3e-3, warmup_steps=4, final_lr_fraction=0.1, clip_norm=1.0,
                      log_every=16, eval_every=0, eval_batches=2, eval_at_start=True)
  # Before and after training, code a few validation notes and 80 of their gold evidence spans
  # (span top-1 accuracy): the run ends with what training changed. After training the decision
  # threshold is calibrated on those notes and stored in the workdir for eval and predict (their
  # F1 is therefore optimistic: the experiment, python -m jaxicd.experiment, scores test notes).
  # Decoding in float32 with the adapters folded in: on CPUs without bf16 units XLA:CPU widens
  # bf16 weights at every decode step, and float32 decodes ~1.8x faster. Where the CPU has them
  # (AVX512-BF16, AMX) dtype="" decodes in bf16 instead, ~1.9x faster than float32 on a 2-core
  # EPYC (bench/coder.py).
  config.eval_coding.update(documents=4, spans=80, max_new_tokens=96, batch_size=8,
                            calibrate=True, dtype="float32", at_start=True)
  config.checkpoint.update(every=96, keep=2)
  return config
