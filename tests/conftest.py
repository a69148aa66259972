import os
import sys

import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # `import checks`

settings.register_profile(
    "polymodal",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "10")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=os.environ.get("CI") == "true",
    print_blob=True,
)
settings.load_profile("polymodal")
torch.set_num_threads(1)

