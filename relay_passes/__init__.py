"""Graph-level (Relax) passes: tvmq composites -> integer kernels, integer-only verifier."""
from relay_passes.lower_composites import (LOWERINGS, LowerTvmqComposites, LoweringError,
                                           alternatives, composite_calls)
from relay_passes import lower_mxqn, lower_pot, lower_pt2e, lower_ternary  # noqa: F401  register their lowerings
from relay_passes.pipeline import legalize_passes, lowering_passes
from relay_passes.verify_integer import (FloatOpError, VerifyIntegerKernels, VerifyIntegerOnly,
                                         verify_integer_kernels, verify_integer_only)
