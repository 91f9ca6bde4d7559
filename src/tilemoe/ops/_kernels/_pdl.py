"""Programmatic dependent launch (PDL, Hopper and later): the kernels of one layer overlap their launches.

A kernel launched with ``launch_pdl=True`` may become resident while the kernel before it in the stream still
runs. ``_pdl_prologue`` is the first thing every such kernel does: wait until the previous grid has finished and
its writes are visible (griddepcontrol.wait), then let the next kernel start launching (launch_dependents).
Waiting before any global load or store keeps the stream order of every read and write exactly as without PDL;
what overlaps is the next grid's launch, block scheduling and prologue with this grid's tail. With PDL off the
prologue is empty (and it is always off in the interpreter).
"""

import triton
import triton.language as tl

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - PDL is then never enabled (tilemoe.ops._launch.pdl_enabled)
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def _pdl_prologue(PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
