"""7. ``retrainer --help`` wall time (best of 7), next to a bare ``python -c pass``.

``--help`` must never import TensorFlow: subcommands are imported only when named.
"""
from __future__ import annotations

import sys

from common import emit, parser, retrainer_cmd, run


def best(cmd: list[str], n: int = 7) -> float:
    return min(run(cmd)[0] for _ in range(n))


def main() -> None:
    parser(__doc__).parse_args()
    help_s = best([*retrainer_cmd(), "--help"])
    python_s = best([sys.executable, "-c", "pass"])
    tf_s = min(run([sys.executable, "-c", "import tensorflow"])[0] for _ in range(2))
    emit({"benchmark": "startup", "results": {"help_s": round(help_s, 3),
                                              "python_s": round(python_s, 3),
                                              "import_tensorflow_s": round(tf_s, 2)}})


if __name__ == "__main__":
    main()
