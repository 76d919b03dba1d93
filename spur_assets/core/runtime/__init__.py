"""How work runs on a machine: device choice, the thread policy, process pools that stop with their caller."""
