"""The one hook into PEFT: a new member of its closed ``PeftType`` enum.

PEFT dispatches configs, tuners and state dicts on ``PeftType``; its
``register_peft_method`` accepts only names the enum already has. Python enums
cannot grow through their public API, so the member is added here, once, the way
the enum's own metaclass stores members. That relies on the enum's shape (a ``str``
enum whose values are its names, kept in ``_member_map_``, ``_value2member_map_``
and ``_member_names_``): it is checked before, and the result after, so a peft or
Python that stores members differently fails at import with one clear line
instead of half-registering the method. Everything else goes through PEFT's
public registration.
"""

from __future__ import annotations

import enum
from typing import Any

from peft.utils.peft_types import PeftType

from .compat import TESTED_PEFT_VERSIONS, IncompatiblePeftError, installed_peft_version

NAME = "BOTTLENECK"
_STORES = {"_member_map_": dict, "_value2member_map_": dict, "_member_names_": list}


def _shape_error(enum_cls: type, name: str, problem: str) -> IncompatiblePeftError:
    return IncompatiblePeftError(
        f"alpaca_cot_peft cannot add {enum_cls.__name__}.{name} to peft {installed_peft_version()}: {problem}; "
        f"use a peft it was tested with ({TESTED_PEFT_VERSIONS}): pip install 'peft>=0.18.0,<=0.21.2'")


def _check_shape(enum_cls: type, name: str) -> None:
    """The enum is shaped as this module extends it, or an ``IncompatiblePeftError`` says how it is not."""
    if not (isinstance(enum_cls, enum.EnumMeta) and issubclass(enum_cls, str)):
        raise _shape_error(enum_cls, name, "it is no longer a str Enum")
    renamed = [member.name for member in enum_cls if member.value != member.name]
    if renamed:
        raise _shape_error(enum_cls, name, f"its values are no longer its names ({renamed[0]})")
    for store, kind in _STORES.items():
        if not isinstance(enum_cls.__dict__.get(store), kind):
            raise _shape_error(enum_cls, name, f"it keeps no {store} {kind.__name__} (Python's enum changed)")


def _check_added(enum_cls: type, name: str, member: Any) -> None:
    """Every way peft looks a type up finds the new member."""
    found = (enum_cls[name] is member and enum_cls(name) is member and member in list(enum_cls)
             and isinstance(member, enum_cls) and member == name and member.value == name)
    if not found:
        raise _shape_error(enum_cls, name, "the added member is not found by name, by value and in iteration")


def add_enum_member(enum_cls: type, name: str) -> Any:
    """Add ``name`` (value ``name``) to a str enum, or return the member already there."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    _check_shape(enum_cls, name)
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    _check_added(enum_cls, name, member)
    return member


def register_method(name: str, config_cls: type, model_cls: type) -> None:
    """``register_peft_method`` for ``name``; registering the same classes again (a reload) is fine.

    Another method already registered under the name (peft gained its own) is an error: configs would
    silently be built by the other method's classes.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    def same(registered: Any, ours: type) -> bool:  # a reloaded module defines new but equal classes
        return registered is not None and (registered.__module__, registered.__qualname__) == \
            (ours.__module__, ours.__qualname__)

    peft_type = getattr(PeftType, name.upper())
    registered = (PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type), PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type))
    if registered == (None, None):
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    elif not (same(registered[0], config_cls) and same(registered[1], model_cls)):
        other = registered[1] or registered[0]
        raise _shape_error(PeftType, name.upper(), f"peft already has a method '{name}' "
                                                   f"({other.__module__}.{other.__qualname__})")


BOTTLENECK: PeftType = add_enum_member(PeftType, NAME)
