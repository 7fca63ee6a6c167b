"""StarDist in its own process.

TensorFlow must not live in napari's process: imported after an OpenGL context
exists it segfaults on software-rendered machines, and on a GPU it would take
the memory torch needs. :class:`StarDistWorker` starts a new Python process
(``python -m napari_mpt_deblur.detection.worker``) that imports StarDist, keeps loaded models between calls, and answers
requests over a pipe. A crash there (a segfault, the process killed) becomes a
:class:`WorkerCrashed` error here, and the next call starts a new process.

This module imports only numpy and the standard library at the top: it is the child's main module.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Client, Listener
from pathlib import Path
from typing import Any

import numpy as np

PRETRAINED_CLASS = "StarDist2D"
_ADDRESS_ENV, _AUTHKEY_ENV, _GPU_ENV = "MPT_DEBLUR_WORKER_ADDRESS", "MPT_DEBLUR_WORKER_KEY", "MPT_DEBLUR_WORKER_GPU"
START_TIMEOUT_S = 600.0
"""A first call imports TensorFlow and may download a model: allow for a slow disk and network."""
CONNECT_TIMEOUT_S = 60.0
"""How long a new process may take to start Python and connect back."""
POLL_S = 0.1
"""How often a waiting call checks that the worker lives and that nobody asked to stop."""


class DetectionError(RuntimeError):
    """StarDist could not run as asked; the message says why and what to do."""


class WorkerCrashed(DetectionError):
    """The StarDist process died (a crash in TensorFlow, or it was killed); the next call starts a new one."""


class DetectionCancelled(Exception):
    """A detection was stopped on request (the worker process was stopped with it)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the main process needs to know about a loaded StarDist model."""

    name: str
    """The name or folder it was asked for."""
    folder: str
    """Where its files are."""
    channels: int
    """Input channels: 1 (fluorescence) or 3 (RGB, e.g. H&E)."""
    prob_thresh: float
    """The model's own object probability threshold."""
    nms_thresh: float
    """The model's own non-maximum-suppression (overlap) threshold."""


def keras_cache() -> Path:
    """The folder where Keras (and so StarDist) caches downloaded models: ``$KERAS_HOME`` or ``~/.keras``."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras")


def pretrained_cache_folder(name: str) -> Path:
    """Where a pretrained model named ``name`` lives once downloaded (or copied in by hand)."""
    return keras_cache() / "models" / PRETRAINED_CLASS / name


class StarDistWorker:
    """A StarDist process that is started on first use, reused across calls, and stopped by :meth:`close`.

    Parameters
    ----------
    use_gpu
        Let TensorFlow see the GPUs (with memory growth, so it takes only what
        it needs). Off by default: the GPU is torch's.
    env
        Extra environment variables for the process (e.g. ``KERAS_HOME``, or a
        proxy). Set before TensorFlow is imported there.

    Calls are serialised: one request at a time, from any thread.
    """

    def __init__(self, use_gpu: bool = False, env: Mapping[str, str] | None = None) -> None:
        self.use_gpu = use_gpu
        self.env = dict(env or {})
        self._process: Any = None
        self._conn: Any = None
        self._log: Path | None = None
        self._lock = threading.Lock()
        self._interrupt = threading.Event()

    # --- life cycle ---------------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The process id while it runs, else None."""
        return self._process.pid if self.alive else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the process now (calls start it when needed)."""
        with self._lock:
            self._ensure_started()

    def _ensure_started(self) -> None:
        if self.alive:
            return
        self._discard()
        # A new interpreter running this module (not multiprocessing's spawn, which re-runs the caller's main
        # script): no Qt, OpenGL or CUDA state inherited, and scripts without a __main__ guard still work.
        authkey = secrets.token_bytes(32)
        listener = Listener(authkey=authkey)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **self.env}
        if not self.use_gpu:
            env["CUDA_VISIBLE_DEVICES"] = "-1"
        env[_ADDRESS_ENV] = json.dumps(listener.address)
        env[_AUTHKEY_ENV] = authkey.hex()
        env[_GPU_ENV] = "1" if self.use_gpu else ""
        # TensorFlow's and StarDist's chatter goes to a log, quoted when the process dies
        log = tempfile.NamedTemporaryFile(prefix="mpt-deblur-stardist-", suffix=".log", delete=False)
        with log:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self._log = Path(log.name)
        accepted: list[Any] = []
        waiter = threading.Thread(target=_accept, args=(listener, accepted), daemon=True)
        waiter.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while waiter.is_alive() and process.poll() is None and time.monotonic() < deadline:
            waiter.join(POLL_S)
        listener.close()
        if not accepted:
            if process.poll() is None:
                process.kill()
            process.wait()
            tail = self._log_tail()
            self._discard()  # removes the log
            raise WorkerCrashed(
                f"the StarDist process could not start (exit code {process.returncode}); check that stardist and "
                f"tensorflow are installed: pip install 'napari-mpt-deblur[stardist]'.{tail}"
            )
        self._process, self._conn = process, accepted[0]

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait(timeout=10)
        self._process = self._conn = None
        if self._log is not None:
            self._log.unlink(missing_ok=True)
            self._log = None

    def _log_tail(self, lines: int = 6) -> str:
        """The last lines the process wrote, to quote in an error."""
        try:
            text = self._log.read_text(errors="replace").strip().splitlines() if self._log else []
        except OSError:
            return ""
        return ("\nThe StarDist process's last words:\n" + "\n".join(text[-lines:])) if text else ""

    def close(self, timeout: float = 10.0) -> None:
        """Stop the process: politely, then by force after ``timeout`` seconds."""
        self._interrupt.set()  # a call in progress gives up
        with self._lock:
            self._interrupt.clear()
            if self.alive:
                try:
                    self._conn.send(("close", {}))
                    self._process.wait(timeout)
                except (OSError, EOFError, subprocess.TimeoutExpired):
                    pass
            self._discard()

    def interrupt(self) -> None:
        """Stop the call in progress now (from another thread); the process is stopped with it and restarted later."""
        self._interrupt.set()

    def __enter__(self) -> StarDistWorker:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------------------------------

    def call(self, command: str, should_stop: Callable[[], bool] | None = None, **kwargs: Any) -> Any:
        """Send one request and wait for its answer.

        Raises
        ------
        DetectionError
            The request failed in the worker (its message says why).
        WorkerCrashed
            The worker process died before answering.
        DetectionCancelled
            :meth:`interrupt` was called or ``should_stop()`` became true; the
            process is stopped (TensorFlow cannot be interrupted otherwise).
        """
        with self._lock:
            self._interrupt.clear()
            self._ensure_started()
            try:
                self._conn.send((command, kwargs))
            except OSError as error:
                raise self._crashed(command) from error
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if self._interrupt.is_set() or (should_stop is not None and should_stop()):
                    self._discard()
                    raise DetectionCancelled("detection stopped")
                try:
                    if self._conn.poll(POLL_S):
                        reply = self._conn.recv()
                        break
                except (OSError, EOFError) as error:
                    raise self._crashed(command) from error
                if self._process.poll() is not None:
                    raise self._crashed(command)
                if command == "load" and time.monotonic() > deadline:
                    self._discard()
                    raise DetectionError(f"StarDist did not load within {START_TIMEOUT_S:.0f} s; try again")
        status, payload = reply
        if status == "error":
            raise DetectionError(payload)
        return payload

    def _crashed(self, command: str) -> WorkerCrashed:
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        tail = self._log_tail()
        self._discard()
        how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
        hint = " (a segmentation fault in TensorFlow)" if code == -11 else ""
        return WorkerCrashed(
            f"the StarDist process stopped unexpectedly ({how}{hint}) during '{command}'. "
            "Nothing else is affected; it starts again on the next detection. If it keeps happening, try "
            f"smaller planes (the command line's --max-tile) or closing other programs to free memory.{tail}"
        )

    def load(self, model: str, should_stop: Callable[[], bool] | None = None) -> ModelInfo:
        """Load a model (a pretrained name or a model folder) in the worker and describe it."""
        model = str(model)
        if ("/" in model or os.sep in model) and not Path(model).expanduser().is_dir():
            raise DetectionError(f"StarDist model folder not found: {model}")  # no need to start TensorFlow
        return ModelInfo(**self.call("load", should_stop=should_stop, model=model))

    def predict(
        self,
        model: str,
        plane: np.ndarray,
        prob_thresh: float | None = None,
        nms_thresh: float | None = None,
        n_tiles: tuple[int, ...] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """Label the objects in one normalised plane ((Y, X) or (Y, X, C) float32); returns int32 labels (Y, X)."""
        return self.call(
            "predict",
            should_stop=should_stop,
            model=str(model),
            plane=np.ascontiguousarray(plane, dtype=np.float32),
            prob_thresh=prob_thresh,
            nms_thresh=nms_thresh,
            n_tiles=n_tiles,
        )


_SHARED: StarDistWorker | None = None
_SHARED_LOCK = threading.Lock()


def shared_worker() -> StarDistWorker:
    """The process-wide worker the CLI and the widgets share (stopped when Python exits)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = StarDistWorker()
            atexit.register(_SHARED.close)
        return _SHARED


# --- the child process ----------------------------------------------------------------------------------------------


def _accept(listener: Listener, accepted: list[Any]) -> None:
    with contextlib.suppress(OSError, EOFError):  # the listener closed: the process never connected
        accepted.append(listener.accept())


def _serve(conn: Any, use_gpu: bool) -> None:
    """The worker's loop: answer requests until told to close or the parent goes away."""
    if use_gpu:
        _grow_gpu_memory()  # before TensorFlow touches a GPU: only then can it be set
    models: dict[str, Any] = {}
    handlers = {"load": _load, "predict": _predict}
    while True:
        try:
            command, kwargs = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if command == "close":
            return
        try:
            result = handlers[command](models, **kwargs)
            reply = ("ok", result)
        except DetectionError as error:
            reply = ("error", str(error))
        except Exception as error:  # anything from TensorFlow/StarDist: report, keep serving
            reply = ("error", f"StarDist failed: {type(error).__name__}: {error}")
        try:
            conn.send(reply)
        except OSError:
            return


def _grow_gpu_memory() -> None:
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised
            pass


def _load(models: dict[str, Any], model: str) -> dict[str, Any]:
    if model not in models:
        models[model] = _open_model(model)
    instance = models[model]
    thresholds = instance.thresholds
    return {
        "name": model,
        "folder": str(Path(instance.logdir)) if instance.logdir is not None else "",
        "channels": int(instance.config.n_channel_in),
        "prob_thresh": float(thresholds.prob),
        "nms_thresh": float(thresholds.nms),
    }


def _open_model(model: str) -> Any:
    folder = Path(model).expanduser()
    if folder.is_dir():
        return _from_folder(folder)
    if os.sep in model or "/" in model:
        raise DetectionError(f"StarDist model folder not found: {model}")
    return _pretrained(model)


def _from_folder(folder: Path) -> Any:
    if not (folder / "config.json").is_file():
        raise DetectionError(f"{folder} is not a StarDist model folder: it has no config.json")
    from stardist.models import StarDist2D

    config = _read_json(folder / "config.json")
    if config.get("n_dim", 2) != 2:
        raise DetectionError(f"{folder} holds a {config.get('n_dim')}-D StarDist model; only 2-D models are supported")
    try:
        instance = StarDist2D(None, name=folder.name, basedir=str(folder.parent))
    except Exception as error:
        raise DetectionError(f"could not load the StarDist model in {folder}: {error}") from error
    instance.basedir = None  # read-only: never write into the user's folder
    instance.logdir = folder
    return instance


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DetectionError(f"cannot read {path}: {error}") from error


def _pretrained(name: str) -> Any:
    from csbdeep.models.pretrained import get_model_details, get_registered_models
    from stardist.models import StarDist2D

    try:
        key, _, details = get_model_details(StarDist2D, name)
    except ValueError:
        known = ", ".join(get_registered_models(StarDist2D, return_aliases=False))
        raise DetectionError(
            f"unknown StarDist model {name!r}: give a pretrained name ({known}) or a model folder"
        ) from None
    cache = pretrained_cache_folder(key)
    local = _find_model_folder(cache)
    if local is not None:  # downloaded before or copied in by hand: no network needed
        return _from_folder(local)
    try:
        instance = StarDist2D.from_pretrained(key)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DetectionError(
            f"the StarDist model {key!r} is not on this computer and could not be downloaded ({reason}). "
            f"On a computer with internet access, download {details['url']}, unzip it, and copy the files in it "
            f"(config.json, thresholds.json, weights_best.h5) into the folder {cache} on this computer; "
            "or choose the unzipped folder itself as the StarDist model."
        ) from None
    if instance is None:
        raise DetectionError(f"StarDist has no pretrained model {key!r}")
    instance.logdir = Path(instance.logdir) if getattr(instance, "logdir", None) is not None else cache
    return instance


def _find_model_folder(cache: Path) -> Path | None:
    """A folder with ``config.json`` and weights at or below ``cache`` (Keras versions unpack to different depths)."""
    if not cache.is_dir():
        return None
    for config in sorted(cache.rglob("config.json"), key=lambda p: len(p.parts)):
        if any(config.parent.glob("weights*.h5")):
            return config.parent
    return None


def _predict(
    models: dict[str, Any],
    model: str,
    plane: np.ndarray,
    prob_thresh: float | None,
    nms_thresh: float | None,
    n_tiles: tuple[int, ...] | None,
) -> np.ndarray:
    if model not in models:
        _load(models, model)
    instance = models[model]
    labels, _ = instance.predict_instances(
        plane, prob_thresh=prob_thresh, nms_thresh=nms_thresh, n_tiles=n_tiles, show_tile_progress=False, verbose=False
    )
    return labels.astype(np.int32, copy=False)


def _main() -> None:
    address = json.loads(os.environ.pop(_ADDRESS_ENV))
    authkey = bytes.fromhex(os.environ.pop(_AUTHKEY_ENV))
    use_gpu = bool(os.environ.pop(_GPU_ENV, ""))
    with Client(address if isinstance(address, str) else tuple(address), authkey=authkey) as conn:
        _serve(conn, use_gpu)


if __name__ == "__main__":
    _main()
