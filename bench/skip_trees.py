"""Probe trees that leave one epilogue's work out, for bench/ab_probe.py: what an epilogue costs where it is exposed.

    python3 bench/skip_trees.py [NAME ...]      writes bench/.trees/NAME/src from this checkout's src

Each tree is this checkout's ``src`` with one textual change to the expert GEMMs' kernels (Triton and Gluon alike);
its outputs are wrong on purpose, so time it with ``ab_probe.py --probe-options=--allow-wrong``. The difference
between a tree and ``src`` at one point, timed in turn on one GPU, is what that piece of the epilogue adds to the
kernel there, i.e. the most that hiding it under the MMAs (warps of its own, as ``async_combine`` does for GEMM 2's
combine) could gain:

- ``noact1``: GEMM 1 stores the rounded gate accumulator instead of act(gate) * up (the activation's math left out).
- ``noepi1``: GEMM 1's epilogue (bias, activation, the store of the intermediate) behind a runtime condition that is
  never true (the wgmma results are still waited for); in the Triton GEMM 1, the activation left out and the store's
  mask false at run time (an if there breaks Triton's loop flattening), its bias loads kept.
- ``noepi2``: GEMM 2's atomic adds / per-slot stores into the output behind such a condition (the tile's weighting,
  layout change and, under ``async_combine``, the hand-off through shared memory stay); in the Triton GEMM 2 their
  mask false at run time.
- ``gather2``: not a piece left out: the Gluon GEMM 1's gathering producer in 2 warps instead of 4 (what async_act1's
  producer had; its outputs are right), to learn whether the gather's copies bound the gathering entries.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "tilemoe/ops/_kernels"
TRITON = f"{KERNELS}/_fused_experts.py"
GLUON = f"{KERNELS}/_gluon_experts.py"

_GLUON_ACT = (
    "    result = _activate(acc_g.to(dtype).to(gl.float32), ACTIVATION, swiglu_alpha, swiglu_limit)\n"
    "    if GATED:\n"
    "        result = result * _up_factor(acc_u.to(dtype).to(gl.float32), ACTIVATION, swiglu_limit)\n"
)
_TRITON_ACT = (
    "    result = _activate(g, ACTIVATION, swiglu_alpha, swiglu_limit)\n"
    "    if GATED:\n"
    "        u = acc_u.to(dtype).to(tl.float32)\n"
    "        result = result * _up_factor(u, ACTIVATION, swiglu_limit)\n"
)
_GLUON_EPI1 = "        _gemm1_epilogue(gate, up, pid_m, pid_n,"
_TRITON_NOACT = (TRITON, _TRITON_ACT, "    result = g\n")  # the Triton GEMM 1 stores the rounded gate
_TRITON_STORE1 = "    tl.store(out_ptrs, result.to(dtype), mask=col_mask[None, :])\n"
_GLUON_COMBINE = (
    "    if ATOMIC:\n"
    '        gl.atomic_add(out_ptrs, values, mask=mask, sem="relaxed")\n'
    "    else:\n"
    "        gl.store(out_ptrs, values, mask=mask)\n"
)
_TRITON_COMBINE_ATOMIC = '        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed")\n'
_TRITON_COMBINE_STORE = "        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)\n"


def _indent(text: str, spaces: int = 4) -> str:
    return "".join(" " * spaces + line if line.strip() else line for line in text.splitlines(keepends=True))


# name -> [(file, old, new)]: every old text must occur exactly once
EDITS: dict[str, list[tuple[str, str, str]]] = {
    "noact1": [
        (GLUON, _GLUON_ACT, "    result = acc_g.to(dtype).to(gl.float32)\n"),
        _TRITON_NOACT,
    ],
    "noepi1": [
        # (the call's continuation lines sit inside its parentheses: their indentation does not matter)
        (GLUON, _GLUON_EPI1, "        if num_slots < 0:\n    " + _GLUON_EPI1),
        # Triton's loop flattening (the persistent GEMM 1, Triton 3.6) fails on an if around the store ("scf.if op
        # region control flow edge ..."): the store's mask is false at run time instead, and the activation goes
        # as in noact1 (the compiler cannot drop math whose store it cannot prove dead)
        _TRITON_NOACT,
        (TRITON, _TRITON_STORE1, _TRITON_STORE1.replace("col_mask[None, :]", "col_mask[None, :] & (inter < 0)")),
    ],
    "gather2": [(GLUON, "GATHER_WARPS = gl.constexpr(4)", "GATHER_WARPS = gl.constexpr(2)")],
    "noepi2": [
        (GLUON, _GLUON_COMBINE, "    if num_slots < 0:\n" + _indent(_GLUON_COMBINE)),
        # (the Triton GEMM 2: the mask false at run time, as in noepi1; an if breaks the nested loops' fusion)
        (TRITON, _TRITON_COMBINE_ATOMIC, _TRITON_COMBINE_ATOMIC.replace("mask=mask", "mask=mask & (top_k < 0)")),
        (TRITON, _TRITON_COMBINE_STORE, _TRITON_COMBINE_STORE.replace("mask=mask", "mask=mask & (top_k < 0)")),
    ],
}


def edited(text: str, old: str, new: str, where: str) -> str:
    if text.count(old) != 1:
        raise SystemExit(f"skip_trees: {where}: expected the text once, found it {text.count(old)} times:\n{old}")
    return text.replace(old, new)


def write_tree(name: str, trees: Path = ROOT / "bench" / ".trees") -> Path:
    src = trees / name / "src"
    shutil.rmtree(trees / name, ignore_errors=True)
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    for file, old, new in EDITS[name]:
        path = src / file
        path.write_text(edited(path.read_text(), old, new, f"{name}: {file}"))
    return src


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"of {list(EDITS)} (default: all)")
    args = parser.parse_args(argv)
    if unknown := [name for name in args.names if name not in EDITS]:
        parser.error(f"unknown tree {unknown}: expected names of {list(EDITS)}")
    args.names = args.names or list(EDITS)
    for name in args.names:
        print(f"{write_tree(name)}: {len(EDITS[name])} edits")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
