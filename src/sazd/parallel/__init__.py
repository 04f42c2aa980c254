"""Coded model parallelism for unchanged ``nn.Module``s.

```python
import sazd
from sazd.codes import get_code
from sazd.runtime.inproc import InProcessCluster

code = get_code("sazd", n=6, k=4)
model = sazd.parallel.parallelize(model, code, InProcessCluster(6), scheme="deu")
```
"""

from sazd.parallel.layers import SCHEMES, CodedContext, CodedConv2d, CodedLayer, CodedLinear, PhaseStats
from sazd.parallel.plan import (
    DEFAULT_MIN_FEATURES,
    coded_layers,
    context,
    decoded_copies,
    load_plain_weights,
    parallelize,
    plain_model,
    plain_state_dict,
    plain_weights,
    predicted_traffic,
    repair,
    resolve_plan,
)

__all__ = [
    "DEFAULT_MIN_FEATURES",
    "SCHEMES",
    "CodedContext",
    "CodedConv2d",
    "CodedLayer",
    "CodedLinear",
    "PhaseStats",
    "coded_layers",
    "context",
    "decoded_copies",
    "load_plain_weights",
    "parallelize",
    "plain_model",
    "plain_state_dict",
    "plain_weights",
    "predicted_traffic",
    "repair",
    "resolve_plan",
]
