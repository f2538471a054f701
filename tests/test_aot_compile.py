"""Every Triton kernel config we ship compiles for sm_80 and sm_90 (no GPU needed).

Runs ``python -m tests.aot_compile <module>`` in a subprocess per kernel module, because the
interpreter (TRITON_INTERPRET=1, set for the other tests) replaces ``triton.jit``.
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kernel_modules():
    kdir = os.path.join(ROOT, "kernels")
    return sorted(f[:-3] for f in os.listdir(kdir) if f.endswith(".py") and f != "__init__.py")


@pytest.mark.aot
@pytest.mark.parametrize("module", _kernel_modules())
def test_every_kernel_config_compiles_for_sm80_and_sm90(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "tests.aot_compile", module], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    tail = "\n".join(out.stdout.splitlines()[-15:]) + out.stderr[-3000:]
    assert out.returncode == 0, tail
    m = re.match(r"(\d+)/(\d+) configs compiled", out.stdout.splitlines()[-1])
    assert m and int(m.group(2)) > 0 and m.group(1) == m.group(2), tail
