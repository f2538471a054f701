"""``python -m fastbert.env``: what this machine can run.

Prints the device, driver, torch / triton / CUDA versions, and for each backend whether it is
usable here and, if not, why.
"""
from __future__ import annotations

import platform
import subprocess
import sys


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "-"
    except Exception:
        return "- (nvidia-smi not found)"


def report() -> str:
    import torch

    from fastbert import __version__
    from fastbert.ops._dispatch import backend_report, interpreter_enabled

    lines = [f"fastbert        {__version__}",
             f"python          {platform.python_version()} ({sys.executable})",
             f"torch           {torch.__version__} (built for CUDA {torch.version.cuda or '-'})"]
    try:
        import triton
        lines.append(f"triton          {triton.__version__}"
                     + (" (interpreter: TRITON_INTERPRET=1)" if interpreter_enabled() else ""))
    except Exception as e:
        lines.append(f"triton          not importable ({type(e).__name__}: {e})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"device cuda:{i}   {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                         f"{p.total_memory / 2**30:.0f} GiB")
        lines.append(f"driver          {_driver()}")
    else:
        lines.append("device          cpu (no CUDA device visible to torch)")
    lines.append("backends:")
    for name, why in backend_report().items():
        lines.append(f"  {name:<7} {'usable' if why is None else 'not usable: ' + why}")
    if not torch.cuda.is_available() and not interpreter_enabled():
        lines.append("  (`fastbert env`, `demo` and `selfcheck` set TRITON_INTERPRET=1 themselves on "
                     "a machine without a GPU, so there triton reports usable, in the interpreter)")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
