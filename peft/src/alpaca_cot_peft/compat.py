"""Which peft this extension works with, checked at import before anything of peft is touched.

peft 0.18 turned ``BaseTuner`` into a class a tuner configures with ``tuner_layer_cls`` and
``target_module_mapping``; before it, every tuner had to implement ``_check_target_module_exists``,
``_mark_only_adapters_as_trainable``, ``enable_adapter_layers`` and ``disable_adapter_layers`` itself,
and ``BottleneckModel`` does not. (peft 0.17 also cannot be imported next to transformers 5.)
Tested with peft 0.18.0 to 0.21.2.
"""

from __future__ import annotations

MIN_PEFT_VERSION = "0.18.0"
TESTED_PEFT_VERSIONS = "0.18.0 to 0.21.2"


class IncompatiblePeftError(ImportError):
    """The installed peft cannot host the bottleneck method; the message says which peft to install."""


def installed_peft_version() -> str | None:
    """The installed peft's version from its package metadata (peft itself is not imported), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:
        return None


def check_peft_version(installed: str | None = None) -> str:
    """Return the installed peft's version; raise ``IncompatiblePeftError`` (one line) when it is too old.

    ``installed``: the version to judge (default: the installed one).
    """
    from packaging.version import Version

    installed = installed or installed_peft_version()
    pip = f"pip install -U 'peft>={MIN_PEFT_VERSION}'"
    if installed is None:
        raise IncompatiblePeftError(f"alpaca_cot_peft needs peft>={MIN_PEFT_VERSION}, which is not installed: {pip}")
    if Version(installed) < Version(MIN_PEFT_VERSION):
        raise IncompatiblePeftError(
            f"alpaca_cot_peft needs peft>={MIN_PEFT_VERSION} (the BaseTuner API with tuner_layer_cls), "
            f"but peft {installed} is installed: {pip}")
    return installed
