"""Code-Centric Learning on the embedded SmolLM2-135M and the built-in demo corpus (CPU default).

Many short span->code examples (code-system expansion + annotated evidence) interleaved with
fewer document->codes windows. Sized to finish on a 2-core CPU in under 10 minutes, load and
compile included:

  python -m jaxicd.main --config=configs/mixed.py --workdir=runs/mixed
"""

from jaxicd.train.config import base_config


def get_config():
  config = base_config()
  config.model.source = "smollm2"
  config.model.remat = "full"        # ~1 GB of activations instead of ~5 GB at 4 x 512
  config.lora.update(rank=16, alpha=32.0, dropout=0.0)
  config.data.update(
      source="demo", code_space="demo", spans_per_code=4, negatives=True, annotated_spans=True,
      # Fractions of *tokens*: a document window is ~10x a span, so an example-level 0.8/0.2
      # would spend most compute on documents.
      span_weight=0.75, doc_weight=0.25, mixture_unit="tokens",
      seq_len=512, window_overlap=64, batch_size=4)
  config.train.update(steps=30, lr=1e-3, warmup_steps=3, final_lr_fraction=0.1, clip_norm=1.0,
                      log_every=2, eval_every=0, eval_batches=2)
  config.checkpoint.update(every=10, keep=2)
  return config
