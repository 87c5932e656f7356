"""Keeping TensorFlow's native log lines off the user's terminal.

TensorFlow 2.20+ logs through absl straight to file descriptor 2 and ignores
``TF_CPP_MIN_LOG_LEVEL`` (tensorflow/tensorflow#100442). The real entry point routes fd 2
through a pipe that drops absl INFO/WARNING/ERROR lines and passes everything else on, while
Python's own ``sys.stderr`` (progress bars, messages) keeps writing to the terminal directly.
"""
from __future__ import annotations

import atexit
import os
import re
import sys
import threading

# absl's log lines; LiteRT's delegate banner; the int8 converter's settings line.
_NATIVE = re.compile(rb"^([IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\]|"
                     rb"WARNING: All log messages before absl::InitializeLog|"
                     rb"INFO: Created TensorFlow Lite XNNPACK delegate|"
                     rb"fully_quantize: \d+, inference_type: )")


def filter_native_logs() -> None:
    """Install the filter once, for this process (not for tests that call the CLI in-process)."""
    try:
        real = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except OSError:
        return
    sys.stderr.flush()
    sys.stderr = open(real, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                      errors="backslashreplace", closefd=False)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as src:
            for line in src:
                if not _NATIVE.match(line):
                    os.write(real, line)

    thread = threading.Thread(target=pump, name="native-log-filter", daemon=True)
    thread.start()

    def drain() -> None:
        try:
            os.dup2(real, 2)  # closes the pipe's write end, so the pump sees EOF
        except OSError:
            return
        thread.join(timeout=1.0)

    atexit.register(drain)
