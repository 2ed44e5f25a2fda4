"""Every read RPC runs a fixed, small number of SQL statements, however many rows exist (issue 10, item 2).

The same calls are made against a world where each related table holds 1 row and one where it holds 500 (500
contexts, credentials, and — on the context read — 500 jobs, disks, CBT rows, JobLog jobs and group memberships):
the statement count of each RPC must be the same in both and within its budget. Statements are counted by a
Peewee query hook on the OMA's RPC threads (tests/helpers/queries.py) on SQLite and MariaDB; on MariaDB the server's
own ``Questions`` counter of the single pooled connection is read too and must agree with the hook.
"""
from __future__ import annotations

import base64
import threading
import time
from datetime import timedelta
from typing import Any, Callable

import pytest
from oma.v1 import replications_pb2 as rpb
from oma.v1 import vm_contexts_pb2 as cpb
from oma.v1 import vmware_credentials_pb2 as vpb

from oma_server.db import connect, models
from oma_server.db import database as db_module
from oma_server.domain import auth, contexts
from oma_server.errors import InvalidArgument, Unauthenticated
from omaclient.client import OmaClient
from tests import factories
from tests.fixtures.databases import fresh_database_url, reset_database
from tests.fixtures.servers import ADMIN_PASSWORD, start_oma
from tests.helpers.queries import count_statements, mariadb_questions

TARGET = "ctx-budget-target"
JOB = "job-budget-target"

# Statements per call (the token check is served from the auth cache and needs none).
BUDGET = {
    "ListVMContexts": 3,        # count, page, group memberships of the page
    "GetVMContext": 6,          # context, job history, CBT history, groups, disks, their replica volumes
    "GetVMContextByName": 6,
    "ListVMContextDisks": 3,    # context, disks, replica volumes
    "ListRecentJobs": 4,        # context, replication jobs, JobLog jobs, their steps
    "ListCredentials": 1,       # credentials with their context counts
    "GetCredential": 1,
    "GetDefaultCredential": 1,
    "GetReplication": 5,        # job, disks, replica volumes, CBT history, JobLog id
    "ListReplications": 2,      # count, page
    "GetReplicationProgress": 3,  # job, disks, CBT history
    "GetPreviousChangeID": 3,   # context, disk, replica volume
}


def populate(n: int) -> None:
    """A world where every table a read touches has ``n`` rows (about the target context where it applies)."""
    now = models.utcnow()
    models.VmwareCredential.insert_many([
        dict(credential_name=f"cred-{i:04d}", vcenter_host="vc.budget", username="administrator@vsphere.local",
             password_encrypted="x", datacenter="DC0", is_active=True, is_default=i == 0) for i in range(n)
    ]).execute()
    credential = models.VmwareCredential.get(models.VmwareCredential.credential_name == "cred-0000").id
    models.VmReplicationContext.insert_many([
        dict(context_id=TARGET if i == 0 else f"ctx-budget-{i:04d}", vm_name=f"vm-{i:04d}", vmware_vm_id=f"vm-{i}",
             vm_path=f"/DC0/vm/vm-{i:04d}", vcenter_host="vc.budget", datacenter="DC0", credential=credential)
        for i in range(n)
    ]).execute()
    models.ReplicationJob.insert_many([
        dict(id=JOB if i == 0 else f"job-budget-{i:04d}", vm_context=TARGET, source_vm_id="vm-0",
             source_vm_name="vm-0000", source_vm_path="/DC0/vm/vm-0000", vcenter_host="vc.budget",
             datacenter="DC0", replication_type="initial", status="completed",
             created_at=now - timedelta(seconds=i), completed_at=now) for i in range(n)
    ]).execute()
    models.OsseaVolume.insert_many([
        dict(volume_id=f"vol-budget-{i:04d}", volume_name=f"vol-{i}", size_gb=1) for i in range(n)
    ]).execute()
    volumes = [v.id for v in models.OsseaVolume.select(models.OsseaVolume.id).order_by(models.OsseaVolume.id)]
    models.VmDisk.insert_many([
        dict(vm_context=TARGET, job=JOB, disk_id=f"disk-{2000 + i}", vmdk_path=f"[ds0] vm-0000/{i}.vmdk", size_gb=1,
             unit_number=i, ossea_volume_id=volumes[i], disk_change_id=f"52 aa-{i:04d}/1") for i in range(n)
    ]).execute()
    models.CbtHistory.insert_many([
        dict(vm_context=TARGET, job=JOB, disk_id=f"disk-{2000 + i}", change_id=f"52 aa-{i:04d}/1",
             sync_type="full", sync_success=True) for i in range(n)
    ]).execute()
    models.JobTracking.insert_many([
        dict(id=f"track-budget-{i:04d}", job_type="failover", operation="test-failover", status="completed",
             context_id=TARGET, external_job_id=JOB if i == 0 else None, started_at=now - timedelta(seconds=i))
        for i in range(n)
    ]).execute()
    models.JobStep.insert_many([
        dict(job=f"track-budget-{i:04d}", name="validate", seq=1, status="completed") for i in range(n)
    ]).execute()
    models.VmMachineGroup.insert_many([dict(id=f"group-budget-{i:04d}", name=f"group-{i:04d}") for i in range(n)]).execute()
    models.VmGroupMembership.insert_many([
        dict(group=f"group-budget-{i:04d}", vm_context=TARGET) for i in range(n)
    ]).execute()


def read_calls(client: OmaClient) -> dict[str, Callable[[], Any]]:
    return {
        "ListVMContexts": lambda: client.contexts.ListVMContexts(cpb.ListVMContextsRequest(page_size=50)),
        "GetVMContext": lambda: client.contexts.GetVMContext(cpb.GetVMContextRequest(context_id=TARGET)),
        "GetVMContextByName": lambda: client.contexts.GetVMContextByName(
            cpb.GetVMContextByNameRequest(vm_name="vm-0000")),
        "ListVMContextDisks": lambda: client.contexts.ListVMContextDisks(
            cpb.ListVMContextDisksRequest(context_id=TARGET)),
        "ListRecentJobs": lambda: client.contexts.ListRecentJobs(cpb.ListRecentJobsRequest(context_id=TARGET)),
        "ListCredentials": lambda: client.credentials.ListCredentials(vpb.ListCredentialsRequest()),
        "GetCredential": lambda: client.credentials.GetCredential(vpb.GetCredentialRequest(
            id=models.VmwareCredential.get(models.VmwareCredential.credential_name == "cred-0000").id)),
        "GetDefaultCredential": lambda: client.credentials.GetDefaultCredential(vpb.GetDefaultCredentialRequest()),
        "GetReplication": lambda: client.replications.GetReplication(rpb.GetReplicationRequest(job_id=JOB)),
        "ListReplications": lambda: client.replications.ListReplications(rpb.ListReplicationsRequest(page_size=50)),
        "GetReplicationProgress": lambda: client.replications.GetReplicationProgress(
            rpb.GetReplicationProgressRequest(job_id=JOB)),
        "GetPreviousChangeID": lambda: client.replications.GetPreviousChangeID(
            rpb.GetPreviousChangeIDRequest(vm_context_id=TARGET, disk_id="disk-2000")),
    }


def statements_per_call(database, client: OmaClient) -> dict[str, list[str]]:
    counted = {}
    calls = read_calls(client)
    for call in calls.values():
        call()  # warm: the first call of a kind may compile its statements and load the auth cache
    with count_statements(database) as log:
        for name, call in calls.items():
            log.clear()
            call()
            counted[name] = log.rpc_statements
    return counted


def test_every_read_rpc_runs_the_same_few_statements_for_1_and_500_rows(db, tmp_path):
    counts: dict[int, dict[str, list[str]]] = {}
    for n in (1, 500):
        db_module.database_proxy.initialize(db)
        reset_database(db)
        with db.connection_context():
            populate(n)
        # The revocation snapshot stays cached for the test, so no call reloads it.
        with start_oma(tmp_path / f"oma-{n}", db, token_revocation_cache_seconds=3600) as running:
            with OmaClient(f"127.0.0.1:{running.port}", token="") as client:
                client.login("admin", ADMIN_PASSWORD)
                with db.connection_context():
                    sizes = client.contexts.GetVMContext(cpb.GetVMContextRequest(context_id=TARGET)).details
                    assert len(sizes.disks) == n and len(sizes.context.groups) == n
                    assert len(client.credentials.ListCredentials(vpb.ListCredentialsRequest()).credentials) == n
                    assert client.credentials.ListCredentials(
                        vpb.ListCredentialsRequest()).credentials[0].context_count == n
                    counts[n] = statements_per_call(db, client)
    for name, budget in BUDGET.items():
        small, large = counts[1][name], counts[500][name]
        assert len(small) == len(large), f"{name}: {len(small)} statements for 1 row, {len(large)} for 500: {large}"
        assert len(large) <= budget, f"{name}: {len(large)} statements, budget {budget}: {large}"
        assert large, f"{name}: no statement seen on the RPC threads (were they renamed?)"


def test_mariadb_questions_counter_agrees_with_the_statement_hook(mariadb_test_server, tmp_path):
    """MariaDB's own count of the statements a read RPC sent (``SHOW SESSION STATUS LIKE 'Questions'``), on an OMA
    with a single pooled connection so the call must use the one the test reads the counter on."""
    with fresh_database_url("mariadb", mariadb_test_server) as url, \
            start_oma(tmp_path / "oma", None, db_url=url, db_pool_size=1,
                      token_revocation_cache_seconds=3600) as running:
        database = db_module.database_proxy.obj
        with database.connection_context():
            populate(500)
        with OmaClient(f"127.0.0.1:{running.port}", token="") as client:
            client.login("admin", ADMIN_PASSWORD)
            calls = read_calls(client)
            with database.connection_context():
                credential_id = models.VmwareCredential.get(models.VmwareCredential.credential_name == "cred-0000").id
            calls["GetCredential"] = lambda: client.credentials.GetCredential(vpb.GetCredentialRequest(id=credential_id))
            for call in calls.values():
                call()
            for name, call in calls.items():
                with count_statements(database) as log:
                    with database.connection_context():
                        before = mariadb_questions(database)
                    call()
                    with database.connection_context():
                        after = mariadb_questions(database)
                connections = {s.connection for s in log.statements}
                assert len(connections) == 1, "the pool of one connection served everything"
                # Everything sent on the connection between the two readings (the second SHOW included), by
                # any thread: the server's counter and the hook agree.
                assert after - before == len(log.statements) - 1, (name, after - before, log.statements)
                assert 0 < len(log.rpc_statements) <= BUDGET[name], (name, log.rpc_statements)


def test_listing_10000_contexts_page_by_page_reads_one_index_range_per_page(db, tmp_path):
    """Keyset paging: every page after the first is the same two statements (page, group memberships) whose page
    read is a range of the (vm_name, vcenter_host) index with no sort and no OFFSET, so page 100 costs what page 2
    does; the whole listing returns each context exactly once, in order."""
    total = 10_000
    names = [f"vm-{i:05d}" for i in range(total)]
    with db.connection_context(), db.atomic():
        rows = [dict(context_id=f"ctx-page-{i:05d}", vm_name=name, vmware_vm_id=f"vm-{i}", vm_path=f"/DC0/vm/{name}",
                     vcenter_host="vc.page", datacenter="DC0") for i, name in enumerate(reversed(names))]
        for start in range(0, total, 500):
            models.VmReplicationContext.insert_many(rows[start:start + 500]).execute()
    with start_oma(tmp_path / "oma", db, token_revocation_cache_seconds=3600) as running, \
            OmaClient(f"127.0.0.1:{running.port}", token="") as client:
        client.login("admin", ADMIN_PASSWORD)
        client.contexts.ListVMContexts(cpb.ListVMContextsRequest(page_size=1))  # loads the auth cache
        seen, per_page, token = [], [], ""
        with count_statements(db) as log:
            while True:
                log.clear()
                page = client.contexts.ListVMContexts(cpb.ListVMContextsRequest(page_size=250, page_token=token))
                per_page.append(list(log.rpc_statements))
                assert page.count == total
                seen.extend(c.vm_name for c in page.vm_contexts)
                token = page.next_page_token
                if not token:
                    break
        page_sql = [s for s in log.statements if "ORDER BY" in s.sql and "vm_replication_contexts" in s.sql]
    assert seen == names
    assert len(per_page) == total // 250
    assert len(per_page[0]) == 3 and "COUNT" in per_page[0][0].upper()  # the first page counts once
    assert all(len(statements) == 2 for statements in per_page[1:])
    last = page_sql[-1]  # the page read of the last page: the same text as every page after the first
    assert "OFFSET" not in last.sql.upper()
    # Its plan: a range of the unique (vm_name, vcenter_host) index, no sort.
    with db.connection_context():
        params = last.params
        if db_module.is_mysql(db):
            plan = db.execute_sql("EXPLAIN " + last.sql, params).fetchall()
            columns = [d[0] for d in db.execute_sql("EXPLAIN " + last.sql, params).description]
            row = dict(zip(columns, plan[0], strict=True))
            assert row["key"] == "unique_vm_name_per_vcenter" and row["type"] == "range", row
            assert "filesort" not in (row["Extra"] or ""), row
        else:
            plan = " | ".join(r[-1] for r in db.execute_sql("EXPLAIN QUERY PLAN " + last.sql, params).fetchall())
            assert "USING INDEX unique_vm_name_per_vcenter (vm_name>?)" in plan, plan
            assert "TEMP B-TREE" not in plan, plan


def test_keyset_tokens_continue_offset_tokens_and_refuse_tampering(db):
    with db.connection_context():
        for name in ("alpha", "bravo", "charlie", "delta"):
            factories.context(vm_name=name)
        first, _ = contexts.list_contexts(page_size=2)
        assert [c.vm_name for c in first.items] == ["alpha", "bravo"] and first.total == 4
        second, _ = contexts.list_contexts(page_size=2, page_token=first.next_page_token)
        assert [c.vm_name for c in second.items] == ["charlie", "delta"] and not second.next_page_token
        assert second.total == 4  # the count taken by the first page, carried in the token
        # An offset token from before keyset paging (a listing that spans the upgrade) still continues.
        legacy = base64.urlsafe_b64encode(b"o:1").decode()
        resumed, _ = contexts.list_contexts(page_size=2, page_token=legacy)
        assert [c.vm_name for c in resumed.items] == ["bravo", "charlie"]
        for forged in ("zzz", base64.urlsafe_b64encode(b'k:[["x"],1]').decode(),
                       base64.urlsafe_b64encode(b"k:not json").decode()):
            with pytest.raises(InvalidArgument):
                contexts.list_contexts(page_size=2, page_token=forged)


def test_a_call_waiting_for_the_only_mariadb_connection_gets_it_when_it_is_given_back(mariadb_test_server):
    with fresh_database_url("mariadb", mariadb_test_server) as url:
        pool = connect(url, pool_size=1, pool_timeout=5)
        taken, waited = threading.Event(), []

        def holder() -> None:
            with pool.connection_context():
                pool.execute_sql("SELECT 1")
                taken.set()
                time.sleep(0.3)

        def waiter() -> None:
            taken.wait(5)
            started = time.monotonic()
            with pool.connection_context():
                waited.append((time.monotonic() - started, pool.execute_sql("SELECT 1").fetchone()))

        threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        pool.close_all()
        (seconds, row), = waited
        assert row == (1,) and 0.1 < seconds < 0.9, seconds


def test_a_mariadb_pool_bound_at_start_is_already_open(mariadb_test_server):
    with fresh_database_url("mariadb", mariadb_test_server) as url:
        previous = db_module.database_proxy.obj
        try:
            pool = db_module.init_database(url, pool_size=4)
            assert len(pool._connections) == 4 and not pool._in_use
            with pool.connection_context():
                assert pool.execute_sql("SELECT 1").fetchone() == (1,)
            assert len(pool._connections) == 4 and not pool._in_use
            pool.close_all()
        finally:
            db_module.database_proxy.initialize(previous)


def test_a_token_verified_once_is_still_refused_when_it_expires_or_is_altered(db):
    """The token check remembers verified claims by the exact token text; that must not outlive the token's
    expiry nor accept any other text."""
    with db.connection_context():
        auth.ensure_admin_user(ADMIN_PASSWORD)
        user_id = models.ApiUser.get(models.ApiUser.username == "admin").id
        authority = auth.TokenAuthority(b"s" * 32, 1)
        token = authority.issue("admin", user_id).token
        assert authority.verify(token).username == "admin"
        assert authority.verify(token).username == "admin"  # from the cache
        header, payload, signature = token.split(".")
        altered = ".".join((header, payload, ("A" if signature[0] != "A" else "B") + signature[1:]))
        with pytest.raises(Unauthenticated, match="not valid"):
            authority.verify(altered)
        time.sleep(2.1)
        with pytest.raises(Unauthenticated, match="expired"):
            authority.verify(token)
