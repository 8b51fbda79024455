"""Small shared helpers: the logger and the hermetic (offline) environment for Ultralytics."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERMETIC_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false"}


def make_hermetic(config_dir: str | Path | None = None) -> Path:
    """Configure Ultralytics to make no network connection; call before ``import ultralytics``.

    Ultralytics probes DNS at import, checks PyPI for updates, sends analytics, and downloads ``Arial.ttf`` whenever
    it checks a dataset. Offline mode plus a local font in its settings dir stops all of that.

    Args:
        config_dir: Ultralytics config dir to use (``YOLO_CONFIG_DIR``, e.g. a private one for tests); None keeps the
            user's own, so ``yolo settings`` (runs_dir, datasets_dir) applies and nothing is left in the temp dir.

    Returns:
        The Ultralytics settings dir in use (where settings.json and the font live).
    """
    for k, v in HERMETIC_ENV.items():
        os.environ.setdefault(k, v)
    if config_dir is not None:
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
        os.environ.setdefault("MPLCONFIGDIR", str(Path(config_dir) / "matplotlib"))
    settings_dir = ultralytics_settings_dir()
    font = settings_dir / "Arial.ttf"
    if not font.exists():  # what Ultralytics would download there; matplotlib (its dependency) ships DejaVuSans.ttf
        import matplotlib

        try:
            font.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf", font)
        except OSError:  # an unwritable settings dir: Ultralytics falls back to a temp dir of its own
            pass
    return settings_dir


def ultralytics_settings_dir() -> Path:
    """The folder Ultralytics keeps settings.json in, found without importing it (as ``get_user_config_dir``)."""
    if env := os.environ.get("YOLO_CONFIG_DIR"):
        return Path(env).expanduser() / "Ultralytics"
    if sys.platform.startswith("win"):
        return Path.home() / "AppData" / "Roaming" / "Ultralytics"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "Ultralytics"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "Ultralytics"


def __getattr__(name):
    if name == "LOGGER":  # lazy, so make_hermetic() can run before Ultralytics is imported
        from ultralytics.utils import LOGGER

        return LOGGER
    raise AttributeError(name)
