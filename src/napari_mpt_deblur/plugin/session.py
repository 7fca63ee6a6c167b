"""What the plugin's docks share for as long as napari runs: the models offered and loaded, the StarDist
folders chosen (no Qt here).

Every dock lists the bundled models, the model files saved in this session (e.g. by the Fine-tune dock)
and any file the user picks; a model is loaded once per (path, modification time) and reused until the
file changes. Every Compare dock offers the StarDist model folders chosen in any of them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..models.files import BUNDLED_MODELS, load_model
from ..models.mpt import MPT


class Session:
    """The choices the plugin's docks share, with listeners for changes of the model choices."""

    def __init__(self) -> None:
        self._model_files: list[Path] = []
        self._stardist_folders: list[str] = []
        self._listeners: list[Callable[[], None]] = []
        self._cache: dict[tuple[str, float], MPT] = {}
        self._lock = threading.Lock()

    # --- deblurring models ------------------------------------------------------------------------------------------

    def model_choices(self) -> list[str]:
        """Model files saved or opened in this session (newest first), then the bundled model names."""
        return [str(path) for path in reversed(self._model_files)] + sorted(BUNDLED_MODELS)

    def add_model_file(self, path: str | os.PathLike) -> str:
        """Offer a model file (saved by the Fine-tune dock, or picked by the user) first; returns its choice."""
        path = Path(path).resolve()
        if path in self._model_files:
            self._model_files.remove(path)
        self._model_files.append(path)
        for listener in list(self._listeners):
            listener()
        return str(path)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` whenever the model choices change; returns a function that unsubscribes."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def load_model(self, choice: str) -> MPT:
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

    # --- StarDist models ----------------------------------------------------------------------------------------------

    def stardist_folders(self) -> list[str]:
        """StarDist model folders chosen in this session, newest first."""
        return list(reversed(self._stardist_folders))

    def add_stardist_folder(self, folder: str | os.PathLike) -> str:
        """Offer a StarDist model folder first in every Compare dock's menu from now on; returns its choice."""
        choice = str(Path(folder).expanduser().resolve())
        if choice in self._stardist_folders:
            self._stardist_folders.remove(choice)
        self._stardist_folders.append(choice)
        return choice


SESSION = Session()
"""The session every dock of this napari process shares (read it as ``session.SESSION``: tests replace it)."""
