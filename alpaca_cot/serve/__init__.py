"""Serving a model to people: console chat sessions, the engine behind the web page and the HTTP API, the app.

Built on the inference stage; nothing below imports it.
"""
