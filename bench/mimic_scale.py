"""MIMIC-IV at full scale: the reader and the TFDS build in bounded memory and time.

    .venv/bin/python bench/mimic_scale.py [--scale=1.0] [--dir=/tmp/jaxicd-mimic-scale]
        [--seed=0] [--phases=generate,read,build] [--regenerate]

Generates a MIMIC-IV-shaped dataset in the public file formats (``hosp/diagnoses_icd.csv.gz``,
``note/discharge.csv.gz``, ``mimiciv_icd10_split.csv``), synthetic text only, of the real size
at ``--scale=1``: 431k admissions, 122k of them ICD-10 with a discharge note, ~5M diagnosis rows
(ICD-9 rows included, which the reader filters), ~332k discharge notes of ~10k characters
(lognormal lengths: mean ~10.3k, 5-95% ~5.7k-17k) drawn from a seeded pool of clinical
sentences, rows in the release's order (by subject). The files are reused when present (``generated.json`` records
what they were made from), so a rerun only measures.

Each phase runs in a fresh process, which reports its own peak RSS (``getrusage``), wall and CPU
seconds:

* ``generate``: writing the files (skipped when they exist);
* ``read``: ``sources.open_documents`` then every document of every split, streamed;
* ``load``: ``sources.load_documents``, all documents in one list (what holding every text
  costs; not in the default phases);
* ``build``: the TFDS cache (``JaxicdDocuments``) from scratch into ``DIR/.../tfds``: input
  hashing (config name), the reader's passes, writing the array_record splits.

Targets (full scale, 2 cores): peak RSS < 4 GB and the build < 30 min. The time target is
judged on the build's CPU seconds: the process is single-threaded, so they are the wall time
it needs on a free core, whatever else the machine runs. At a smaller scale the script also
extrapolates to scale 1 (`_extrapolate`: time linearly, memory by what grows with the data and
what grows with the shard size) and judges the targets on that. The last line of stdout is one
JSON object.
"""

from __future__ import annotations

import argparse
import csv
import functools
import gzip
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TARGET_RSS_BYTES = 4e9
TARGET_BUILD_S = 30 * 60
GENERATOR_VERSION = 2

# Admissions at scale 1 by kind: ICD-10 coded with a discharge note (the documents), ICD-10
# without a note, ICD-9 with and without a note; plus notes of admissions without diagnoses.
ADMISSIONS = {"icd10_note": 122_000, "icd10": 88_000, "icd9_note": 206_000, "icd9": 15_000,
              "note_only": 500}
SUBJECTS_PER_ADMISSION = 1 / 2.4
TWO_NOTES = 0.01        # admissions with a second discharge note
DUPLICATE_ROWS = 0.001  # a code listed twice for one admission (the reader keeps one)
MEAN_ROWS = 11.5        # diagnosis rows per admission (1 + Poisson, at most 39)
ICD10_CODES = 8_000     # distinct codes in use, Zipf-like frequencies
SPLIT = (("train", 0.8), ("val", 0.1), ("test", 0.1))

# Synthetic clinical sentences, filled from the slot lists below (written for this benchmark).
TEMPLATES = (
    "{age} year old {sex} with a history of {pmh} who presents with {cc}.",
    "Patient reports {cc} for the past {n} days, worse with exertion.",
    "On arrival vitals were T {temp} HR {hr} BP {sbp}/{dbp} RR {rr} SpO2 {spo2}% on RA.",
    "Labs notable for creatinine {cr}, potassium {k}, hemoglobin {hgb} and WBC {wbc}.",
    "Chest x-ray showed {cxr}.",
    "Started on {drug} {dose} mg {route} {freq} with improvement in symptoms.",
    "Home {drug} was held on admission and restarted prior to discharge.",
    "{pmh} was managed with {drug}; no changes were made to the regimen.",
    "Seen by {service}, who recommended {plan}.",
    "Denies fevers, chills, nausea, vomiting, chest pain or shortness of breath.",
    "Family history notable for {pmh} in a first degree relative.",
    "No evidence of {rule_out} on imaging; this was ruled out.",
    "Echocardiogram showed an ejection fraction of {ef}% with {echo}.",
    "Urinalysis was {ua}; cultures were sent and remained negative at discharge.",
    "Physical therapy evaluated the patient and recommended discharge {dispo}.",
    "Blood glucose ranged {glu_lo}-{glu_hi} on an insulin sliding scale.",
    "Diuresed with IV {diuretic} {dose} mg, net negative {n} liters over the stay.",
    "She tolerated a regular diet and ambulated without assistance.",
    "He was transitioned to oral {drug} and remained afebrile for 48 hours.",
    "Pain was controlled with acetaminophen and {drug} as needed.",
    "Patient was counseled on \"{advice}\" and verbalized understanding.",
    "- {drug} {dose} mg PO {freq}",
    "#{pmh}: stable, continue home medications, follow up with PCP.",
    "Discharge condition: mental status clear and coherent, alert, ambulatory, independent.",
    "Follow up with {service} in {n} weeks; labs to be checked at that visit.",
)
SLOTS = {
    "age": [str(a) for a in range(19, 96)], "sex": ["man", "woman", "M", "F"],
    "pmh": ["hypertension", "type 2 diabetes mellitus", "CKD stage 3", "COPD", "atrial fibrillation",
            "heart failure with reduced ejection fraction", "hyperlipidemia", "GERD", "depression",
            "hypothyroidism", "obstructive sleep apnea", "coronary artery disease s/p PCI",
            "cirrhosis", "asthma", "osteoarthritis", "prior stroke"],
    "cc": ["shortness of breath", "chest pain", "abdominal pain", "fever and cough", "dysuria",
           "leg swelling", "dizziness", "altered mental status", "melena", "a fall at home"],
    "n": [str(n) for n in range(1, 15)], "temp": ["97.8", "98.6", "99.1", "100.4", "101.2"],
    "hr": [str(h) for h in range(52, 131, 3)], "sbp": [str(b) for b in range(92, 181, 4)],
    "dbp": [str(b) for b in range(50, 101, 3)], "rr": ["14", "16", "18", "20", "24"],
    "spo2": ["88", "91", "94", "96", "98", "100"], "cr": ["0.8", "1.1", "1.6", "2.3", "3.4"],
    "k": ["3.2", "3.8", "4.4", "5.1", "5.6"], "hgb": ["7.9", "9.4", "11.2", "12.8", "14.1"],
    "wbc": ["4.1", "7.5", "11.8", "15.2", "19.6"],
    "cxr": ["no acute cardiopulmonary process", "a right lower lobe opacity",
            "mild pulmonary vascular congestion", "small bilateral pleural effusions"],
    "drug": ["lisinopril", "metoprolol", "furosemide", "apixaban", "atorvastatin", "metformin",
             "insulin glargine", "ceftriaxone", "azithromycin", "pantoprazole", "levothyroxine",
             "sertraline", "oxycodone", "vancomycin", "prednisone", "amlodipine"],
    "dose": ["2.5", "5", "10", "20", "25", "40", "80", "100", "500", "1000"],
    "route": ["PO", "IV", "SC"], "freq": ["daily", "BID", "TID", "q8h", "at bedtime"],
    "service": ["cardiology", "nephrology", "infectious disease", "GI", "endocrinology",
                "social work", "palliative care"],
    "plan": ["continued medical management", "outpatient stress testing", "a repeat ultrasound",
             "a short course of antibiotics", "titration of diuretics"],
    "rule_out": ["pulmonary embolism", "pneumothorax", "acute fracture", "bowel obstruction"],
    "ef": [str(e) for e in range(20, 66, 5)],
    "echo": ["mild mitral regurgitation", "no wall motion abnormalities", "LVH",
             "moderate tricuspid regurgitation"],
    "ua": ["positive for leukocyte esterase", "bland", "notable for trace protein"],
    "dispo": ["home", "home with services", "to rehab"],
    "glu_lo": ["82", "95", "110"], "glu_hi": ["180", "215", "260"],
    "diuretic": ["furosemide", "bumetanide", "torsemide"],
    "advice": ["a low sodium diet", "daily weights", "smoking cessation", "fall precautions"],
}
SECTIONS = ("Chief Complaint:", "History of Present Illness:", "Past Medical History:",
            "Physical Exam:", "Pertinent Results:", "Brief Hospital Course:",
            "Medications on Admission:", "Discharge Medications:", "Discharge Diagnosis:",
            "Discharge Instructions:", "Followup Instructions:")


# ----------------------------------------------------------------------------- generation


def _counts(scale: float) -> dict[str, int]:
  return {k: max(1, round(v * scale)) for k, v in ADMISSIONS.items()}


def _sentence_pool(rng: np.random.Generator, size: int = 6000) -> tuple[str, ...]:
  out = []
  for _ in range(size):
    t = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    fill = {k: v[int(rng.integers(len(v)))] for k, v in SLOTS.items() if "{" + k + "}" in t}
    out.append(t.format(**fill))
  return tuple(out)


def _icd10_codes(rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
  """Undotted billable codes with Zipf-like probabilities, as diagnoses_icd stores them."""
  from jaxicd.ontology import get_ontology  # pylint: disable=g-import-not-at-top
  billable = sorted(get_ontology().code_space("all"))
  codes = [billable[int(i)].replace(".", "")
           for i in rng.choice(len(billable), ICD10_CODES, replace=False)]
  p = 1.0 / (np.arange(ICD10_CODES) + 10.0) ** 1.1
  return codes, p / p.sum()


def _icd9_codes(rng: np.random.Generator, n: int = 5000) -> list[str]:
  return sorted({str(int(rng.integers(10, 99999))).zfill(int(rng.integers(3, 6))) for _ in range(n)})


@functools.cache
def _mean_length(pool: tuple[str, ...]) -> float:
  return sum(map(len, pool)) / len(pool)


def _note(rng: np.random.Generator, pool: tuple[str, ...], length: int) -> str:
  parts, size = ["Name:  ___                 Unit No:   ___\n \nService: MEDICINE\n \n"], 0
  per_section = max(1, round(length / (len(SECTIONS) * (_mean_length(pool) + 1))))
  for section in SECTIONS:
    parts.append(section + "\n")
    idx = rng.integers(len(pool), size=per_section)
    body = "\n".join(pool[i] for i in idx.tolist()) if section.startswith(
        ("Medications", "Discharge Med")) else " ".join(pool[i] for i in idx.tolist())
    parts.append(body + "\n \n")
    size += len(body)
    if size >= length:
      break
  return "".join(parts)


def generate(root: Path, scale: float, seed: int) -> dict:
  """Writes the three files under ``root`` (via temporary names) and returns what it wrote."""
  rng = np.random.default_rng(seed)
  counts = _counts(scale)
  kinds = np.repeat(np.arange(len(counts)), list(counts.values()))
  rng.shuffle(kinds)
  n = len(kinds)
  names = list(counts)
  hadm = rng.choice(10_000_000, n, replace=False) + 20_000_000
  subject = np.sort(rng.integers(0, max(1, int(n * SUBJECTS_PER_ADMISSION)), n)) + 10_000_000
  order = np.lexsort((hadm, subject))  # the release's row order: by subject, then hadm_id
  kinds, hadm, subject = kinds[order], hadm[order], subject[order]
  icd10, p10 = _icd10_codes(rng)
  icd9 = _icd9_codes(rng)
  pool = _sentence_pool(rng)
  (root / "hosp").mkdir(parents=True, exist_ok=True)
  (root / "note").mkdir(parents=True, exist_ok=True)
  rows = notes = chars = 0
  diag_tmp, note_tmp = root / "hosp/diagnoses_icd.csv.gz.tmp", root / "note/discharge.csv.gz.tmp"
  split_rows = []
  with gzip.open(diag_tmp, "wt", compresslevel=6, encoding="utf-8", newline="") as diag, \
       gzip.open(note_tmp, "wt", compresslevel=6, encoding="utf-8", newline="") as note:
    diag.write("subject_id,hadm_id,seq_num,icd_code,icd_version\n")
    writer = csv.writer(note, lineterminator="\n")
    writer.writerow(["note_id", "subject_id", "hadm_id", "note_type", "note_seq", "charttime",
                     "storetime", "text"])
    note_seq, last_subject = 0, -1
    buf = io.StringIO()
    for a in range(n):
      kind, h, s = names[kinds[a]], int(hadm[a]), int(subject[a])
      if s != last_subject:
        note_seq, last_subject = 0, s
      if kind != "note_only":
        k = int(min(39, 1 + rng.poisson(MEAN_ROWS - 1)))
        if kind.startswith("icd10"):
          picked = list(dict.fromkeys(icd10[i] for i in rng.choice(ICD10_CODES, k, p=p10)))
          version = 10
        else:
          picked = [icd9[int(i)] for i in rng.integers(len(icd9), size=k)]
          version = 9
        if rng.random() < DUPLICATE_ROWS * k:
          picked.append(picked[0])
        for seq, code in enumerate(picked, 1):
          buf.write(f"{s},{h},{seq},{code},{version}\n")
        rows += len(picked)
        if buf.tell() > 1 << 20:
          diag.write(buf.getvalue())
          buf = io.StringIO()
      if kind.endswith("note") or kind == "note_only":
        for _ in range(2 if rng.random() < TWO_NOTES else 1):
          note_seq += 1
          length = int(np.clip(rng.lognormal(math.log(9_400), 0.35), 1_500, 60_000))
          text = _note(rng, pool, length)
          day = 1 + a % 28
          writer.writerow([f"{s}-DS-{note_seq}", s, h, "DS", note_seq,
                           f"2180-01-{day:02d} 00:00:00", f"2180-01-{day:02d} 15:00:00", text])
          notes, chars = notes + 1, chars + len(text)
      if kind == "icd10_note":
        u, acc = rng.random(), 0.0
        for split, frac in SPLIT:
          acc += frac
          if u < acc:
            break
        split_rows.append(f"{h},{split}\n")
      if a % 20_000 == 0:
        print(f"generate: {a}/{n} admissions", file=sys.stderr, flush=True)
    diag.write(buf.getvalue())
  (root / "mimiciv_icd10_split.csv").write_text("hadm_id,split\n" + "".join(split_rows))
  diag_tmp.rename(root / "hosp/diagnoses_icd.csv.gz")
  note_tmp.rename(root / "note/discharge.csv.gz")
  return {"admissions": n, "admissions_by_kind": counts, "diagnosis_rows": rows,
          "discharge_notes": notes, "note_characters": chars, "split_rows": len(split_rows),
          "bytes": {p: (root / p).stat().st_size for p in (
              "hosp/diagnoses_icd.csv.gz", "note/discharge.csv.gz", "mimiciv_icd10_split.csv")}}


# ----------------------------------------------------------------------------- phases


def _usage(t0: float, cpu0: float) -> dict:
  ru = resource.getrusage(resource.RUSAGE_SELF)
  return {"peak_rss_bytes": ru.ru_maxrss * 1024, "wall_s": round(time.perf_counter() - t0, 2),
          "cpu_s": round(ru.ru_utime + ru.ru_stime - cpu0, 2)}


def _rss_now() -> int:
  """Resident memory now (Linux); elsewhere the peak so far, which is no less."""
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      return int(f.read().split()[1]) * resource.getpagesize()
  except OSError:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu() -> float:
  ru = resource.getrusage(resource.RUSAGE_SELF)
  return ru.ru_utime + ru.ru_stime


def phase(name: str, root: Path, scale: float, seed: int) -> dict:
  """One phase, in this (fresh) process; returns its figures."""
  t0, cpu0 = time.perf_counter(), _cpu()
  manual = root / "manual"
  if name == "generate":
    return {**generate(manual, scale, seed), **_usage(t0, cpu0)}
  # Fixed costs, before the clock starts: imports and the ontology (which checks the codes).
  from jaxicd.data import sources  # pylint: disable=g-import-not-at-top
  from jaxicd.data import tfds_builders as tb  # pylint: disable=g-import-not-at-top
  from jaxicd.ontology import get_ontology  # pylint: disable=g-import-not-at-top
  get_ontology()
  imports = {"rss_after_imports_bytes": _rss_now()}
  t0, cpu0 = time.perf_counter(), _cpu()
  if name == "read":
    docs = chars = codes = 0
    with sources.open_documents("mimic_iv", manual) as stream:
      opened = time.perf_counter() - t0
      for split in stream.counts:
        for d in stream.documents(split):
          docs, chars, codes = docs + 1, chars + len(d.text), codes + len(d.codes)
      return {**imports, "documents": dict(stream.counts), "characters": chars,
              "code_assignments": codes, "open_s": round(opened, 2),
              "yield_s": round(time.perf_counter() - t0 - opened, 2), "reader": stream.stats,
              **_usage(t0, cpu0)}
  if name == "load":
    docs = sources.load_documents("mimic_iv", manual)
    return {**imports, "documents": len(docs), "characters": sum(len(d.text) for d in docs),
            **_usage(t0, cpu0)}
  if name == "build":
    data_dir = root / "tfds"
    shutil.rmtree(data_dir, ignore_errors=True)
    builder = tb.JaxicdDocuments(source="mimic_iv", manual_dir=str(manual), data_dir=str(data_dir))
    key_s = time.perf_counter() - t0
    tb.prepare(builder, str(manual))
    prepare_s = time.perf_counter() - t0 - key_s
    read = builder.read_stats
    read_s = sum(read.get(k, 0.0) for k in ("diagnoses_s", "notes_s", "index_s"))
    splits = {s: len(builder.as_data_source(split=s)) for s in builder.info.splits}
    size = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file())
    return {**imports, "documents": splits, "documents_per_shard": tb.DOCUMENTS_PER_SHARD,
            "key_s": round(key_s, 2),
            "read_s": round(read_s, 2), "write_s": round(prepare_s - read_s, 2), "reader": read,
            "built_bytes": size, **_usage(t0, cpu0)}
  raise ValueError(f"unknown phase {name!r}")


def _run_phase(name: str, root: Path, args) -> dict:
  cmd = [sys.executable, __file__, f"--_phase={name}", f"--dir={args.dir}",
         f"--scale={args.scale}", f"--seed={args.seed}"]
  print(f"phase {name} ...", file=sys.stderr, flush=True)
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    sys.stderr.write(out.stderr[-4000:])
    raise SystemExit(f"phase {name} failed (exit {out.returncode})")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"phase {name}: {result['wall_s']} s wall, {result['cpu_s']} s CPU, peak RSS "
        f"{result['peak_rss_bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
  return result


def _extrapolate(results: dict, scale: float) -> dict:
  """Phase figures at scale 1 from figures at ``scale``.

  Time: linear in rows and notes. Memory, above what imports and the ontology take: the reader's
  (its arrays) grows linearly, so the read phase's is scaled; the build adds the shard being
  written, which grows with the documents per shard until shards are full, so its own growth is
  scaled by that ratio and added to the reader's (an overestimate: the build's growth includes
  the reader's once more).
  """
  out = {f"{k}_{m}": round(results[k][m] / scale)
         for k in ("read", "build") if k in results for m in ("wall_s", "cpu_s")}
  grown = lambda r: r["peak_rss_bytes"] - r["rss_after_imports_bytes"]
  reader = grown(results["read"]) / scale if "read" in results else 0.0
  if "read" in results:
    out["read_peak_rss_bytes"] = round(results["read"]["rss_after_imports_bytes"] + reader)
  if "build" in results:
    b = results["build"]
    if "read" not in results:  # the build's growth, all of it scaled
      reader = grown(b) / scale
    per_shard = b["documents_per_shard"]
    full_shard = per_shard / min(per_shard, max(b["documents"].values()))
    out["build_peak_rss_bytes"] = round(b["rss_after_imports_bytes"] + reader
                                        + grown(b) * full_shard)
  return out


def _dataset_dir(args) -> Path:
  return Path(args.dir) / f"scale{args.scale:g}-seed{args.seed}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scale", type=float, default=1.0, help="fraction of MIMIC-IV's size")
  parser.add_argument("--dir", default="/tmp/jaxicd-mimic-scale")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--phases", default="generate,read,build",
                      help="comma-separated: generate, read, load, build")
  parser.add_argument("--regenerate", action="store_true", help="write the files again")
  parser.add_argument("--_phase", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not 0 < args.scale <= 1:
    parser.error("--scale must be in (0, 1]")
  root = _dataset_dir(args)
  if args._phase:  # pylint: disable=protected-access
    print(json.dumps(phase(args._phase, root, args.scale, args.seed)))  # pylint: disable=protected-access
    return

  marker = root / "generated.json"
  wanted = {"scale": args.scale, "seed": args.seed, "generator": GENERATOR_VERSION}
  generated = json.loads(marker.read_text()) if marker.exists() else {}
  results: dict = {}
  phases = [p.strip() for p in args.phases.split(",") if p.strip()]
  if args.regenerate or {k: generated.get(k) for k in wanted} != wanted:
    if "generate" not in phases:
      raise SystemExit(f"no generated dataset for {wanted} in {root}: add the generate phase")
    shutil.rmtree(root, ignore_errors=True)
    results["generate"] = _run_phase("generate", root, args)
    marker.write_text(json.dumps({**wanted, **results["generate"]}, indent=1))
  else:
    print(f"reusing the dataset in {root}", file=sys.stderr)
    results["generate"] = {**generated, "reused": True}
  for name in phases:
    if name != "generate":
      results[name] = _run_phase(name, root, args)

  summary: dict = {"bench": "mimic_scale", "scale": args.scale, "dir": str(root),
                   "targets": {"peak_rss_bytes": TARGET_RSS_BYTES, "build_s": TARGET_BUILD_S},
                   "phases": results}
  streamed = [results[k] for k in ("read", "build") if k in results]
  rss = max((r["peak_rss_bytes"] for r in streamed), default=None)
  build = results.get("build")
  # One process, one thread: its CPU seconds are the wall time it needs on a free core (on a
  # shared machine the wall time also counts waiting for one).
  seconds = None if build is None else build["cpu_s"]
  if args.scale < 1:
    summary["extrapolated_to_scale_1"] = extrapolated = _extrapolate(results, args.scale)
    rss = max((v for k, v in extrapolated.items() if k.endswith("peak_rss_bytes")), default=None)
    seconds = extrapolated.get("build_cpu_s")
  summary["targets_met"] = {
      "peak_rss": None if rss is None else rss < TARGET_RSS_BYTES,
      "build_time": None if seconds is None else seconds < TARGET_BUILD_S,
      "basis": ("measured" if args.scale >= 1 else "extrapolated") + " peak RSS of read/build; "
               "build CPU seconds (single-threaded)"}
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
