"""The packaged end-to-end boot test on an emulated ARM gateway, with the x86 boot tests' own assertions.

The test functions are the ones in tests/packaging (imported, not copied):
here their ``gateway_rootfs`` and ``installed_rootfs`` are the ARM lane's
root filesystem with the .debs installed by apt, booted under
``systemd-nspawn --boot`` with qemu-user running every arm64 binary.
"""

from __future__ import annotations

import pytest
from test_boot import test_apt_installs_both_packages_with_debians_python_libraries  # noqa: F401
from test_boot_enrolled import (  # noqa: F401
    controller,
    test_token_on_boot_partition_enrolls_and_a_host_dial_reaches_a_service_inside,
)

pytestmark = pytest.mark.slow
