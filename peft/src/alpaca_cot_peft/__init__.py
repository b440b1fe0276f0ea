"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) as a PEFT method.

Importing this package registers ``PeftType.BOTTLENECK`` with PEFT, after which
``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` handle
``BottleneckConfig`` like any built-in method.
"""

from peft.utils import register_peft_method

from .config import BottleneckConfig
from .layer import BottleneckLayer
from .model import DEFAULT_TARGETS, BottleneckModel
from .registration import BOTTLENECK

__all__ = ["BOTTLENECK", "DEFAULT_TARGETS", "BottleneckConfig", "BottleneckLayer", "BottleneckModel"]
__version__ = "0.1.0"

try:
    register_peft_method(name="bottleneck", config_cls=BottleneckConfig, model_cls=BottleneckModel,
                         prefix=BottleneckModel.prefix)
except KeyError:  # registered already (the module was reloaded)
    pass
