"""etjax.pallas: kernels, each with a dense reference beside it.

rsa: Random Sparse Attention (block-sparse attention with random layouts).
"""

from etjax.pallas.rsa import (make_layout, reference_rsa, rsa_attention,
                              rsa_attention_sharded)

__all__ = ["make_layout", "reference_rsa", "rsa_attention", "rsa_attention_sharded"]
