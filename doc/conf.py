"""Sphinx configuration of mailhub's manual."""

project = "mailhub"
author = "the mailhub developers"
release = "0.1.0"
extensions: list[str] = []
exclude_patterns = ["_build", "*.part"]
html_theme = "alabaster"
