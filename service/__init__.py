"""The online package: FastAPI app, batch loop, safe image decoding, Prometheus metrics, settings.

Grouped by role: ``api`` (the HTTP edge), ``runtime`` (images to verdicts, the model process)
and ``monitoring`` (metrics, logs, drift); the app, its settings and its context at the top.

Entry points: :func:`service.app.create_app` and ``python -m service`` (console script
``mixoe-serve``). It depends on ``models`` (what a bundle is), never on ``training``.
"""
