import torch

# The test problems are tiny: one thread is fastest and immune to oversubscription when other
# processes share the two cores.
torch.set_num_threads(1)
