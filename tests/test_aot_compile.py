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
    """The modules of kernels/ that define Triton kernels (not the launch helper)."""
    kdir = os.path.join(ROOT, "kernels")
    return sorted(f[:-3] for f in os.listdir(kdir) if f.endswith(".py") and f != "__init__.py"
                  and "@triton.jit" in open(os.path.join(kdir, f)).read())


# modules whose configs take minutes to compile, split in this many shards so that
# pytest-xdist's workers share them (lstm: ~270 configs x 2 archs, ~4.5 min on one core)
SHARDS = {"lstm": 3}


def _module_shards():
    return [(m, k, SHARDS.get(m, 1)) for m in _kernel_modules() for k in range(SHARDS.get(m, 1))]


@pytest.mark.aot
@pytest.mark.parametrize("module,shard,n_shards", _module_shards())
def test_every_kernel_config_compiles_for_sm80_and_sm90(module, shard, n_shards):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-m", "tests.aot_compile", module,
                          "--shard", f"{shard}/{n_shards}"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1800)
    tail = "\n".join(out.stdout.splitlines()[-15:]) + out.stderr[-3000:]
    assert out.returncode == 0, tail
    m = re.match(r"(\d+)/(\d+) configs compiled", out.stdout.splitlines()[-1])
    assert m and int(m.group(2)) > 0 and m.group(1) == m.group(2), tail


def _run_probe(source: str) -> subprocess.CompletedProcess:
    """Run a compile probe in a fresh interpreter without TRITON_INTERPRET (which replaces
    triton.jit); it must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", source], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


_PIPELINE_PROBE = """
import fastbert
from fastbert.kernels import attention as a
from tests.aot_compile import aligned_attrs
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cfg = next(c for c in a.aot_configs() if c.kernel is a._attention_fwd_kernel
           and c.signature["q_ptr"] == "*bf16" and c.num_stages > 1)
for aligned in (False, True):
    src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs,
                    attrs=aligned_attrs(cfg) if aligned else None)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    print(aligned, c.asm["ttgir"].count("async_copy_global_to_local"))
"""


@pytest.mark.aot
def test_aot_compile_specializes_like_the_jit_for_aligned_tensors():
    # The JIT marks 16-byte-aligned pointers and ints divisible by 16; only with
    # those marks does Triton vectorize loads and software-pipeline the K/V loads of the
    # attention loop (cp.async over num_stages). Compiled without them, as the AOT check once
    # did, a kernel's registers and shared memory are not those of the GPU run.
    out = _run_probe(_PIPELINE_PROBE)
    copies = dict(line.split() for line in out.stdout.splitlines())
    assert int(copies["False"]) == 0 and int(copies["True"]) > 0, out.stdout


_LSTM_PIPELINE_PROBE = """
import fastbert
from fastbert.kernels import lstm as k
from tests.aot_compile import aligned_attrs
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
cfg = next(c for c in k.aot_configs() if c.name == "lstm_fwd[bf16,32x64x32,proj=False]")
src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs,
                attrs=aligned_attrs(cfg))
c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
print(c.asm["ttgir"].count("async_copy_global_to_local"))
"""


@pytest.mark.aot
def test_aot_compile_marks_sizes_like_the_jit_so_bf16_step_kernels_pipeline():
    # The LSTM step's W_hh and h loads are masked by offs_k < n_state along their contiguous
    # dimension: in bf16 they become cp.async (and the K loop software-pipelined) only when
    # n_state is known divisible by 16, as the JIT marks hidden sizes like 512 at run time.
    out = _run_probe(_LSTM_PIPELINE_PROBE)
    assert int(out.stdout.split()[-1]) > 0, out.stdout


_LSTM_RESIDENT_PROBE = """
import re
import fastbert
from fastbert.kernels import lstm as k
from tests.aot_compile import aligned_attrs
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for cfg in k.aot_configs():
    # (a W tile of the batch block's shape, BLOCK_K == BLOCK_B, is not told apart by its type)
    if not cfg.constexprs.get("RESIDENT") or cfg.constexprs["BLOCK_K"] == cfg.constexprs["BLOCK_B"]:
        continue
    src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs,
                    attrs=aligned_attrs(cfg))
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    ttgir = c.asm["ttgir"]
    loop = re.search(r"scf.for %(s|i) = %step_begin", ttgir).start()
    elem = {"*bf16": "bf16", "*fp16": "f16", "*fp32": "f32"}[cfg.signature["w_hh_ptr"]]
    w = "tensor<%dx%dx!tt.ptr<%s>" % (cfg.constexprs["BLOCK_K"], cfg.constexprs["BLOCK_H"], elem)
    loads = lambda text: sum(1 for line in text.splitlines() if "tt.load" in line and w in line)
    print(cfg.name, loads(ttgir[:loop]), loads(ttgir[loop:]))
"""


@pytest.mark.aot
def test_lstm_resident_coop_kernels_load_w_hh_once_before_the_time_loop():
    # COOP_RESIDENT_W's point: the W_hh slice (BLOCK_K x BLOCK_H tiles, BLOCK_K the whole
    # reduction) is loaded before the time loop (4 gate tiles forward, 1 backward) and never
    # inside it (the streaming kernels load K-step tiles every step)
    out = _run_probe(_LSTM_RESIDENT_PROBE)
    rows = [line.rsplit(" ", 2) for line in out.stdout.splitlines()]
    assert len(rows) >= 4, out.stdout
    for name, before, inside in rows:
        assert (int(before), int(inside)) == ((4, 0) if "fwd" in name else (1, 0)), name


_CE_PIPELINE_PROBE = """
import re
import fastbert
from fastbert.kernels import cross_entropy as k
from tests.aot_compile import aligned_attrs
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for cfg in k.aot_configs():
    if not cfg.constexprs.get("ROW_STAGES") or cfg.constexprs["BLOCK_V"] < 8192:
        continue
    src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs,
                    attrs=aligned_attrs(cfg))
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    ttgir = c.asm["ttgir"]
    # the most cp.async groups a wait leaves in flight (0: it waits for all of them; a row's
    # load is several groups: 3 in bf16, 4 in fp32)
    waits = [int(n) for n in re.findall(r"ttg.async_wait[^\\n]*?\\{num = (\\d+)", ttgir)]
    print(cfg.constexprs["BLOCK_V"], cfg.constexprs["ROW_STAGES"],
          ttgir.count("async_copy_global_to_local"), c.metadata.shared, max(waits or [0]))
"""


@pytest.mark.aot
def test_cross_entropy_pipelined_row_loop_loads_the_next_row_asynchronously():
    # STORE_GRAD_PIPELINED_WARPS_PER_SM's point: the one-block row loop is software-pipelined,
    # each row's load a cp.async into shared memory (one row buffer with 2 stages, two with
    # 3), and with 3 stages a wait leaves a row's load in flight while the row before is
    # computed (with 2 the next load is issued after the stores and waited for at once).
    # Triton pipelines no loop that holds a tl.debug_barrier: the one the forward needs for its
    # in-place gradient of rows wider than a block must stay out of ONE_BLOCK.
    out = _run_probe(_CE_PIPELINE_PROBE)
    rows = [tuple(int(v) for v in line.split()) for line in out.stdout.splitlines()]
    assert len(rows) >= 4, out.stdout
    for _, stages, copies, _, in_flight in rows:
        assert copies > 0, out.stdout
        assert in_flight > 0 or stages < 3, out.stdout
    # the widest block (32768: BERT's 30522 classes): stages - 1 row buffers of 64 KB in bf16
    widest = [r[1:4] for r in rows if r[0] == 32768]
    assert {s for s, _, _ in widest} == {2, 3}, out.stdout
    assert all(shared >= (stages - 1) * 64 * 1024 for stages, _, shared in widest), out.stdout
