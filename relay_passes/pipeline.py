"""The graph-level phases of tvmq's compilation, as lists of passes (TVM's pipeline style).

``tvmq.compile`` assembles them with the schedule phase of ``schedules/`` into the one
pipeline handed to ``relax.build``.
"""
from __future__ import annotations

import tvm
from tvm import relax

from relay_passes.fuse_epilogues import FuseConvEpilogues
from relay_passes.lower_composites import LowerTvmqComposites
from relay_passes.verify_integer import VerifyIntegerOnly


def lowering_passes(target: tvm.target.Target, plan: dict | None = None) -> list:
    """Phase 1: quantized composites -> integer kernels, then prove integer-only.

    Runs before FoldConstant/LegalizeOps/FuseOps: those would fold integer weights back to
    float or drop the composite attributes.
    """
    return [LowerTvmqComposites(target, plan), relax.transform.DeadCodeElimination(["main"]),
            VerifyIntegerOnly()]


def legalize_passes(target: tvm.target.Target) -> list:
    """Phase 2: each conv takes its residual add into its epilogue; remaining Relax ops
    (reshapes) to TIR, constant folding, operator fusion."""
    return [FuseConvEpilogues(), relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(),
            relax.transform.FuseTIR(), relax.transform.DeadCodeElimination(["main"])]
