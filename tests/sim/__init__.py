"""A deterministic simulator of the mesh, around its real decision code.

In the style of FoundationDB's and TigerBeetle's simulation testing: one seed draws a small
mesh (2-5 nodes, 1-4 apps, tens of inputs) and a schedule of faults, and the world runs in
virtual time on one event loop, so the same seed always gives the same trace, byte for byte.

Real: `mesh.reconcile` (decide, plan_leave, plan_rebuild, handover_epoch, View, Running,
Held and the actions), `mesh.placement.Placement`, and the records `mesh.wire.NodeRecord`,
`AppSpec`, `OwnerRecord`. Modelled: everything around them: the broker (broker.py), the network
(net.py), the MQTT client (client.py), the node's executor (node.py, device.py), the app
(app.py), the publisher and operator (outside.py). Faults: faults.py; invariants:
invariants.py; one run: world.py; sweeps, shrinking, reports: runner.py; deliberate bugs:
mutants.py; the command line: `python -m tests.sim --help`.
"""
