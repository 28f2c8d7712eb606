"""pytest plugin for `make nbval`: outputs captured by an Output widget are not cell outputs.

A cell such as `interactive(f, n=(0, 10))` runs `f` once while building the widget, inside an
`ipywidgets.Output` context; Jupyter (and nbclient, used by `make execute`) route the printed
text, figures and errors into that widget, whose state the notebook stores. nbval 0.11 does
not: it counts them as extra outputs of the cell, so every such cell fails ("Unexpected output
fields", "dissimilar number of outputs"). This plugin follows the Output widgets' `msg_id`
(sent over comm messages, as Jupyter's front ends do) and drops the messages they capture
before nbval sees them. The rest of the cell is compared as usual.

Loaded with `pytest -p tools.nbval_output_widgets --nbval ...` (see the Makefile).
"""

from __future__ import annotations

from typing import Any

OUTPUT_MESSAGES = {
    "stream",
    "display_data",
    "update_display_data",
    "execute_result",
    "error",
    "clear_output",
}


class OutputWidgetCapture:
    """Tracks which Output widgets capture which request, from the iopub messages in order."""

    def __init__(self) -> None:
        self.capturing: dict[str, str] = {}  # comm id -> msg_id of the captured request

    def is_captured(self, msg: dict[str, Any]) -> bool:
        msg_type, content = msg["msg_type"], msg["content"]
        if msg_type in ("comm_open", "comm_msg"):
            state = (content.get("data") or {}).get("state") or {}
            if "msg_id" in state:
                if state["msg_id"]:
                    self.capturing[content["comm_id"]] = state["msg_id"]
                else:
                    self.capturing.pop(content["comm_id"], None)
            return False
        if msg_type == "comm_close":
            self.capturing.pop(content.get("comm_id"), None)
            return False
        parent = msg.get("parent_header", {}).get("msg_id")
        return msg_type in OUTPUT_MESSAGES and parent in self.capturing.values()


def pytest_configure(config: Any) -> None:
    from nbval.plugin import IPyNbFile

    if getattr(IPyNbFile.get_kernel_message, "_skips_output_widgets", False):
        return
    original = IPyNbFile.get_kernel_message

    def get_kernel_message(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        capture = self.__dict__.setdefault("_output_widget_capture", OutputWidgetCapture())
        while True:
            msg = original(self, *args, **kwargs)
            if not capture.is_captured(msg):
                return msg

    get_kernel_message._skips_output_widgets = True
    IPyNbFile.get_kernel_message = get_kernel_message
