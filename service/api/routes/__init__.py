"""HTTP routers: thin adapters from HTTP to :mod:`service.runtime.predictor` and the registry."""
