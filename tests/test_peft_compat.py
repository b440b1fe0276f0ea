"""alpaca_cot_peft's peft requirements: the minimum version, checked at import, and the PeftType extension's
checks of the enum's shape (each fails with one line naming what to install instead of misbehaving)."""

from __future__ import annotations

import enum
import subprocess
import sys

import pytest

import alpaca_cot_peft
from alpaca_cot_peft.compat import MIN_PEFT_VERSION, IncompatiblePeftError, check_peft_version
from alpaca_cot_peft.registration import add_enum_member, register_method
from tests.conftest import ROOT


def test_the_declared_minimum_is_the_checked_one():
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    assert any(line.startswith(f"peft>={MIN_PEFT_VERSION.removesuffix('.0')}") for line in requirements)
    assert f'"peft>={MIN_PEFT_VERSION.removesuffix(".0")}"' in (ROOT / "peft" / "pyproject.toml").read_text()
    assert check_peft_version("0.21.2") == "0.21.2" and check_peft_version() is not None  # the installed one passes


@pytest.mark.parametrize("installed", ["0.17.1", "0.15.0", "0.18.0rc1"])
def test_an_older_peft_gets_one_line_naming_both_versions_and_the_command(installed):
    with pytest.raises(IncompatiblePeftError) as refused:
        check_peft_version(installed)
    message = str(refused.value)
    assert "\n" not in message
    assert f"peft {installed} is installed" in message and f"peft>={MIN_PEFT_VERSION}" in message
    assert f"pip install -U 'peft>={MIN_PEFT_VERSION}'" in message
    assert isinstance(refused.value, ImportError)


def test_importing_with_an_old_peft_installed_stops_before_peft_is_imported(tmp_path):
    """A real interpreter whose first peft on the path is version 0.17.1 (its package metadata, as pip leaves it)."""
    dist = tmp_path / "peft-0.17.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: peft\nVersion: 0.17.1\n")
    script = "import sys, alpaca_cot_peft; print('imported', 'peft' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("alpaca_cot_peft.compat.IncompatiblePeftError: alpaca_cot_peft needs peft>=0.18.0")
    assert "peft 0.17.1 is installed: pip install -U 'peft>=0.18.0'" in last


def test_the_real_peft_type_gains_bottleneck():
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    member = alpaca_cot_peft.BOTTLENECK
    assert PeftType("BOTTLENECK") is member and PeftType["BOTTLENECK"] is member and member in list(PeftType)
    assert add_enum_member(PeftType, "BOTTLENECK") is member  # idempotent (a reload)
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is alpaca_cot_peft.BottleneckModel
    register_method("bottleneck", alpaca_cot_peft.BottleneckConfig, alpaca_cot_peft.BottleneckModel)  # again: fine


class NotStr(enum.Enum):
    LORA = "LORA"


class LowerCase(str, enum.Enum):
    LORA = "lora"


def _storeless() -> type:
    class Storeless(str, enum.Enum):
        LORA = "LORA"

    del Storeless._value2member_map_  # how a Python that keeps members elsewhere would look
    return Storeless


@pytest.mark.parametrize("enum_cls,problem", [
    (NotStr, "it is no longer a str Enum"),
    (LowerCase, "its values are no longer its names (LORA)"),
    (_storeless(), "it keeps no _value2member_map_ dict"),
])
def test_an_enum_of_another_shape_fails_loudly(enum_cls, problem):
    with pytest.raises(IncompatiblePeftError) as refused:
        add_enum_member(enum_cls, "BOTTLENECK")
    message = str(refused.value)
    assert problem in message and "\n" not in message
    assert "pip install 'peft>=0.18.0,<=0.21.2'" in message
    assert "BOTTLENECK" not in enum_cls.__members__  # nothing half-added


def test_another_method_already_called_bottleneck_is_refused():
    from peft import LoraConfig, LoraModel

    with pytest.raises(IncompatiblePeftError, match="peft already has a method 'bottleneck' "
                                                   r"\(alpaca_cot_peft.model.BottleneckModel\)"):
        register_method("bottleneck", LoraConfig, LoraModel)
