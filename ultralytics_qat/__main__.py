"""``python -m ultralytics_qat`` runs the ``yolo-qat`` command."""

import sys

from .cli import main

sys.exit(main())
