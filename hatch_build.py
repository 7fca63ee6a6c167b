"""Hatch build hook: put the npe2 manifest inside the package, from its one copy at the repository root.

npe2 looks for ``napari.yaml`` in the package folder (the ``napari.manifest``
entry point ``napari_mpt_deblur:napari.yaml``). The manifest itself lives at
the repository root, so nothing in the repository links or duplicates it (a
symlink becomes a text file holding a path on Windows checkouts):

- a wheel gets the root file at ``napari_mpt_deblur/napari.yaml``;
- an editable install imports the package from ``src/``, so the root file is
  copied to ``src/napari_mpt_deblur/napari.yaml`` (ignored by git). Reinstall
  (``pip install -e .``) after editing the manifest; a test says so if the two
  differ.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

MANIFEST = "napari.yaml"
"""The manifest, relative to the repository root."""

PACKAGED = "napari_mpt_deblur/napari.yaml"
"""Where npe2 finds it, relative to the package's parent folder (``src/`` or a wheel's root)."""


class ManifestBuildHook(BuildHookInterface):
    """Ships the root ``napari.yaml`` inside ``napari_mpt_deblur`` in wheels and editable installs."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        source = Path(self.root) / MANIFEST
        if version != "editable":
            build_data["force_include"][str(source)] = PACKAGED
            return
        copy = Path(self.root) / "src" / PACKAGED
        if copy.is_symlink() or not copy.is_file() or copy.read_bytes() != source.read_bytes():
            copy.unlink(missing_ok=True)  # a symlink from an older checkout: replace it, never write through it
            shutil.copyfile(source, copy)
