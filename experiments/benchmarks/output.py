"""What every benchmark does at its end: print its figures, keep them in a file if asked, and leave.

The figures are printed as indented JSON (what the README quotes) and written atomically to
``--json`` when given. Leaving goes through ``os._exit`` once stdout is flushed: MindSpore's
``Cell.__del__`` prints noise during a normal interpreter teardown.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union


def emit(figures: dict[str, Any], json_path: Optional[Union[str, Path]] = None) -> None:
    """Print ``figures`` as indented JSON and, with ``json_path``, write them there too."""
    print(json.dumps(figures, indent=2))
    if json_path:
        from cytocore.atomic import write_json

        write_json(json_path, figures)


def run_main(main: Callable[[], int]) -> None:
    """Run a benchmark's ``main`` and exit with its status, skipping the interpreter's teardown."""
    code = main()
    sys.stdout.flush()
    os._exit(code)
