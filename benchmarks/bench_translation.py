"""#5's translation comparison: ``LSTMSeq2Seq`` against ``Seq2SeqTransformer``, each trained on
fastbert's kernels and beside the reference a user would otherwise run, from the same weights.

    python -m benchmarks.bench_translation [--quick] [--device cuda] [--no-write]
        [--steps N] [--max-tokens N] [--models transformer,lstm]

The task is the built-in synthetic language pair of ``benchmarks/translation_data.py``
(nothing downloads): a made-up source language and its translation, which reorders words
(verb last, prepositional phrase first, adjective after the noun) and inflects them for
gender, number and tense. Each row trains one model for ``--steps`` steps of at most
``--max-tokens`` padded source + target tokens (the same batches, in the same order, for every
row), then translates the held-out test sentences greedily and scores them with sacreBLEU.

Rows (each case: the fastbert model, then its reference from the same initial weights):
- ``transformer``: ``Seq2SeqTransformer`` (post-LN, GELU; fastbert's attention, fused
  LayerNorm epilogues and bias-GELU; the loss through ``masked_lm_loss``) against
  ``TorchTransformerSeq2Seq``: the same weights in torch's ``nn.TransformerEncoderLayer`` /
  ``nn.TransformerDecoderLayer`` (SDPA) with the loss the Hugging Face way (every position
  projected, then ``F.cross_entropy``). Their dropout differs in one place (torch's layers
  drop after the FFN's activation too).
- ``lstm``: ``LSTMSeq2Seq`` (Luong attention; fastbert.nn.LSTM, the source lengths inside the
  kernel; the fused loss) against the same model with torch.nn.LSTM (cuDNN, PackedSequence)
  and the Hugging Face way's loss.

Columns: ``ms`` the median training step (forward, backward, clipping, AdamW), from CUDA
events around each step (the loop itself reads nothing back to the host but what a model
reads: masked_lm_loss's count of target tokens, the models' id and length checks with
``check_ids`` off; the batches' lengths stay on the CPU, pinned, as the LSTMs'
PackedSequence and the checks take them; on CPU, wall time), ``ms_p20`` / ``ms_p80``;
``tok/s`` source + target tokens (padding excluded) per second over the timed steps but those
slower than ``OUTLIER`` x the median (``outliers``: how many: a Triton compile for a new
length class, 1 / multiple of 16 / other, lands there); ``steps_run`` the steps trained
(fewer than ``steps`` when the time budget stopped the row: ``note`` says so);
``peak_mb`` the peak memory of training; ``loss`` the mean training loss over the last
tenth of the steps; ``bleu`` sacreBLEU's corpus BLEU of the greedy translations of the test
set, ``exact%`` the share translated exactly; ``decode_ms`` greedy decoding time per test
sentence (the models' own decoders with their key / value cache or LSTM state; the torch
reference encodes once and reruns its decoder over the prefix each step, as torch's layers
offer no cache); ``speedup_vs_reference`` the reference's step time over this row's. The
first ``WARMUP_STEPS`` steps (at most half of them) are trained but not timed.

Both implementations of a case compute the same function from the same weights
(tests/test_translation_refs.py), so their BLEU after the same batches should be close: a
fastbert row far below its reference would point at a wrong gradient. Mixed precision on CUDA
(bf16 autocast, fp32 weights), AdamW (fused on CUDA), linear warm-up then linear decay,
gradient clipping at 1.0, label smoothing 0.1. The fastbert models run with
``check_ids=False`` (the ids come from the vocabulary; the check costs a host read a call).

No issue sets a target for these rows; ``make gpu-check`` runs this script only when
``FASTBERT_BENCHES`` names it (e.g. ``FASTBERT_BENCHES="attention:3 ... translation:1"``).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from benchmarks import _harness
from benchmarks.translation_data import PAD, Grammar, Vocab, batches, encode_batch
from benchmarks.translation_refs import TorchTransformerSeq2Seq, cudnn_lstm_seq2seq, hf_loss
from fastbert.models import LSTMSeq2Seq, Seq2SeqTransformer

BENCH = "translation"
MODELS = ("transformer", "lstm")
WARMUP_STEPS = 10
# timed steps slower than this many times the median are left out of tok/s (compiles)
OUTLIER = 5.0
LABEL_SMOOTHING = 0.1
SEED = 0

# (GPU, quick) settings: steps, tokens per batch, training pairs, test pairs
FULL = dict(steps=600, max_tokens=8192, n_train=200_000, n_test=1000)
QUICK = dict(steps=12, max_tokens=256, n_train=300, n_test=16)


def model_configs(quick: bool) -> Dict[str, dict]:
    """Constructor arguments of each model (the vocabularies added by ``build``)."""
    if quick:
        return {"transformer": dict(d_model=32, heads=2, layers=1, ffn=64, dropout=0.1),
                "lstm": dict(emb=32, hidden=32, layers=1, dropout=0.1)}
    return {"transformer": dict(d_model=512, heads=8, layers=6, ffn=2048, dropout=0.1),
            "lstm": dict(emb=512, hidden=1024, layers=2, attention="luong", dropout=0.1)}


LEARNING_RATES = {"transformer": 7e-4, "lstm": 1e-3}


def build(kind: str, src_vocab: Vocab, tgt_vocab: Vocab, quick: bool, device: torch.device):
    """(fastbert model, reference) with the same initial weights, both on ``device``, and
    each one's loss function."""
    cfg = model_configs(quick)[kind]
    torch.manual_seed(SEED)
    if kind == "transformer":
        fast = Seq2SeqTransformer(len(src_vocab), len(tgt_vocab), check_ids=False, **cfg)
        ref = TorchTransformerSeq2Seq.from_fastbert(fast)
    else:
        fast = LSTMSeq2Seq(len(src_vocab), len(tgt_vocab), check_ids=False, **cfg)
        ref = cudnn_lstm_seq2seq(fast)
    return {"fastbert": (fast.to(device), _fast_loss), "reference": (ref.to(device), hf_loss)}


def _fast_loss(model, src, lengths, tgt_in, tgt_out, *, label_smoothing):
    return model.loss(src, lengths, tgt_in, tgt_out, label_smoothing=label_smoothing)


def _schedule(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over the first 10% of the steps, then linear decay
    to 10% of the peak."""
    warm = max(1, steps // 10)
    if step < warm:
        return (step + 1) / warm
    return max(0.1, 1.0 - 0.9 * (step - warm) / max(1, steps - warm))


def warmup_steps(steps: int) -> int:
    """The untimed first steps of a row of ``steps``: WARMUP_STEPS, at most half of them."""
    return min(WARMUP_STEPS, steps // 2)


def train(model, loss_fn: Callable, data: List[tuple], steps: int, lr: float,
          device: torch.device, stop_at: Optional[float]) -> Dict[str, object]:
    """Train ``steps`` steps over ``data`` (batches: ids on the device, lengths on the CPU;
    cycled); returns the steps run, the times of the timed ones (ms, after the warm-up) and
    their tokens, the loss of the last tenth and the peak memory. Stops early after
    ``stop_at`` (Unix time): ``steps`` in the result says how far it got."""
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9,
                            weight_decay=0.01, **({"fused": True} if cuda else {}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps))
    model.train()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    events, wall, losses, tokens = [], [], [], []
    warm = warmup_steps(steps)
    done = 0
    for step in range(steps):
        if stop_at is not None and time.time() > stop_at:
            break
        src, lengths, tgt_in, tgt_out, n_tok = data[step % len(data)]
        timed = step >= warm
        if cuda and timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model, src, lengths, tgt_in, tgt_out, label_smoothing=LABEL_SMOOTHING)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if cuda and timed:
            end.record()
            events.append((start, end))
        elif timed:
            wall.append((time.perf_counter() - t0) * 1e3)
        if timed:
            tokens.append(n_tok)
        losses.append(loss.detach().float())
        done += 1
    if cuda:
        torch.cuda.synchronize(device)
        wall = [s.elapsed_time(e) for s, e in events]
    tail = losses[-max(1, done // 10):]
    return {
        "steps": done,
        "times": wall,
        "tokens": tokens,   # per timed step
        "loss": float(torch.stack(tail).mean()) if tail else float("nan"),
        "peak_mb": ((torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
                    if cuda else None),
    }


@torch.no_grad()
def greedy(model, src: torch.Tensor, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Greedy translations (B, L): the model's own ``greedy_decode`` where it has one, else
    (torch's Transformer layers, no key / value cache) the source encoded once and the
    decoder rerun over the whole prefix each step; pad and bos never generated, as the
    models' decoders rule them out."""
    if hasattr(model, "greedy_decode"):
        return model.greedy_decode(src, lengths, max_len=max_len)
    memory, src_pad = model.encode(src, lengths)
    out = torch.full((src.shape[0], 1), model.bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits = model.decode(out, memory, src_pad)[:, -1].float()
        logits[:, [model.pad_id, model.bos_id]] = float("-inf")
        y = torch.where(done, model.pad_id, logits.argmax(-1))
        out = torch.cat([out, y[:, None]], dim=1)
        done |= y == model.eos_id
        if bool(done.all()):
            break
    return out[:, 1:]


def evaluate(model, test: List[tuple], tgt_vocab: Vocab, src_vocab: Vocab,
             device: torch.device, batch: int = 250) -> Dict[str, float]:
    """Greedy translations of ``test``: sacreBLEU, exact matches, ms per sentence."""
    import sacrebleu
    model.eval()
    hyps: List[str] = []
    t0 = time.perf_counter()
    for i in range(0, len(test), batch):
        part = test[i:i + batch]
        src, lengths, _, tgt_out = encode_batch(part, src_vocab, tgt_vocab)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            ids = greedy(model, src.to(device), lengths, tgt_out.shape[1] + 5)
        hyps.extend(tgt_vocab.decode(row) for row in ids.tolist())
    ms = (time.perf_counter() - t0) * 1e3 / max(1, len(test))
    refs = [t for _, t in test]
    # the sentences are word tokens already (no detokenized form): BLEU over those words
    bleu = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", force=True).score
    exact = 100.0 * sum(h == r for h, r in zip(hyps, refs)) / max(1, len(test))
    return {"bleu": round(bleu, 2), "exact%": round(exact, 1), "decode_ms": round(ms, 3)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny models and data (the default on CPU)")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    p.add_argument("--steps", type=int, help="training steps per row")
    p.add_argument("--max-tokens", type=int, help="padded source + target tokens per batch")
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated, of {', '.join(MODELS)}")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type != "cuda":
        args.quick = True
    # in the order given, each once
    args.models = list(dict.fromkeys(m.strip() for m in args.models.split(",") if m.strip()))
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models: expected names from {MODELS}, got {bad or args.models}")
    if args.steps is not None and args.steps < 2:
        p.error(f"--steps must be >= 2 (one untimed, one timed), got {args.steps}")
    if args.max_tokens is not None and args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return args


def _timed(result: Dict[str, object]) -> Dict[str, object]:
    """The row's time columns from ``train``'s result: median and quantiles of the step
    times; tok/s over the steps within OUTLIER x the median."""
    times = sorted(result["times"])
    if not times:
        raise RuntimeError(f"no timed step ({result['steps']} steps run before the time "
                           "budget ended)")
    med = statistics.median(times)
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    kept = [(t, n) for t, n in zip(result["times"], result["tokens"]) if t <= OUTLIER * med]
    return {"ms": round(med, 4), "ms_p20": round(q(0.2), 4), "ms_p80": round(q(0.8), 4),
            "tok/s": round(sum(n for _, n in kept) / (sum(t for t, _ in kept) / 1e3)),
            "outliers": len(times) - len(kept)}


def main(argv=None) -> List[Dict[str, object]]:
    args = parse_args(argv)
    device = args.device
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.max_tokens is not None:
        settings["max_tokens"] = args.max_tokens
    grammar = Grammar.tiny() if args.quick else Grammar.default()
    src_vocab, tgt_vocab = grammar.vocabularies()
    parts = grammar.splits(settings["n_train"], settings["n_test"], seed=SEED + 1)
    # the batches of every row, in one order, made before any timing: ids on the device;
    # lengths on the CPU (pinned on CUDA), where the LSTMs' packing and the models' length
    # checks read them without a device sync
    data = []
    for src, lengths, tgt_in, tgt_out in batches(parts["train"], src_vocab, tgt_vocab,
                                                 settings["max_tokens"], seed=SEED):
        n_tok = int(lengths.sum()) + int((tgt_out != PAD).sum())
        if device.type == "cuda":
            lengths = lengths.pin_memory()
        data.append((src.to(device), lengths, tgt_in.to(device), tgt_out.to(device), n_tok))
        if len(data) >= settings["steps"]:
            break
    ceilings = {"copy_gbps": _harness.copy_bandwidth_gbps(device), "matmul_tflops": None}
    stop_at = _harness.deadline()
    tag = _harness.QUICK_TAG if args.quick and device.type == "cuda" else ""
    rows: List[Dict[str, object]] = []
    skipped: List[str] = []
    print(f"{BENCH}: {len(parts['train'])} training pairs ({len(data)} batches of <= "
          f"{settings['max_tokens']} tokens), {len(parts['test'])} test pairs, vocabularies "
          f"{len(src_vocab)} / {len(tgt_vocab)}", flush=True)
    n_rows = len(args.models) * 2
    for kind in args.models:
        impls = build(kind, src_vocab, tgt_vocab, args.quick, device)
        params = sum(p.numel() for p in impls["fastbert"][0].parameters())
        case_rows: List[Dict[str, object]] = []
        for impl in list(impls):
            model, loss_fn = impls.pop(impl)
            if stop_at is not None and time.time() > stop_at:
                skipped.append(f"{kind} {impl}")
                continue
            row: Dict[str, object] = {
                "bench": BENCH, "case": kind, "params_m": round(params / 1e6, 2),
                "steps": settings["steps"], "max_tokens": settings["max_tokens"],
                "dtype": "bf16-autocast" if device.type == "cuda" else "fp32", "impl": impl}
            try:
                result = train(model, loss_fn, data, settings["steps"], LEARNING_RATES[kind],
                               device, stop_at)
                row["steps_run"] = result["steps"]
                row.update(_timed(result))
                row.update({"peak_mb": (None if result["peak_mb"] is None
                                        else round(result["peak_mb"], 1)),
                            "loss": round(result["loss"], 4)})
                if result["steps"] < settings["steps"]:
                    row["note"] = (f"stopped by the time budget after {result['steps']} of "
                                   f"{settings['steps']} steps")
                    print(f"{BENCH}: {kind} {impl}: {row['note']}", flush=True)
                row.update(evaluate(model, parts["test"], tgt_vocab, src_vocab, device))
            except Exception as e:  # reported in the row, the other rows still run
                row["error"] = _harness.error_text(e, 160)
            del model
            case_rows.append(row)
            print(f"{BENCH:>14} {kind:<12} {impl:<10} "
                  + (f"{row['ms']:.3f} ms/step  " if "ms" in row else "") + "  ".join(
                      f"{k}={row[k]}" for k in ("tok/s", "loss", "bleu", "exact%", "error")
                      if k in row), flush=True)
            _speedups(case_rows)
            if not args.no_write:   # after every row: a run killed mid-case keeps its rows
                _write(rows + case_rows, device, ceilings, tag, skipped, settings,
                       incomplete=f"Incomplete: the run stopped after {len(rows) + len(case_rows)}"
                                  f" of {n_rows} rows.")
        rows.extend(case_rows)
        del impls
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_write:
        _write(rows, device, ceilings, tag, skipped, settings)
    return rows


def _speedups(case_rows: List[Dict[str, object]]) -> None:
    """speedup_vs_reference of each row of a case: the reference's step time over its own."""
    ref_ms = next((r.get("ms") for r in case_rows if r["impl"] == "reference"), None)
    for r in case_rows:
        r["speedup_vs_reference"] = (round(ref_ms / r["ms"], 3)
                                     if ref_ms and r.get("ms") else None)


def _write(rows, device, ceilings, tag, skipped, settings, incomplete: str = "") -> None:
    """The CSV and markdown, with the note: the setup, then (each a paragraph of its own, as
    gpu_check.sh greps them) whether the run is incomplete or the time budget skipped rows."""
    notes = [f"Synthetic language pair (benchmarks/translation_data.py), {settings['n_train']} "
             f"training pairs, {settings['n_test']} test pairs; greedy decoding; label "
             f"smoothing {LABEL_SMOOTHING}; the first {warmup_steps(settings['steps'])} steps "
             f"untimed; tok/s leaves out steps slower than {OUTLIER:g}x the median."]
    if incomplete:
        notes.append(incomplete)
    if skipped:
        notes.append(f"Time budget (${_harness.DEADLINE_ENV}) reached: not run: "
                     + ", ".join(skipped) + ".")
    _harness.write_results(BENCH, rows, device, ceilings, note="\n\n".join(notes), tag=tag)


if __name__ == "__main__":
    main(sys.argv[1:])
