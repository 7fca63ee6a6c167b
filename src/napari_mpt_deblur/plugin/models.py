"""Which models the widgets offer, and loading them once (no Qt here).

The Deblur widget lists the bundled models, the model files saved in this
session (e.g. by the Fine-tune dock) and any file the user picks. A model is
loaded once per (path, modification time) and reused until the file changes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..models.files import BUNDLED_MODELS, load_model
from ..models.mpt import MPT


class ModelRegistry:
    """Model choices shared by the plugin's widgets, with listeners for changes."""

    def __init__(self) -> None:
        self._session_files: list[Path] = []
        self._listeners: list[Callable[[], None]] = []
        self._cache: dict[tuple[str, float], MPT] = {}
        self._lock = threading.Lock()

    def choices(self) -> list[str]:
        """Files saved or opened in this session (newest first), then the bundled model names."""
        return [str(path) for path in reversed(self._session_files)] + sorted(BUNDLED_MODELS)

    def add_file(self, path: str | os.PathLike) -> str:
        """Remember a model file (saved by the Fine-tune dock, or picked by the user); returns its choice."""
        path = Path(path).resolve()
        if path in self._session_files:
            self._session_files.remove(path)
        self._session_files.append(path)
        for listener in list(self._listeners):
            listener()
        return str(path)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` whenever the choices change; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def load(self, choice: str) -> MPT:
        """The model for a choice (bundled name, model file or reference checkpoint), loaded once.

        Raises
        ------
        ModelFileError
            For a missing, corrupt or foreign file, with a message for the user.
        """
        if choice in BUNDLED_MODELS:
            key = (choice, 0.0)
        else:
            path = Path(choice)
            key = (str(path.resolve()), path.stat().st_mtime if path.exists() else -1.0)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = load_model(choice)
            return self._cache[key]


REGISTRY = ModelRegistry()
"""The registry every widget of this napari session shares."""
