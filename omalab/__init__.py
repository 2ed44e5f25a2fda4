"""The local lab: every real part a migration needs, runnable on one machine without VMware or CloudStack.

* ``omalab.vcsim``: a simulated vCenter (govmomi's simulator extended in Go: raw disk files, exact CBT)
  and its Python harness ``VCSim``;
* ``omalab.cloudstack_emulator``: an emulator of the CloudStack API whose volumes are sparse files;
* ``omalab.servers``: the OMA server and the VMA agent started in this process;
* ``omalab.lab``: all of them wired together in one process (``start_lab``), for the end-to-end tests;
* ``omalab.processes``: supervision of separate processes (process groups, orphans, health);
* ``omalab.demo``: ``scripts/lab``, the same parts as separate processes driven through ``omactl``.

The tests use it through the fixtures in ``tests/fixtures/``; nothing here imports from ``tests/``.
"""
