"""Exactly-once claims on a real three-node MariaDB Galera cluster, with three OMA processes each on its own node.

Galera does not make ``SELECT … FOR UPDATE`` cluster-wide: concurrent claims through different nodes meet at
commit, where certification aborts all but one (MariaDB error 1213), and the OMA retries the loser's whole
transaction (``oma_server.db.transactions``, docs/design/galera.md).  These tests drive that race for real:

* 100 concurrent CreateReplication calls for 20 VMs spread over the 3 OMAs → exactly one job per VM;
* one schedule watched by the 3 OMAs' schedulers → one execution per tick;
* a database node killed mid-wave → every job a client was told about exists, still one job per VM.

The replications never get far (CloudStack and the VMA are a black hole: a socket that never answers, so each job
stays active during the test); what is tested is the claim.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from oma.v1 import machine_groups_pb2 as mgpb
from oma.v1 import replications_pb2 as rpb
from oma.v1 import schedules_pb2

from oma_server.db import connect, database_proxy, models
from oma_server.domain import cloudstack_config, credentials, replications
from oma_server.domain.crypto import SecretBox, decode_key
from oma_server.domain.schedules import SCHEDULER_OWNER
from oma_server.errors import FailedPrecondition
from omaclient.client import OmaClient
from omalab.servers import ADMIN_PASSWORD
from tests import factories

VMS = 20
CALLS = 100

# One worker runs them all, so an xdist run starts one cluster (scripts/test uses --dist loadgroup).
pytestmark = pytest.mark.xdist_group("galera")


@pytest.fixture
def black_hole():
    """A TCP port that accepts connections (into the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(256)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@contextlib.contextmanager
def bound_to(url: str):
    """The test's own connection to the cluster (through one node), bound to the models."""
    database = connect(url, pool_size=4)
    database_proxy.initialize(database)
    try:
        with database.connection_context():
            yield database
    finally:
        database.close_all()


def prepare_vms(encryption_key: str, black_hole: str) -> list[str]:
    """A default vCenter credential, an active CloudStack configuration and VMS VMs with one disk each."""
    box = SecretBox(decode_key(encryption_key))
    credentials.create(box, credential_name="lab", vcenter_host="vc.lab", username="administrator@vsphere.local",
                       password="lab-password", datacenter="DC0", is_default=True, tls_insecure=True,
                       created_by="test")
    cloudstack_config.create(box, {
        "name": "cs", "api_url": f"http://{black_hole}/client/api", "api_key": "key", "secret_key": "secret",
        "zone": "zone-1", "disk_offering_id": "offering-1", "oma_vm_id": "oma-vm-1"})
    contexts = [factories.context(vm_name=f"galera-vm{index:02d}") for index in range(VMS)]
    for ctx in contexts:
        factories.disk(ctx)
    return [ctx.context_id for ctx in contexts]


def clients_for(omas) -> list[OmaClient]:
    clients = []
    for oma in omas:
        client = OmaClient(oma.address, token="", timeout=60)
        client.login("admin", ADMIN_PASSWORD)
        clients.append(client)
    return clients


def cluster_conflicts(galera) -> int:
    """Transactions Galera aborted so far on the running nodes (certification failures + brute-force aborts)."""
    return sum(int(node.status(name) or 0) for node in galera.nodes if node.running
               for name in ("wsrep_local_cert_failures", "wsrep_local_bf_aborts"))


def jobs_per_vm(context_ids: list[str]) -> dict[str, list[str]]:
    jobs: dict[str, list[str]] = {context_id: [] for context_id in context_ids}
    for job in models.ReplicationJob.select(models.ReplicationJob.id, models.ReplicationJob.vm_context):
        jobs[job.vm_context_id].append(job.id)
    return jobs


def test_concurrent_creates_through_three_nodes_make_one_job_per_vm(galera, galera_database, oma_processes,
                                                                    black_hole):
    omas = oma_processes(galera_database, 3, vma_address=black_hole)
    with bound_to(galera.nodes[0].url(galera_database)):
        context_ids = prepare_vms(oma_processes.encryption_key, black_hole)
    clients = clients_for(omas)
    conflicts_before = cluster_conflicts(galera)
    start = threading.Barrier(CALLS)

    def create(call: int) -> tuple[str, str, str]:
        context_id = context_ids[call % VMS]
        start.wait()
        try:
            created = clients[call % 3].replications.CreateReplication(
                rpb.CreateReplicationRequest(context_id=context_id), timeout=60)
        except grpc.RpcError as exc:
            return context_id, exc.code().name, exc.details()
        return context_id, "OK", created.job_id

    try:
        with ThreadPoolExecutor(CALLS) as pool:
            outcomes = list(pool.map(create, range(CALLS)))
    finally:
        for client in clients:
            client.close()

    codes = Counter(code for _, code, _ in outcomes)
    assert codes == {"OK": VMS, "FAILED_PRECONDITION": CALLS - VMS}, outcomes
    answered = {context_id: job_id for context_id, code, job_id in outcomes if code == "OK"}
    assert sorted(answered) == sorted(context_ids)  # each VM won exactly once
    for node in galera.nodes:  # every node holds the same outcome
        with bound_to(node.url(galera_database)):
            assert jobs_per_vm(context_ids) == {context_id: [answered[context_id]] for context_id in context_ids}
            current = {ctx.context_id: ctx.current_job_id for ctx in models.VmReplicationContext.select()}
            assert current == answered
    # The race really crossed nodes: Galera aborted some of the competing transactions (and the OMAs retried
    # them). Without it this test would only show that one node serialises with FOR UPDATE.
    print(f"Galera aborted {cluster_conflicts(galera) - conflicts_before} conflicting transactions")


def test_a_create_aborted_by_a_claim_through_another_node_is_retried_and_refused(galera, galera_database,
                                                                                 oma_processes, black_hole):
    """Deterministic form of the race: a create through node 2 has claimed the VM (uncommitted) when a create
    through node 1 commits the same claim.  Galera aborts node 2's transaction (a brute-force abort, error 1213);
    run_transaction runs it again, and the second attempt sees the winner's job and refuses."""
    oma_on_node1 = oma_processes(galera_database, 1, vma_address=black_hole)[0]
    node2 = galera.nodes[1]
    with bound_to(node2.url(galera_database)):
        context_id = prepare_vms(oma_processes.encryption_key, black_hole)[0]
        aborts_before = int(node2.status("wsrep_local_bf_aborts") or 0)
        # A second connection to node 2 holds the VM's disk row, where the create (after its claim) will wait.
        holder = node2.connect(database=galera_database)
        holder.begin()
        holder.cursor().execute("SELECT * FROM vm_disks WHERE vm_context_id = %s FOR UPDATE", (context_id,))
        outcome: dict[str, object] = {}

        def create_through_node2() -> None:
            with database_proxy.connection_context():
                try:
                    outcome["job"] = replications.create(replications.CreateRequest(context_id=context_id), "test")
                except Exception as exc:  # noqa: BLE001 - the outcome is asserted below
                    outcome["error"] = exc

        loser = threading.Thread(target=create_through_node2)
        loser.start()
        with contextlib.closing(node2.connect()) as watcher, watcher.cursor() as cursor:
            deadline = time.monotonic() + 90
            while not cursor.execute("SELECT 1 FROM information_schema.processlist WHERE info LIKE 'UPDATE `vm_disks`%'"):
                assert loser.is_alive(), f"the create through node 2 ended before the race: {outcome}"
                assert time.monotonic() < deadline, "the create through node 2 never reached the disk row"
                time.sleep(0.05)
        client = clients_for([oma_on_node1])[0]
        try:
            winner = client.replications.CreateReplication(rpb.CreateReplicationRequest(context_id=context_id),
                                                           timeout=30).job_id
        finally:
            client.close()
        loser.join(timeout=60)
        with contextlib.suppress(Exception):  # aborted by Galera as well (it held a row the winner wrote)
            holder.rollback()
        holder.close()
        error = outcome.get("error")
        assert isinstance(error, FailedPrecondition), outcome
        assert winner in error.message
        assert jobs_per_vm([context_id]) == {context_id: [winner]}
        assert int(node2.status("wsrep_local_bf_aborts") or 0) > aborts_before


def test_three_schedulers_fire_each_tick_once(galera, galera_database, oma_processes):
    """Five schedules firing every second, watched by three schedulers on three nodes: one execution per schedule
    and tick (several schedules make the three processes' firings overlap often)."""
    omas = oma_processes(galera_database, 3, scheduler_reload_seconds=0.5)
    client = clients_for(omas[:1])[0]
    try:
        schedule_ids = [client.schedules.CreateSchedule(schedules_pb2.CreateScheduleRequest(
            name=f"every-second-{index}", cron_expression="* * * * * *", skip_if_running=False),
            timeout=30).schedule.id for index in range(5)]
    finally:
        client.close()
    time.sleep(8)
    with bound_to(galera.nodes[1].url(galera_database)):
        models.ReplicationSchedule.update(enabled=False).execute()
        time.sleep(1.5)  # firings already admitted finish their transaction
        executions = list(models.ScheduleExecution.select().where(
            models.ScheduleExecution.triggered_by == SCHEDULER_OWNER))
    per_tick = Counter((execution.schedule_id, execution.scheduled_at) for execution in executions)
    for schedule_id in schedule_ids:
        ticks = [tick for (schedule, tick) in per_tick if schedule == schedule_id]
        assert len(ticks) >= 4, f"schedule {schedule_id} fired only {len(ticks)} ticks in 8 s"
    assert set(per_tick.values()) == {1}, sorted(count for count in per_tick.items() if count[1] > 1)
    assert all(execution.firing_key == f"{execution.schedule_id}@{execution.scheduled_at.isoformat()}"
               for execution in executions)
    firing_instances = Counter(execution.execution_details["instance"] for execution in executions)
    print(f"{len(per_tick)} firings, by instance: {dict(firing_instances)}")


def test_a_node_killed_mid_wave_loses_no_job_and_duplicates_none(galera, galera_database, oma_processes,
                                                                 black_hole):
    """A wave of creates (5 per VM, one idempotency key per VM) and group assignments (each VM to two groups at
    once) through the three OMAs; a third of the way in, node 3 dies (SIGKILL).  Callers repeat a call that got
    no answer through the next OMA.  Afterwards: one job per VM, the one every successful answer named; one
    group per VM, the one a successful assignment named — nothing a caller was told about is lost."""
    omas = oma_processes(galera_database, 3, vma_address=black_hole)
    with bound_to(galera.nodes[0].url(galera_database)):
        context_ids = prepare_vms(oma_processes.encryption_key, black_hole)
    clients = clients_for(omas)
    group_ids = [clients[0].groups.CreateGroup(mgpb.CreateGroupRequest(name=f"wave-{index}"), timeout=30).group.id
                 for index in range(2)]
    victim = galera.nodes[2]
    calls_started = threading.Semaphore(0)
    retried = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

    def repeated(call: int, rpc) -> object:
        """Call ``rpc(client)``; on an unavailable OMA or node, repeat it through the next OMA."""
        calls_started.release()
        for attempt in range(6):
            try:
                return rpc(clients[(call + attempt) % 3])
            except grpc.RpcError as exc:
                if exc.code() not in retried:
                    return exc.code()
                time.sleep(0.2)
        raise AssertionError(f"call {call} never got an answer")

    def create(call: int) -> tuple[str, object]:
        context_id = context_ids[call % VMS]
        request = rpb.CreateReplicationRequest(context_id=context_id, request_id=f"wave-{context_id}")
        return context_id, repeated(call, lambda client: client.replications.CreateReplication(
            request, timeout=15).job_id)

    def assign(call: int) -> tuple[str, str, object]:
        context_id, group_id = context_ids[call % VMS], group_ids[call // VMS % 2]
        request = mgpb.AssignVMRequest(group_id=group_id, vm_context_id=context_id)
        return context_id, group_id, repeated(call, lambda client: client.groups.AssignVM(request, timeout=15))

    def kill_mid_wave() -> None:
        for _ in range((CALLS + 2 * VMS) // 3):
            calls_started.acquire()
        galera.kill_node(victim)

    try:
        killer = threading.Thread(target=kill_mid_wave)
        killer.start()
        with ThreadPoolExecutor(16) as pool:
            creations = pool.map(create, range(CALLS))
            assignments = pool.map(assign, range(2 * VMS))
            created, assigned = list(creations), list(assignments)
        killer.join()
    finally:
        for client in clients:
            client.close()
    assert not victim.running
    # Every create answered with a job (repeats of the VM's request id name the first one's job).
    assert all(isinstance(job_id, str) for _, job_id in created), created
    answered = {context_id: job_id for context_id, job_id in created}
    assert len(answered) == VMS
    assert all(job_id == answered[context_id] for context_id, job_id in created), created
    # An assignment answered OK, or ALREADY_EXISTS (its first attempt committed, the answer was lost), or
    # FAILED_PRECONDITION (the VM's other assignment won).
    won = {(context_id, group_id) for context_id, group_id, outcome in assigned
           if not isinstance(outcome, grpc.StatusCode) or outcome == grpc.StatusCode.ALREADY_EXISTS}
    assert {outcome for _, _, outcome in assigned if isinstance(outcome, grpc.StatusCode)} <= {
        grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION}, assigned
    galera.wait_for_size(2)
    with bound_to(galera.nodes[0].url(galera_database)):
        assert jobs_per_vm(context_ids) == {context_id: [job_id] for context_id, job_id in answered.items()}
        memberships = [(m.vm_context_id, m.group_id) for m in models.VmGroupMembership.select()]
    assert sorted(memberships) == sorted(won)
    assert sorted(context_id for context_id, _ in memberships) == sorted(context_ids)  # one group per VM
