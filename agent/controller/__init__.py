"""The fleet controller: a hawkBit-DDI-compatible update server for edgeops devices.

Modules:
    errors    typed errors, each mapped to one HTTP status in ``app``
    db        SQLite (default, WAL) or PostgreSQL: schema and portable SQL
    rollout   pure wave planning and health gating (no clock, no I/O)
    fleet     fleet operations on the database: devices, bundles, actions, rollouts
    app       the aiohttp application: DDI for devices, /api/v1 for operators
    regional  a controller with a parent: mirror while the WAN is up, serve from cache when down

Nothing on the device side imports this package (see docs/fleet-controller.md).
"""
