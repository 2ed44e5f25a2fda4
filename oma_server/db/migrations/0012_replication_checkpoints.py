"""Checkpoints for resuming a replication after a VMA or OMA crash (issue 13, docs/design/resume.md):
``vm_disks.checkpoint_offset`` (every planned byte of the disk below it is on the replica, for the job in
``vm_disks.job_id``) and ``replication_jobs.vma_snapshot_moref`` (the snapshot the job reads, kept by the
VMA when it dies, so a resume reads the same snapshot with the same CBT base)."""
from peewee import BigIntegerField, CharField


def up(migrator, db):
    migrator.migrate(
        migrator.add_column('vm_disks', 'checkpoint_offset', BigIntegerField(null=True)),
        migrator.add_column('replication_jobs', 'vma_snapshot_moref', CharField(max_length=191, null=True)),
    )


def down(migrator, db):
    migrator.migrate(
        migrator.drop_column('replication_jobs', 'vma_snapshot_moref'),
        migrator.drop_column('vm_disks', 'checkpoint_offset'),
    )
