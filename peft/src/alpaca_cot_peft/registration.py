"""The one hook into PEFT: a new member of its closed ``PeftType`` enum.

PEFT dispatches configs, tuners and state dicts on ``PeftType``; its
``register_peft_method`` accepts only names the enum already has. Python enums
cannot grow through their public API, so the member is added here, once, the way
the enum's own metaclass stores members. Everything else goes through PEFT's
public registration.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

NAME = "BOTTLENECK"


def _add_enum_member(enum_cls: type, name: str) -> PeftType:
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


BOTTLENECK: PeftType = _add_enum_member(PeftType, NAME)
