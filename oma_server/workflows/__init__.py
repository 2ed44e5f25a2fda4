"""Long-running work of the OMA: every workflow is a JobLog job of named steps run by one runner.

``runner`` (pool, jobs running here, keeper thread), ``lease`` (which process drives a job),
``steps`` (the step loop), ``hub`` (wakes progress watchers) are shared; ``replication`` and
``failover`` are the two engines, the failover family split into ``failover_steps``,
``compensation``, ``cleanup``, ``placement`` and ``error_rules``. docs/design/workflows.md explains
how a workflow runs and how to add a step.
"""
