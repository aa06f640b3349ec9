"""main.py with a small cap on a streamed answer, for the tests of the 10 MB rule
(test_openai_partials): images of a few kilobytes cross it as megabytes would.

    functions-framework --source=tests/small_stream_main.py --target=generate_image

The cap is Cloud Run's, a constant; this entry point lowers it to TEST_MAX_STREAM_BYTES before
the function is built, so the production settings carry no knob that only a test needs.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import imagegen.streaming  # noqa: E402

imagegen.streaming.MAX_STREAM_BYTES = int(os.environ["TEST_MAX_STREAM_BYTES"])

from main import generate_image  # noqa: E402, F401
