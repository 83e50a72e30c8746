"""The online package: FastAPI app, micro-batcher, safe image decoding, Prometheus metrics, settings.

Entry points: :func:`service.app.create_app` and ``python -m service`` (console script
``mixoe-serve``). It depends on ``models`` (what a bundle is), never on ``training``.
"""
