"""User-facing names of workflow steps (docs/design/jobs.md#step-names-and-error-categories), kept as data. Unknown names become Title Case."""
from __future__ import annotations

FRIENDLY_STEP_NAMES = {
    "validation": "Pre-flight Validation",
    "pre-flight-validation": "Pre-flight Validation",
    "source-vm-power-off": "Powering Off Source VM",
    "source-vm-power-on": "Powering On Source VM",
    "final-sync": "Final Data Synchronization",
    "multi-volume-snapshot-creation": "Creating Backup Snapshots",
    "cloudstack-volume-snapshot-creation": "Creating Storage Backup",
    "volume-mode-switch-failover": "Configuring Storage Mode",
    "volume-mode-switch-oma": "Preparing Storage Volumes",
    "virtio-driver-injection": "Preparing Drivers for Compatibility",
    "vm-creation": "Creating Destination VM",
    "volume-attachment": "Attaching Storage Volumes",
    "volume-detachment": "Detaching Storage Volumes",
    "volume-reattachment-to-oma": "Restoring Storage Configuration",
    "vm-startup-and-validation": "Starting and Validating VM",
    "status-update": "Updating VM Status",
    "failover-job-status-update": "Updating Operation Status",
    "vm-context-status-update": "Finalizing VM State",
    "failover-job-retrieval": "Retrieving Operation Details",
    "test-vm-shutdown": "Shutting Down Test VM",
    "test-vm-deletion": "Removing Test VM",
    "multi-volume-cleanup": "Cleaning Up Storage Snapshots",
    "cloudstack-snapshot-rollback": "Rolling Back to Backup",
    "cloudstack-snapshot-deletion": "Cleaning Up Backups",
    "multi-volume-snapshot-cleanup": "Restoring Volumes from Backup Snapshots",
    "legacy-cloudstack-snapshot-rollback": "Rolling Back to Backup",
    "legacy-cloudstack-snapshot-deletion": "Cleaning Up Backups",
    # failover compensation (a failed failover undone)
    "destination-vm-shutdown": "Stopping Destination VM",
    "destination-vm-deletion": "Removing Destination VM",
    # cleanup of a failed execution
    "analyze-volume-state": "Analyzing Volume State",
    "detach-attached-volumes": "Detaching Storage Volumes",
    "destroy-destination-vm": "Removing Destination VM",
    "cleanup-snapshots": "Cleaning Up Backups",
    "reattach-all-volumes": "Restoring Storage Configuration",
    "reset-vm-state": "Resetting VM State",
    # replication workflow
    "prepare-disks": "Preparing Disks",
    "provision-volumes": "Provisioning Replica Volumes",
    "attach-volumes": "Attaching Replica Volumes",
    "start-exports": "Starting NBD Exports",
    "start-transfer": "Starting Data Transfer",
    "transfer": "Transferring Data",
    "finalize": "Finalizing",
}


def friendly_step_name(name: str) -> str:
    return FRIENDLY_STEP_NAMES.get(name) or name.replace("-", " ").replace("_", " ").title()
