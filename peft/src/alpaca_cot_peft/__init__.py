"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) as a PEFT method.

Importing this package registers ``PeftType.BOTTLENECK`` with PEFT, after which
``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` handle
``BottleneckConfig`` like any built-in method. It needs peft>=0.18 (``compat``):
an older peft, or a ``PeftType`` of another shape, stops the import with one line
saying what to install.
"""

from .compat import MIN_PEFT_VERSION, IncompatiblePeftError, check_peft_version

check_peft_version()  # before anything of peft is imported: an old peft fails with one line, not a traceback

from .config import BottleneckConfig  # noqa: E402
from .layer import BottleneckLayer  # noqa: E402
from .model import BottleneckModel  # noqa: E402
from .registration import BOTTLENECK, register_method  # noqa: E402
from .tables import DEFAULT_TARGETS, INIT_SCHEMES, NON_LINEARITIES, PLACEMENTS, Placement, placement_of  # noqa: E402

__all__ = ["BOTTLENECK", "DEFAULT_TARGETS", "INIT_SCHEMES", "MIN_PEFT_VERSION", "NON_LINEARITIES", "PLACEMENTS",
           "BottleneckConfig", "BottleneckLayer", "BottleneckModel", "IncompatiblePeftError", "Placement",
           "placement_of"]
__version__ = "0.1.0"

register_method("bottleneck", BottleneckConfig, BottleneckModel)
