"""Check measured benchmark results against the speed targets the issues set.

    python -m benchmarks.targets [RESULTS_DIR] [--card SLUG] [--out FILE.md]

Reads the ``<bench>_<card>.csv`` files the benchmark scripts wrote (default
``$FASTBERT_RESULTS`` or benchmarks/results), evaluates every target on every case it applies
to, and prints a markdown table: the issue, the target, the case, the measured ratio and
whether it is met. ``make gpu-check`` runs it after the benchmarks. A target whose case was
not measured (a script stopped by its time budget, an impl that errored) says so: it is
neither met nor missed.

The ratios are computed from the median times of impls measured in the same run on the same
card, as the README requires of every speed claim.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import math
import os
import sys
from typing import Callable, Dict, Iterable, List, Optional, Tuple

# columns that are measurements or the impl name; the rest identify the case. The same set as
# benchmarks._harness.MEASURED_COLUMNS (a test checks; this module imports no torch)
MEASURED = {"bench", "impl", "ms", "ms_p20", "ms_p80", "gpu_ms", "peak_mb", "first_s", "GB/s",
            "%copy_bw", "TFLOP/s", "%matmul", "error",
            # bench_translation's training rows
            "steps_run", "tok/s", "outliers", "loss", "bleu", "exact%", "decode_ms", "note"}

Group = Dict[str, Dict[str, str]]   # impl -> its CSV row, for one case


@dataclasses.dataclass
class Target:
    """One speed target: ``check`` maps a case's rows to (measured text, met) or None when
    the case lacks what the target compares."""
    issue: int
    bench: str
    case: str                      # the case name it applies to (exact)
    text: str
    check: Callable[[Group], Optional[Tuple[str, bool]]]
    applies: Callable[[Dict[str, str]], bool] = lambda params: True
    # fastbert's other paths the bench times beside the default one (opt-in modes, the path a
    # threshold did not pick), judged by the same target: (impl, check). Shown, not counted:
    # they say which default to change once a GPU run shows one meets the target.
    alternatives: Tuple[Tuple[str, Callable[[Group], Optional[Tuple[str, bool]]]], ...] = ()
    # the default path's impl (what ``check`` judges), for the alternatives' summary
    default: str = ""


def _ms(group: Group, impl: str) -> Optional[float]:
    row = group.get(impl)
    if row is None or row.get("error"):
        return None
    try:
        v = float(row["ms"])
    except (KeyError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _best(group: Group, prefix: str, suffix: str = "") -> Optional[Tuple[str, float]]:
    """The fastest impl whose name starts with prefix (and ends with suffix)."""
    found = [(impl, _ms(group, impl)) for impl in group
             if impl.startswith(prefix) and impl.endswith(suffix)]
    found = [(i, m) for i, m in found if m is not None]
    return min(found, key=lambda x: x[1]) if found else None


def _faster(ours: str, ref: str, at_least: float):
    """ours must be at least ``at_least`` x faster than ref (time_ref / time_ours)."""
    def check(group: Group):
        a, b = _ms(group, ours), _ms(group, ref)
        if a is None or b is None:
            return None
        r = b / a
        return f"{r:.2f}x {ref}", r >= at_least
    return check


def _time_ratio_at_most(ours: str, ref: str, at_most: float):
    """time_ours / time_ref must be at most ``at_most``."""
    def check(group: Group):
        a, b = _ms(group, ours), _ms(group, ref)
        if a is None or b is None:
            return None
        r = a / b
        return f"{r:.2f}x {ref}'s time", r <= at_most
    return check


def _vs_best(ours: str, prefix: str, at_least: float, suffix: str = ""):
    def check(group: Group):
        a = _ms(group, ours)
        if prefix == "sdpa_":
            # SDPA's best among its fused backends (flash, efficient, cuDNN): its math
            # fallback alone is no measure of "SDPA's best backend" (none ran: not measured)
            best = _best({i: r for i, r in group.items() if not i.startswith("sdpa_math")},
                         prefix, suffix)
        else:
            best = _best(group, prefix, suffix)
        if a is None or best is None:
            return None
        r = best[1] / a
        return f"{r:.2f}x {best[0]} (the fastest)", r >= at_least
    return check


def _memory_at_most(ours: str, ref: str, at_most: float):
    def check(group: Group):
        try:
            a, b = float(group[ours]["peak_mb"]), float(group[ref]["peak_mb"])
        except (KeyError, ValueError, TypeError):
            return None
        if not (b > 0):
            return None
        r = a / b
        return f"{r:.2f}x {ref}'s peak memory", r <= at_most
    return check


def _matmul_fraction(ours: str, at_least_pct: float):
    def check(group: Group):
        row = group.get(ours)
        if row is None or row.get("error") or not row.get("%matmul"):
            return None
        pct = float(row["%matmul"])
        return f"{pct:.0f}% of the bf16 matmul rate", pct >= at_least_pct
    return check


def _int(params: Dict[str, str], key: str) -> int:
    try:
        return int(params.get(key, ""))
    except ValueError:
        return -1


def _alts(make: Callable[[str], Callable[[Group], Optional[Tuple[str, bool]]]],
          *impls: str) -> Tuple[Tuple[str, Callable[[Group], Optional[Tuple[str, bool]]]], ...]:
    return tuple((impl, make(impl)) for impl in impls)


_ATTENTION_ALTS = _alts(lambda i: _vs_best(i, "sdpa_", 1.0), "fastbert_three_kernel_bwd[triton]",
                        "fastbert_atomic_dq_bwd[triton]", "fastbert_tuned[triton]")
# (fastbert_triton_coop: the cooperative loop's rows until it became the default, 2026-11-28;
# kept so that the results recorded then are judged as they were)
_LSTM_ALTS = _alts(lambda i: _time_ratio_at_most(i, "cudnn", 1.25), "fastbert_triton_step_graph",
                   "fastbert_triton_no_coop", "fastbert_triton_coop", "fastbert_triton_per_step",
                   "fastbert_triton_bwd_k128", "fastbert_triton_tiles",
                   "fastbert_triton_tiles_b64", "fastbert_triton_coop_resident",
                   "fastbert_triton_coop_tiles")

TARGETS: List[Target] = [
    # issue 3: attention
    Target(3, "attention", "bert-base padded fwd+bwd",
           "fwd+bwd at least as fast as SDPA's best backend (BERT shapes, padding mask)",
           _vs_best("fastbert[triton]", "sdpa_", 1.0), alternatives=_ATTENTION_ALTS,
           default="fastbert[triton]"),
    Target(3, "attention", "bert-large padded fwd+bwd",
           "fwd+bwd at least as fast as SDPA's best backend (BERT shapes, padding mask)",
           _vs_best("fastbert[triton]", "sdpa_", 1.0), alternatives=_ATTENTION_ALTS,
           default="fastbert[triton]"),
    Target(3, "attention", "varlen vs padded fwd+bwd",
           "varlen >= 1.5x padded SDPA (mixed lengths 16-512)",
           _vs_best("fastbert_varlen[triton]", "sdpa_", 1.5, suffix=" (padded)"),
           alternatives=_alts(lambda i: _vs_best(i, "sdpa_", 1.5, suffix=" (padded)"),
                              "fastbert_varlen_atomic_dq_bwd[triton]",
                              "fastbert_varlen_tuned[triton]"),
           default="fastbert_varlen[triton]"),
    Target(3, "attention", "causal fwd",
           "forward >= 50% of the measured matmul rate (seq >= 2k, head dim 128)",
           _matmul_fraction("fastbert[triton]", 50.0),
           applies=lambda p: _int(p, "seq") >= 2048 and _int(p, "head_dim") == 128,
           alternatives=_alts(lambda i: _matmul_fraction(i, 50.0), "fastbert_tuned[triton]",
                              "fastbert_heavy_first_fwd[triton]"),
           default="fastbert[triton]"),
    # issue 4: embedding + LayerNorm, cross-entropy, masked-LM loss
    Target(4, "embedding", "embedding_layer_norm fwd+bwd", ">= 1.2x torch.compile",
           _faster("fastbert", "torch.compile", 1.2),
           alternatives=_alts(lambda i: _faster(i, "torch.compile", 1.2), "fastbert_det",
                              "fastbert_atomic_word"), default="fastbert"),
    Target(4, "cross_entropy", "cross_entropy fwd+bwd", ">= 3x eager (V = 30522)",
           _faster("fastbert", "eager", 3.0), applies=lambda p: _int(p, "vocab") == 30522,
           alternatives=_alts(lambda i: _faster(i, "eager", 3.0), "fastbert_stored",
                              "fastbert_stored_looping", "fastbert_stored_l2x2",
                              "fastbert_stored_l2x4", "fastbert_stored_pipelined",
                              "fastbert_stored_pipelined_s2"), default="fastbert"),
    Target(4, "cross_entropy", "masked_lm_loss fwd+bwd", "time <= 0.5x the HF way",
           _time_ratio_at_most("fastbert", "hf", 0.5)),
    Target(4, "cross_entropy", "masked_lm_loss fwd+bwd", "peak memory <= 0.25x the HF way",
           _memory_at_most("fastbert", "hf", 0.25)),
    Target(4, "cross_entropy", "masked_lm_loss fwd+bwd", "faster than eager on gathered rows",
           _faster("fastbert", "eager_gathered", 1.0)),
    # issue 5: LSTM
    Target(5, "lstm", "lstm fwd+bwd padded", "<= 1.25x cuDNN's time (padded input)",
           _time_ratio_at_most("fastbert_triton", "cudnn", 1.25), alternatives=_LSTM_ALTS,
           default="fastbert_triton"),
    Target(5, "lstm", "lstm fwd+bwd varlen", "packed <= 1.1x our own padded time",
           _time_ratio_at_most("fastbert_triton_packed", "fastbert_triton_padded", 1.1)),
    Target(5, "lstm", "layer_norm_lstm fwd+bwd", "LayerNormLSTM >= 3x eager PyTorch",
           _faster("fastbert", "eager_pytorch", 3.0)),
]


def read_groups(path: str) -> List[Tuple[str, Dict[str, str], Group]]:
    """(case name, case params, impl -> row) for every case of one CSV, in file order."""
    groups: Dict[Tuple, Tuple[str, Dict[str, str], Group]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            params = {k: v for k, v in row.items()
                      if k not in MEASURED and not k.startswith("speedup_vs_") and k != "case"
                      and v not in ("", None)}
            key = (row.get("case"),) + tuple(sorted(params.items()))
            groups.setdefault(key, (row.get("case", ""), params, {}))[2][row["impl"]] = row
    return list(groups.values())


def evaluate(results_dir: str, card: Optional[str] = None) -> List[Dict[str, str]]:
    """One row per (target, measured case); cards are told apart by the file name. CPU
    results (``cpu-*`` files: smoke runs of the reference paths on tiny shapes) are judged
    only when ``card`` names them."""
    out = []
    for t in TARGETS:
        files = sorted(glob.glob(os.path.join(results_dir, f"{t.bench}_*.csv")))
        if card is None:
            # CPU smoke runs and --quick GPU runs (tiny shapes) only when their slug is asked for
            files = [p for p in files
                     if not os.path.basename(p)[len(t.bench) + 1:].startswith("cpu-")
                     and not p.endswith("-quick.csv")]
        else:
            files = [p for p in files if p.endswith(f"_{card}.csv")]
        seen = False
        for path in files:
            slug = os.path.basename(path)[len(t.bench) + 1:-len(".csv")]
            for case, params, group in read_groups(path):
                if case != t.case or not t.applies(params):
                    continue
                seen = True
                res = t.check(group)
                shown = " ".join(f"{k}={v}" for k, v in params.items() if k != "dtype")
                alts, versus = [], []
                for impl, check in t.alternatives:
                    alt = check(group)
                    if alt is not None:
                        alts.append(f"{impl}: {alt[0]} ({'met' if alt[1] else 'missed'})")
                    base, other = _ms(group, t.default), _ms(group, impl)
                    if base is not None and other is not None:
                        versus.append((impl, base / other, bool(alt and alt[1])))
                out.append({"issue": f"#{t.issue}", "target": t.text, "card": slug,
                            "case": f"{case} {shown}".strip(),
                            "measured": res[0] if res else "not measured (error or missing impl)",
                            "met": ("yes" if res[1] else "NO") if res else "-",
                            "alternatives": "; ".join(alts),
                            # (impl, its speedup over the default path, meets the target)
                            "_versus": versus})
        if not seen:
            out.append({"issue": f"#{t.issue}", "target": t.text, "card": card or "-",
                        "case": t.case, "measured": "no such case in the results", "met": "-",
                        "alternatives": ""})
    return out


def to_markdown(rows: Iterable[Dict[str, str]]) -> str:
    rows = list(rows)
    met = sum(r["met"] == "yes" for r in rows)
    missed = sum(r["met"] == "NO" for r in rows)
    alt_met = sum(r["met"] == "NO" and "(met)" in r.get("alternatives", "") for r in rows)
    lines = [f"Targets: {met} met, {missed} missed, {len(rows) - met - missed} not measured.",
             "", f"Missed by the default path but met by another fastbert path timed beside it "
             f"(last column): {alt_met}.", "",
             "| issue | target | card | case | measured | met | other fastbert paths |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['issue']} | {r['target']} | {r['card']} | {r['case']} | {r['measured']} "
              f"| {r['met']} | {r.get('alternatives', '')} |" for r in rows]
    summary = summarize_alternatives(rows)
    if summary:
        lines += ["", "Each other fastbert path against the default one, over the cases of a "
                  "target where both were timed (which opt-in to make the default):", "",
                  "| issue | target | other path | cases | faster than the default in | "
                  "speedup over the default (geometric mean, min - max) | "
                  "meets the target where the default misses |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {s['issue']} | {s['target']} | {s['impl']} | {s['cases']} | "
                  f"{s['faster']} | {s['speedup']} | {s['rescues']} |" for s in summary]
    return "\n".join(lines) + "\n"


def summarize_alternatives(rows: Iterable[Dict[str, object]]) -> List[Dict[str, str]]:
    """Per (target, other path): over the cases where it and the default were both timed, in
    how many it is faster, its speedup over the default (geometric mean, min, max), and in
    how many cases it meets the target that the default misses."""
    acc: Dict[Tuple[str, str, str], List[Tuple[float, bool, bool]]] = {}
    for r in rows:
        for impl, speedup, met in r.get("_versus", ()):
            acc.setdefault((r["issue"], r["target"], impl), []).append(
                (speedup, met, r["met"] == "NO"))
    out = []
    for (issue, target, impl), vals in acc.items():
        speedups = [v for v, _, _ in vals]
        geo = math.exp(sum(math.log(v) for v in speedups) / len(speedups))
        out.append({"issue": issue, "target": target, "impl": impl, "cases": str(len(vals)),
                    "faster": str(sum(v > 1.0 for v in speedups)),
                    "speedup": f"{geo:.2f}x ({min(speedups):.2f} - {max(speedups):.2f})",
                    "rescues": str(sum(met and missed for _, met, missed in vals))})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="?",
                   default=os.environ.get("FASTBERT_RESULTS")
                   or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--card", help="only files of this card slug (e.g. nvidia-h100-80gb-hbm3)")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    md = to_markdown(evaluate(args.results, args.card))
    sys.stdout.write(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
