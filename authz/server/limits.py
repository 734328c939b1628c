"""Limits every front enforces on what it accepts, so hostile input is a deny and never a crash."""

from __future__ import annotations

# Envoy's own default max_request_headers_kb is 60 KiB; a check carrying more than that did not come from
# a default Envoy, and anything larger only costs us memory.
MAX_HEADERS_BYTES = 96 * 1024
# Envoy's default max_headers_count is 100; leave room for the pseudo-headers and ext_authz additions.
MAX_HEADER_COUNT = 200
# A :path longer than this is not a request we can decide sensibly (Envoy limits the whole header map).
MAX_PATH_BYTES = 16 * 1024
