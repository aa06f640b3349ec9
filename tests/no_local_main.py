"""main.py as on a machine without requirements-local.txt, for tests of a server with nothing
configured (test_browser).

    functions-framework --source=tests/no_local_main.py --target=generate_image

With torch and diffusers installed (CI installs them), no key makes the local model the
default; this entry point reports them missing before the settings are read, as they are on
a Cloud Functions deployment, without uninstalling anything.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import imagegen.backends.registry  # noqa: E402

imagegen.backends.registry.local_model_installed = lambda: False

from main import generate_image  # noqa: E402, F401
