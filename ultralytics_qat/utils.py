"""Small shared helpers: the logger and the hermetic (offline) environment for Ultralytics."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

HERMETIC_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}


def make_hermetic(config_dir: str | Path | None = None) -> Path:
    """Configure Ultralytics to make no network connection; call before ``import ultralytics``.

    Ultralytics probes DNS at import, checks PyPI for updates, sends analytics, and downloads ``Arial.ttf`` whenever
    it checks a dataset. Offline mode plus a local font in a private config dir stops all of that.

    Args:
        config_dir: Ultralytics config dir to use; a fresh temporary one if None and none is set.

    Returns:
        The config dir in use.
    """
    for k, v in HERMETIC_ENV.items():
        os.environ.setdefault(k, v)
    if config_dir is None:
        config_dir = os.environ.get("YOLO_CONFIG_DIR") or tempfile.mkdtemp(prefix="ultralytics_qat_cfg_")
    config_dir = Path(config_dir)
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ.setdefault("MPLCONFIGDIR", str(config_dir / "matplotlib"))
    font = config_dir / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        import matplotlib  # an Ultralytics dependency that ships DejaVuSans.ttf

        font.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    return config_dir


def __getattr__(name):
    if name == "LOGGER":  # lazy, so make_hermetic() can run before Ultralytics is imported
        from ultralytics.utils import LOGGER

        return LOGGER
    raise AttributeError(name)
