"""check_http_request's two-scan fast path decides exactly like checking every header one by one."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from authz.errors import MalformedRequest
from authz.policy.normalize import check_http_request
from authz.request import HttpAttributes

TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
BAD_VALUE = re.compile(r"[\r\n\x00]")


def one_by_one(headers: dict[str, str]) -> bool:
    for name, value in headers.items():
        if not TOKEN.fullmatch(name[1:] if name.startswith(":") else name) or BAD_VALUE.search(value):
            return False
    return True


names = st.one_of(
    st.sampled_from([":path", ":authority", "x-a", "authorization", "x a", "", ":", "::x", "a\nb", "ü"]),
    st.text(alphabet="ab-: \n\r\x00", max_size=6),
)
values = st.one_of(st.sampled_from(["v", "", "a\r\nb", "x\x00", "t\tt"]), st.text(max_size=8))


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(names, values, max_size=6))
def test_fast_path_equals_per_header_check(headers: dict[str, str]) -> None:
    try:
        check_http_request(HttpAttributes(method="GET", host="a", headers=headers))
        accepted = True
    except MalformedRequest:
        accepted = False
    assert accepted == one_by_one(headers)
