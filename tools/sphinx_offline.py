"""A Sphinx extension that keeps the website free of CDN references: no page loads or names a script from the network.

Jupyter Book 1.x always loads ``sphinx_thebe``, which adds to every page an inline script naming thebe's
bundle on unpkg.com (``const THEBE_JS_URL = "https://unpkg.com/thebe@..."``, fetched when a reader presses a
"Live Code" button) and ``sphinx-thebe.js``. The book has no such button (``launch_buttons`` has no thebe), so
this extension drops both from every page. ``tests/browser/test_site.py`` checks that no page references a CDN.
"""
from __future__ import annotations

CDN_HOSTS = ("unpkg.com", "cdn.jsdelivr.net", "cdnjs.cloudflare.com")


def _is_thebe_or_cdn(js) -> bool:
    filename = str(getattr(js, "filename", js) or "")
    body = str((getattr(js, "attributes", None) or {}).get("body", ""))
    return "thebe" in filename or any(host in filename or host in body for host in CDN_HOSTS)


def _drop_cdn_scripts(app, pagename, templatename, context, doctree):  # noqa: ARG001 (Sphinx's signature)
    if "script_files" in context:
        context["script_files"] = [js for js in context["script_files"] if not _is_thebe_or_cdn(js)]


def setup(app):
    app.connect("html-page-context", _drop_cdn_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
