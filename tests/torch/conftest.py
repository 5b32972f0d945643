"""tests/torch: one intra-op thread (the tensors here are tiny, and the test machine's cores are shared).

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on before anything
imports triton: ``torch.testing._internal`` (the peer suite, collected before ``test_triton_bn.py``) does."""
import os

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
