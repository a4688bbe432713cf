"""One torch thread: these tests run tiny tensors on a shared 2-core machine, where OpenMP
threads waiting on each other at every op cost far more than they save."""

import torch

torch.set_num_threads(1)
