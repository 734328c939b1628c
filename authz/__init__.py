"""meshauthz: an Istio-compatible external authorizer for Envoy, with a bundled proxy and a mock IdP."""

__version__ = "0.1.0"
