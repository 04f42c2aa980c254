"""Coded model parallelism for unchanged ``nn.Module``s.

```python
import torch
import sazd
from sazd.codes import get_code
from sazd.runtime.inproc import InProcessCluster

code = get_code("sazd", n=6, k=4)
model = sazd.parallelize(model, code, InProcessCluster(6))    # scheme: DEU (default) or Naive
optimizer = sazd.coded_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
```
"""

from sazd.parallel.coded import CodedLayer, CodedParameter, coded_matmul, coded_parameters
from sazd.parallel.context import CodedContext, PhaseStats, RoundRecord
from sazd.parallel.optimizer import clip_grad_norm_, coded_optimizer, grad_norm
from sazd.parallel.plan import (
    DEFAULT_MIN_FEATURES,
    Coded,
    Master,
    by_weight_name,
    check_blocks,
    check_weights,
    coded_layers,
    context,
    layer_traffic,
    load_weights,
    parallelize,
    plain_model,
    plain_state_dict,
    plain_weights,
    plan_layers,
    plan_weights,
    predicted_traffic,
    read_matrices,
    repair,
    resolve_plan,
)
from sazd.parallel.schemes import DEFAULT_SCHEME, DEU, SCHEMES, Naive, Scheme, get_scheme

__all__ = [
    "DEFAULT_MIN_FEATURES",
    "DEFAULT_SCHEME",
    "DEU",
    "SCHEMES",
    "Coded",
    "CodedContext",
    "CodedLayer",
    "CodedParameter",
    "Master",
    "Naive",
    "PhaseStats",
    "RoundRecord",
    "Scheme",
    "by_weight_name",
    "check_blocks",
    "check_weights",
    "clip_grad_norm_",
    "coded_layers",
    "coded_matmul",
    "coded_optimizer",
    "coded_parameters",
    "context",
    "get_scheme",
    "grad_norm",
    "layer_traffic",
    "load_weights",
    "parallelize",
    "plain_model",
    "plain_state_dict",
    "plain_weights",
    "plan_layers",
    "plan_weights",
    "predicted_traffic",
    "read_matrices",
    "repair",
    "resolve_plan",
]
