"""schemathesis hooks for tests/web/test_openapi_conformance.py: requests that name site data.

The add hook refuses a ``groupId`` the site does not have (GroupServer's
validation error, 400): which groups exist is data, which no schema can
know. A request schemathesis generates as valid names a group the test
site has, so "valid" means one the site can carry out; requests generated
to be invalid are sent as generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis import GenerationMode

#: The groups the test site has (test_openapi_conformance._site_with_data).
GROUPS = ("team", "quiet")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: Any) -> None:
    """Point a valid add request at an existing group, chosen by its own value."""
    if case.operation.path != "/gs-group-member-add.json":
        return
    meta = case.meta
    if meta is None or meta.generation.mode is not GenerationMode.POSITIVE:
        return
    forms = [case.query, case.body]
    if isinstance(case.query, dict):
        forms.append(case.query.get("form"))  # the GET form, if not yet flattened
    for fields in forms:
        if isinstance(fields, dict) and fields.get("groupId") is not None:
            fields["groupId"] = GROUPS[len(str(fields["groupId"])) % len(GROUPS)]
