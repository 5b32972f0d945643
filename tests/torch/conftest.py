"""tests/torch: one intra-op thread (the tensors here are tiny, and the test machine's cores are shared)."""
import torch

torch.set_num_threads(1)
