"""The ``fastbert`` command line.

    fastbert demo      correctness self-check of every op + a small op benchmark
    fastbert env       what this machine can run (same as python -m fastbert.env)
    fastbert selfcheck the correctness self-check alone
"""
from __future__ import annotations

import argparse
import os
import sys


def _has_cuda_device() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def _prepare_interpreter(argv) -> None:
    """Without a GPU the Triton kernels can still be checked, in the interpreter on CPU
    tensors. That must be decided before triton is imported, and importing this module has
    already imported fastbert (and triton): so start again, once, with TRITON_INTERPRET=1."""
    if _has_cuda_device() or "TRITON_INTERPRET" in os.environ:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "fastbert.cli", *argv])


def cmd_selfcheck(args) -> int:
    import torch

    from fastbert import selfcheck
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    where = "compiled Triton kernels on " + torch.cuda.get_device_name(device) if device.type == "cuda" \
        else "Triton kernels in the CPU interpreter (no GPU here)"
    print(f"== correctness self-check: {where}, against fp64 PyTorch references\n")
    results = selfcheck.run(device)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} ops agree with their fp64 references")
    return 1 if bad else 0


def cmd_bench(args) -> int:
    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        from benchmarks import run_all
    except ImportError:
        # an installed fastbert (a wheel) carries no benchmarks/: nothing failed
        print("\n== op benchmark: skipped (benchmarks/ ships with the source checkout, not with "
              "the installed package; run `make demo` or `python -m benchmarks.run_all` there)")
        return 0
    print("\n== op benchmark " + ("(quick)" if device.type == "cuda" else
                                 "(CPU: torch reference paths only, tiny shapes; GPU numbers come "
                                 "from `make gpu-check`)"))
    return run_all.main(["--quick", "--no-write", "--device", str(device)])


def cmd_demo(args) -> int:
    rc = cmd_selfcheck(args)
    rc |= cmd_bench(args)
    return rc


def cmd_env(args) -> int:
    from fastbert.env import main
    main()
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _prepare_interpreter(argv)
    p = argparse.ArgumentParser(prog="fastbert", description="fused GPU kernels for BERT training")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (("demo", cmd_demo, "self-check every op, then a small benchmark"),
                            ("selfcheck", cmd_selfcheck, "check every op against fp64 references"),
                            ("env", cmd_env, "versions, device and usable backends")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
        sp.set_defaults(fn=fn)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
