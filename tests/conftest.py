"""Tests run tiny models, whose small ops are fastest on one thread (and do not fight over the 2 cores of CI)."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses (CLI runs, torchrun) inherit it
torch.set_num_threads(1)
