"""Our MAC count against XLA's flop count of the same forward (tests/test_quant.py, tests/test_unet2d.py)."""

import jax
import numpy as np

MATMUL_SCALES = (0.0, 0.5, 1.5, 2.0)  # attention matmul MACs dropped, one of qk/av lost, one counted twice, doubled


def mac_ratios(apply, shapes, inputs, sites) -> dict[float, float]:
    """{scale: 2 x MACs / XLA flops} of one compiled forward, with the attention matmul sites' MACs multiplied by
    `scale` (1.0: as counted; the others: what a miscount of the matmuls would give)."""
    cost = jax.jit(apply).lower(shapes, *inputs).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    macs = sites.macs.astype(np.float64)
    matmul = np.asarray([s.kind == "matmul" for s in sites.sites])
    return {scale: float(2 * (macs[~matmul].sum() + scale * macs[matmul].sum()) / cost["flops"])
            for scale in (1.0, *MATMUL_SCALES)}
