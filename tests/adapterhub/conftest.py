"""AdapterHub reference tests: they need `adapters` (which pins transformers ~=4.57.6), so they run in the
second environment made by .ci/floor. Elsewhere each module is reported as skipped; where .ci/floor sets
PEFT_LAB_REQUIRE_ADAPTERHUB=1 a missing `adapters` fails the run instead of skipping it."""
import importlib.util
import os

if os.environ.get("PEFT_LAB_REQUIRE_ADAPTERHUB") == "1" and importlib.util.find_spec("adapters") is None:
    raise ImportError("PEFT_LAB_REQUIRE_ADAPTERHUB=1 but AdapterHub `adapters` is not installed in this "
                      "environment; run the AdapterHub tests through .ci/floor")
