"""What importing costs and what it still does: `import autoexperts` loads neither torch nor scikit-learn, yet `"auto"`
is registered whatever is imported first; the command's help and argument errors load no torch; scikit-learn (and
joblib) load only when a cost model is fitted or loaded. Each check runs in a fresh interpreter, since this one has
imported everything already."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autoexperts.layer import LayerSpec
from autoexperts.profile import save_profile
from tests.conftest import (
    CROSSOVER_CURVES,
    HEAVY_MODULES,
    TINY_CONFIGS,
    cli_in_fresh_python,
    run_in_fresh_python,
    synthetic_profile,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = LayerSpec("TinyExperts", 8, 64, 32, 2, True, False, False, False, "float32", "cpu")
HEAVY = HEAVY_MODULES
_python = run_in_fresh_python


def test_import_loads_no_torch_and_every_public_name_resolves():
    code = f"""
import json, sys
import autoexperts
heavy = sorted(name for name in {HEAVY!r} if name in sys.modules)
missing = [name for name in autoexperts.__all__ if getattr(autoexperts, name, None) is None]
unlisted = sorted(set(autoexperts.__all__) - set(dir(autoexperts)))
print(json.dumps({{"heavy": heavy, "missing": missing, "unlisted": unlisted}}))
"""
    result = _python(code)
    assert result == {"heavy": [], "missing": [], "unlisted": []}


@pytest.mark.parametrize(
    "first",
    [
        "import autoexperts",  # the package alone: registered when Transformers imports its registries
        # the registries already imported: registered at once
        "import transformers.integrations.moe, transformers.integrations.finegrained_fp8",
        "import autoexperts.dispatch",  # the per-call path before the registry: registered when it is imported
        "import autoexperts.layer",  # a module dispatch imports, before dispatch
        "import autoexperts.calibration.run",  # a module that reaches the registry through Transformers' models
    ],
)
def test_auto_is_registered_whatever_is_imported_first(first):
    code = f"""
import json
{first}
import autoexperts
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.for_model("qwen3_moe", **{TINY_CONFIGS["qwen3_moe"]!r})
model = AutoModelForCausalLM.from_config(config, experts_implementation="auto")  # raises unless registered
from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
print(json.dumps({{
    "model": model.config._experts_implementation,
    "experts": ALL_EXPERTS_FUNCTIONS.get("auto") is autoexperts.auto_experts_forward,
    "fp8": "auto" in ALL_FP8_EXPERTS_FUNCTIONS,
}}))
"""
    assert _python(code) == {"model": "auto", "experts": True, "fp8": True}


def _module_level_imports(path: Path, package: str) -> set[str]:
    """The absolute names a module imports when it is imported (not inside functions or `if TYPE_CHECKING:`)."""
    names = set()
    pending = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import submodule`
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            pending.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            pending.extend(node.body + node.orelse + node.finalbody)
    return names


def test_dispatch_imports_no_module_that_imports_transformers_registries():
    """The rule `autoexperts._registration` relies on: the modules `autoexperts.dispatch` imports may import
    Transformers' package (lazy), but not its experts registry or its models, which would run the registration hook
    while they are half-imported."""
    files = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in (ROOT / "autoexperts").rglob("*.py")
    }
    seen, todo, offenders = set(), ["autoexperts.dispatch"], {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        package = name if files[name].name == "__init__.py" else name.rpartition(".")[0]
        imports = _module_level_imports(files[name], package)
        todo.extend(imported for imported in imports if imported in files)
        from_transformers = sorted(n for n in imports if n.startswith("transformers.") or n == "transformers")
        if name != "autoexperts.dispatch" and set(from_transformers) - {"transformers"}:
            offenders[name] = from_transformers
    assert "autoexperts.layer" in seen and "autoexperts.profile" in seen  # the walk follows relative imports
    assert offenders == {}


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (["--help"], 0),  # the command's help
        (["calibrate", "--help"], 0),  # a command's help
        (["bench", "--help"], 0),  # the bench help, whose choices once came from the benchmark's torch modules
        (["calibrate", "--tokens", "x"], 2),  # a malformed option value
        (["nosuch"], 2),  # an unknown command
    ],
)
def test_help_and_argument_errors_load_no_torch(args, status):
    result = cli_in_fresh_python(args)
    assert result["status"] == status and result["heavy"] == []
    assert "usage: autoexperts" in result["out"] if status == 0 else "error:" in result["err"]


def test_python_m_autoexperts_help_imports_no_torch():
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "autoexperts", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0 and "usage: autoexperts" in result.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")
    }
    assert "autoexperts.cli" in imported  # the import log is there to read
    assert not {"torch", "transformers"} & imported


def test_scikit_learn_loads_only_with_a_cost_model(tmp_path):
    json_path = save_profile(synthetic_profile(SPEC, CROSSOVER_CURVES), tmp_path)
    code = f"""
import json, sys
import autoexperts, autoexperts.dispatch  # what an experts call runs
before = sorted(name for name in ("sklearn", "joblib") if name in sys.modules)
from autoexperts.cost_model import CostModel
from autoexperts.profile import load_profile
loaded = load_profile({str(json_path)!r}, trusted=True)
refit = CostModel.fit(loaded.measurements)
print(json.dumps({{
    "before": before,
    "source": loaded.model_source,
    "loaded": loaded.cost_model.latency_ms("grouped_mm", [3, 50]).tolist(),
    "refit": refit.latency_ms("grouped_mm", [3, 50]).tolist(),
}}))
"""
    result = _python(code)
    assert result["before"] == []
    assert result["source"] == "joblib"  # unpickled, not refit after a failed load
    expected = synthetic_profile(SPEC, CROSSOVER_CURVES).cost_model.latency_ms("grouped_mm", [3, 50])
    np.testing.assert_allclose(result["loaded"], expected)
    np.testing.assert_allclose(result["refit"], expected)
