"""Fronts that translate Envoy's ext_authz protocols (gRPC and HTTP) to and from the engine."""
