"""The HTTP edge: routes, admission, limits, API keys, errors and the schemas of every body.

Everything here turns HTTP into calls on :mod:`service.runtime` and answers back; nothing here
touches a tensor.
"""
