"""Tests: the random "tiny" preset (vocab 512) on the demo corpus, spans only, a few steps.

The tiny model needs a tokenizer whose ids fit its vocabulary: tests write a byte-level
tokenizer.json (256 byte tokens + ChatML specials) and set --config.model.tokenizer=DIR.
"""

from jaxicd.train.config import base_config


def get_config():
  config = base_config()
  config.model.update(source="tiny", tokenizer="", remat="none")
  config.lora.update(rank=4, alpha=8.0)
  config.data.update(source="demo", code_space="demo", spans_per_code=1, negatives=False,
                     annotated_spans=False, span_weight=1.0, doc_weight=0.0,
                     seq_len=256, window_overlap=32, batch_size=8, num_threads=1)
  config.train.update(steps=8, lr=3e-3, warmup_steps=1, log_every=2, eval_every=0,
                      eval_batches=1)
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  config.checkpoint.update(every=2, keep=2)
  return config
