"""Images to verdicts: decoding, the batch loop (in-process or the model process), the registry of served bundles.

What the HTTP layer (:mod:`service.api`) hands its checked uploads to; it knows nothing of HTTP.
"""
