"""Plan builder (`p`): method, base, each model's parameters, dtype and output; a live preview of what
each model keeps; `s` saves mergekit YAML, `r` runs it.

Every edit re-validates the plan through the same loader and job builder ``mergescope merge`` uses, then
a worker previews it: sampled first (instant), then exact. The preview calls the merge methods' own tensor
functions, so it cannot disagree with the merge.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, Select, Static

from mergescope.checkpoints import MergescopeError
from mergescope.demo.session import merge_folder
from mergescope.merge.methods import METHODS
from mergescope.merge.plan import MergePlan, load_plan, parse_plan
from mergescope.tui.plan_comments import plan_file_text
from mergescope.tui.plan_document import (
    DTYPES,
    ModelRow,
    PlanForm,
    default_form,
    from_plan,
    set_method,
    to_document,
    to_yaml,
)
from mergescope.tui.plan_preview import Row, norm_unit_note, preview_rows, vocabulary_line
from mergescope.tui.report_view import badges
from mergescope.tui.screens.confirm_screen import ConfirmScreen
from mergescope.tui.screens.run_screen import RunScreen
from mergescope.tui.widgets.plan.model_fields import ModelFields, ModelFieldsChanged
from mergescope.tui.widgets.plan.preview_table import PreviewTable

#: seconds of quiet after an edit before the preview recomputes
DEBOUNCE = 0.3
DEFAULT_METHOD = "ties"


@dataclass
class PlanValidated(Message):
    """The form makes a valid plan (every edit is checked; ``r`` checks once more before it runs)."""

    plan_text: str  # the plan as mergekit YAML
    output: str = "merged"  # the builder's output folder, where ``r`` merges it from any screen
    started_from: str = ""  # the plan the builder started from (the file as opened, or its first plan)


@dataclass
class PreviewUpdated(Message):
    """The preview worker has more: after the sampled pass, then as exact groups land."""

    status: str  # what the rows are: sampled, exact so far, exact
    names: list[str]  # the plan's sources, one retention column each
    rows: list[Row]  # every layer group previewed so far, then the whole model ("all")
    warnings: list[str]  # what the plan warns of (base mismatch, missing tensors, ...)
    cancel: threading.Event  # the preview's own; set once a later edit superseded it
    norm_heading: str = "‖τm‖"  # the merged-norm column's unit: absolute, or relative to ‖θ₀‖


@dataclass
class VocabularyPreviewed(Message):
    """The output vocabulary the plan's tokenizer setting gives (its size, the tokens it adds)."""

    text: str
    cancel: threading.Event


@dataclass
class PlanRejected(Message):
    """The form does not make a valid plan."""

    problem: str  # what is wrong, as the plan loader says it
    cancel: threading.Event  # the check's own; set once a later edit superseded it


class PlanScreen(Screen):
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("ctrl+s,s", "save", "Save"),
        Binding("r", "run", "Run"),
    ]

    def __init__(self, plan_path: Path | None = None, *, plan: MergePlan | None = None) -> None:
        """``plan_path``: the plan to open (and where ``s`` saves); ``plan``: open this plan instead of reading
        ``plan_path`` (a search's best candidate, saved only when asked)."""
        super().__init__()
        self.plan_path = plan_path
        self.plan = plan
        self.form: PlanForm | None = None
        self._timer = None
        self._cancel = threading.Event()
        self._replace_ok: Path | None = None  # the existing plan file the user agreed to replace
        self._file_method: str | None = None  # the method of the plan file the builder opened
        self._auto_output = ""  # the output folder the builder chose; follows the method until the user types
        self.started_from = ""  # the plan the builder started from, as text (see PlanValidated)

    # --- layout ------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        self.form = self._initial_form()
        yield Header()
        with Horizontal():
            with VerticalScroll(id="plan-form"):
                yield Label("method", classes="field-label")
                yield Select([(f"{name}", name) for name in METHODS], value=self.form.method, allow_blank=False,
                             compact=True, id="method")
                yield Static(METHODS[self.form.method].description, id="method-doc", classes="dim")
                yield Label("base model", classes="field-label")
                yield Select(self._base_options(), value=self.form.base or "", allow_blank=False, compact=True,
                             id="base")
                yield Static("values are YAML: 0.5 · a gradient over the layers [0.2, 0.8] · filters "
                             "[{filter: mlp, value: 0.3}, {value: 0.5}] · empty = the default", classes="dim hint")
                yield Vertical(id="model-fields")
                yield Label("method parameters", classes="field-label")
                yield Vertical(id="option-fields")
                yield Label("dtype", classes="field-label")
                yield Select([("as the base", "")] + [(d, d) for d in DTYPES], value=self.form.dtype or "",
                             allow_blank=False, compact=True, id="dtype")
                yield Label("tokenizer (tokenizer_source)", classes="field-label")
                yield Select(self._tokenizer_options(), value=self.form.tokenizer_source or "", allow_blank=False,
                             compact=True, id="tokenizer")
                yield Static("", id="vocab-preview", classes="dim")
                yield Label("output folder", classes="field-label")
                yield Input(self.form.output, compact=True, id="output")
                yield Label("plan file (s saves)", classes="field-label")
                yield Input(str(self.plan_path or "merge-plan.yml"), compact=True, id="plan-file")
            with Vertical(id="plan-preview-pane"):
                yield Static(Text("preview: …", style="dim"), id="preview-status")
                yield PreviewTable(id="preview")
                yield Static("", id="plan-warnings")
        yield Footer()

    async def on_mount(self) -> None:
        self.sub_title = "plan builder"
        try:
            self.started_from = (Path(self.plan_path).read_text(encoding="utf-8") if self.plan_path is not None
                                 else to_yaml(to_document(self.form)))
        except (OSError, ValueError):
            self.started_from = ""
        await self._rebuild_fields()
        self.query_one("#method").focus()
        self.schedule_preview(0)
        self.app.analysis_changed.subscribe(self, self._analysis_changed)

    def _analysis_changed(self, report: dict) -> None:
        """The analysis finished while the builder is open: preview again, now in units of ‖θ₀‖ and with the
        warnings that need the analysis."""
        if self.app.state.analysis_done:
            self.schedule_preview()  # debounced: a zero-delay timer left at shutdown trips textual's Timer

    def on_resize(self) -> None:
        self.set_class(self.size.width < 100, "narrow-plan")

    def _initial_form(self) -> PlanForm:
        state = self.app.state
        session = state.session
        rows = [ModelRow(ref, name) for ref, name in zip(self._references()[1:], state.names)]
        if self.plan is not None or self.plan_path is not None:
            form = from_plan(self.plan or load_plan(self.plan_path), rows)
            self._file_method = form.method
            form.output = self._auto_output = self.default_output(form.method)
            return form
        # models that failed a compatibility check (another base, vocabulary, tokenizer, architecture), and those
        # the session sets aside, start unticked and listed last: a first plan never merges what is flagged
        left_out = {row.reference for row in rows
                    if row.reference in session.set_aside or not all(badges(state.report, row.name).values())}
        if len(left_out) < len(rows):
            rows = [r for r in rows if r.reference not in left_out] + [r for r in rows if r.reference in left_out]
            for row in rows:
                row.included = row.reference not in left_out
        form = default_form(DEFAULT_METHOD, self._references()[0], rows)
        form.output = self._auto_output = self.default_output(DEFAULT_METHOD)
        return form

    def _references(self) -> list[str]:
        session = self.app.state.session
        return session.references or [session.base.source, *[m.source for m in session.models]]

    def _base_options(self) -> list[tuple[str, str]]:
        refs = self._references()
        options = [(f"{self.app.state.session.base.name} (analysis base)", refs[0])]
        options += [(name, ref) for name, ref in zip(self.app.state.names, refs[1:])]
        options.append(("none", ""))
        if self.form and self.form.base and self.form.base not in refs:
            options.insert(0, (self.form.base, self.form.base))
        return options

    def _tokenizer_options(self) -> list[tuple[str, str]]:
        """Not set (the base's, vocabularies must agree), union, base, or one model's tokenizer."""
        options = [("not set (the base's)", ""), ("union of all models", "union"), ("base", "base")]
        options += [(name, ref) for name, ref in zip(self.app.state.names, self._references()[1:])]
        if self.form and self.form.tokenizer_source and self.form.tokenizer_source not in {v for _, v in options}:
            options.append((self.form.tokenizer_source, self.form.tokenizer_source))
        return options

    async def _rebuild_fields(self) -> None:
        """(Re)create the per-model and method-level fields for the form's method."""
        models, options = self.query_one("#model-fields"), self.query_one("#option-fields")
        await models.remove_children()
        await options.remove_children()
        await models.mount_all([ModelFields(i, row) for i, row in enumerate(self.form.models)])
        widgets = []
        method = METHODS[self.form.method]
        for name, text in self.form.options.items():
            spec = method.parameter(name)
            widgets += [Static(f"{name}: {spec.description}", classes="dim"),
                        Input(text, placeholder=f"default {spec.default}", compact=True, name=name, id=f"option-{name}",
                              classes="param-input")]
        if not widgets:
            widgets.append(Static("none", classes="dim"))
        await options.mount_all(widgets)

    # --- edits -------------------------------------------------------------------------------------
    async def on_select_changed(self, event: Select.Changed) -> None:
        if self.form is None:
            return
        value = event.value if isinstance(event.value, str) else ""
        if event.select.id == "method" and value != self.form.method:
            notes = set_method(self.form, value, self._references()[0])
            if notes:
                self.notify("; ".join(notes), title=f"method: {value}")
            self.query_one("#method-doc", Static).update(METHODS[value].description)
            self.query_one("#base", Select).value = self.form.base or ""
            output = self.query_one("#output", Input)
            if output.value == self._auto_output:
                output.value = self._auto_output = self.default_output(value)
            await self._rebuild_fields()
        elif event.select.id == "base":
            self.form.base = value or None
        elif event.select.id == "dtype":
            self.form.dtype = value or None
        elif event.select.id == "tokenizer":
            self.form.tokenizer_source = value or None
        self.schedule_preview()

    def on_model_fields_changed(self, message: ModelFieldsChanged) -> None:
        row = self.form.models[message.index]
        row.included = message.included
        if message.parameter is not None:
            row.fields[message.parameter] = message.text
        self.schedule_preview()

    @on(Input.Changed, "#option-fields Input")
    def option_changed(self, event: Input.Changed) -> None:
        self.form.options[event.input.name] = event.value
        self.schedule_preview()

    @on(Input.Changed, "#output")
    def output_changed(self, event: Input.Changed) -> None:
        self.form.output = event.value
        try:
            _, text = self.current_plan()
        except (MergescopeError, ValueError):
            return  # the next valid edit carries the output along
        self.post_message(PlanValidated(text, self.form.output, self.started_from))

    def default_output(self, method: str) -> str:
        """Where a plan of ``method`` merges unless the user typed a folder: in a demo workspace under its
        ``merges/``, else beside the current folder, named after the plan file (while the method is the file's)
        or the method."""
        session = self.app.state.session
        if session.workspace is not None:
            return str(merge_folder(session.workspace, method))
        if self.plan_path is not None and method == self._file_method:
            return f"{Path(self.plan_path).stem}-merged"
        return f"{method}-merged"

    def schedule_preview(self, delay: float = DEBOUNCE) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._timer = self.set_timer(delay, self._start_preview)

    def _start_preview(self) -> None:
        self._cancel.set()
        self._cancel = threading.Event()
        self.preview(self._cancel)

    # --- the plan and its preview ------------------------------------------------------------------
    def current_plan(self) -> tuple[MergePlan, str]:
        """(plan, YAML text) of the form, or raise MergescopeError / ValueError with what is wrong. The text is
        what Ctrl+S would write (comments of an existing plan file carried over), so a problem's line is the
        line it will have in the saved file."""
        path = Path(self.query_one("#plan-file", Input).value or "merge-plan.yml")
        try:
            old_text = path.read_text(encoding="utf-8") if path.is_file() else None
        except OSError:
            old_text = None
        text = plan_file_text(to_document(self.form), old_text)
        return parse_plan(text, source=f"{path} as saved"), text

    @work(thread=True, exclusive=True, group="preview")
    def preview(self, cancel: threading.Event) -> None:
        try:
            plan, text = self.current_plan()
            self.post_message(PlanValidated(text, self.form.output, self.started_from))
            self.post_message(VocabularyPreviewed(vocabulary_line(self.app.state, plan), cancel))
            for status, names, rows, warnings, heading in preview_rows(self.app.state, plan, cancel):
                if cancel.is_set():
                    return
                self.post_message(PreviewUpdated(status, names, rows, warnings, cancel, heading))
        except (MergescopeError, ValueError) as exc:
            if not cancel.is_set():
                self.post_message(PlanRejected(str(exc), cancel))

    def on_preview_updated(self, message: PreviewUpdated) -> None:
        if message.cancel.is_set():  # a later edit's preview is on its way
            return
        style = "green" if message.status.startswith("exact") else "yellow"
        self.query_one("#preview-status", Static).update(
            Text(message.status + norm_unit_note(message.norm_heading), style=style))
        self.query_one(PreviewTable).show(message.names, message.rows, message.norm_heading)
        text = Text()
        for warning in message.warnings:
            text.append("⚠ ", style="yellow")
            text.append(warning + "\n")
        self.query_one("#plan-warnings", Static).update(text)

    def on_vocabulary_previewed(self, message: VocabularyPreviewed) -> None:
        if not message.cancel.is_set():
            self.query_one("#vocab-preview", Static).update(message.text)

    def on_plan_rejected(self, message: PlanRejected) -> None:
        if message.cancel.is_set():
            return
        self.query_one("#preview-status", Static).update(Text("the plan has problems:", style="bold red"))
        self.query_one("#plan-warnings", Static).update(Text(message.problem, style="red"))

    # --- actions -----------------------------------------------------------------------------------
    def action_save(self) -> None:
        """Save the plan to the plan-file field's path; over an existing file only once the user said yes
        (``n`` leaves the file as it is and puts the cursor in the file field: save as), keeping its comments."""
        try:
            self.current_plan()
            document = to_document(self.form)
        except (MergescopeError, ValueError) as exc:
            self.notify(f"not saved: {exc}", severity="error")
            return
        path = Path(self.query_one("#plan-file", Input).value or "merge-plan.yml")
        try:
            old_text = path.read_text(encoding="utf-8") if path.is_file() else None
        except OSError as exc:
            self.notify(f"cannot read {path}: {exc.strerror}", severity="error")
            return
        text = plan_file_text(document, old_text)
        if old_text is None or old_text == text or self._replace_ok == path:
            self._write_plan(path, text)
            return

        def answered(replace: bool | None) -> None:
            if replace:
                self._replace_ok = path
                self._write_plan(path, text)
            else:
                self.query_one("#plan-file", Input).focus()
                self.notify("not saved: type another file name, then Ctrl+S saves there", severity="warning")

        self.app.push_screen(ConfirmScreen(f"{path} exists. Replace it? (its comments stay where the plan "
                                           "still has their keys)\nn: keep it and save as another file"), answered)

    def _write_plan(self, path: Path, text: str) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            self.notify(f"cannot write {path}: {exc.strerror}", severity="error")
            return
        self.notify(f"saved {path}")

    def action_run(self) -> None:
        try:
            _, text = self.current_plan()
        except (MergescopeError, ValueError) as exc:
            self.notify(f"cannot run: {exc}", severity="error")
            return
        self.post_message(PlanValidated(text, self.form.output, self.started_from))
        self.app.push_screen(RunScreen(text, self.form.output, self.started_from))

    def action_back(self) -> None:
        self._cancel.set()
        self.app.pop_screen()
