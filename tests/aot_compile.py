"""Ahead-of-time compile every Triton kernel config we ship, for real GPU targets, on a CPU.

    python -m tests.aot_compile [MODULE ...] [--arch 80 90] [--regs]

Each module in ``kernels/`` lists, in ``aot_configs()``, every block-size / warps / flag
configuration its launchers can pick; this compiles each to PTX and a cubin for sm_80 and
sm_90 (no GPU needed), checks the shared memory against the architecture's limit, and with
``--regs`` runs ``ptxas -v`` to report registers and spills. Exit status 1 if any failed.

Each config is compiled as the JIT compiles an aligned launch (pointers and size / stride
integers divisible by 16, ``aligned_attrs``): only then are loads vectorized and loops
software-pipelined, so only then are the shared memory and registers those of the GPU run.
``--unaligned`` compiles the fallback variant instead.

Must run without ``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit``); the test
``tests/test_aot_compile.py`` runs it in a subprocess for that reason.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

# Opt-in shared memory per block (bytes): sm_80 (A100) 163 KB, sm_90 (H100) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def kernel_modules():
    import fastbert.kernels as pkg
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


# What the JIT assumes of an argument it finds divisible by 16 at launch (a pointer's address,
# an integer's value): every fresh torch allocation, and row strides of BERT's hidden sizes.
DIVISIBILITY = 16


def aligned_attrs(cfg) -> dict:
    """An aligned launch as the JIT specializes it: tt.divisibility=16 on every pointer and
    every integer argument (not on ``do_not_specialize`` ones).

    Without it a kernel compiles as if nothing were aligned: no vectorized loads, no
    cp.async software pipelining (``num_stages`` ignored), so neither its registers nor its
    shared memory are those of the kernel that runs on the GPU for aligned tensors. The JIT
    marks whatever is divisible at run time: strides, and sizes such as a hidden size, a
    sequence length or a row count. Sizes matter too: a bf16 load masked along its contiguous
    dimension by ``offs < n`` is vectorized (and software-pipelined) only when n is known to
    be a multiple of 16, as 256 / 512 / 768 / 1024 are at run time (the LSTM step kernels
    compile without cp.async when only pointers and strides are marked). So this is the
    launch of typical training shapes, every size a multiple of 16: the most vectorized and
    pipelined variant, the one that needs the most shared memory. A stride or size that is
    not (BERT's vocabulary, 30522) gets a less specialized variant on the GPU; --unaligned
    compiles the least specialized one."""
    fixed = {p.name for p in cfg.kernel.params if p.do_not_specialize}
    names = cfg.kernel.arg_names
    attrs = {}
    for name, ty in cfg.signature.items():
        if name in fixed or ty == "constexpr":
            continue
        if ty.startswith("*") or ty in ("i32", "i64"):
            attrs[(names.index(name),)] = [["tt.divisibility", DIVISIBILITY]]
    return attrs


def compile_config(cfg, arch: int, regs: bool, aligned: bool = True):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {"num_warps": cfg.num_warps}
    if cfg.num_stages is not None:
        options["num_stages"] = cfg.num_stages
    src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs,
                    attrs=aligned_attrs(cfg) if aligned else None)
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    shared = int(c.metadata.shared)
    info = {"shared": shared}
    if shared > SHARED_LIMIT[arch]:
        raise RuntimeError(f"uses {shared} B of shared memory, over sm_{arch}'s {SHARED_LIMIT[arch]}")
    if regs:
        info.update(_ptxas_usage(c.asm["ptx"], arch))
    return info


def _ptxas_usage(ptx: str, arch: int):
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        tool = get_ptxas(arch)  # triton >= 3.4
    except TypeError:
        tool = get_ptxas()
    ptxas = getattr(tool, "path", tool)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
        path = f.name
    try:
        out = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a" if arch == 90 else f"-arch=sm_{arch}",
                              path, "-o", os.devnull], capture_output=True, text=True)
        text = out.stderr + out.stdout
    finally:
        os.unlink(path)
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"regs": int(regs.group(1)) if regs else None, "spill": int(spill.group(1)) if spill else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("modules", nargs="*", help="kernel modules (default: all in kernels/)")
    p.add_argument("--arch", nargs="+", type=int, default=[80, 90])
    p.add_argument("--regs", action="store_true", help="also report registers and spills")
    p.add_argument("--unaligned", action="store_true",
                   help="compile without the JIT's alignment specialization (the variant an "
                        "odd pointer or stride gets)")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="compile only the configs whose index modulo N is K (0 <= K < N): the "
                        "test suite splits the largest module across its workers")
    args = p.parse_args(argv)
    try:
        shard, n_shards = (int(v) for v in args.shard.split("/"))
        assert 0 <= shard < n_shards
    except (ValueError, AssertionError):
        p.error(f"--shard must be K/N with 0 <= K < N, got {args.shard!r}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces triton.jit", file=sys.stderr)
        return 2
    modules = args.modules or kernel_modules()
    failures = 0
    total = 0
    t0 = time.time()
    for name in modules:
        mod = importlib.import_module(f"fastbert.kernels.{name}")
        if not hasattr(mod, "aot_configs"):
            print(f"{name}: no aot_configs()", file=sys.stderr)
            failures += 1
            continue
        for i, cfg in enumerate(mod.aot_configs()):
            if i % n_shards != shard:
                continue
            for arch in args.arch:
                total += 1
                try:
                    info = compile_config(cfg, arch, args.regs, not args.unaligned)
                    print(f"ok   sm_{arch} {cfg.name or cfg.kernel.__name__} warps={cfg.num_warps} "
                          + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)
                except Exception as e:
                    failures += 1
                    msg = str(e).strip().splitlines()
                    print(f"FAIL sm_{arch} {cfg.name or cfg.kernel.__name__}: {type(e).__name__}: "
                          f"{msg[-1] if msg else ''}", flush=True)
    print(f"{total - failures}/{total} configs compiled in {time.time() - t0:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
