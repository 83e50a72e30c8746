"""HTTP routers: thin adapters from HTTP to :mod:`service.predictor` and the registry."""
