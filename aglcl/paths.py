"""Where the configs live: the top-level ``conf/`` of a source checkout, else the copy in the wheel."""

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """Absolute config directory (Hydra rewrites relative paths into ``pkg://`` ones that break)."""
    for candidate in (_PKG.parent / "conf", _PKG / "_conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"aglcl configs not found next to {_PKG}; reinstall aglcl")
