"""main.py with a short single-flight lease, for the test that kills a winner (test_state_e2e).

    functions-framework --source=tests/short_lease_main.py --target=generate_image

The lease is a constant (30 s in production, longer than nothing a test should wait for);
this entry point lowers it to TEST_SINGLE_FLIGHT_LEASE_SECONDS before the function is built, so
the production settings carry no knob that only a test needs.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import imagegen.service  # noqa: E402

imagegen.service.SINGLE_FLIGHT_LEASE_SECONDS = float(os.environ["TEST_SINGLE_FLIGHT_LEASE_SECONDS"])

from main import generate_image  # noqa: E402, F401
