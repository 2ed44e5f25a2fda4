"""vSphere (vCenter) through pyVmomi (package being split; see session.py)."""
from vma_agent.integrations.vsphere.session import *  # noqa: F403
from vma_agent.integrations.vsphere.session import __all__  # noqa: F401
