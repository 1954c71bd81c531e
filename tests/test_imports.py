"""What importing costs: scikit-learn (and joblib) load only when a cost model is fitted or loaded. Each check runs
in a fresh interpreter, since this one has imported everything already."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from autoexperts.layer import LayerSpec
from autoexperts.profile import save_profile
from tests.conftest import CROSSOVER_CURVES, synthetic_profile

ROOT = Path(__file__).resolve().parents[1]
SPEC = LayerSpec("TinyExperts", 8, 64, 32, 2, True, False, False, False, "float32", "cpu")


def _python(code: str) -> dict:
    """Runs `code` in a fresh interpreter of this checkout and returns the JSON it printed last."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


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
