"""The studio at ``/`` (serve/studio.html): generate, click an image for variations, paint a mask
over it (brush and eraser) to edit it with a prompt, and a session history. One file of plain
HTML and JavaScript, no build step; it calls the same ``/v1`` endpoints as any client, with the
API key typed into it (kept in the tab's sessionStorage only)."""

from importlib import resources

PAGE = resources.files("serve").joinpath("studio.html").read_text(encoding="utf-8")
