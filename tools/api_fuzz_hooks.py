"""Schemathesis hooks of tools/api-fuzz.sh (loaded through SCHEMATHESIS_HOOKS).

Owns one filter: in negative mode schemathesis still sends, now and then, a case it generated as
positive; for shutdownVm the positive case without a body stops the VM, so the shutdown phase
never sends a bodyless request (the script's last phase does, deliberately)."""

import schemathesis
from schemathesis.core import NOT_SET


@schemathesis.hook
def filter_case(context, case):
    """False for a shutdownVm case without a body."""
    return not (case.operation.path.endswith("/shutdown") and case.body is NOT_SET)
