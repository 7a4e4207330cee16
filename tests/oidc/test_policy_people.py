"""People and policies: a tenant admin changes only their tenant's policies; a refusal is one sentence and one row."""

from __future__ import annotations

from pathlib import Path

from tests.controller.harness import run, running_controller, store_snapshot
from tests.oidc.harness import IdP
from tests.oidc.signin_harness import call, device_sign_in, signin_settings


def test_a_tenant_admin_cannot_update_or_delete_another_tenants_policy(idp: IdP, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_controller(tmp_path / "ctl", signin=signin_settings(idp)) as running:
            admin = running.admin_token
            for tenant in ("default", "acme"):
                status, _ = await call(running, "POST", "/api/v1/services", {"name": "modbus", "tenant": tenant},
                                       bearer=admin)
                assert status == 201
            ours = {}
            for tenant in ("default", "acme"):
                status, ours[tenant] = await call(running, "POST", "/api/v1/policies", {
                    "kind": "dial", "tenant": tenant, "identities": ["ops"], "services": ["modbus"]}, bearer=admin)
                assert status == 201
            tina = (await device_sign_in(running, idp, "tina"))["session"]  # admin of tenant acme only
            path = running.context.settings.store_path
            for method, body in (("PATCH", {"identities": ["tina"]}), ("DELETE", None)):
                before = store_snapshot(path)
                status, refused = await call(running, method, f"/api/v1/policies/{ours['default']['id']}", body,
                                             bearer=tina)
                assert (status, refused["error"]) == (403, "role_required"), refused
                assert refused["message"] == (f"{'Updating' if method == 'PATCH' else 'Deleting'} a policy needs "
                                              "the admin role in tenant default; you have admin:acme.")
                after = store_snapshot(path)
                assert after["policies"] == before["policies"]
                added = [row[2] for row in after["audit"][len(before["audit"]):]]
                assert added == ["management_refused"]
            # Her own tenant's policy she may change, and she sees only it.
            status, updated = await call(running, "PATCH", f"/api/v1/policies/{ours['acme']['id']}",
                                         {"for": "1h"}, bearer=tina)
            assert status == 200 and updated["version"] == 2, updated
            status, listed = await call(running, "GET", "/api/v1/policies", bearer=tina)
            assert [p["tenant"] for p in listed["policies"]] == ["acme"]
            status, _ = await call(running, "DELETE", f"/api/v1/policies/{ours['acme']['id']}", bearer=tina)
            assert status == 200

    run(scenario())
