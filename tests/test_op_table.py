"""The C++ op table (runtime_ops/include/normact_op_table.h) is the one the catalogue generates.

runtime_ops/tools/gen_op_table.py writes the header from the catalogue; these tests need no compiler and no
kernel library (tests/test_kernels.py::test_library_op_table_matches_catalogue checks a built library).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from normact_onnx.catalogue import CATALOGUE, gated

ROOT = Path(__file__).resolve().parents[1]
ACTIVATIONS = ROOT / "runtime_ops" / "include" / "normact_activations.h"


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_op_table", ROOT / "runtime_ops" / "tools" / "gen_op_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def test_generated_op_table_is_current():
    stale = "normact_op_table.h disagrees with the catalogue: run python runtime_ops/tools/gen_op_table.py"
    assert gen.HEADER.read_text() == gen.render(), stale
    assert gen.main(["--check"]) == 0


def _replace(entry: str, **changes):
    return dataclasses.replace(CATALOGUE[entry], **changes)


@pytest.mark.parametrize(
    "change",
    ["default", "attribute name", "kind", "op name", "new entry", "shared constant"],
)
def test_check_fails_when_the_catalogue_changes(change, monkeypatch, capsys):
    """Each way the catalogue and the header can disagree makes --check fail and say what to run."""
    if change == "default":
        monkeypatch.setitem(CATALOGUE, "elu", _replace("elu", params={"alpha": 2.0}))
    elif change == "attribute name":
        monkeypatch.setitem(CATALOGUE, "hard_sigmoid", _replace("hard_sigmoid", params={"alpha": 0.2, "offset": 0.5}))
    elif change == "kind":
        renamed = _replace("mish", kind="mish_renamed")
        monkeypatch.delitem(CATALOGUE, "mish")
        monkeypatch.setitem(CATALOGUE, "mish_renamed", renamed)
    elif change == "op name":
        monkeypatch.setitem(CATALOGUE, "tanh", _replace("tanh", op_name="NormTanhRenamed"))
    elif change == "new entry":
        monkeypatch.setitem(CATALOGUE, "log_sigmoid", _replace("sigmoid", kind="log_sigmoid", op_name="NormLogSigmoid"))
    else:
        monkeypatch.setattr(gated, "GELU_CUBIC", 0.0447)
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "normact_op_table.h disagrees with the catalogue" in err
    assert "python runtime_ops/tools/gen_op_table.py" in err


def test_entry_the_kernels_cannot_hold_is_refused(monkeypatch, capsys):
    monkeypatch.setitem(CATALOGUE, "selu", _replace("selu", params={"alpha": 1.0, "gamma": 1.0, "beta": 0.0}))
    assert gen.main(["--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gen_op_table: catalogue entry selu: 3 parameters; the kernels have two slots"


def test_defaults_are_float32_literals_that_read_back_exactly():
    assert gen.c_float(gated.SQRT_2_OVER_PI) == "0.7978846f"
    assert gen.c_float(1.0) == "1.0f"
    assert gen.c_float(-3.4028234663852886e38) == "-3.4028235e+38f"
    with pytest.raises(ValueError, match="not a finite float32"):
        gen.c_float(1e39)


def test_every_functor_of_the_table_is_defined():
    """A catalogue entry needs its functor in normact_activations.h (the build would fail without it)."""
    text = ACTIVATIONS.read_text()
    body = text[text.index("namespace act {") : text.index("}  // namespace act")]
    defined = set(re.findall(r"^struct (\w+) \{", body, re.M)) | set(re.findall(r"^using (\w+) = \w+;", body, re.M))
    functors = {row[1] for row in gen.op_rows()}
    assert functors <= defined, f"no functor in normact_activations.h for {sorted(functors - defined)}"
