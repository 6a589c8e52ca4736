"""The machine is shared and the models are tiny: one thread for torch keeps the tests fast and quiet."""

import torch

torch.set_num_threads(1)
