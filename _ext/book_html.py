"""Small fixes to the HTML that Jupyter Book 1.x writes, loaded from _config.yml.

Sphinx 7.4 adds an inline script registered after the builder starts twice to every page
(once with filename None, once with ''). sphinx-thebe registers one that declares
`const THEBE_JS_URL`, so the second copy throws "Identifier 'THEBE_JS_URL' has already been
declared" on every page. This drops repeated inline scripts (same body and attributes).
"""

from __future__ import annotations

from typing import Any


def drop_repeated_inline_scripts(
    app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple[tuple[str, str], ...]] = set()
    kept = []
    for script in scripts:
        if not getattr(script, "filename", True):  # inline <script>, its code in attributes["body"]
            key = tuple(sorted((k, str(v)) for k, v in script.attributes.items()))
            if key in seen:
                continue
            seen.add(key)
        kept.append(script)
    scripts[:] = kept


def setup(app: Any) -> dict[str, Any]:
    # After every other handler has added its scripts to the page (default priority 500).
    app.connect("html-page-context", drop_repeated_inline_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
