"""Benchmark: ontology start-up, full-code-space span expansion, demo corpus generation.

Targets: ontology ready in < 2 s in a fresh process; expansion of all billable ICD-10-CM codes in
< 60 s with 100% coverage. Prints one JSON line.

  .venv/bin/python bench/expansion.py [--code_space=all] [--max_per_code=8] [--no_demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _startup_seconds() -> float:
  """Time to import jaxicd.ontology and build the ontology, in a fresh interpreter."""
  code = ("import time; t = time.perf_counter(); from jaxicd.ontology import get_ontology; "
          "get_ontology(); print(time.perf_counter() - t)")
  out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
  return float(out.stdout.strip())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--code_space", default="all")
  parser.add_argument("--max_per_code", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_demo", action="store_true")
  args = parser.parse_args()

  from jaxicd.data.demo import code_space
  from jaxicd.data.expansion import expand
  from jaxicd.ontology import get_ontology

  result: dict = {"ontology_startup_s": round(min(_startup_seconds() for _ in range(2)), 3)}
  onto = get_ontology()
  codes = code_space(args.code_space)
  t = time.perf_counter()
  exp = expand(codes, onto, seed=args.seed, max_per_code=args.max_per_code)
  seconds = time.perf_counter() - t
  r = exp.report
  result["expansion"] = {
      "release": onto.release, "code_space": args.code_space, "codes": len(codes),
      "coverage": r["coverage"], "codes_covered": r["codes_covered"], "spans": r["spans"],
      "seconds": round(seconds, 2), "spans_per_s": round(r["spans"] / seconds),
      "codes_per_s": round(len(codes) / seconds), "by_origin": r["by_origin"],
      "ambiguous_terms_dropped": r["ambiguous_terms_dropped"],
      "target_met": seconds < 60 and r["coverage"] == 1.0,
  }
  if not args.no_demo:
    from jaxicd.data.demo import demo_corpus, demo_stats
    t = time.perf_counter()
    corpus = demo_corpus(seed=args.seed)
    gen_s = time.perf_counter() - t
    tok = None
    try:
      from jaxicd.model.tokenizer import load_tokenizer
      tok = load_tokenizer("smollm2")
    except Exception as e:  # report and go on without real token counts
      result["tokenizer_error"] = repr(e)
    result["demo"] = dict(demo_stats(corpus, tok), generation_s=round(gen_s, 2))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
