"""Putting runs side by side: compare (many methods, one report), inspection (per-layer
analysis of an adapter) and the pages both write (Markdown, HTML, PNG)."""
