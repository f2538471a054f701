"""Ahead-of-time compile every Triton kernel config we ship, for real GPU targets, on a CPU.

    python -m tests.aot_compile [MODULE ...] [--arch 80 90] [--regs]

Each module in ``kernels/`` lists, in ``aot_configs()``, every block-size / warps / flag
configuration its launchers can pick; this compiles each to PTX and a cubin for sm_80 and
sm_90 (no GPU needed), checks the shared memory against the architecture's limit, and with
``--regs`` runs ``ptxas -v`` to report registers and spills. Exit status 1 if any failed.

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


def compile_config(cfg, arch: int, regs: bool):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {"num_warps": cfg.num_warps}
    if cfg.num_stages is not None:
        options["num_stages"] = cfg.num_stages
    src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs)
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
    args = p.parse_args(argv)
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
        for cfg in mod.aot_configs():
            for arch in args.arch:
                total += 1
                try:
                    info = compile_config(cfg, arch, args.regs)
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
