"""The ``fastbert`` command line.

    fastbert demo      correctness self-check of every op + a small op benchmark
    fastbert env       what this machine can run (python -m fastbert.env, run in the Triton
                       interpreter on a machine without a GPU, as the self-check runs)
    fastbert selfcheck the correctness self-check alone

On a CPU device every command restarts its process once with TRITON_INTERPRET=1 (``os.execv``):
call ``main()`` from a subprocess, not from a notebook or test process that must live on.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional


def _device_arg(value: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N."""
    v = value.strip().lower()
    if v in ("cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {value!r}")


def _prepare_interpreter(argv, device: Optional[str]) -> None:
    """On CPU the Triton kernels can still be checked, in the interpreter on CPU tensors
    (``TRITON_INTERPRET=1``). That must be set before triton is imported, and importing this
    module has already imported fastbert (and triton): so start again, once, with it set.
    Not when the user set TRITON_INTERPRET (their choice), nor without Triton (the self-check
    then says why it cannot run)."""
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    from fastbert.ops._dispatch import triton_import_error
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if not on_cpu or triton_import_error() is not None:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "fastbert.cli", *argv])


def _device(args):
    """The torch.device of --device (default: cuda if torch sees one), or None after printing
    why it cannot be used."""
    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"fastbert: --device {device}, but torch sees no CUDA device here "
                  f"(torch {torch.__version__}, CUDA {torch.version.cuda}); use --device cpu",
                  file=sys.stderr)
            return None
        if device.index is not None and device.index >= torch.cuda.device_count():
            print(f"fastbert: --device {device}, but torch sees {torch.cuda.device_count()} "
                  "CUDA device(s)", file=sys.stderr)
            return None
    return device


def cmd_selfcheck(args) -> int:
    import torch

    from fastbert import selfcheck
    from fastbert.ops._dispatch import (interpreter_enabled, interpreter_version_error,
                                        triton_import_error)
    device = _device(args)
    if device is None:
        return 2
    why = triton_import_error()
    if why is None and device.type != "cuda":
        why = interpreter_version_error()
    if why is not None:
        # macOS / Windows: pyproject installs Triton on Linux only; fastbert.ops then runs its
        # PyTorch reference paths, which is all there is to use here
        print(f"== correctness self-check: skipped: the fused kernels cannot run here, {why}. "
              "fastbert.ops runs its PyTorch reference paths on this machine.")
        return 0
    if device.type == "cuda":
        where = "compiled Triton kernels on " + torch.cuda.get_device_name(device)
    elif interpreter_enabled():
        where = "Triton kernels in the CPU interpreter"
    else:
        print(f"== correctness self-check: not run: on CPU the Triton kernels run only in the "
              f"interpreter, which TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} "
              "turns off; unset it (fastbert then sets it) or set it to 1")
        return 1
    print(f"== correctness self-check: {where}, against fp64 PyTorch references\n")
    results = selfcheck.run(device)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} ops agree with their fp64 references")
    return 1 if bad else 0


def cmd_bench(args) -> int:
    device = _device(args)
    if device is None:
        return 2
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
    p = argparse.ArgumentParser(prog="fastbert", description="fused GPU kernels for BERT training")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (("demo", cmd_demo, "self-check every op, then a small benchmark"),
                            ("selfcheck", cmd_selfcheck, "check every op against fp64 references"),
                            ("env", cmd_env, "versions, device and usable backends")):
        sp = sub.add_parser(name, help=help_)
        if name != "env":
            sp.add_argument("--device", type=_device_arg, default=None,
                            help="cpu, cuda or cuda:N (default: cuda if torch sees one)")
        sp.set_defaults(fn=fn)
    args = p.parse_args(argv)   # --help and bad arguments exit here, before any restart
    _prepare_interpreter(argv, getattr(args, "device", None))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
