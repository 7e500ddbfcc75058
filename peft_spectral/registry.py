"""The one place that touches PEFT internals.

PEFT (0.21) keeps its method names in `peft.utils.PeftType`, a closed `str` enum, and
`peft.utils.register_peft_method` refuses names that are not members of it. A plugin therefore has to add
members to the enum before it registers. Everything that depends on that private detail lives here, so that a PEFT
upgrade that changes it breaks one function (and `tests/test_registry.py`) instead of the whole package.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


#: The PEFT types this package adds, in the order they are registered.
PEFT_TYPE_NAMES: tuple[str, ...] = ("SVF", "SPECTRAL_COMPRESS", "CORE_ISOLATION")


def add_peft_type(name: str) -> PeftType:
    """Add `name` as a member of `peft.utils.PeftType` (idempotent) and return the member.

    Args:
        name (`str`): Upper-case member name, e.g. `"SVF"`. The value equals the name, as for PEFT's own members.

    Returns:
        `PeftType`: the (new or existing) enum member.
    """
    if not name.isupper():
        raise ValueError(f"PEFT type names are upper case, got {name!r}.")
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    if hasattr(PeftType, "_add_member_"):  # Python >= 3.13 has a supported hook
        PeftType._add_member_(name, member)
    else:
        PeftType._member_map_[name] = member
        PeftType._member_names_.append(name)
        type.__setattr__(PeftType, name, member)
    PeftType._value2member_map_[name] = member
    return member


def register_method(name: str, config_cls: type, model_cls: type, prefix: str) -> None:
    """Register a tuner with PEFT under `name` (lower case). Registering the same classes twice is a no-op.

    Args:
        name (`str`): Lower-case method name, e.g. `"svf"`.
        config_cls (`type`): The `PeftConfig` subclass.
        model_cls (`type`): The `BaseTuner` subclass.
        prefix (`str`): The state-dict prefix of the method's parameters, e.g. `"svf_"`.
    """
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = add_peft_type(name.upper())
    if (
        PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) is config_cls
        and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls
    ):
        return
    register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)


for _name in PEFT_TYPE_NAMES:
    add_peft_type(_name)

__all__ = ["PEFT_TYPE_NAMES", "add_peft_type", "register_method"]
