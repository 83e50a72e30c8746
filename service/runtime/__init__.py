"""Images to verdicts: decoding, the micro-batcher, the registry of served bundles, the model process.

What the HTTP layer (:mod:`service.api`) hands its checked uploads to; it knows nothing of HTTP.
"""
