"""Graph-level (Relax) passes: tvmq composites -> integer kernels, integer-only verifier."""
from relay_passes.lower_composites import (LOWERINGS, LowerTvmqComposites, LoweringError,
                                           alternatives, composite_calls)
from relay_passes import lower_ternary  # noqa: F401  registers the ternary lowerings
from relay_passes import lower_pt2e  # noqa: F401  registers the affine (PT2E) lowerings
from relay_passes.pipeline import legalize_passes, lowering_passes
from relay_passes.verify_integer import FloatOpError, VerifyIntegerOnly, verify_integer_only
