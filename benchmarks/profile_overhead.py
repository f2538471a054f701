"""Host-side (CPU) cost of fastbert's ops on a GPU: where the time of a small call goes.

On the GPU machine of 2026-11-26 (H200, torch 2.11, triton 3.6) every fastbert op timed at
BERT's smaller shapes showed a floor: forward+backward of a LayerNorm over 8192 x 768 took
~1.0 ms whatever its size, eager PyTorch ~0.1-0.2 ms. That is host time (Python, dispatch,
launches) the GPU waits for. This script measures it, per call:

  - ``wall``: mean time of a call in a loop of ``--iters`` calls, synchronized once at the end
    (the throughput a training loop sees: max(host time, GPU time));
  - ``host``: the same loop with the GPU kept busy by a long kernel first, so launches queue
    without waiting: the time Python takes to issue one call ("syncs" for a call that waits
    for the GPU, where that loop would count the wait: see ``_syncs``);
  - ``gpu``: the sum of the call's kernel durations from torch.profiler (device time);
  - for the ops, the top functions of a cProfile of the loop (host time by function);
  - ``--timeline-k`` cases (whole names): one call's timeline on every thread, from
    torch.profiler with its Python tracer (``_timeline``). cProfile sees the calling thread
    only, and on CUDA the autograd engine runs a backward on a thread of its own (one per
    device): its Python, the calling thread's wait for it and the launches there are what the
    timeline adds.

Prints a text report (and writes it to ``--out``). A diagnostic, not a benchmark: no targets.

    python -m benchmarks.profile_overhead --out /tmp/overhead.txt
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import re
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F


def _busy(ms: float = 20.0) -> None:
    """Queue ~ms of GPU work (a chain of matmuls), so that later launches are not waited for."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(max(1, int(ms / 0.2))):
        a = a @ a
        a = a / a.abs().amax().clamp_min(1)


def _host_us(fn: Callable, iters: int) -> float:
    torch.cuda.synchronize()
    _busy(5.0 + iters * 0.3)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / iters * 1e6


def _syncs(fn: Callable) -> bool:
    """Whether a call waits for the GPU (an .item(), a device-to-host copy, nonzero(): the
    label and bounds checks, masked_lm_loss's row count). Its ``host`` time would count the
    wait for the busy chain queued first, so it is not reported."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()


def _wall_us(fn: Callable, iters: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def _gpu_us(fn: Callable, iters: int = 20) -> tuple[float, List[str]]:
    from benchmarks._harness import gpu_kernel_times
    names = gpu_kernel_times(fn, iters)
    top = sorted(names.items(), key=lambda kv: -kv[1])[:8]
    return sum(names.values()), [f"{v:8.1f} us  {k[:90]}" for k, v in top]


def _cprofile(fn: Callable, iters: int, lines: int = 22) -> str:
    pr = cProfile.Profile()
    torch.cuda.synchronize()
    pr.enable()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(lines)
    return s.getvalue()


# _timeline: the events shown, down to this depth below a thread's root (the call's marker on
# the calling thread), of at least this many us (the Python tracer records every isinstance),
# at most this many lines
TIMELINE_DEPTH = 7
TIMELINE_MIN_US = 2.0
TIMELINE_LINES = 200


def _depth(e, root_ids) -> int:
    d, p = 0, e.cpu_parent
    while p is not None and id(p) not in root_ids:
        d, p = d + 1, p.cpu_parent
    return d


# events during which a thread waits rather than works, the C-level calls that block (their
# Python wrappers' own time is work): the autograd engine's run_backward on the calling thread
# (the backward of CUDA tensors runs on the engine's device thread), device synchronizations
# (a host read of a device value waits in cudaStreamSynchronize), sleeps, lock acquires (an
# uncontended one is ~1 us), TorchScript's wait. Names as torch.profiler's Python tracer and
# CUPTI give them; a name merely containing "wait" or "join" (str.join, os.path.join) is work.
BLOCKING = re.compile(r"<built-in method run_backward of |<built-in function sleep>$"
                      r"|<built-in method acquire of _thread\.|<built-in function "
                      r"_cuda_synchronize>$|cuda(Stream|Device|Event)Synchronize$|aten::wait$")


def _union_us(spans, t0: float, t1: float) -> float:
    """The length of the union of (start, end) spans, clipped to [t0, t1] (us)."""
    total, end = 0.0, t0
    for a, b in sorted((max(a, t0), min(b, t1)) for a, b in spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _timeline(fn: Callable, calls: int = 3, depth: int = TIMELINE_DEPTH,
              lines: int = TIMELINE_LINES, min_us: float = TIMELINE_MIN_US) -> str:
    """One call of ``fn`` (the last of ``calls``, each in a ``record_function`` marker) as
    torch.profiler saw it on every thread, with Python functions (its Python tracer, which
    inflates each Python call by a few us: read the shares, not the absolute times). Per
    thread: the time some event of it covers within the call (the union of their spans) and
    how much of that it spent waiting (``BLOCKING`` events: on the calling thread of a CUDA
    backward, run_backward waits for the engine's thread, whose own line shows its work),
    the longest waits; then the events down to ``depth`` levels and of at least ``min_us``,
    in start order: thread, start (us from the call's start), duration, name."""
    from torch.profiler import ProfilerActivity, profile, record_function
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []),
                 with_stack=True) as prof:
        for i in range(calls):
            with record_function(f"fastbert_call_{i}"):
                fn()
        sync()
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.events() if getattr(e, "device_type", None) == cpu]
    # (on CUDA record_function also leaves a GPU annotation of the same name: CPU events only)
    marks = [e for e in events if e.name == f"fastbert_call_{calls - 1}"]
    if not marks:
        return "(no marker event recorded)"
    mark = marks[0]
    t0, t1 = mark.time_range.start, mark.time_range.end
    main = mark.thread
    inside = [e for e in events if e is not mark and t0 <= e.time_range.start < t1]
    names = {main: "main"}
    for e in sorted(inside, key=lambda e: e.time_range.start):
        names.setdefault(e.thread, f"t{len(names)}")
    # each thread's roots: the marker on the main thread, else the parents of its top events
    roots = {id(mark)}
    out = [f"one call: {t1 - t0:.1f} us (profiled; Python traced); threads: "
           + ", ".join(f"{v} = {k}" for k, v in names.items())]
    blocking = lambda e: BLOCKING.match(e.name) is not None
    for tid, label in names.items():
        mine = [e for e in inside if e.thread == tid]
        top = [e for e in mine
               if e.cpu_parent is None or e.cpu_parent is mark
               or not t0 <= e.cpu_parent.time_range.start < t1]
        for e in top:
            if e.cpu_parent is not None:
                roots.add(id(e.cpu_parent))
        covered = _union_us([(e.time_range.start, e.time_range.end) for e in top], t0, t1)
        # waiting: the time a blocking event is the innermost one (its self time): on the CPU
        # a backward runs inside run_backward on this thread (work), on CUDA on the engine's
        # thread while run_backward here only waits
        waits = [(e, _self_us(e)) for e in mine if blocking(e)]
        waited = sum(us for _, us in waits)
        out.append(f"  {label}: covered {covered:.1f} us, of which waiting {waited:.1f} us "
                   f"(working ~{covered - waited:.1f} us)"
                   + ("  [waits overlap: the split is off]" if waited > covered + 1 else ""))
        for e, us in sorted(waits, key=lambda w: -w[1])[:5]:
            if us >= min_us:
                out.append(f"    waits {us:8.1f} us at +{e.time_range.start - t0:.0f}: "
                           f"{e.name[:90]}")
    shown = [e for e in inside
             if e.time_range.elapsed_us() >= min_us and _depth(e, roots) < depth]
    shown.sort(key=lambda e: e.time_range.start)
    out.append(f"  {'thread':<6} {'start':>8} {'us':>8}  event (depth < {depth}, "
               f">= {min_us:g} us)")
    for e in shown[:lines]:
        d = _depth(e, roots)
        out.append(f"  {names.get(e.thread, '?'):<6} {e.time_range.start - t0:8.1f} "
                   f"{e.time_range.elapsed_us():8.1f}  {'  ' * d}{e.name[:100]}")
    if len(shown) > lines:
        out.append(f"  ... {len(shown) - lines} more")
    return "\n".join(out)


def _self_us(e) -> float:
    """``e``'s duration less its children's (us; torch.profiler nests events per thread)."""
    return max(0.0, e.time_range.elapsed_us()
               - sum(c.time_range.elapsed_us() for c in e.cpu_children))


def _fwd_and_fwd_bwd(out: Dict[str, Callable], op: str, shape: str, fwd: Callable,
                     leaves, grad) -> None:
    """Register ``op``'s forward without grad and its forward + backward."""
    def no_grad():
        with torch.no_grad():
            return fwd()

    out[f"{op} fwd (no grad) {shape}"] = no_grad
    out[f"{op} fwd+bwd {shape}"] = lambda: torch.autograd.grad(fwd(), leaves, grad)


def cases(dev: str = "cuda") -> Dict[str, Callable]:
    """name -> a call to time (built, not run; ``dev`` other than cuda: for the CPU smoke test
    of the cheap ones)."""
    from fastbert import ops
    bf = torch.bfloat16
    out: Dict[str, Callable] = {}

    # the floor: what one launch costs through each path
    small = torch.randn(1024, device=dev)
    out["torch add (one launch)"] = lambda: small.add(1.0)

    import triton
    import triton.language as tl

    @triton.jit
    def _noop(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    out["triton launch, 3 args"] = lambda: _noop[(1,)](small, 1024, BLOCK=1024)
    # the same launch through kernels/_launch.py (every fastbert kernel launches this way)
    from benchmarks._harness import with_setting
    from fastbert.kernels import _launch
    out["fastbert launch, 3 args"] = lambda: _launch.launch(_noop, (1,), small, 1024, BLOCK=1024)

    # what autograd itself costs there: a Function of one torch op each way, and an allocation
    class _Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, gt):
            return gt * 2

    leaf = torch.randn(1024, device=dev, requires_grad=True)
    out["autograd.Function fwd+bwd (one op each)"] = lambda: torch.autograd.grad(
        _Twice.apply(leaf), (leaf,), small)
    out["torch.empty (8192, 768) bf16"] = lambda: torch.empty((8192, 768), device=dev, dtype=bf)

    x = torch.randn(8192, 768, device=dev, dtype=bf, requires_grad=True)
    w = torch.ones(768, device=dev, dtype=bf, requires_grad=True)
    b = torch.zeros(768, device=dev, dtype=bf, requires_grad=True)
    r = torch.randn(8192, 768, device=dev, dtype=bf)
    g = torch.randn(8192, 768, device=dev, dtype=bf)

    _fwd_and_fwd_bwd(out, "layer_norm+res", "8192x768",
                     lambda: ops.layer_norm(x, w, b, residual=r, backend="triton"), (x, w, b), g)
    out["eager layer_norm+res fwd+bwd 8192x768"] = lambda: torch.autograd.grad(
        F.layer_norm(x + r, (768,), w, b), (x, w, b), g)

    q, k, v = (torch.randn(256, 128, 12, 64, device=dev, dtype=bf, requires_grad=True)
               for _ in range(3))
    lengths = torch.randint(32, 129, (256,), device=dev)
    mask = torch.arange(128, device=dev)[None, :] < lengths[:, None]
    do = torch.randn(256, 128, 12, 64, device=dev, dtype=bf)

    _fwd_and_fwd_bwd(out, "attention", "256x128x12x64",
                     lambda: ops.attention(q, k, v, attention_mask=mask, backend="triton"),
                     (q, k, v), do)
    # Triton's own launch path for the same call: what kernels/_launch.py saves
    out["attention fwd+bwd 256x128x12x64 (Triton's launch path)"] = with_setting(
        _launch, "ENABLED", False, out["attention fwd+bwd 256x128x12x64"])
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    smask = mask[:, None, None, :]
    out["sdpa fwd+bwd 256x128x12x64 (default backend)"] = lambda: torch.autograd.grad(
        F.scaled_dot_product_attention(qt, kt, vt, attn_mask=smask), (qt, kt, vt),
        do.transpose(1, 2))

    ids = torch.randint(0, 30522, (32, 128), device=dev)
    ww = torch.randn(30522, 768, device=dev, dtype=bf, requires_grad=True)
    pw = torch.randn(512, 768, device=dev, dtype=bf, requires_grad=True)
    tw = torch.randn(2, 768, device=dev, dtype=bf, requires_grad=True)
    eg = torch.randn(32, 128, 768, device=dev, dtype=bf)
    out["embedding_layer_norm fwd+bwd 32x128"] = lambda: torch.autograd.grad(
        ops.embedding_layer_norm(ids, ww, pw, w, b, token_type_ids=torch.zeros_like(ids),
                                 type_weight=tw, backend="triton"), (ww, pw, tw, w, b), eg)

    # BERT seq 512 attention (the GPU-bound BERT case: kernel times, not host)
    q5, k5, v5 = (torch.randn(64, 512, 12, 64, device=dev, dtype=bf, requires_grad=True)
                  for _ in range(3))
    mask5 = torch.arange(512, device=dev)[None, :] < torch.randint(128, 513, (64, 1), device=dev)
    do5 = torch.randn(64, 512, 12, 64, device=dev, dtype=bf)
    out["attention fwd+bwd 64x512x12x64"] = lambda: torch.autograd.grad(
        ops.attention(q5, k5, v5, attention_mask=mask5, backend="triton"), (q5, k5, v5), do5)

    # the LSTM time loops: "fastbert" the per-step / time-looping path (cooperative loop off),
    # "fastbert coop" the cooperative loop (COOP_TIME_LOOP, the GPU default since 2026-11-28),
    # cuDNN
    _lstm_cases(out, dev, bf)

    logits = torch.randn(4096, 30522, device=dev, dtype=bf, requires_grad=True)
    tgt = torch.randint(0, 30522, (4096,), device=dev)
    out["cross_entropy fwd+bwd 4096x30522"] = lambda: torch.autograd.grad(
        ops.cross_entropy(logits, tgt, backend="triton"), (logits,))
    out["cross_entropy(none).sum fwd+bwd 4096x30522"] = lambda: torch.autograd.grad(
        ops.cross_entropy(logits, tgt, reduction="none", backend="triton").sum(), (logits,))
    out["eager F.cross_entropy fwd+bwd 4096x30522"] = lambda: torch.autograd.grad(
        F.cross_entropy(logits, tgt), (logits,))

    # BERT-base MLM head at seq 128 (bench_cross_entropy's first case): 15% of 4096 rows
    hid = torch.randn(32, 128, 768, device=dev, dtype=bf, requires_grad=True)
    mlm_labels = torch.where(torch.rand(32, 128, device=dev) < 0.15,
                             torch.randint(0, 30522, (32, 128), device=dev), -100)
    vb = torch.zeros(30522, device=dev, dtype=bf, requires_grad=True)
    out["masked_lm_loss fwd+bwd 32x128 V=30522"] = lambda: torch.autograd.grad(
        ops.masked_lm_loss(hid, ww, vb, mlm_labels, check_labels=False, backend="triton"),
        (hid, ww, vb))

    def eager_gathered():
        flat = mlm_labels.view(-1)
        rows = (flat != -100).nonzero().squeeze(1)
        h = hid.reshape(-1, 768).index_select(0, rows)
        loss = F.cross_entropy(F.linear(h, ww, vb).float(), flat.index_select(0, rows))
        return torch.autograd.grad(loss, (hid, ww, vb))
    out["eager gathered MLM fwd+bwd 32x128 V=30522"] = eager_gathered
    return out


def _lstm_cases(out: Dict[str, Callable], dev: str, dtype: torch.dtype) -> None:
    from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

    from benchmarks._harness import with_setting
    from fastbert.kernels import _launch
    from fastbert.kernels import lstm as klstm
    from fastbert.nn import LSTM
    for batch, hidden, seq in ((64, 256, 64), (64, 512, 64), (256, 1024, 64)):
        x = torch.randn(seq, batch, hidden, device=dev, dtype=dtype, requires_grad=True)
        ours = LSTM(hidden, hidden, backend="triton").to(dev, dtype)
        ref = torch.nn.LSTM(hidden, hidden).to(dev, dtype)
        for name, model, coop in (("fastbert", ours, False), ("fastbert coop", ours, True),
                                  ("cudnn", ref, None)):
            def run(model=model, x=x):  # bound now: each case runs its own shape
                y, (h, c) = model(x)
                return torch.autograd.grad(y.float().sum() + h.float().sum(),
                                           [x] + list(model.parameters()))
            if coop is not None:
                run = with_setting(klstm, "COOP_TIME_LOOP", coop, run)
            out[f"lstm {name} fwd+bwd {batch}x{hidden}x{seq}"] = run
        if hidden == 512:   # one launch a step: what kernels/_launch.py saves there
            shape = f"{batch}x{hidden}x{seq}"
            out[f"lstm fastbert fwd+bwd {shape} (Triton's launch path)"] = with_setting(
                _launch, "ENABLED", False, out[f"lstm fastbert fwd+bwd {shape}"])
            # a PackedSequence as pack_padded_sequence leaves it (sorted_indices on the GPU),
            # built outside the call as bench_lstm's varlen case does: the LSTM's own handling
            gen = torch.Generator().manual_seed(0)
            lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=gen)
            lengths[0] = seq
            pk = pack_padded_sequence(x.detach(), lengths, enforce_sorted=False)
            leaf = pk.data.detach().requires_grad_()
            inp = PackedSequence(leaf, pk.batch_sizes, pk.sorted_indices, pk.unsorted_indices)
            for name, model in (("fastbert", ours), ("cudnn", ref)):
                def run_packed(model=model, inp=inp, leaf=leaf):
                    y, (h, c) = model(inp)
                    return torch.autograd.grad(y.data.float().sum() + h.float().sum(),
                                               [leaf] + list(model.parameters()))
                if name == "fastbert":   # as the "fastbert" rows above: the cooperative loop off
                    run_packed = with_setting(klstm, "COOP_TIME_LOOP", False, run_packed)
                out[f"lstm {name} packed fwd+bwd {shape}"] = run_packed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-cprofile", action="store_true")
    ap.add_argument("--cprofile-k", default="",
                    help="cProfile only the cases whose name contains one of these "
                         "comma-separated texts (default: every op case)")
    ap.add_argument("--timeline-k", default="",
                    help="the cases named (comma-separated, whole names) get one call's "
                         "all-threads timeline (torch.profiler, Python traced)")
    ap.add_argument("-k", dest="select", default="",
                    help="only the cases whose name contains this text")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_overhead needs a CUDA device")
        return 0
    lines = [f"host overhead on {torch.cuda.get_device_name()}, torch {torch.__version__}",
             f"{'case':<48} {'wall us':>9} {'host us':>9} {'gpu us':>9}"]
    reports = []
    for name, fn in cases().items():
        if args.select not in name:
            continue
        try:
            for _ in range(3):
                fn()  # compile, warm up
            wall = _wall_us(fn, args.iters)
            host = "syncs" if _syncs(fn) else f"{_host_us(fn, args.iters):.1f}"
            gpu, top = _gpu_us(fn)
            lines.append(f"{name:<48} {wall:9.1f} {host:>9} {gpu:9.1f}")
            print(lines[-1], flush=True)
            reports.append(f"--- {name}: kernels\n" + "\n".join(top))
            wanted = [t for t in args.cprofile_k.split(",") if t]
            if (not args.no_cprofile and not name.startswith(("torch add", "triton launch"))
                    and (not wanted or any(t in name for t in wanted))):
                reports.append(f"--- {name}: cProfile of {args.iters} calls\n"
                               + _cprofile(fn, args.iters))
            if name in [t.strip() for t in args.timeline_k.split(",")]:
                try:
                    text = _timeline(fn)
                except Exception as e:  # the case's timing line stands; say why here
                    text = f"timeline failed: {type(e).__name__}: {str(e)[:200]}"
                reports.append(f"--- {name}: timeline of one call, every thread\n" + text)
        except Exception as e:  # a diagnostic: report and go on
            lines.append(f"{name:<48} ERROR {type(e).__name__}: {str(e)[:200]}")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n\n" + "\n\n".join(reports) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
