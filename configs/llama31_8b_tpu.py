"""Llama-3.1-8B-Instruct on MIMIC-IV ICD-10 + MDACE evidence, on a TPU v5e-32 / v4-32 pod slice.

Credentialed data is never downloaded: put MIMIC-IV (hosp + note) and MDACE under
``manual_dir`` on every worker (see README "Data"). The base checkpoint is an HF directory
(config.json + safetensors) copied to the same path on every worker. Launch with
``launch/tpu.py run --config=configs/llama31_8b_tpu.py`` (see README "TPU launch").

Sharding: base weights in bf16, FSDP over all chips on their embed dim (8B x 2 bytes / 32 chips
= 0.5 GB per chip); LoRA adapters and their Adam moments in f32, sharded the same way. The
global batch (rows) splits over (data, fsdp).
"""

from jaxicd.train.config import base_config


def get_config():
  config = base_config()
  config.model.update(source="/mnt/models/Meta-Llama-3.1-8B-Instruct", tokenizer="",
                      dtype="bfloat16", param_dtype="bfloat16",
                      # Recompute each block in the backward pass: with remat="dots" the saved
                      # activations alone outgrow v5e's 16 GB per chip (mode=plan: ~41 GB).
                      remat="full")
  config.lora.update(rank=16, alpha=32.0, dropout=0.05)
  # One document source (MIMIC-IV) + code-system spans; configs/paper.py mixes MIMIC-IV, MDACE
  # evidence and expansion spans as named sources (config.data.sources).
  config.data.update(
      source="mimic_iv", manual_dir="/mnt/data/mimic", code_space="all",
      spans_per_code=8, negatives=True, annotated_spans=True,
      span_weight=0.8, doc_weight=0.2, mixture_unit="examples",
      seq_len=4096, window_overlap=256, batch_size=32, data_dir="/mnt/data/tfds",
      on_error="skip", num_threads=8)
  config.train.update(steps=20_000, lr=2e-4, warmup_steps=500, final_lr_fraction=0.1,
                      weight_decay=0.0, clip_norm=1.0,
                      # 2 microbatches of 32 rows (64 per optimizer step): ~10 GB per v5e chip
                      # with remat=full (mode=plan; 64-row microbatches need ~41 GB).
                      grad_accum=2,
                      log_every=50, eval_every=1000, eval_batches=32)
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  # mode=plan: the costs of this recipe on a v5e-32 slice (docs/benchmarks.md, "Beyond this
  # machine"); notes of 1,500 and 5,000 tokens span MIMIC-IV discharge summaries.
  config.plan.update(accelerator="v5e", chips=32, note_tokens=(1500, 5000))
  config.distributed.update(enabled=True)   # TPU pods: coordinator discovered from metadata
  # Hosts share no disk: checkpoints (and each host's data-iterator state) go to a bucket.
  config.checkpoint.update(every=500, keep=3, directory="gs://YOUR_BUCKET/jaxicd/llama31_8b")
  return config
