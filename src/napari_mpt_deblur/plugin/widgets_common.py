"""What the plugin's docks share (Qt here; what they compute stays in Qt-free modules): the device and model
pickers, progress, a thread worker that reports every error, and stopping the work when the dock closes."""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import napari.layers
import napari.viewer
from magicgui.widgets import ComboBox, Container, FileEdit, Label, ProgressBar, Select, Widget
from magicgui.widgets.bases import CategoricalWidget
from napari.utils import progress
from napari.utils.notifications import show_error
from qtpy.QtCore import QEvent, QObject, QSignalBlocker, QSize, Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFrame,
    QLineEdit,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import GeneratorWorker

from ..models.files import BUNDLED_MODELS, ModelFileError
from ..runtime import available_devices, resolve_device
from . import session
from .deblur_job import result_source

MODEL_FILTER = "MPT models (*.safetensors *.pth *.pt *.zip);;All files (*)"
"""The model-file dialogs' filter: model files, reference checkpoints and bioimage.io packages (``.zip``)."""
MENU_MIN_CHARACTERS = 12
"""A dock's menus are at least this many characters wide; a longer choice is elided (the open menu shows it whole)."""
MIN_SCROLL_HEIGHT = 150
"""A dock's scrolling part shrinks to this height (pixels): two docks then fit a 1366 x 768 screen."""


def device_choices() -> list[tuple[str, str]]:
    """(label, device setting) for every device present, ``auto`` first, labelled with what it is.

    For example ``("auto (CPU)", "auto")`` or ``("cuda:0 (NVIDIA H100)", "cuda:0")``.
    """
    auto = str(resolve_device("auto"))
    what = _describe_device(auto) if auto in ("cpu", "mps") else f"{auto}, {_describe_device(auto)}"
    return [(f"{name} ({what if name == 'auto' else _describe_device(name)})", name) for name in available_devices()]


def _describe_device(name: str) -> str:
    if name.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(int(name.split(":")[1]) if ":" in name else torch.cuda.current_device())
    return {"cpu": "CPU", "mps": "Apple GPU"}.get(name, name)


def device_box(value: str = "auto") -> ComboBox:
    """The ``device`` menu (:func:`device_choices`), set to ``value`` when present here, else to ``auto``."""
    choices, tip = device_choices(), "auto: the first GPU if there is one, else the CPU."
    value = value if value in [setting for _, setting in choices] else "auto"
    return ComboBox(name="device", label="device", choices=choices, value=value, tooltip=tip)


def progress_and_status(label: str = "", value: str = "") -> tuple[ProgressBar, Label]:
    """A dock's progress bar and its status line, wrapped to the dock's width however long it gets."""
    status = Label(name="status", label=label, value=value)
    status.native.setWordWrap(True)
    # magicgui fixes a label at the size of its text: a long status line then widened the dock's parts past the
    # dock (cut off on the right, with no scroll bar) and squeezed its own name away. Ignored: as wide as the
    # row allows; Preferred: as tall as the text wrapped to that width.
    status.native.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    return ProgressBar(name="progress_bar", label="progress", min=0, max=1, value=0), status


def unwrapped(obj: Any) -> Any:
    """The object behind the proxy napari hands a plugin's dock for its viewer and whatever comes from it
    (``PublicOnlyProxy``): for identity tests and weak references, which a proxy would defeat."""
    return getattr(obj, "__wrapped__", obj)


def show_path_end(box: FileEdit, tooltip: str = "") -> None:
    """Keep a path box's end (the file name) in view, and its whole path in its tooltip.

    A path longer than the box is cut off, and Qt shows the part around the text cursor, which a click may
    leave anywhere: the file name is the part to see, so the cursor goes to the end whenever the path changes
    and whenever the box loses the focus. The tooltip gives the whole path, after ``tooltip`` (what the box
    is for).
    """
    line = box.native.findChild(QLineEdit)

    def shown(value: Any) -> None:
        text = "" if value is None or str(value) in ("", ".") else str(value)
        box.tooltip = "\n".join(part for part in (tooltip, text) if part)
        if line is not None and not line.hasFocus():
            line.end(False)  # the cursor, and so the view, at the end of the text

    box.changed.connect(shown)
    if line is not None:
        line.editingFinished.connect(lambda: shown(box.value))  # focus left the box: back to the file name
    shown(box.value)


class Section(QWidget):
    """A part of a dock that folds away under a title: an arrow button over its content, collapsed by default.

    Collapsed, the content is hidden (not squeezed to zero height, as superqt's ``QCollapsible`` does): its widgets
    take no room and Tab skips them.

    Parameters
    ----------
    title
        The button's text (what the section holds).
    content
        The widget shown when the section is expanded.
    expanded
        Whether it starts expanded.
    """

    def __init__(self, title: str, content: QWidget, *, expanded: bool = False) -> None:
        super().__init__()
        self.toggle = QToolButton()
        self.toggle.setText(title)
        self.toggle.setCheckable(True)
        self.toggle.setAutoRaise(True)
        self.toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.content = content
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.toggle)
        layout.addWidget(content)
        self.toggle.toggled.connect(self.set_expanded)
        self.set_expanded(expanded)

    def set_expanded(self, expanded: bool) -> None:
        """Show (True) or hide the content."""
        with QSignalBlocker(self.toggle):
            self.toggle.setChecked(expanded)
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if expanded else Qt.ArrowType.RightArrow)
        self.content.setVisible(expanded)

    def is_expanded(self) -> bool:
        """Whether the content is shown."""
        return self.toggle.isChecked()


class _DockScrollArea(QScrollArea):
    """Scrolls a dock's parts up and down: as tall as they ask when there is room, down to
    :data:`MIN_SCROLL_HEIGHT` when not, and never narrower than they need (there is no horizontal scroll bar)."""

    def __init__(self, content: QWidget) -> None:
        super().__init__()
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Expanding)
        self.setWidget(content)

    def _bar(self) -> int:
        return self.verticalScrollBar().sizeHint().width()

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        # Qt caps a scroll area's hint at 24 lines of text: with room, a dock would scroll for nothing
        hint = self.widget().sizeHint()
        return QSize(hint.width() + self._bar(), hint.height())

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(self.widget().minimumSizeHint().width() + self._bar(), MIN_SCROLL_HEIGHT)


class WhenShown(QObject):
    """Calls ``function`` each time ``widget`` is shown (its style, and so its fonts, are then final); it lives as
    long as the widget."""

    def __init__(self, widget: QWidget, function: Callable[[], None]) -> None:
        super().__init__(widget)
        self._function = function
        widget.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        if event.type() == QEvent.Type.Show:
            self._function()
        return False


class ScrollingDock(Container):
    """A dock whose parts (magicgui containers, foldable sections, plots) scroll, so that it fits a small screen.

    napari puts a plugin's widget in its dock as it is, and a magicgui ``Container(scrollable=True)`` loses its
    scroll area on the way (napari docks the inner widget): the dock holds its own. Subclasses call
    ``super().__init__()``, then :meth:`add_part` and :meth:`add_section` top to bottom, then
    :meth:`align_labels`.

    Attributes
    ----------
    scroll_area
        The scroll area that holds the parts.
    sections
        The foldable sections, in order.
    """

    def __init__(self) -> None:
        super().__init__(labels=False)
        self.margins = (0, 0, 0, 0)
        self.sections: list[Section] = []
        content = QWidget()
        self._parts = QVBoxLayout(content)
        self._parts.setContentsMargins(4, 4, 4, 4)
        self.scroll_area = _DockScrollArea(content)
        self.native.layout().addWidget(self.scroll_area)
        WhenShown(self.native, self.align_labels)

    @staticmethod
    def _let_menus_shrink(widget: QWidget) -> QWidget:
        # a menu may be narrower than its longest choice (a model file's path, a layer's name), which it elides: Qt's
        # menus are otherwise at least that wide, and widen the dock with them
        for menu in widget.findChildren(QComboBox):
            menu.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
            menu.setMinimumContentsLength(MENU_MIN_CHARACTERS)
        return widget

    def _adopt(self, part: Container) -> QWidget:
        # a magicgui child of the dock, so that napari's refresh of the dock's menus (reset_choices) reaches its
        # menus; Qt then moves its widget from the dock's own layout (which holds only the scroll area: hence
        # position 0, as magicgui inserts into that layout at the child's position) into the scroll area's
        self.insert(0, part)
        part.margins = (0, 0, 0, 0)
        return part.native

    def add_part(self, part: Container | QWidget) -> None:
        """Add a magicgui container of widgets, or a Qt widget (a plot, a table), below the parts added so far."""
        self._parts.addWidget(self._let_menus_shrink(self._adopt(part) if isinstance(part, Container) else part))

    def add_section(self, title: str, part: Container, *, expanded: bool = False) -> Section:
        """Add a container of rarely changed widgets in a :class:`Section` that folds away (collapsed by default)."""
        section = Section(title, self._let_menus_shrink(self._adopt(part)), expanded=expanded)
        self._parts.addWidget(section)
        self.sections.append(section)
        return section

    def labelled_rows(self) -> list[Any]:
        """The rows of the dock's labelled parts (magicgui's label-and-field rows), top to bottom."""
        return [
            labelled
            for part in self
            if isinstance(part, Container) and part.labels and part.layout == "vertical"
            for widget in part
            if (labelled := widget._labeled_widget()) is not None
        ]

    def align_labels(self) -> None:
        """Give every labelled part's labels one width, so that the fields line up across the parts."""
        rows = self.labelled_rows()
        if rows:
            # the shown label's size hint: its text's widest line in its own font (napari's style sheet sets it once
            # the dock is in the window: measured again then), plus its padding
            widest = max(row._label_widget.native.sizeHint().width() for row in rows)
            for row in rows:
                row.label_width = widest
        self.scroll_area.updateGeometry()  # the dock's minimum width follows its labels

    def reveal(self, widget: Widget | QWidget) -> None:
        """Scroll to ``widget`` (expanding the section that holds it): for a script or a test, as a user would."""
        native = getattr(widget, "native", widget)
        for section in self.sections:
            if section.content.isAncestorOf(native):
                section.set_expanded(True)
        self.scroll_area.ensureWidgetVisible(native)


def row(*widgets: Widget) -> Container:
    """Widgets side by side (buttons), as a part of a :class:`ScrollingDock`."""
    part = Container(layout="horizontal", labels=False, widgets=list(widgets))
    part.margins = (0, 0, 0, 0)
    return part


class GuiRelay(QObject):
    """Runs functions in the GUI thread, queued, whichever thread asks (:meth:`call`).

    Use the process's one relay, :func:`gui_relay`: a Qt object must be deleted in its own thread, and an
    object held by work that ends in a worker could be collected there. A function asked for from the GUI
    thread itself runs once the current event is handled: napari's slicing, say, is over before it runs.
    """

    _called = Signal(object)

    def __init__(self) -> None:
        super().__init__()
        self._called.connect(_run, Qt.ConnectionType.QueuedConnection)

    def call(self, function: Callable[[], Any]) -> None:
        """Run ``function()`` in the GUI thread, after the current event; nothing happens once Qt has gone."""
        with contextlib.suppress(RuntimeError):  # "wrapped C/C++ object has been deleted": napari closed
            self._called.emit(function)


def _run(function: Callable[[], Any]) -> None:
    function()


_RELAY: list[GuiRelay] = []


def gui_relay() -> GuiRelay:
    """The process's :class:`GuiRelay`, made at the first call, which must come from the GUI thread (a dock's)."""
    if not _RELAY:
        _RELAY.append(GuiRelay())
    return _RELAY[0]


def model_choices(_: Any = None) -> list[tuple[str, str]]:
    """(label, choice) for the session's models: a file's name, its full path when two share a name."""
    choices = session.SESSION.model_choices()
    names = [Path(choice).name for choice in choices]
    return [(name if names.count(name) == 1 else choice, choice) for name, choice in zip(names, choices)]


class ModelPicker:
    """A dock's model menu (:attr:`combo`) and model-file box (:attr:`file`), following the shared session's models.

    The menu follows every change of the :mod:`.session`'s models (a model saved by the Fine-tune dock, a file picked
    in any dock), which holds the picker weakly: it lives as long as napari and must keep no closed dock alive. The
    model just added comes first and is chosen, in every picker. A picked file is loaded first: one that loads joins
    the session's models; one that does not is reported (a notification and ``status``), stays out of the menu, and is
    the :attr:`problem` (docks refuse to start) until the user chooses again: a model in the menu (the one already
    chosen included), another file, or an empty box. The box shows the chosen model's file (empty for a bundled
    model), except after such a refused file.
    """

    def __init__(self, status: Label, *, label: str, tooltip: str) -> None:
        self.status = status
        self.problem: str | None = None
        self.combo = ComboBox(name="model", label=label, choices=model_choices, tooltip=tooltip)
        self.file = FileEdit(
            name="model_file",
            label="model file",
            mode="r",
            filter=MODEL_FILTER,
            nullable=True,
            tooltip="A napari-mpt-deblur model (.safetensors), a reference MPT checkpoint (.pth) or a bioimage.io "
            "package (.zip) exported by napari-mpt-deblur.",
        )
        show_path_end(self.file, self.file.tooltip)
        self._showing = False  # the box is being set to the chosen model's file: not a pick
        self._show_file(self.combo.value)
        self.combo.changed.connect(self._chosen)
        # Qt's "activated" comes with every choice made in the menu, the model already chosen included ("changed"
        # does not): choosing it again is how a user takes it back after a refused file
        self.combo.native.activated.connect(self._chosen_in_menu)
        self.file.changed.connect(self._picked)
        picker = weakref.ref(self)

        def models_changed() -> None:
            alive = picker()
            if alive is None:
                unsubscribe()
            else:
                alive.refresh()

        self.unsubscribe = unsubscribe = session.SESSION.subscribe(models_changed)

    def refresh(self) -> None:
        """List the session's models again, in its order, and choose the first: the one just added.

        The menu emits ``changed`` once, when its value changes.
        """
        combo = self.combo
        try:
            before = combo.value
            with combo.changed.blocked():
                if list(combo.choices) != [choice for _, choice in model_choices()]:
                    combo.native.clear()  # magicgui keeps listed items in place and appends new ones at the end
                combo.reset_choices()
                if combo.choices:
                    combo.value = combo.choices[0]
            if combo.value != before:
                combo.changed.emit(combo.value)
        except RuntimeError:  # "wrapped C/C++ object has been deleted": the viewer closed first
            self.unsubscribe()

    def _chosen(self, choice: str | None) -> None:
        self.problem = None
        self._show_file(choice)

    def _chosen_in_menu(self, _index: int) -> None:
        if self.problem is not None:
            self._take_back_the_menu_choice()

    def _take_back_the_menu_choice(self) -> None:
        """Forget a refused file: the menu's model is the choice again."""
        refused, self.problem = self.problem, None
        self._show_file(self.combo.value)
        self._announce_choice(refused)

    def _announce_choice(self, refused: str | None) -> None:
        """Tell the dock (``changed``) that the menu's model, chosen already, is the choice again after a refused
        file, so that it shows the model instead of the error."""
        if self.status.value == refused:
            self.status.value = f"model: {self.combo.current_choice}" if self.combo.value else ""
        self.combo.changed.emit(self.combo.value)

    def _show_file(self, choice: str | None) -> None:
        path = None if not choice or choice in BUNDLED_MODELS else Path(choice)
        if self.file.value != path:
            self._showing = True
            try:
                self.file.value = path
            finally:
                self._showing = False

    def _picked(self, path: Path | None) -> None:
        if self._showing:
            return  # following the menu
        if path is None or str(path) in ("", "."):
            if self.problem is not None:  # the refused file's path cleared: back to the menu's model
                self._take_back_the_menu_choice()
            return
        if not Path(path).is_file():
            return  # typing a path: wait until it names a file
        try:
            session.SESSION.load_model(str(path))
        except (ModelFileError, OSError) as error:
            self.problem = f"Model file failed to load: {str(error).rstrip('. ')}. Pick another model file."
            self.status.value = self.problem
            show_error(self.problem)
            return
        refused, self.problem = self.problem, None
        before = self.combo.value
        choice = session.SESSION.add_model_file(path)  # first and chosen in every picker's menu, this one's included
        self._show_file(choice)  # already chosen (no ``changed``): the box still shows the path as typed
        if refused is not None and self.combo.value == before:
            self._announce_choice(refused)


def list_in_order(menu: ComboBox) -> None:
    """Refresh a menu's choices in the order its choices function gives, keeping its value while still listed.

    magicgui's refresh keeps listed items in place and appends new ones at the end, so an entry meant to come last
    (such as "all layers...") would end up among the layers. ``changed`` is emitted only if the value changes.
    """
    value = menu.value
    with menu.changed.blocked():
        menu.native.clear()
        menu.reset_choices()
        if value in menu.choices:
            menu.value = value
    if menu.value is not value:
        menu.changed.emit(menu.value)


def image_for(layer: Any, layers: Sequence[Any]) -> napari.layers.Image | None:
    """The image a dock should work on when ``layer`` is selected, or None (not an image: labels, points, ...).

    The layer itself, except for a deblurred result whose source is in ``layers``: then the source, so that *Run*
    after a run does not deblur the result again.
    """
    if not isinstance(layer, napari.layers.Image):
        return None
    images = {other.name: other for other in layers if isinstance(other, napari.layers.Image)}
    source = result_source(layer.name, layer.metadata, list(images))
    return images[source] if source is not None else layer


def _offered(menu: CategoricalWidget, value: Any) -> bool:
    """Whether a menu lists ``value`` (every value, for a multiple choice)."""
    choices = menu.choices
    return all(item in choices for item in value) if isinstance(menu, Select) else value in choices


class FollowSelection:
    """Keeps a dock's layer menus on the viewer's selected layers, each until the user picks in it by hand.

    Parameters
    ----------
    viewer
        The viewer whose layer selection is followed.
    state
        The dock's state: its close undoes the connection to the viewer (which holds this object weakly).
    menus
        The menus that follow (named, as magicgui widgets are).
    suggest
        What the menus should show for the viewer's layers (their ``selection`` and its ``active`` layer):
        ``{menu name: value}``; menus left out keep their value. Called at every change of the selection, and by
        :meth:`follow`, which the dock calls once it is built.

    Notes
    -----
    A menu whose value changes by any other way than :meth:`show` or napari refreshing its choices (a layer added,
    removed or renamed) has been picked in by hand (by the user, or a script setting ``value``): it stops following,
    until the layer picked leaves the viewer. Napari refreshes a dock's menus as a layer is added, before it selects
    the layer, so the new layer is already offered.
    """

    def __init__(
        self,
        viewer: napari.viewer.Viewer,
        state: DockState,
        menus: Sequence[CategoricalWidget],
        suggest: Callable[[Any], Mapping[str, Any]],
    ) -> None:
        self._layers = viewer.layers
        self._menus = {menu.name: menu for menu in menus}
        self._suggest = suggest
        self._showing = False
        self._shown = {name: menu.value for name, menu in self._menus.items()}
        self.by_hand: set[str] = set()
        """The menus the user picked in (they follow no more)."""
        for name, menu in self._menus.items():
            menu.changed.connect(partial(self._changed, name))
        follower = weakref.ref(self)

        def selection_changed(*_: Any) -> None:
            alive = follower()
            if alive is not None and not state.deleted:
                alive.follow()

        # both: the active layer is set after the selection's "changed" (adding a layer), and alone (clicking)
        for emitter in (viewer.layers.selection.events.changed, viewer.layers.selection.events.active):
            emitter.connect(selection_changed)
            state.disconnects.append(partial(emitter.disconnect, selection_changed))

    def follow(self) -> None:
        """Show what ``suggest`` proposes for the current selection, in every menu not picked in by hand."""
        for name, value in self._suggest(self._layers).items():
            if name not in self.by_hand:
                self.show(name, value)

    def show(self, name: str, value: Any) -> None:
        """Set a menu's value as the dock's suggestion, not the user's pick (nothing happens if it is not listed)."""
        menu = self._menus[name]
        self._showing = True
        try:
            if not _offered(menu, value):
                menu.reset_choices()  # a dock outside the viewer's dock area is not refreshed by napari
            if _offered(menu, value) and menu.value != value:
                menu.value = value
        finally:
            self._showing = False

    def _changed(self, name: str, value: Any) -> None:
        shown, self._shown[name] = self._shown[name], value
        if self._showing:
            return
        if _offered(self._menus[name], shown):
            self.by_hand.add(name)  # the value it showed is still there: someone picked another
        else:
            self.by_hand.discard(name)  # napari replaced a layer that left the viewer: follow again


class _CarriedError(Exception):
    """Carries a RuntimeError raised by the work (its ``__cause__``) to ``errored`` (see :func:`start_worker`)."""


def _carry(steps: Generator) -> Generator:
    try:
        return (yield from steps)
    except RuntimeError as error:
        raise _CarriedError(error) from error


def _call(function: Callable[[], Any]) -> Generator[None, None, Any]:
    """Work that yields nothing and returns ``function()``: one worker class for both kinds of work."""
    return function()
    yield  # unreachable: makes this a generator function


class _Worker(GeneratorWorker):
    """superqt's generator worker, closing its generator in its own thread as it stops (see :func:`start_worker`)."""

    def __init__(self, steps: Generator) -> None:
        super().__init__(_carry, steps)
        self._steps = steps

    def work(self) -> Any:
        try:
            return super().work()
        finally:
            self._steps.close()


def weak_callback(callback: Callable[..., Any] | None) -> Callable[..., None]:
    """``callback``, holding a bound method's object weakly (a dead one is not called)."""
    if not inspect.ismethod(callback):
        return callback or (lambda *_: None)
    method = weakref.WeakMethod(callback)
    return lambda *args: None if (alive := method()) is None else alive(*args)


def start_worker(
    work: Generator | Callable[[], Any],
    *,
    on_yield: Callable[[Any], Any] | None = None,
    on_return: Callable[[Any], Any] | None = None,
    on_error: Callable[[BaseException], Any] | None = None,
    on_finished: Callable[[], Any] | None = None,
) -> GeneratorWorker:
    """Run ``work`` (a generator, or a function of no arguments) in Qt's thread pool; callbacks run in the GUI thread.

    Yielded values go to ``on_yield``, the return value to ``on_return``, every error (as raised) to ``on_error``,
    then ``on_finished`` in every case. After ``worker.quit()`` the work stops at its next ``yield`` and neither
    ``on_return`` nor ``on_error`` is called. Bound methods are held weakly: a worker keeps no closed dock alive.
    Workarounds:

    - superqt's ``GeneratorWorker`` takes any ``RuntimeError`` for a deleted worker and then emits neither
      ``errored`` nor ``finished``, and torch raises many (out of memory included): they travel wrapped.
    - superqt's class, not napari's, which posts every error as a traceback notification on top of the dock's
      message; not napari's ``create_worker``, which files the worker (and what its slots hold) in the viewer's
      task list for the session.
    - ``quit()`` leaves the generator suspended. Closed later in another thread (the GUI's, the garbage collector's),
      it would leave the thread-local state it entered (torch's inference mode) on in the pool's thread, breaking
      the next work run there (training: "does not require grad"): the worker closes it in its own thread.
    """
    steps = work if isinstance(work, Generator) else _call(work)
    worker = _Worker(steps)
    report = weak_callback(on_error)

    def errored(error: BaseException) -> None:
        report(error.__cause__ if isinstance(error, _CarriedError) else error)

    worker.yielded.connect(weak_callback(on_yield))
    worker.returned.connect(weak_callback(on_return))
    worker.errored.connect(errored)
    worker.finished.connect(weak_callback(on_finished))
    worker.start()
    return worker


@dataclass(eq=False)
class DockState:
    """What a dock shares with its worker's slots and its clean-up: never the widget itself.

    Qt keeps slots as long as the widget's Qt objects, and workers and the session outlive a closed dock: what they
    hold must not hold the widget (nor its viewer). The dock's own slots are bound methods, called while it lives.
    """

    worker: GeneratorWorker | None = None  # the running worker (None when idle)
    pbar: progress | None = None  # its bar in napari's activity dock
    docked: bool = False
    closed: bool = False  # taken out of the viewer (dock closed) or destroyed: no new work, running work stops
    cancel_requested: bool = False  # the user asked the running work to stop (nothing of it is kept)
    deleted: bool = False  # the Qt widgets are gone: handlers must not touch them
    disconnects: list[Callable[[], None]] = field(default_factory=list)  # undo outside connections (on close)

    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(
        self,
        work: Generator | Callable[[], Any],
        task: str,
        total: int = 0,
        *,
        on_finished: Callable[[], Any] | None = None,
        **callbacks,
    ) -> GeneratorWorker:
        """:func:`start_worker` with a napari progress bar named ``task``; idle again, before ``on_finished``."""
        self.pbar = progress(total=total, desc=task)
        done = weak_callback(on_finished)

        def finished() -> None:
            pbar, self.worker, self.pbar = self.pbar, None, None
            done()
            if pbar is not None:
                pbar.close()

        self.worker = start_worker(work, on_finished=finished, **callbacks)
        return self.worker

    def show_progress(self, bar: ProgressBar, done: int, total: int, description: str | None = None) -> None:
        """``done`` of ``total`` in the dock's ``bar``, then in napari's; handlers call it last, as napari's bars and
        notifications may process Qt events (and so run the worker's next signals) while they update."""
        if not self.deleted:
            bar.max, bar.value = max(1, total), done
        pbar = self.pbar
        if pbar is not None:
            if pbar.total != total:
                pbar.total = total
            if description:
                pbar.set_description(description)
            pbar.update(done - pbar.n)

    def cancel(self) -> bool:
        """The user's Cancel: stop the running work and remember why; True when the dock should show it."""
        if self.worker is None:
            return False
        self.cancel_requested = True
        self.stop()
        return not self.deleted

    def stop(self) -> None:
        """Ask the running work to stop at its next step."""
        if self.worker is not None:
            self.worker.quit()

    def close(self) -> None:
        """Stop running work and undo outside connections (the dock closed or the widget was destroyed)."""
        self.closed = True
        self.stop()
        for disconnect in self.disconnects:
            with contextlib.suppress(RuntimeError, ValueError, TypeError):  # the viewer went first
                disconnect()
        self.disconnects.clear()


def stop_when_closed(widget: Container, state: DockState) -> None:
    """:meth:`DockState.close` when napari takes ``widget`` out of its dock (closing it: the parent becomes None)
    or its Qt widget is destroyed (the viewer closing; the Python object may live on). The slots hold ``state``."""
    widget.native_parent_changed.connect(partial(_parent_changed, state))
    widget.native.destroyed.connect(partial(_destroyed, state))


def _parent_changed(state: DockState, parent: Any) -> None:
    if parent is not None:
        state.docked = True
    elif state.docked:
        state.close()


def _destroyed(state: DockState, *_: Any) -> None:
    state.deleted = True
    state.close()
